"""The authors' checkpoints and YAML files: AdelaiDet weights through MODEL.WEIGHTS, the original
release through ``python -m fcos_d2.convert``, their configs and spellings.

The foreign layouts are written here from /tmp/facts (AdelaiDet aim-uofa/AdelaiDet@36721221,
original FCOS tianzhi0549/FCOS@a773f128), independently of fcos_d2/checkpoint.py, so that a wrong
mapping there makes the round trips fail.
"""

import copy
import logging
import os
import pickle
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from helpers import config_path, fresh_cfg, shrink, synthetic_image

from fcos_d2.convert import main as convert
from fcos_d2.formats import adelaidet_key_to_ours, fcos_key_to_ours, frozen_bn_var_for_detectron2

EPS = 1e-5  # Detectron2's FrozenBatchNorm2d eps; maskrcnn-benchmark's has none


def small_cfg(backbone_norm="BN", num_classes=3):
    cfg = shrink(fresh_cfg(), config_path("configs/FCOS-Detection/Base-FCOS.yaml"))
    cfg.MODEL.RESNETS.NORM = backbone_norm
    cfg.MODEL.FCOS.NUM_CLASSES = num_classes
    cfg.MODEL.FCOS.INFERENCE_TH_TEST = 0.0  # keep the top 100 whatever the scores
    return cfg


_BUILT: dict = {}


def new_model(cfg):
    """``build_model(cfg)``, built once per config and copied: loads below replace every weight
    (the reports assert it), so a fresh initialization per test only costs time."""
    key = cfg.dump()
    if key not in _BUILT:
        torch.manual_seed(123)
        _BUILT[key] = build_model(cfg)
    return copy.deepcopy(_BUILT[key])


def randomized_model(cfg, seed=0):
    """Every parameter and statistic moved off its initial value, so every key matters."""
    model = new_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.empty(tensor.shape).uniform_(0.3, 2.0, generator=generator))
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            else:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return model.eval()


IMAGE = synthetic_image(64, 96, boxes=[[8, 10, 40, 50], [50, 12, 90, 60]], classes=[0, 2])


def detect(model):
    with torch.no_grad():
        return model.eval()([IMAGE])[0]["instances"]


@pytest.fixture(scope="module")
def source():
    """A randomized small model (BatchNorm backbone) and its detections; do not modify it."""
    model = randomized_model(small_cfg())
    return model, detect(model)


@pytest.fixture(scope="module")
def frozen_bn_source():
    """The same with FrozenBN everywhere in the backbone, as the original release's models."""
    model = randomized_model(small_cfg(backbone_norm="FrozenBN"))
    return model, detect(model)


def assert_same_detections(a, b):
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


# --- Foreign layouts, from the facts file ----------------------------------------------------


def adelaidet_layout(state, centerness=False, ddp=False):
    """AdelaiDet: Detectron2 backbone names; head at proposal_generator.fcos_head. (same
    sub-names); ``centerness`` instead of ``ctrness`` before AdelaiDet commit 281ee24."""
    out = OrderedDict()
    for key, value in state.items():
        if key.startswith("head."):
            name = key[len("head.") :]
            if centerness and name.startswith("ctrness."):
                name = "centerness." + name[len("ctrness.") :]
            key = "proposal_generator.fcos_head." + name
        out[("module." if ddp else "") + key] = value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(
            (re.sub(r"^head(?=\.|$)", "proposal_generator.fcos_head", k), v)
            for k, v in metadata.items()
        )
    return out


