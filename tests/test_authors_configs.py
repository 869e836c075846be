"""The authors' YAML files and spellings, and the configs of their released models.

AdelaiDet's files are written out below as they are in aim-uofa/AdelaiDet@36721221
(configs/FCOS-Detection, facts file section 4); the original release's settings come from
tianzhi0549/FCOS@a773f128 (configs/fcos/*.yaml, fcos_core/config/defaults.py).
"""

import pytest
import torch
from detectron2.modeling import build_model
from helpers import config_path, fresh_cfg, synthetic_image

from fcos_d2.engine import Trainer

AUTHORS_FILES = {
    "Base-FCOS.yaml": """\
MODEL:
  META_ARCHITECTURE: "OneStageDetector"
  BACKBONE:
    NAME: "build_fcos_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res3", "res4", "res5"]
  PROPOSAL_GENERATOR:
    NAME: "FCOS"
  # PIXEL_MEAN: [102.9801, 115.9465, 122.7717]
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.01  # Note that RetinaNet uses a different default learning rate
  STEPS: (60000, 80000)
  MAX_ITER: 90000
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
""",
    "R_50_1x.yaml": """\
_BASE_: "Base-FCOS.yaml"
MODEL:
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  RESNETS:
    DEPTH: 50
INPUT:
  MIN_SIZE_TRAIN: (800,)
OUTPUT_DIR: "output/fcos/R_50_1x"
""",
    "MS_R_50_2x.yaml": """\
_BASE_: "Base-FCOS.yaml"
MODEL:
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  RESNETS:
    DEPTH: 50
SOLVER:
  STEPS: (120000, 160000)
  MAX_ITER: 180000
OUTPUT_DIR: "output/fcos/R_50_2x"
""",
    "FCOS_RT/MS_R_50_4x_syncbn_bn_head.yaml": """\
_BASE_: "../Base-FCOS.yaml"
INPUT:
  MIN_SIZE_TRAIN: (256, 288, 320, 352, 384, 416, 448, 480, 512, 544, 576, 608)
  MAX_SIZE_TRAIN: 900
  MAX_SIZE_TEST: 736
  MIN_SIZE_TEST: 512
MODEL:
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  RESNETS:
    DEPTH: 50
    NORM: "SyncBN"
  FCOS:
    TOP_LEVELS: 0
    SIZES_OF_INTEREST: [64, 128]
    FPN_STRIDES: [8, 16, 32]
    IN_FEATURES: ['p3', 'p4', 'p5']
    NORM: "SyncBN"
SOLVER:
  STEPS: (300000, 340000)
  MAX_ITER: 360000
OUTPUT_DIR: "output/fcos/FCOS_RT_MS_R_50_4x_syncbn_bn_head"
""",
}
OUR_FILES = {
    "R_50_1x.yaml": "configs/FCOS-Detection/R_50_1x.yaml",
    "MS_R_50_2x.yaml": "configs/FCOS-Detection/MS_R_50_2x.yaml",
    "FCOS_RT/MS_R_50_4x_syncbn_bn_head.yaml": (
        "configs/FCOS-Detection/FCOS_RT/MS_R_50_4x_syncbn_bn_head.yaml"
    ),
}
MASKRCNN_BENCHMARK_PIXEL_MEAN = [102.9801, 115.9465, 122.7717]


def write_authors_files(folder, as_a_user_fixes_them: bool):
    for name, text in AUTHORS_FILES.items():
        if as_a_user_fixes_them and name == "Base-FCOS.yaml":
            text = text.replace('"OneStageDetector"', '"FCOS"')
            text = text.replace('  PROPOSAL_GENERATOR:\n    NAME: "FCOS"\n', "")
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def small_forward(cfg):
    """Build ``cfg`` with a small ResNet-18 / 64-channel FPN (norms untouched) and detect."""
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        (out,) = model([synthetic_image(64, 96, boxes=[[8, 8, 40, 40]], classes=[1])])
    assert out["instances"].image_size == (64, 96)
    return model


def test_authors_meta_architecture_name_says_what_to_write(tmp_path):
    write_authors_files(tmp_path, as_a_user_fixes_them=False)
    for name in OUR_FILES:
        cfg = fresh_cfg()
        cfg.merge_from_file(str(tmp_path / name))
        with pytest.raises(ValueError, match='set MODEL.META_ARCHITECTURE: "FCOS" and drop MODEL'):
            build_model(cfg)


