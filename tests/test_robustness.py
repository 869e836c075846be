"""Robustness: every shipped config loads the Detectron2 way, and bad inputs either work as
documented or stop with an error that names the problem."""

import glob
import math
import re

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from helpers import (
    QUICKSTART,
    REPO,
    config_path,
    drop_closed_log_handlers,
    load_script,
    run_python,
    shapes_root,
    synthetic_image,
    tiny_opts,
)
from PIL import Image

from fcos_d2 import add_fcos_config
from fcos_d2.config import build_cfg
from fcos_d2.data.images import ImageReadError, read_image_bgr, to_bgr_uint8
from fcos_d2.modeling.box_ops import compute_locations
from fcos_d2.modeling.targets import FCOSTargetAssigner

SHIPPED_YAMLS = sorted(glob.glob(config_path("configs/**/*.yaml"), recursive=True))


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED_YAMLS, ids=lambda p: p.split("configs/")[1])
def test_every_shipped_yaml_merges_into_a_plain_detectron2_config_and_builds(path):
    cfg = add_fcos_config(get_cfg())
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


GOOD = [10.0, 12.0, 60.0, 50.0]
# Each bad box with what happens to it: clipped to the image (128 x 96) like Detectron2's
# DatasetMapper does, or ignored (None).
BAD_BOXES = [
    ([30.0, 30.0, 30.0, 70.0], None),  # zero width
    ([80.0, 40.0, 50.0, 90.0], None),  # inverted
    ([float("nan"), 20.0, 60.0, 70.0], None),  # NaN
    ([200.0, 10.0, 260.0, 60.0], None),  # entirely outside (right of x = 128)
    ([70.0, 20.0, float("inf"), 80.0], [70.0, 20.0, 128.0, 80.0]),  # inf: to the image edge
    ([-30.0, 40.0, 40.0, 120.0], [0.0, 40.0, 40.0, 96.0]),  # partly outside
]


def _targets(boxes, classes):
    assigner = FCOSTargetAssigner(strides=[8, 16], sizes_of_interest=[48], num_classes=4)
    locations = compute_locations([(12, 16), (6, 8)], [8, 16], torch.device("cpu"))
    gt = Instances((96, 128), gt_boxes=Boxes(torch.tensor(boxes)), gt_classes=torch.tensor(classes))
    return assigner(locations, [gt])


def test_bad_boxes_from_a_custom_mapper_train_as_their_clipped_or_absent_selves():
    boxes = [GOOD] + [box for box, _ in BAD_BOXES]
    classes = list(range(len(boxes)))
    classes = [c % 4 for c in classes]
    kept = [(0, GOOD)] + [(i + 1, fixed) for i, (_, fixed) in enumerate(BAD_BOXES) if fixed]
    with_bad = _targets(boxes, classes)
    clean = _targets([box for _, box in kept], [classes[i] for i, _ in kept])
    assert torch.equal(with_bad.labels, clean.labels)
    assert torch.equal(with_bad.reg_targets, clean.reg_targets)
    assert torch.isfinite(with_bad.reg_targets).all()
    # Indices refer to the original instances: the clipped boxes keep theirs.
    mapping = torch.tensor([-1] + [i for i, _ in kept])
    assert torch.equal(with_bad.matched_gt, mapping[clean.matched_gt + 1])
    assert set(with_bad.matched_gt.unique().tolist()) == {-1, 0, 5, 6}