def original_fcos_layout(state):
    """tianzhi0549/FCOS (maskrcnn-benchmark) names, DDP ``module.`` prefix, and FrozenBN variances
    as its FrozenBatchNorm2d uses them (no eps): var_mb = var_d2 + eps."""
    out = OrderedDict()
    for key, value in state.items():
        p = key.split(".")
        if key.startswith("backbone.bottom_up.stem."):  # stem.conv1.weight, stem.conv1.norm.*
            name = "backbone.body.stem." + ("conv1.weight" if p[4] == "weight" else f"bn1.{p[5]}")
        elif key.startswith("backbone.bottom_up.res"):  # layer1..4 = res2..5
            layer = f"backbone.body.layer{int(p[2][3:]) - 1}.{p[3]}"
            if p[4] == "shortcut":
                name = f"{layer}.downsample." + ("0.weight" if p[5] == "weight" else f"1.{p[6]}")
            else:  # conv1..3.weight, conv1..3.norm.* -> bn1..3.*
                name = (
                    f"{layer}.{p[4]}.weight" if p[5] == "weight" else f"{layer}.bn{p[4][4]}.{p[6]}"
                )
        elif key.startswith("backbone.fpn_lateral"):  # fpn_inner2..4 = C3..C5
            name = f"backbone.fpn.fpn_inner{int(p[1][-1]) - 1}.{p[2]}"
        elif key.startswith("backbone.fpn_output"):
            name = f"backbone.fpn.fpn_layer{int(p[1][-1]) - 1}.{p[2]}"
        elif key.startswith("backbone.top_block."):
            name = "backbone.fpn.top_blocks." + ".".join(p[2:])
        elif key.startswith("head."):
            name = "rpn.head." + ".".join(p[1:]).replace("ctrness.", "centerness.")
        else:
            raise AssertionError(f"no original-FCOS name for {key}")
        if key.startswith("backbone.bottom_up.") and key.endswith("norm.running_var"):
            value = value + EPS
        out["module." + name] = value
    return out


def save(obj, path):
    torch.save(obj, str(path))
    return str(path)


def load_into(cfg, path):
    model = new_model(cfg)
    incompatible = DetectionCheckpointer(model).load(str(path))
    assert incompatible == {}  # the checkpointables it returns: none for a weights file
    return model