def authors_cfg(folder, name):
    cfg = fresh_cfg()
    cfg.merge_from_file(str(folder / name))
    return cfg


@pytest.mark.parametrize("name", sorted(OUR_FILES))
def test_authors_files_merge_into_the_same_config_as_ours(tmp_path, name):
    write_authors_files(tmp_path, as_a_user_fixes_them=True)
    theirs, ours = authors_cfg(tmp_path, name), fresh_cfg()
    ours.merge_from_file(config_path(OUR_FILES[name]))
    theirs.OUTPUT_DIR = ours.OUTPUT_DIR
    assert theirs == ours


@pytest.mark.parametrize("name", ["R_50_1x.yaml", "FCOS_RT/MS_R_50_4x_syncbn_bn_head.yaml"])
def test_authors_files_build_and_detect(tmp_path, name):
    write_authors_files(tmp_path, as_a_user_fixes_them=True)
    model = small_forward(authors_cfg(tmp_path, name))
    if name.startswith("FCOS_RT/"):
        assert model.head_in_features == ["p3", "p4", "p5"]
        keys = set(model.state_dict())
        assert "head.cls_tower.1.2.running_mean" in keys  # one BatchNorm per level, 3 levels
        assert "head.cls_tower.1.3.running_mean" not in keys
        assert not any(k.startswith("backbone.top_block") for k in keys)


def test_rt_config_without_bn_head_differs_only_by_the_head_norm():
    plain, bn_head = fresh_cfg(), fresh_cfg()
    plain.merge_from_file(config_path("configs/FCOS-Detection/FCOS_RT/MS_R_50_4x_syncbn.yaml"))
    bn_head.merge_from_file(config_path(OUR_FILES["FCOS_RT/MS_R_50_4x_syncbn_bn_head.yaml"]))
    assert (plain.MODEL.FCOS.NORM, bn_head.MODEL.FCOS.NORM) == ("GN", "SyncBN")
    bn_head.MODEL.FCOS.NORM, bn_head.OUTPUT_DIR = "GN", plain.OUTPUT_DIR
    assert plain == bn_head


@pytest.mark.parametrize(
    "name, paper_model",
    [("FCOS_imprv_R_50_FPN_1x.yaml", False), ("FCOS_R_50_FPN_1x.yaml", True)],
)
def test_original_release_configs(name, paper_model):
    cfg = fresh_cfg()
    cfg.merge_from_file(config_path(f"configs/FCOS-Detection/original/{name}"))
    assert cfg.MODEL.PIXEL_MEAN == MASKRCNN_BENCHMARK_PIXEL_MEAN
    assert cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]
    assert cfg.DATASETS.TRAIN == ("coco_2014_train", "coco_2014_valminusminival")
    assert cfg.DATASETS.TEST == ("coco_2014_minival",)
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN) == ((800,), 1333)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == (
        0.01,
        (60000, 80000),
        90000,
    )
    assert (cfg.SOLVER.WARMUP_METHOD, cfg.SOLVER.WARMUP_ITERS) == ("constant", 500)
    assert cfg.SOLVER.WARMUP_FACTOR == pytest.approx(1 / 3)
    fcos = cfg.MODEL.FCOS
    # NORM_REG_TARGETS, CENTERNESS_ON_REG, CENTER_SAMPLING_RADIUS 1.5, giou in the imprv file;
    # maskrcnn-benchmark defaults (False, False, 0, "iou", exp regression) in the paper one.
    improved = (True, True, True, "giou", "relu")
    paper = (False, False, False, "iou", "exp")
    settings = (
        fcos.NORM_REG_TARGETS,
        fcos.CENTERNESS_ON_REG,
        fcos.CENTER_SAMPLE,
        fcos.LOC_LOSS_TYPE,
        fcos.BOX_ACTIVATION,
    )
    assert settings == (paper if paper_model else improved)
    assert fcos.POS_RADIUS == 1.5 or paper_model