def test_bad_boxes_give_finite_losses_and_gradients(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    batch = [synthetic_image(96, 128)]
    batch[0]["instances"] = Instances(
        (96, 128),
        gt_boxes=Boxes(torch.tensor([GOOD] + [box for box, _ in BAD_BOXES])),
        gt_classes=torch.tensor([0, 1, 2, 0, 1, 2, 0]),
    )
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_boxes_through_detectron2_datasetmapper_are_dropped_or_clipped(tmp_path):
    Image.fromarray(np.zeros((96, 128, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    record = {
        "file_name": str(tmp_path / "a.png"),
        "height": 96,
        "width": 128,
        "image_id": 1,
        "annotations": [
            {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}
            for box in [GOOD] + [b for b, _ in BAD_BOXES]
        ],
    }
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    instances = mapper(record)["instances"]
    expected = [GOOD] + [fixed for _, fixed in BAD_BOXES if fixed]
    assert instances.gt_boxes.tensor.tolist() == expected


def test_a_batch_without_any_positive_location(tiny_cfg):
    # 2 x 2 boxes between the stride-8 locations (4, 12, ...): no location of any level is inside.
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    batch = [
        synthetic_image(boxes=[[5, 5, 7, 7], [57, 90, 59, 92]], classes=[0, 1]),
        synthetic_image(boxes=[[21, 13, 23, 15]], classes=[2], seed=1),
    ]
    with EventStorage() as storage:
        losses = model(batch)
        sum(losses.values()).backward()
        assert storage.latest()["fcos/num_pos_per_worker"][0] == 0
    assert losses["loss_fcos_loc"].item() == 0 and losses["loss_fcos_ctr"].item() == 0
    assert math.isfinite(losses["loss_fcos_cls"].item()) and losses["loss_fcos_cls"].item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _odd_images(folder):
    """Grayscale, RGBA, 16-bit, palette and EXIF-rotated files, with what they must read as."""
    folder.mkdir()
    expected = {}
    Image.fromarray(np.full((20, 30), 77, dtype=np.uint8)).save(folder / "gray.png")
    expected["gray.png"] = np.full((20, 30, 3), 77, dtype=np.uint8)
    Image.fromarray(np.dstack([np.full((20, 30), v, np.uint8) for v in (200, 100, 50, 0)])).save(
        folder / "rgba.png"
    )
    expected["rgba.png"] = np.dstack([np.full((20, 30), v, np.uint8) for v in (50, 100, 200)])
    sixteen = np.zeros((20, 30), dtype=np.uint16)
    sixteen[:, 15:] = 65535
    sixteen[:10, :15] = 32768
    Image.fromarray(sixteen).save(folder / "deep.png")
    eight = np.zeros((20, 30), dtype=np.uint8)
    eight[:, 15:] = 255
    eight[:10, :15] = 128
    expected["deep.png"] = np.repeat(eight[:, :, None], 3, axis=2)
    Image.fromarray(np.full((20, 30, 3), (0, 0, 255), np.uint8)).convert("P").save(
        folder / "palette.png"
    )
    expected["palette.png"] = np.full((20, 30, 3), (255, 0, 0), np.uint8)
    # A 30 x 20 (W x H) JPEG stored sideways: EXIF orientation 6 means "rotate 90 degrees clockwise
    # to view", so it reads as 20 x 30 (W x H) with its top rows, red, becoming the right columns.
    stored = np.full((20, 30, 3), 255, np.uint8)
    stored[:4, :] = (255, 0, 0)
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=100)
    expected["rotated.jpg"] = None  # checked by shape and red column below
    return expected


def test_odd_image_files_read_upright_as_3_channel_bgr(tmp_path):
    expected = _odd_images(tmp_path / "odd")
    for name, pixels in expected.items():
        image = read_image_bgr(tmp_path / "odd" / name)
        assert image.dtype == np.uint8 and image.shape[2] == 3, name
        if pixels is not None:
            assert np.array_equal(image, pixels), name
    rotated = read_image_bgr(tmp_path / "odd" / "rotated.jpg")
    assert rotated.shape == (30, 20, 3)
    assert (rotated[:, -1, 2] > 200).all() and (rotated[:, -1, 0] < 60).all()  # red (BGR)
    assert (rotated[:, 0] > 200).all()  # white
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="junk.png is not a readable image"):
        read_image_bgr(tmp_path / "junk.png")
    with pytest.raises(ImageReadError, match="nothing.png does not exist"):
        read_image_bgr(tmp_path / "nothing.png")
    with pytest.raises(ImageReadError, match=r"got shape \(4, 4, 2\)"):
        to_bgr_uint8(np.zeros((4, 4, 2), np.uint8))


def test_predictor_takes_paths_and_odd_arrays_like_their_bgr_versions(tmp_path):
    from detectron2.engine import DefaultPredictor

    from fcos_d2.inference.predictor import FCOSPredictor

    cfg = build_cfg(QUICKSTART, ["MODEL.DEVICE", "cpu", "MODEL.FCOS.INFERENCE_TH_TEST", "0.0"])
    torch.manual_seed(0)
    predictor = FCOSPredictor(cfg)
    reference = DefaultPredictor(cfg)
    reference.model.load_state_dict(predictor.model.state_dict())
    gray = (np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)
    for odd, bgr in (
        (gray, np.repeat(gray[:, :, None], 3, axis=2)),
        (
            np.dstack([gray, gray // 2, gray // 3, np.zeros_like(gray)]),
            np.dstack([gray, gray // 2, gray // 3]),
        ),
        (gray.astype(np.uint16) * 257, np.repeat(gray[:, :, None], 3, axis=2)),
    ):
        got = predictor(odd)["instances"]
        want = reference(bgr)["instances"]
        assert len(want) > 0
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
        assert torch.equal(got.scores, want.scores)
    Image.fromarray(gray).save(tmp_path / "g.png")
    from_path = predictor(tmp_path / "g.png")["instances"]
    assert torch.equal(
        from_path.scores, reference(np.repeat(gray[:, :, None], 3, axis=2))["instances"].scores
    )


@pytest.mark.slow
def test_demo_reads_odd_files_and_names_bad_inputs(tmp_path):
    cfg = build_cfg(QUICKSTART, ["MODEL.DEVICE", "cpu"])
    weights = tmp_path / "w.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    _odd_images(tmp_path / "odd")
    demo = ["demo.py", "--config-file", QUICKSTART, "--output", str(tmp_path / "vis")]
    opts = ["MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu"]
    done = run_python(*demo, "--input", str(tmp_path / "odd"), *opts)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote 5 annotated images" in done.stdout
    (tmp_path / "empty").mkdir()
    done = run_python(*demo, "--input", str(tmp_path / "empty"), *opts)
    assert done.returncode != 0 and "empty holds no images" in done.stderr


LAZY_QUICKSTART = config_path("configs/LazyConfig/fcos_R_18_shapes.py")
# The same mistakes made with each train script: (train_net.py arguments, lazyconfig_train_net.py
# arguments, what both messages name).
SCRIPT_MISTAKES = {
    "missing config": (
        ["--config-file", "nope.yaml"],
        ["--config-file", "nope.py"],
        "does not exist",
    ),
    "unknown key": (
        ["--config-file", QUICKSTART, "MODEL.FCOS.NUM_CLASSSES", "3"],
        ["--config-file", LAZY_QUICKSTART, "model.head.num_clases=3"],
        "NUM_CLASSSES|num_clases",
    ),
    "wrong type": (
        ["--config-file", QUICKSTART, "MODEL.FCOS.NUM_CLASSES", "many"],
        ["--config-file", LAZY_QUICKSTART, "train.max_iter=many"],
        "Type mismatch|train.max_iter must be an integer",
    ),
    "bad value": (
        ["--config-file", QUICKSTART, "MODEL.FCOS.NORM", "LN"],
        ["--config-file", LAZY_QUICKSTART, "model.head.norm=LN"],
        "must be one of",
    ),
    "missing weights": (
        ["--config-file", QUICKSTART, "--eval-only", "MODEL.WEIGHTS", "none.pth"],
        ["--config-file", LAZY_QUICKSTART, "--eval-only", "train.init_checkpoint=none.pth"],
        "none.pth does not exist",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", sorted(SCRIPT_MISTAKES))
@pytest.mark.parametrize("script", ["train_net.py", "lazyconfig_train_net.py"])
def test_both_train_scripts_report_the_same_mistakes_in_one_line(
    tmp_path, capsys, monkeypatch, script, mistake
):
    monkeypatch.chdir(tmp_path)  # the relative missing files, the outputs
    yacs, lazy, message = SCRIPT_MISTAKES[mistake]
    if script == "train_net.py":  # the data and outputs of the tests, registered once
        arguments = yacs + tiny_opts(tmp_path, 3)
    else:
        shrunk = [f"datasets.root={shapes_root()}", "datasets.num_train=16", "datasets.num_val=8"]
        shrunk += ["datasets.image_size=[128,128]", "train.device=cpu"]
        arguments = lazy + shrunk + [f"train.output_dir={tmp_path / 'o'}"]
    if mistake == "missing config":
        arguments = arguments[:2]
    drop_closed_log_handlers()
    status = load_script(script).main(arguments)
    err = capsys.readouterr().err
    assert status == 2, err[-1500:]
    (line,) = [x for x in err.splitlines() if f"{script}: error:" in x]
    assert re.search(message, line), line
    assert "Traceback" not in err


@pytest.mark.slow
def test_train_scripts_and_demo_exit_2_on_bad_weights_as_processes(tmp_path):
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    cut = str(tmp_path / "cut.pth")
    done = run_python(
        str(REPO / "train_net.py"), "--config-file", QUICKSTART, "--eval-only",
        "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "o"), "MODEL.WEIGHTS", cut,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-1500:]
    assert f"train_net.py: error: MODEL.WEIGHTS: {cut} is not a readable checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_python(
        str(REPO / "lazyconfig_train_net.py"), "--config-file", LAZY_QUICKSTART,
        "MODEL.WEIGHTS", cut,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert "lazyconfig_train_net.py: error: in the command-line overrides" in done.stderr
    assert "key=value" in done.stderr
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    done = run_python(
        str(REPO / "demo.py"),
        "--config-file",
        QUICKSTART,
        "--input",
        str(tmp_path / "imgs"),
        "--output",
        str(tmp_path / "vis"),
        "MODEL.WEIGHTS",
        cut,
    )
    assert done.returncode == 2 and "cut.pth is not a readable checkpoint" in done.stderr


def test_image_lists_end_at_the_first_config_key(tmp_path, monkeypatch):
    from fcos_d2.cli import split_config_overrides

    images, opts = split_config_overrides(
        ["a.jpg", "folder/", "MODEL.WEIGHTS", "w.pth"], ["MODEL.DEVICE", "cpu"]
    )
    assert images == ["a.jpg", "folder/"]
    assert opts == ["MODEL.WEIGHTS", "w.pth", "MODEL.DEVICE", "cpu"]
    # Top-level keys count; names that are not config sections stay inputs (reported if missing).
    assert split_config_overrides(["a.jpg", "OUTPUT_DIR", "o"], []) == (
        ["a.jpg"],
        ["OUTPUT_DIR", "o"],
    )
    assert split_config_overrides(["IMG_0001.JPG", "DSC.jpg"], []) == (
        ["IMG_0001.JPG", "DSC.jpg"],
        [],
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "MODEL.PNG").write_bytes(b"")  # an existing file stays an input, whatever its name
    assert split_config_overrides(["MODEL.PNG"], []) == (["MODEL.PNG"], [])


class _NotATensor:
    """Stands for any Python object a checkpoint should not need to unpickle."""


def test_checkpoints_load_weights_only(tmp_path):
    from fcos_d2.checkpoint import FCOSCheckpointer
    from fcos_d2.checks import ConfigError

    model = torch.nn.Linear(2, 2)
    path = tmp_path / "odd.pth"
    torch.save({"model": model.state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(ConfigError, match=r"odd.pth stores a Python object \(.*_NotATensor\)"):
        FCOSCheckpointer(torch.nn.Linear(2, 2)).load(str(path))
    torch.save({"model": model.state_dict(), "iteration": 3}, path)
    loaded = torch.nn.Linear(2, 2)
    assert FCOSCheckpointer(loaded).load(str(path))["iteration"] == 3
    assert torch.equal(loaded.weight, model.weight)


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_loads_what_fits_and_names_the_rest(cfg):
    """Detectron2's RetinaNet weights into FCOS R-50: the backbone loads except P6 (RetinaNet's
    comes from C5, FCOS's from P5: another shape), RetinaNet's head is 'unexpected' except
    bbox_pred (skipped for its shape), FCOS's head 'missing'; another class count skips
    cls_logits for its shape."""
    from fcos_d2.checkpoint import FCOSCheckpointer

    retina_cfg = get_cfg()
    retina_cfg.merge_from_list(
        ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.DEVICE", "cpu"]
        + ["MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"]
        + ["MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"]]
        + ["MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]]
    )
    retina = build_model(retina_cfg).state_dict()
    cfg.merge_from_file(config_path("configs/FCOS-Detection/R_50_1x.yaml"))
    fcos = build_model(cfg)
    report = FCOSCheckpointer(fcos)._load_model({"model": dict(retina)})
    assert torch.equal(
        fcos.backbone.bottom_up.stem.conv1.weight, retina["backbone.bottom_up.stem.conv1.weight"]
    )
    assert "head.cls_subnet.0.weight" in report.unexpected_keys
    assert "head.cls_logits.weight" in report.missing_keys
    assert [k for k in report.missing_keys if k.startswith("backbone.")] == [
        "backbone.top_block.p6.weight"
    ]
    # Same names, other shapes: P6 from C5, and RetinaNet's 9 anchors x 4 box outputs.
    assert sorted(k for k, *_ in report.incorrect_shapes) == [
        "backbone.top_block.p6.weight",
        "head.bbox_pred.bias",
        "head.bbox_pred.weight",
    ]
    other_classes = {k: v for k, v in fcos.state_dict().items()}
    other_classes["head.cls_logits.weight"] = torch.zeros(3, 256, 3, 3)
    other_classes["head.cls_logits.bias"] = torch.zeros(3)
    report = FCOSCheckpointer(build_model(cfg))._load_model({"model": other_classes})
    assert sorted(k for k, *_ in report.incorrect_shapes) == [
        "head.cls_logits.bias",
        "head.cls_logits.weight",
    ]