class CheckpointerLog(logging.Handler):
    """Warnings of fvcore's Checkpointer, which Detectron2 prints as its loading report."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("fvcore.common.checkpoint").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("fvcore.common.checkpoint").removeHandler(self)


def load_report(cfg, path):
    model = new_model(cfg)
    with CheckpointerLog() as log:
        DetectionCheckpointer(model).load(str(path))
    return model, log.messages


# --- AdelaiDet checkpoints through MODEL.WEIGHTS ----------------------------------------------


@pytest.mark.parametrize(
    "layout, wrapped",
    [
        (dict(), True),
        (dict(centerness=True), False),  # AdelaiDet before 2020-04-03; a bare state dict
        (dict(ddp=True), True),  # saved from a DistributedDataParallel model
    ],
    ids=["ctrness", "centerness-bare-state-dict", "module-prefix"],
)
def test_adelaidet_checkpoint_loads_with_identical_detections(source, tmp_path, layout, wrapped):
    model, detections = source
    foreign = adelaidet_layout(model.state_dict(), **layout)
    assert not any(k.startswith(("head.", "module.head.")) for k in foreign)
    path = save({"model": foreign} if wrapped else foreign, tmp_path / "adelaidet.pth")
    loaded, report = load_report(small_cfg(), path)
    assert report == []  # no missing, unexpected or skipped key
    assert_same_detections(detect(loaded), detections)


@pytest.mark.slow
def test_adelaidet_weights_in_default_predictor(source, tmp_path):
    cfg = small_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 160
    model = source[0]
    image = IMAGE["image"].permute(1, 2, 0).numpy().astype(np.uint8)  # HWC, BGR
    outputs = []
    for name, state in (
        ("ours", model.state_dict()),
        ("adelaidet", adelaidet_layout(model.state_dict())),
    ):
        cfg.MODEL.WEIGHTS = save({"model": state}, tmp_path / f"{name}.pth")
        outputs.append(DefaultPredictor(cfg)(image)["instances"])
    assert_same_detections(*outputs)


def test_fine_tuning_report_matches_detectron2s_own(source, tmp_path):
    """80 -> 5 classes in miniature: 3-class weights into a 5-class model skip cls_logits with
    the same report as a checkpoint already in our layout."""
    source = source[0]
    target_cfg = small_cfg(num_classes=5)
    ours = save({"model": source.state_dict()}, tmp_path / "ours.pth")
    theirs = save({"model": adelaidet_layout(source.state_dict())}, tmp_path / "theirs.pth")
    model_ours, report_ours = load_report(target_cfg, ours)
    model_theirs, report_theirs = load_report(target_cfg, theirs)
    assert report_theirs == report_ours
    assert (
        "Skip loading parameter 'head.cls_logits.weight' to the model due to incompatible "
        "shapes: (3, 64, 3, 3) in the checkpoint but (5, 64, 3, 3) in the model!"
    ) in report_theirs[0]
    assert any("head.cls_logits.{bias, weight}" in m for m in report_theirs)
    loaded = model_theirs.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("head.cls_logits."):
            assert torch.equal(loaded[key], value), key
    assert torch.equal(
        loaded["head.cls_logits.bias"], model_ours.state_dict()["head.cls_logits.bias"]
    )


def test_bn_head_metadata_and_missing_statistics_reported_as_for_our_layout():
    """FCOS-RT BN head (one BatchNorm per level, cls_tower.1.<level>.*): module versions travel
    with the renamed keys, so a missing num_batches_tracked is reported as Detectron2 would."""
    cfg = small_cfg()
    cfg.MODEL.FCOS.NORM = "BN"
    state = new_model(cfg).state_dict()
    assert "head.cls_tower.1.4.running_mean" in state
    dropped = "head.bbox_tower.1.0.num_batches_tracked"
    del state[dropped]
    reports = []
    for checkpoint in (state, adelaidet_layout(state)):
        model = new_model(cfg)
        reports.append(DetectionCheckpointer(model)._load_model({"model": checkpoint}))
    assert reports[1].missing_keys == reports[0].missing_keys == [dropped]
    assert reports[1].unexpected_keys == reports[0].unexpected_keys == []


def test_unknown_keys_are_reported_under_their_file_names(source):
    foreign = adelaidet_layout(source[0].state_dict())
    foreign["proposal_generator.fcos_head.bogus.weight"] = torch.zeros(3)
    foreign["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3)
    del foreign["proposal_generator.fcos_head.scales.2.scale"]
    report = DetectionCheckpointer(new_model(small_cfg()))._load_model({"model": foreign})
    assert sorted(report.unexpected_keys) == [
        "proposal_generator.fcos_head.bogus.weight",
        "roi_heads.box_predictor.cls_score.weight",
    ]
    assert report.missing_keys == ["head.scales.2.scale"]


def test_original_fcos_checkpoint_through_model_weights_says_to_convert(tmp_path):
    cfg = small_cfg(backbone_norm="FrozenBN")
    path = save({"model": original_fcos_layout(new_model(cfg).state_dict())}, tmp_path / "o.pth")
    with pytest.raises(ValueError, match="python -m fcos_d2.convert --from fcos"):
        load_into(cfg, path)


# --- The original release through the converter -----------------------------------------------


def test_original_fcos_round_trip_gives_identical_detections(frozen_bn_source, tmp_path, capsys):
    cfg = small_cfg(backbone_norm="FrozenBN")
    source, detections = frozen_bn_source
    foreign = original_fcos_layout(source.state_dict())
    assert all(
        k.startswith(("module.backbone.body.", "module.backbone.fpn.", "module.rpn.head."))
        for k in foreign
    )
    checkpoint = {
        "model": foreign,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "scheduler": {"last_epoch": 90000, "milestones": [60000, 80000]},
        "iteration": 90000,
    }
    path_in = save(checkpoint, tmp_path / "FCOS_imprv_R_50_FPN_1x.pth")
    path_out = tmp_path / "converted.pth"
    assert convert(["--from", "fcos", path_in, str(path_out)]) == 0
    out = capsys.readouterr().out
    assert "dropped top-level entries (not weights): iteration, optimizer, scheduler" in out
    written = torch.load(path_out, weights_only=True)
    assert written["matching_heuristics"] is False and "tianzhi0549/FCOS" in written["__author__"]
    assert set(written["model"]) == set(source.state_dict())

    model, report = load_report(cfg, path_out)
    assert report == []
    assert_same_detections(detect(model), detections)

    # The eps rewrite is what makes them identical: the release's variances as they are differ.
    naive = new_model(cfg)
    naive.load_state_dict(
        {
            k: v + EPS if k.startswith("backbone.") and k.endswith("running_var") else v
            for k, v in written["model"].items()
        }
    )
    assert not torch.equal(detect(naive).scores, detections.scores)


def test_adelaidet_conversion_to_pkl_loads_identically(source, tmp_path):
    model, detections = source
    foreign = adelaidet_layout(model.state_dict(), centerness=True)
    path_in = save({"model": foreign}, tmp_path / "a.pth")
    path_out = str(tmp_path / "converted.pkl")
    assert convert(["--from", "adelaidet", path_in, path_out]) == 0
    with open(path_out, "rb") as f:
        data = pickle.load(f)
    assert isinstance(data["model"]["head.ctrness.weight"], np.ndarray)
    loaded, report = load_report(small_cfg(), path_out)
    assert report == []
    assert_same_detections(detect(loaded), detections)


def test_every_key_of_an_r50_release_maps_as_the_facts_say(cfg):
    cfg.merge_from_file(config_path("configs/FCOS-Detection/R_50_1x.yaml"))
    state = new_model(cfg).state_dict()
    foreign = original_fcos_layout(state)
    # stem 5, 16 blocks x 3 convs x 5, 4 shortcuts x 5, FPN 16, towers 32, predictors 6, scales 5
    assert len(foreign) == len(state) == 324
    assert {fcos_key_to_ours(k) for k in foreign} == set(state)
    assert {adelaidet_key_to_ours(k) for k in adelaidet_layout(state)} == set(state)
    # Names read off the releases (facts file, section 2), C2..C5 = layer1..4 = res2..5.
    body, up = "module.backbone.body.", "backbone.bottom_up."
    known = {
        f"{body}stem.conv1.weight": f"{up}stem.conv1.weight",
        f"{body}stem.bn1.bias": f"{up}stem.conv1.norm.bias",
        f"{body}layer1.0.conv1.weight": f"{up}res2.0.conv1.weight",
        f"{body}layer4.2.bn3.running_var": f"{up}res5.2.conv3.norm.running_var",
        f"{body}layer2.0.downsample.0.weight": f"{up}res3.0.shortcut.weight",
        f"{body}layer3.0.downsample.1.weight": f"{up}res4.0.shortcut.norm.weight",
        "module.backbone.fpn.fpn_inner2.weight": "backbone.fpn_lateral3.weight",
        "module.backbone.fpn.fpn_layer4.bias": "backbone.fpn_output5.bias",
        "module.backbone.fpn.top_blocks.p7.weight": "backbone.top_block.p7.weight",
        "module.rpn.head.cls_tower.10.weight": "head.cls_tower.10.weight",
        "module.rpn.head.bbox_tower.9.bias": "head.bbox_tower.9.bias",
        "module.rpn.head.centerness.bias": "head.ctrness.bias",
        "module.rpn.head.scales.4.scale": "head.scales.4.scale",
    }
    assert {k: fcos_key_to_ours(k) for k in known} == known
    assert all(k in foreign for k in known)
    for unmapped in (
        "module.backbone.fpn.fpn_inner1.weight",  # does not exist in the release
        "module.backbone.body.layer3.0.conv2.offset.weight",  # dcnv2 backbone
        "module.rpn.head.cls_tower.9.conv.weight",  # dcnv2 tower
        "module.roi_heads.box.predictor.weight",
    ):
        assert fcos_key_to_ours(unmapped) is None, unmapped
    head = "proposal_generator.fcos_head."
    for key, ours in {
        f"{head}centerness.weight": "head.ctrness.weight",
        f"{head}cls_tower.1.2.running_mean": "head.cls_tower.1.2.running_mean",
        f"{up}res2.0.shortcut.norm.weight": f"{up}res2.0.shortcut.norm.weight",
        f"{up}level3.tree1.conv1.weight": None,  # DLA backbone
        f"{head}cls_tower.9.offset.weight": None,  # modulated deformable conv
    }.items():
        assert adelaidet_key_to_ours(key) == ours, key


def test_frozen_bn_variance_conversion_is_exact_where_float32_allows():
    generator = torch.Generator().manual_seed(0)
    d2 = torch.exp(torch.empty(1_000_000).uniform_(-16.0, 9.0, generator=generator))
    d2 = torch.cat([d2, torch.tensor([1.0 - EPS, 0.0, -EPS / 2])])
    released = d2 + EPS  # maskrcnn-benchmark's variance for the same normalization
    assert torch.equal(frozen_bn_var_for_detectron2(released) + EPS, released)
    assert frozen_bn_var_for_detectron2(torch.ones(1)).add(EPS).item() == 1.0
    # The documented exception: float32 x + 1e-5 never produces this variance.
    unreachable = torch.tensor([8.4683e-05])
    assert frozen_bn_var_for_detectron2(unreachable).add(EPS) != unreachable


def test_unmapped_keys_are_listed_and_block_the_output(tmp_path, capsys):
    state = new_model(small_cfg(backbone_norm="FrozenBN")).state_dict()
    foreign = original_fcos_layout(state)
    foreign["module.rpn.head.bogus.weight"] = torch.zeros(2)
    foreign["module.backbone.body.layer4.0.conv2.offset.weight"] = torch.zeros(2)
    path_in = save({"model": foreign}, tmp_path / "in.pth")
    path_out = tmp_path / "out.pth"
    assert convert(["--from", "fcos", path_in, str(path_out)]) == 1
    out = capsys.readouterr().out
    assert "2 keys have no fcos_d2 name" in out
    assert "UNMAPPED module.rpn.head.bogus.weight  (no fcos_d2 counterpart)" in out
    assert "UNMAPPED module.backbone.body.layer4.0.conv2.offset.weight  (deformable" in out
    assert not path_out.exists()
    assert convert(["--allow-unmapped", "--from", "fcos", path_in, str(path_out)]) == 0
    assert set(torch.load(path_out, weights_only=True)["model"]) == set(state)


def test_wrong_source_layout_is_named(tmp_path, capsys):
    state = new_model(small_cfg()).state_dict()
    path_in = save(adelaidet_layout(state), tmp_path / "in.pth")
    assert convert(["--from", "fcos", path_in, str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert f"error: {path_in}: has AdelaiDet's (aim-uofa/AdelaiDet) layout (keys " in err
    assert "proposal_generator.fcos_head." in err
    assert "not that of --from fcos: convert it with --from adelaidet" in err
    assert not (tmp_path / "out.pth").exists()


def _bad_input(tmp_path, name, content=None):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return str(path)


def test_bad_inputs_get_errors_naming_the_file(tmp_path, capsys):
    good = save({"model": {"backbone.fpn_lateral3.weight": torch.ones(4, 4)}}, tmp_path / "g.pth")
    data = open(good, "rb").read()
    cases = {
        _bad_input(tmp_path, "missing.pth"): "no such file",
        _bad_input(tmp_path, "truncated.pth", data[: len(data) // 2]): "not a readable checkpoint",
        _bad_input(tmp_path, "notes.pth", b"not a checkpoint\n"): "not a readable checkpoint",
        str(tmp_path): "is a directory",
        save([1, 2], tmp_path / "list.pth"): "expected a dict of tensors",
        save({"model": {"a": "text"}}, tmp_path / "str.pth"): "entry 'a' is a str, not a tensor",
        _bad_input(tmp_path, "c2.pkl", pickle.dumps({"blobs": {}})): "Caffe2",
    }
    for path, message in cases.items():
        assert convert(["--from", "adelaidet", path, str(tmp_path / "out.pth")]) == 2, path
        err = capsys.readouterr().err
        assert f"error: {path}: " in err and message in err, err


def test_files_that_need_full_unpickling_are_refused_unless_unsafe(tmp_path, capsys):
    """Weights that need unpickling other classes are refused; other entries that do (configs,
    mmengine's training state) are replaced by placeholders, never unpickled, and dropped."""
    import argparse

    state = {"backbone.fpn_lateral3.weight": torch.ones(4, 4)}
    out = str(tmp_path / "out.pth")
    pkl = _bad_input(
        tmp_path,
        "cfg.pkl",
        pickle.dumps(
            {
                "model": {k: v.numpy() for k, v in state.items()},
                "__author__": "x",
                "cfg": argparse.Namespace(),
            }
        ),
    )
    refused = [
        # The class is inside the weights.
        save({"model": {**state, "cfg": argparse.Namespace(lr=0.01)}}, tmp_path / "in.pth"),
        # The whole file is an object.
        save(argparse.Namespace(lr=0.01), tmp_path / "object.pth"),
        # Detectron2's .pkl files are read with numpy arrays allowed, nothing else.
        pkl,
    ]
    for path in refused:
        assert convert(["--from", "adelaidet", path, out]) == 2
        err = capsys.readouterr().err
        assert f"error: {path}: " in err and "argparse.Namespace" in err, err
        assert "weights_only loading does not allow" in err and "--unsafe-load" in err
    assert convert(["--unsafe-load", "--from", "adelaidet", pkl, out]) == 0

    outside = save({"model": state, "cfg": argparse.Namespace(lr=0.01)}, tmp_path / "cfg.pth")
    assert convert(["--from", "adelaidet", outside, out]) == 0
    printed = capsys.readouterr().out
    assert "dropped top-level entries (not weights): cfg" in printed
    assert (
        "not read (objects outside the weights that weights_only loading does not allow): "
        "argparse.Namespace"
    ) in printed
    assert set(torch.load(out, weights_only=True)["model"]) == set(state)


def test_detectron2_model_zoo_pkl_input_is_read_without_full_unpickling(tmp_path):
    state = new_model(small_cfg()).state_dict()
    zoo = {"model": {k: v.numpy() for k, v in adelaidet_layout(state).items()}, "__author__": "x"}
    path_in = _bad_input(tmp_path, "zoo.pkl", pickle.dumps(zoo))
    assert convert(["--from", "adelaidet", path_in, str(tmp_path / "out.pth")]) == 0
    written = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert all(torch.equal(written[k], v) for k, v in state.items())


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    import subprocess
    import sys

    missing = str(tmp_path / "missing.pth")
    result = subprocess.run(
        [sys.executable, "-m", "fcos_d2.convert", "--from", "fcos", missing, str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": config_path(".")},
    )
    assert result.returncode == 2 and f"error: {missing}: no such file" in result.stderr


@pytest.mark.slow
def test_train_net_fine_tuning_and_eval_only_from_adelaidet_weights(tmp_path):
    """The two train_net.py paths: Trainer.resume_or_load (MODEL.WEIGHTS as the start of
    training) and --eval-only, fed an AdelaiDet-layout file of a quickstart model."""
    from helpers import QUICKSTART, args_for, tiny_opts

    from fcos_d2.config import build_cfg
    from fcos_d2.engine import Trainer, main, setup

    opts = tiny_opts(tmp_path, max_iter=4, **{"MODEL.FCOS.INFERENCE_TH_TEST": 0.0})
    source = randomized_model(build_cfg(QUICKSTART, opts + ["MODEL.WEIGHTS", ""]))
    weights = {
        "ours": save({"model": source.state_dict()}, tmp_path / "ours.pth"),
        "adelaidet": save({"model": adelaidet_layout(source.state_dict())}, tmp_path / "a.pth"),
    }
    trainer = Trainer(setup(args_for(opts + ["MODEL.WEIGHTS", weights["adelaidet"]])))
    with CheckpointerLog() as log:
        trainer.resume_or_load(resume=False)
    assert log.messages == []
    loaded = trainer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())

    results = {}
    for name, path in weights.items():
        with CheckpointerLog() as log:
            results[name] = main(args_for(opts + ["MODEL.WEIGHTS", path], eval_only=True))
        assert log.messages == []
    assert repr(results["adelaidet"]) == repr(results["ours"])  # per-class APs may be NaN
    assert results["ours"]["bbox"]["AP"] >= 0  # not NaN: the random model does output boxes