def test_original_release_optimizer_groups_follow_maskrcnn_benchmark(tiny_cfg):
    """maskrcnn-benchmark's make_optimizer: every parameter with "bias" in its name gets
    lr x BIAS_LR_FACTOR (2) and WEIGHT_DECAY_BIAS (0); everything else, GroupNorm weights
    included, lr and WEIGHT_DECAY (1e-4)."""
    tiny_cfg.merge_from_file(
        config_path("configs/FCOS-Detection/original/FCOS_imprv_R_50_FPN_1x.yaml")
    )
    tiny_cfg.MODEL.RESNETS.DEPTH = 18  # the merge brought R-50 back
    tiny_cfg.MODEL.WEIGHTS = ""
    model = build_model(tiny_cfg)
    optimizer = Trainer.build_optimizer(tiny_cfg, model)
    settings = {
        id(p): (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        for p in group["params"]
    }
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(".norm" not in n and "tower.1." in n for n, _ in trainable)  # GN weights exist
    for name, param in trainable:
        expected = (0.02, 0.0) if "bias" in name else (0.01, 1e-4)
        assert settings[id(param)] == pytest.approx(expected), name


def test_no_norm_spellings_none_and_empty_are_the_same_head(tiny_cfg):
    """AdelaiDet writes "none" for no norm; Detectron2's convention is ""."""
    from detectron2.layers import ShapeSpec

    from fcos_d2.modeling.head import FCOSHead

    shapes = [ShapeSpec(channels=64, stride=s) for s in (8, 16)]
    features = [torch.randn(1, 64, 8, 12), torch.randn(1, 64, 4, 6)]
    heads = {}
    for norm in ("none", "", "GN"):
        tiny_cfg.MODEL.FCOS.NORM = norm
        torch.manual_seed(0)
        heads[norm] = FCOSHead(tiny_cfg, shapes)
    assert list(heads["none"].state_dict()) == list(heads[""].state_dict())
    assert "cls_tower.1.weight" in heads["GN"].state_dict()
    assert "cls_tower.1.weight" not in heads[""].state_dict()
    outputs = {norm: head(features) for norm, head in heads.items()}
    for field in ("cls_logits", "box_reg", "quality_logits"):
        for a, b in zip(getattr(outputs["none"], field), getattr(outputs[""], field)):
            assert torch.equal(a, b)
    assert not torch.equal(outputs["GN"].cls_logits[0], outputs[""].cls_logits[0])


# A config dumped by AdelaiDet (output/.../config.yaml) carries every key of its defaults.
ADELAIDET_EXTRA_KEYS = """\
MODEL:
  MOBILENET: False
  BACKBONE:
    ANTI_ALIAS: False
  RESNETS:
    DEFORM_INTERVAL: 1
  FCOS:
    USE_RELU: False
    YIELD_PROPOSAL: False
    YIELD_BOX_FEATURES: False
INPUT:
  HFLIP_TRAIN: True
  IS_ROTATE: False
  CROP:
    CROP_INSTANCE: True
"""


def test_adelaidet_only_keys_merge_where_they_have_no_effect(tiny_cfg, tmp_path):
    def layout(cfg):
        torch.manual_seed(0)
        return {k: (v.shape, v.sum().item()) for k, v in build_model(cfg).state_dict().items()}

    plain = layout(tiny_cfg)
    path = tmp_path / "dumped.yaml"
    path.write_text(ADELAIDET_EXTRA_KEYS)
    tiny_cfg.merge_from_file(str(path))
    assert tiny_cfg.INPUT.CROP.CROP_INSTANCE is True and tiny_cfg.MODEL.FCOS.USE_RELU is False
    assert layout(tiny_cfg) == plain
    tiny_cfg.INPUT.HFLIP_TRAIN, tiny_cfg.INPUT.RANDOM_FLIP = False, "none"
    assert layout(tiny_cfg) == plain


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MODEL.FCOS.YIELD_PROPOSAL", True, "instance-segmentation"),
        ("MODEL.FCOS.YIELD_BOX_FEATURES", True, "instance-segmentation"),
        ("MODEL.MOBILENET", True, "MobileNetV2"),
        ("MODEL.BACKBONE.ANTI_ALIAS", True, "anti-aliased"),
        ("MODEL.RESNETS.DEFORM_INTERVAL", 2, "DEFORM_ON_PER_STAGE"),
        ("INPUT.IS_ROTATE", True, "rotation"),
        ("INPUT.HFLIP_TRAIN", False, "False with 'none'"),
        ("INPUT.CROP.ENABLED", True, "CROP_INSTANCE must be None when INPUT.CROP.ENABLED"),
    ],
)
def test_adelaidet_only_keys_with_an_effect_are_refused(tiny_cfg, key, value, message):
    tiny_cfg.INPUT.CROP.CROP_INSTANCE = True  # as in a dumped AdelaiDet config
    tiny_cfg.merge_from_list([key, str(value)])
    with pytest.raises(ValueError, match=message) as error:
        build_model(tiny_cfg)
    assert "an AdelaiDet key, accepted only where it has no effect" in str(error.value)
