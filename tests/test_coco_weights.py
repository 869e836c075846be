"""COCO-trained FCOS weights of torchvision and mmdetection: conversion, and the same detections.

torchvision's side is torchvision's own code (``fcos_resnet50_fpn``, installed): its state dict
is converted and both pipelines run on the same inputs. mmdetection cannot be installed here with
its compiled ops, so its layouts (2.x and 3.x files) are written below from mmdetection's source
(2.28.2 / 3.3.0: ``fcos_head.py``, ``anchor_free_head.py``, ``resnet.py``, ``fpn.py``, mmcv's
``ConvModule`` and ``Scale``), independently of ``fcos_d2/formats/mmdet.py``, and converted back:
the detections must be bit-identical. ``test_mmdetection_code_gives_the_same_detections`` runs
mmdetection's own FCOS where it is importable (see docs/checkpoints.md).
"""

import os
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from helpers import config_path, fresh_cfg, shrink, synthetic_image
from torch import nn

from fcos_d2.checkpoint import FCOSCheckpointer
from fcos_d2.checks import ConfigError
from fcos_d2.convert import main as convert
from fcos_d2.formats import COCO_THING_IDS, mmdet_key_to_ours, torchvision_key_to_ours
from fcos_d2.modeling.box_ops import compute_locations
from fcos_d2.modeling.postprocess import FCOSPostProcessor

TORCHVISION_CFG = "configs/FCOS-Detection/torchvision/fcos_resnet50_fpn.yaml"
MMDET_CFG = "configs/FCOS-Detection/mmdet/fcos_r50-caffe_fpn_gn-head_1x_coco.yaml"
MMDET_IMPROVED_CFG = (
    "configs/FCOS-Detection/mmdet/"
    "fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.yaml"
)
STRIDES = (8, 16, 32, 64, 128)
CLS_WEIGHT = "head.classification_head.cls_logits.weight"
CLS_BIAS = "head.classification_head.cls_logits.bias"


def save(obj, path):
    torch.save(obj, str(path))
    return str(path)


def match(a: Instances, b: Instances, min_iou=0.99, max_score_diff=1e-4) -> tuple[int, int]:
    """(matched, total): greedy one-to-one matching, class by class, of ``a``'s detections (best
    score first) to ``b``'s at box IoU >= ``min_iou`` and score difference <= ``max_score_diff``;
    total is the larger count. Boxes of no area (from locations in the padding, clipped to the
    image's edge) have no IoU: two such match when their coordinates agree within 1e-3 px."""
    matched = 0
    for c in torch.cat([a.pred_classes, b.pred_classes]).unique().tolist():
        x, y = a[a.pred_classes == c], b[b.pred_classes == c]
        ious = pairwise_iou(x.pred_boxes, y.pred_boxes).numpy()
        same = (x.pred_boxes.tensor[:, None] - y.pred_boxes.tensor[None]).abs().amax(-1) <= 1e-3
        empty = (x.pred_boxes.area() == 0)[:, None] & (y.pred_boxes.area() == 0)[None]
        ious[(same & empty).numpy()] = 1.0
        ok = (ious >= min_iou) & (
            (x.scores[:, None] - y.scores[None, :]).abs().numpy() <= max_score_diff
        )
        taken = np.zeros(len(y), dtype=bool)
        for i in torch.argsort(x.scores, descending=True).tolist():
            options = np.flatnonzero(ok[i] & ~taken)
            if options.size:
                taken[options[np.argmax(ious[i, options])]] = True
        matched += int(taken.sum())
    return matched, max(len(a), len(b))


# --- The new decoding keys --------------------------------------------------------------------


def test_torchvision_locations_are_its_anchor_centers():
    """On a 224 x 320 input, P6 is 4 x 5 and P7 2 x 3: torchvision's steps there are 224 // 4 =
    56 and 320 // 5 = 64, then 112 and 106, not the strides 64 and 128."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes = [(28, 40), (14, 20), (7, 10), (4, 5), (2, 3)]
    ours = compute_locations(sizes, STRIDES, torch.device("cpu"), grid="torchvision")
    assert ours[3][:6, 0].tolist() == [0, 64, 128, 192, 256, 0]
    assert ours[3][::5, 1].tolist() == [0, 56, 112, 168]
    assert ours[4].tolist() == [[0, 0], [106, 0], [212, 0], [0, 112], [106, 112], [212, 112]]
    generator = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    images = ImageList(torch.zeros(1, 3, 224, 320), [(224, 320)])
    (anchors,) = generator(images, [torch.zeros(1, 1, h, w) for h, w in sizes])
    assert torch.equal(torch.cat(ours), (anchors[:, :2] + anchors[:, 2:]) / 2)
    half = compute_locations(sizes, STRIDES, torch.device("cpu"))  # the default, unchanged
    assert half[4].tolist() == [[64, 64], [192, 64], [320, 64], [64, 192], [192, 192], [320, 192]]


def _one_level(cls_probs, quality, ltrb=None, **settings):
    """Decode one level of 4 locations (x = 0, 8, 16, 24 on a stride-8 row); (boxes, scores,
    classes) sorted by score."""
    locations = [torch.tensor([[0.0, 4], [8, 4], [16, 4], [24, 4]])]
    if ltrb is None:
        ltrb = torch.full((4, 4), 0.5)
    postprocess = FCOSPostProcessor(strides=[8], nms_threshold=1.0, **settings)
    (result,) = postprocess(locations, [cls_probs[None]], [ltrb[None]], [quality[None]], [(8, 32)])
    return result.pred_boxes.tensor, result.scores, result.pred_classes


CLS = torch.tensor([[0.9, 0.1], [0.5, 0.3], [0.04, 0.6], [0.3, 0.01]])
QUALITY = torch.tensor([0.1, 0.9, 1.0, 0.2])


def test_threshold_on_the_class_score_by_default_and_on_the_final_score_if_asked():
    # Default: cls > 0.2 keeps (0,0) 0.9, (1,0) 0.5, (1,1) 0.3, (2,1) 0.6, (3,0) 0.3.
    _, scores, _ = _one_level(CLS, QUALITY, score_threshold=0.2)
    assert sorted(scores.tolist()) == pytest.approx(
        sorted(np.sqrt([0.09, 0.45, 0.27, 0.6, 0.06]).tolist())
    )
    # torchvision: sqrt(cls x quality) > 0.35 keeps sqrt(.45), sqrt(.27), sqrt(.6) only.
    _, scores, _ = _one_level(CLS, QUALITY, score_threshold=0.35, thresh_on_score=True)
    assert sorted(scores.tolist()) == pytest.approx(np.sqrt([0.27, 0.45, 0.6]).tolist())
    with pytest.raises(ConfigError, match="MODEL.FCOS.THRESH_ON_SCORE must be False when"):
        FCOSPostProcessor(strides=[8], thresh_on_score=True, thresh_with_quality=True)


def test_pre_nms_ranking_picks_the_candidates():
    top2 = dict(score_threshold=0.0, pre_nms_topk=2)
    # cls x quality: 0.6 (2,1) and 0.45 (1,0); cls alone: 0.9 (0,0) and 0.6 (2,1).
    _, scores, classes = _one_level(CLS, QUALITY, **top2)
    assert scores.tolist() == pytest.approx(np.sqrt([0.6, 0.45]).tolist())
    for ranking, expected in (("score", [0.6, 0.45]), ("cls", [0.6, 0.09])):
        _, scores, _ = _one_level(CLS, QUALITY, pre_nms_ranking=ranking, **top2)
        assert sorted(scores.tolist(), reverse=True) == pytest.approx(np.sqrt(expected).tolist())
    # mmdetection: cls alone ranks, cls x quality scores (no square root).
    _, scores, _ = _one_level(CLS, QUALITY, pre_nms_ranking="cls", score_sqrt=False, **top2)
    assert sorted(scores.tolist(), reverse=True) == pytest.approx([0.6, 0.09])
    with pytest.raises(ConfigError, match="MODEL.FCOS.PRE_NMS_RANKING must be one of"):
        FCOSPostProcessor(strides=[8], pre_nms_ranking="quality")


def test_min_box_size_drops_empty_boxes_before_nms_only_when_asked():
    ltrb = torch.full((4, 4), 0.5)
    ltrb[0, 2] = 0.0  # location x = 0 with r = 0: a box of no width once clipped at x = 0
    settings = dict(score_threshold=0.0, post_nms_topk=3)
    cls = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    boxes, _, _ = _one_level(cls, torch.ones(4), ltrb, **settings)
    assert len(boxes) == 3 and boxes[0].tolist() == [0, 0, 0, 8]  # kept, and takes a slot
    boxes, scores, _ = _one_level(cls, torch.ones(4), ltrb, min_box_size=0.0, **settings)
    assert len(boxes) == 3 and scores.tolist() == pytest.approx(np.sqrt([0.8, 0.7, 0.6]))


def test_new_keys_default_to_todays_behaviour_and_reach_the_model():
    cfg = fresh_cfg()
    fcos = cfg.MODEL.FCOS
    assert (fcos.LOCATION_GRID, fcos.THRESH_ON_SCORE, fcos.PRE_NMS_RANKING) == (
        "half_stride",
        False,
        "cls_quality",
    )
    assert fcos.MIN_BOX_SIZE_TEST < 0
    cfg.merge_from_file(config_path(TORCHVISION_CFG))
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    core = build_model(cfg).core
    assert core.location_grid == "torchvision"
    post = core.postprocessor
    assert (post.thresh_on_score, post.pre_nms_ranking, post.score_threshold) == (
        True,
        "score",
        0.2,
    )
    cfg.MODEL.FCOS.LOCATION_GRID = "corner"
    with pytest.raises(ConfigError, match="MODEL.FCOS.LOCATION_GRID must be one of"):
        build_model(cfg)


def test_keyword_construction_for_lazyconfig():
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate

    from fcos_d2.modeling import FCOSCore, FCOSLoss, FCOSTargetAssigner

    core = instantiate(
        L(FCOSCore)(
            strides=list(STRIDES),
            num_classes=80,
            target_assigner=L(FCOSTargetAssigner)(
                strides=list(STRIDES), sizes_of_interest=[64, 128, 256, 512], num_classes=80
            ),
            loss=L(FCOSLoss)(num_classes=80),
            postprocessor=L(FCOSPostProcessor)(
                strides=list(STRIDES),
                score_threshold=0.2,
                thresh_on_score=True,
                pre_nms_ranking="score",
                min_box_size=0.0,
            ),
            location_grid="torchvision",
        )
    )
    assert core.location_grid == "torchvision" and core.postprocessor.min_box_size == 0.0


# --- torchvision: its own model, converted ----------------------------------------------------


def frozen_batchnorm(module: nn.Module) -> None:
    """torchvision's FrozenBatchNorm2d in place of every BatchNorm2d, in place.

    ``fcos_resnet50_fpn(weights=None, weights_backbone=None)`` builds trainable BatchNorm2d (with
    ``num_batches_tracked``); given weights it builds FrozenBatchNorm2d, and the COCO_V1 file was
    saved from such a model: this gives the same state-dict keys and the same eval-mode maths.
    """
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            frozen_batchnorm(child)


def torchvision_fcos(seed=0, **kwargs) -> nn.Module:
    """torchvision's FCOS with seeded random weights that detect: backbone statistics moved off
    0 / 1, class biases around 0 (sqrt(cls x ctr) well above its 0.2 threshold) except on the 11
    outputs with no COCO class (0 and the unused ids: -30, never above it, as in a COCO-trained
    model, where their targets are always 0), and box biases of 1.5 strides (so that relu does
    not zero most distances)."""
    from torchvision.models.detection import fcos_resnet50_fpn

    torch.manual_seed(seed)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    frozen_batchnorm(model.backbone.body)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                tensor.copy_(torch.empty(tensor.shape).uniform_(0.5, 2.0, generator=generator))
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.startswith("backbone.body.") and ("bn" in name or "downsample.1" in name):
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)  # weight, bias
        classifier = model.head.classification_head.cls_logits
        classifier.bias.copy_(torch.randn(91, generator=generator))
        no_class = sorted(set(range(91)) - set(COCO_THING_IDS))
        classifier.bias[no_class] = -30.0
        model.head.regression_head.bbox_reg.bias.fill_(1.5)
    return model.eval()


def torchvision_cfg(**overrides):
    cfg = fresh_cfg()
    cfg.merge_from_file(config_path(TORCHVISION_CFG))
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


@pytest.fixture(scope="module")
def tv_model():
    return torchvision_fcos()


def test_torchvision_state_dict_converts_to_exactly_our_models_keys(tv_model):
    """Every key of torchvision's model maps, onto every key of the torchvision config's model,
    with the same shapes (cls_logits: 80 of 91 rows); with 91 classes that model has torchvision's
    32,269,600 parameters (its COCO_V1 ``num_params``)."""
    from torchvision.models.detection import FCOS_ResNet50_FPN_Weights

    from fcos_d2.convert import convert_state_dict

    state = tv_model.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in state)
    result = convert_state_dict(state, "torchvision")
    assert result.unmapped == [] and result.dropped == [] and len(result.state) == len(state)
    cfg = torchvision_cfg(**{"MODEL.FCOS.NUM_CLASSES": 91})
    ours = build_model(cfg)
    expected_params = FCOS_ResNet50_FPN_Weights.COCO_V1.meta["num_params"]
    assert sum(p.numel() for p in ours.parameters()) == expected_params == 32_269_600
    assert sum(p.numel() for p in tv_model.parameters()) == expected_params
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert set(result.state) == set(shapes)
    for key, value in result.state.items():
        rows = (80,) if key.startswith("head.cls_logits.") else shapes[key][:1]
        assert tuple(value.shape) == rows + shapes[key][1:], key
    # The 80 rows kept are those of the COCO category ids, in increasing id order.
    logits = state["head.classification_head.cls_logits.weight"]
    assert torch.equal(result.state["head.cls_logits.weight"][11], logits[13])  # stop sign: id 13
    assert torch.equal(result.state["head.cls_logits.bias"][79], state[CLS_BIAS][90])


def test_torchvision_key_table_as_read_off_its_source():
    body, up = "backbone.body.", "backbone.bottom_up."
    known = {
        f"{body}conv1.weight": f"{up}stem.conv1.weight",
        f"{body}bn1.running_var": f"{up}stem.conv1.norm.running_var",
        f"{body}layer1.0.conv1.weight": f"{up}res2.0.conv1.weight",
        f"{body}layer4.2.bn3.bias": f"{up}res5.2.conv3.norm.bias",
        f"{body}layer2.0.downsample.0.weight": f"{up}res3.0.shortcut.weight",
        f"{body}layer3.0.downsample.1.running_mean": f"{up}res4.0.shortcut.norm.running_mean",
        "backbone.fpn.inner_blocks.0.0.weight": "backbone.fpn_lateral3.weight",
        "backbone.fpn.inner_blocks.2.bias": "backbone.fpn_lateral5.bias",  # before torchvision 0.13
        "backbone.fpn.layer_blocks.1.0.bias": "backbone.fpn_output4.bias",
        "backbone.fpn.layer_blocks.1.weight": "backbone.fpn_output4.weight",
        "backbone.fpn.extra_blocks.p6.weight": "backbone.top_block.p6.weight",
        "backbone.fpn.extra_blocks.p7.bias": "backbone.top_block.p7.bias",
        "head.classification_head.conv.0.weight": "head.cls_tower.0.weight",
        "head.classification_head.conv.10.bias": "head.cls_tower.10.bias",  # the 4th GroupNorm
        "head.classification_head.cls_logits.weight": "head.cls_logits.weight",
        "head.regression_head.conv.9.weight": "head.bbox_tower.9.weight",
        "head.regression_head.bbox_reg.bias": "head.bbox_pred.bias",
        "head.regression_head.bbox_ctrness.weight": "head.ctrness.weight",
    }
    assert {k: torchvision_key_to_ours(k) for k in known} == known
    for key in ("backbone.fpn.inner_blocks.3.0.weight", "anchor_generator.cell_anchors.0"):
        assert torchvision_key_to_ours(key) is None


def test_torchvision_file_with_older_fpn_names_converts(tv_model, tmp_path):
    """Files saved before torchvision 0.13 name the FPN convs ``inner_blocks.0.weight``."""
    state = OrderedDict(
        (k.replace(".0.weight", ".weight").replace(".0.bias", ".bias"), v)
        if k.startswith("backbone.fpn.") and not k.startswith("backbone.fpn.extra")
        else (k, v)
        for k, v in tv_model.state_dict().items()
    )
    assert "backbone.fpn.inner_blocks.0.weight" in state
    out = tmp_path / "out.pth"
    assert convert(["--from", "torchvision", save(state, tmp_path / "in.pth"), str(out)]) == 0
    written = torch.load(out, weights_only=True)["model"]
    assert torch.equal(
        written["backbone.fpn_lateral3.weight"], state["backbone.fpn.inner_blocks.0.weight"]
    )


def test_torchvision_bad_files_are_named(tv_model, tmp_path, capsys):
    state = tv_model.state_dict()
    out = str(tmp_path / "out.pth")
    # Another class count: no COCO category ids to map.
    other = dict(state)
    other["head.classification_head.cls_logits.weight"] = state[CLS_WEIGHT][:21]
    path = save(other, tmp_path / "voc.pth")
    assert convert(["--from", "torchvision", path, out]) == 2
    err = capsys.readouterr().err
    assert "head.classification_head.cls_logits.weight has 21 class outputs" in err
    assert "torchvision's COCO models 91" in err
    # A part missing (truncated or another architecture).
    partial = {k: v for k, v in state.items() if "bbox_ctrness" not in k}
    path = save(partial, tmp_path / "partial.pth")
    assert convert(["--from", "torchvision", path, out]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {path}: not a whole FCOS detector of --from torchvision: nothing maps to " in err
    )
    assert "head.ctrness.weight" in err
    # Another release's file.
    path = save({"state_dict": mmdet_layout(small_model(MMDET_CFG).state_dict())}, tmp_path / "m")
    assert convert(["--from", "torchvision", path, out]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: has mmdetection's FCOS (FCOSHead) layout (keys " in err
    assert "not that of --from torchvision: convert it with --from mmdet" in err
    # Already ours.
    path = save({"model": small_model(MMDET_CFG).state_dict()}, tmp_path / "ours.pth")
    assert convert(["--from", "torchvision", path, out]) == 2
    assert "already in fcos_d2's layout" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_torchvision_file_through_model_weights_says_to_convert(tv_model, tmp_path):
    path = save(tv_model.state_dict(), tmp_path / "fcos_resnet50_fpn_coco.pth")
    model = build_model(torchvision_cfg())
    with pytest.raises(ConfigError, match=r"--from torchvision IN OUT"):
        DetectionCheckpointer(model).load(path)


class GivenInput(nn.Module):
    """In place of torchvision's ``GeneralizedRCNNTransform``: hands over a prepared network
    input (normalized and padded) and leaves the detections in its coordinates."""

    def __init__(self, images):
        super().__init__()
        self.images = images

    def forward(self, images, targets=None):
        return self.images, targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


def torchvision_instances(detections: dict, image_size) -> Instances:
    """torchvision's output with its labels (COCO category ids) as Detectron2's classes."""
    contiguous = {c: i for i, c in enumerate(COCO_THING_IDS)}
    return Instances(
        image_size,
        pred_boxes=Boxes(detections["boxes"]),
        scores=detections["scores"],
        pred_classes=torch.tensor([contiguous[int(c)] for c in detections["labels"]]),
    )


@pytest.fixture(scope="module")
def converted_torchvision(tv_model, tmp_path_factory):
    """The torchvision model, its file, the converted file, and our model loaded from it."""
    folder = tmp_path_factory.mktemp("torchvision")
    path_in = save(tv_model.state_dict(), folder / "fcos_resnet50_fpn.pth")
    path_out = str(folder / "converted.pth")
    assert convert(["--from", "torchvision", path_in, path_out]) == 0
    model = build_model(torchvision_cfg())
    report = DetectionCheckpointer(model)._load_model(torch.load(path_out))
    assert report.missing_keys == report.unexpected_keys == report.incorrect_shapes == []
    return tv_model, path_in, path_out, model.eval()


# Images of different sizes; the last is padded (to 256 x 352), and on all of them torchvision's
# P6 / P7 steps differ from the strides (e.g. 224 // 4 = 56 on a 224 px side).
SIZES = [(224, 320), (256, 256), (250, 330)]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def same_input_detections(tv_model, model, image: torch.Tensor):
    """Both models' detections for one network input: ``image`` (RGB in [0, 1]) normalized as
    torchvision does, padded to a multiple of 32 with zeros, in input coordinates."""
    from torchvision.models.detection.image_list import ImageList

    x = (image - IMAGENET_MEAN) / IMAGENET_STD
    height, width = x.shape[1:]
    padded = x.new_zeros(1, 3, -(-height // 32) * 32, -(-width // 32) * 32)
    padded[0, :, :height, :width] = x
    transform = tv_model.transform
    tv_model.transform = GivenInput(ImageList(padded, [(height, width)]))
    try:
        with torch.no_grad():
            (theirs,) = tv_model([x])
    finally:
        tv_model.transform = transform
    # Our model normalizes inside: with mean 0 and std 1 it takes x as it is, and pads alike.
    mean, std = model.pixel_mean.clone(), model.pixel_std.clone()
    model.pixel_mean.zero_()
    model.pixel_std.fill_(1.0)
    try:
        with torch.no_grad():
            images, features, predictions = model.dense_predictions([{"image": x}])
            assert torch.equal(images.tensor, padded)
            (ours,) = model.forward_inference(images, features, predictions)
    finally:
        model.pixel_mean.copy_(mean)
        model.pixel_std.copy_(std)
    return torchvision_instances(theirs, (height, width)), ours


@pytest.mark.slow
def test_torchvision_and_converted_model_give_the_same_detections(converted_torchvision):
    """Given the same network input, >= 99% of detections match at box IoU >= 0.99 and score
    difference <= 1e-4, with torchvision's decoding (top 100 after NMS) and with every candidate
    kept (no NMS, no top 100: thousands per image, P6 / P7 included, where torchvision's
    locations are off the stride grid)."""
    tv_model, _, _, model = converted_torchvision
    postprocessor = model.core.postprocessor
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=generator) for h, w in SIZES]
    for keep_all in (False, True):
        if keep_all:
            tv_model.nms_thresh, tv_model.detections_per_img = 1.0, 100_000
            model.core.postprocessor = postprocessor.replace(
                nms_threshold=1.0, post_nms_topk=100_000
            )
        matched = total = 0
        try:
            for image in images:
                theirs, ours = same_input_detections(tv_model, model, image)
                m, t = match(theirs, ours)
                matched, total = matched + m, total + t
        finally:
            tv_model.nms_thresh, tv_model.detections_per_img = 0.6, 100
            model.core.postprocessor = postprocessor
        print(f"same input, {'all candidates' if keep_all else 'top 100'}: {matched}/{total}")
        assert matched >= 0.99 * total and total >= (1000 * len(SIZES) if keep_all else 300)


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB image with smooth regions and edges: a gradient with filled shapes."""
    import cv2

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 200 / width, ys * 200 / height, (xs + ys) * 100 / (width + height)], -1)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))
        colour = [int(c) for c in rng.integers(0, 256, 3)]
        if rng.random() < 0.5:
            cv2.rectangle(image, (x0, y0), (x1, y1), colour, -1)
        else:
            center, axes = ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2)
            cv2.ellipse(image, center, axes, 0, 0, 360, colour, -1)
    noise = rng.normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_same_uint8_image_through_each_librarys_preprocessing(converted_torchvision):
    """The same image through each library's own resize differs: torchvision interpolates the
    normalized float tensor (``F.interpolate``, bilinear), Detectron2 the uint8 image (PIL
    bilinear) and rounds to uint8. Measured here, not a target: the match rate is printed. Fed
    torchvision's resized image instead, our model matches again: the resize is the difference."""
    from detectron2.data import transforms as T

    tv_model, _, _, model = converted_torchvision
    short, longest = 320, 533  # both libraries' test-time resize, smaller than 800 for speed
    tv_model.transform.min_size, tv_model.transform.max_size = (short,), longest
    resize = T.ResizeShortestEdge([short, short], longest)
    counts = {"own": [0, 0], "own_loose": [0, 0], "tv_resized": [0, 0]}
    try:
        for index, (height, width) in enumerate(SIZES):
            image = scene(height, width, seed=index)
            rgb = torch.from_numpy(image).permute(2, 0, 1).float() / 255
            with torch.no_grad():
                (detections,) = tv_model([rgb])
                theirs = torchvision_instances(detections, (height, width))
                resized = resize.get_transform(image).apply_image(image)
                chw = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
                (ours,) = model([{"image": chw, "height": height, "width": width}])
                # torchvision's resized network input, back in [0, 255] for our normalization.
                images, _ = tv_model.transform([rgb])
                h, w = images.image_sizes[0]
                tv_resized = (images.tensors[0, :, :h, :w] * IMAGENET_STD + IMAGENET_MEAN) * 255
                (again,) = model([{"image": tv_resized, "height": height, "width": width}])
            assert tuple(resized.shape[:2]) == (h, w)  # same size: only the pixels differ
            for name, other, criteria in (
                ("own", ours, {}),
                ("own_loose", ours, {"min_iou": 0.5, "max_score_diff": 0.05}),
                ("tv_resized", again, {}),
            ):
                m, t = match(theirs, other["instances"], **criteria)
                counts[name] = [counts[name][0] + m, counts[name][1] + t]
    finally:
        tv_model.transform.min_size, tv_model.transform.max_size = (800,), 1333
    for name, (m, t) in counts.items():
        print(f"{name}: {m}/{t} = {100 * m / t:.1f}% matched")
    assert counts["tv_resized"][0] >= 0.99 * counts["tv_resized"][1]
    assert counts["own"][0] < counts["tv_resized"][0]


COCO_V1_FILE = "fcos_resnet50_fpn_coco-99b0c9b7.pth"


@pytest.mark.slow
def test_torchvision_coco_v1_file_loads_without_missing_or_unexpected_keys(tmp_path):
    """The real file, where torchvision has downloaded it to the user's torch hub cache."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", COCO_V1_FILE)
    if not os.path.exists(path):
        pytest.skip(
            f"{path} is not here: torchvision downloads it with fcos_resnet50_fpn(weights="
            "'COCO_V1'), and this machine has no network for it"
        )
    out = tmp_path / "fcos_resnet50_fpn_coco_d2.pth"
    assert convert(["--from", "torchvision", path, str(out)]) == 0
    report = DetectionCheckpointer(build_model(torchvision_cfg()))._load_model(torch.load(out))
    assert report.missing_keys == report.unexpected_keys == report.incorrect_shapes == []


@pytest.mark.slow
def test_fine_tuning_converted_torchvision_weights_on_other_classes(converted_torchvision):
    """3 classes instead of 80: the classifier is skipped (Detectron2's report), everything else
    loads, and training runs."""
    _, _, path, loaded = converted_torchvision
    model = build_model(torchvision_cfg(**{"MODEL.FCOS.NUM_CLASSES": 3}))
    batch = [synthetic_image(128, 160, boxes=[[20, 20, 90, 100]], classes=[2])]
    assert_fine_tunes(model, path, loaded.state_dict(), batch, 1e-3, 2, "head.bbox_pred.weight")


def assert_fine_tunes(
    model, path, source: dict, batch: list, lr: float, steps: int, trained_key: str
) -> None:
    """``path`` loads into ``model`` (another class count) with only the classifier skipped,
    as Detectron2 reports it, the rest equal to ``source``; then ``steps`` SGD steps on
    ``batch`` give finite losses and change ``trained_key``."""
    from detectron2.utils.events import EventStorage

    report = DetectionCheckpointer(model)._load_model(torch.load(path))
    skipped = ["head.cls_logits.weight", "head.cls_logits.bias"]
    assert [k for k, *_ in report.incorrect_shapes] == skipped
    assert sorted(report.missing_keys) == sorted(skipped) and report.unexpected_keys == []
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in source.items() if k not in skipped)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    with EventStorage():
        for _ in range(steps):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.state_dict()[trained_key], state[trained_key])


# --- mmdetection: its layouts written from its source, converted back --------------------------


def mmdet_layout(state, conv_bias=False, old_names=False) -> OrderedDict:
    """Our state dict in mmdetection's FCOS names (the same in 2.x and 3.x), from its source:
    ResNet ``backbone.conv1`` / ``bn1`` stem, ``layer1..4`` (res2..res5) with ``conv1..3`` /
    ``bn1..3`` and ``downsample.0/1``, its BatchNorm with ``num_batches_tracked``; FPN
    ``neck.lateral_convs.{0,1,2}.conv`` (C3..C5), ``neck.fpn_convs.{0..4}.conv`` (P3..P7);
    ``bbox_head.{cls,reg}_convs.{i}`` = ``ConvModule`` (``.conv``, ``.gn``; the conv without bias
    unless ``conv_bias``), ``conv_cls`` / ``conv_reg`` / ``conv_centerness`` (``fcos_*`` in
    mmdetection 2.0-2.2), ``scales.{i}.scale`` 0-dimensional (mmcv's ``Scale``)."""
    out = OrderedDict()
    for key, value in state.items():
        p = key.split(".")
        if key.startswith("backbone.bottom_up.stem."):
            name = "backbone.conv1.weight" if p[4] == "weight" else f"backbone.bn1.{p[5]}"
        elif key.startswith("backbone.bottom_up.res"):
            layer = f"backbone.layer{int(p[2][3:]) - 1}.{p[3]}"
            if p[4] == "shortcut":
                name = f"{layer}.downsample." + ("0.weight" if p[5] == "weight" else f"1.{p[6]}")
            else:
                name = (
                    f"{layer}.{p[4]}.weight" if p[5] == "weight" else f"{layer}.bn{p[4][4]}.{p[6]}"
                )
        elif key.startswith("backbone.fpn_lateral"):
            name = f"neck.lateral_convs.{int(p[1][-1]) - 3}.conv.{p[2]}"
        elif key.startswith("backbone.fpn_output"):
            name = f"neck.fpn_convs.{int(p[1][-1]) - 3}.conv.{p[2]}"
        elif key.startswith("backbone.top_block."):
            name = f"neck.fpn_convs.{3 if p[2] == 'p6' else 4}.conv.{p[3]}"
        elif key.startswith(("head.cls_tower.", "head.bbox_tower.")):
            tower = "cls_convs" if p[1] == "cls_tower" else "reg_convs"
            block, role = divmod(int(p[2]), 3)  # [conv, GroupNorm, ReLU] per block
            if role == 0 and p[3] == "bias" and not conv_bias:
                assert not value.any(), "mmdetection has no such bias: the source must have 0"
                continue
            name = f"bbox_head.{tower}.{block}.{'conv' if role == 0 else 'gn'}.{p[3]}"
        elif key.startswith("head.scales."):
            name, value = f"bbox_head.scales.{p[2]}.scale", value.reshape(())
        else:
            predictor = {"cls_logits": "cls", "bbox_pred": "reg", "ctrness": "centerness"}[p[1]]
            name = f"bbox_head.{'fcos' if old_names else 'conv'}_{predictor}.{p[2]}"
        out[name] = value
        if name.startswith("backbone.") and name.endswith(".running_var"):
            out[name[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(100)
    return out


def mmdet_checkpoint(state_dict, version: str, folder) -> str:
    """A file as mmdetection writes it: 2.x (mmcv) {meta, state_dict, optimizer}; 3.x (mmengine)
    adds message_hub, with mmengine's HistoryBuffer objects (absent here, as on a user's machine
    without mmengine), and param_schedulers."""
    classes = ("a", "b", "c")
    optimizer = {"state": {}, "param_groups": [{"lr": 0.0001, "momentum": 0.9, "params": [0]}]}
    if version == "2.x":
        checkpoint = {
            "meta": {"mmdet_version": "2.28.2", "CLASSES": classes, "epoch": 12, "iter": 87960},
            "state_dict": state_dict,
            "optimizer": optimizer,
        }
        return save(checkpoint, folder / "mmdet2.pth")
    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
    modules = {name: types.ModuleType(name) for name in names}
    buffer_class = type("HistoryBuffer", (), {"__module__": names[-1]})
    modules[names[-1]].HistoryBuffer = buffer_class
    history = buffer_class()
    history._log_history = np.arange(3.0)
    checkpoint = {
        "meta": {"epoch": 12, "iter": 87960, "dataset_meta": {"classes": classes}},
        "state_dict": state_dict,
        "message_hub": {"log_scalars": {"train/loss": history}, "runtime_info": {"epoch": 12}},
        "optimizer": optimizer,
        "param_schedulers": [{"milestones": {8: 1, 11: 1}, "gamma": 0.1}],
    }
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(modules)
    try:
        return save(checkpoint, folder / "mmdet3.pth")
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def small_cfg(config: str, num_classes=3):
    cfg = shrink(fresh_cfg(), config_path(config))
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # as the configs have it (shrink sets BN)
    cfg.MODEL.FCOS.NUM_CLASSES = num_classes
    cfg.MODEL.FCOS.INFERENCE_TH_TEST = 0.0  # random classifiers score ~0.01: keep the top 100
    return cfg


def small_model(config: str, seed=0, num_classes=3):
    """A small model of ``config`` with every weight and statistic moved off its initial value
    (so that every key matters), except the tower biases mmdetection's convs lack (zero)."""
    torch.manual_seed(seed)
    model = build_model(small_cfg(config, num_classes))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                tensor.copy_(torch.empty(tensor.shape).uniform_(0.3, 2.0, generator=generator))
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif "_tower." in name and name.endswith(".bias") and tensor.dim() == 1:
                if config == MMDET_CFG and name.split(".")[2] in ("0", "3", "6", "9"):
                    tensor.zero_()  # conv_bias='auto' with GroupNorm: no bias
                else:
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
            else:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return model.eval()


IMAGE = synthetic_image(64, 96, boxes=[[8, 10, 40, 50], [50, 12, 90, 60]], classes=[0, 2])


def detect(model):
    with torch.no_grad():
        return model.eval()([IMAGE])[0]["instances"]


def load_checked(cfg, path):
    """A model of ``cfg`` loaded from ``path``, with nothing missing, unexpected or skipped."""
    model = build_model(cfg)
    report = DetectionCheckpointer(model)._load_model(torch.load(path))
    assert report.missing_keys == report.unexpected_keys == report.incorrect_shapes == []
    return model


@pytest.mark.parametrize(
    "config, version, old_names",
    [
        (MMDET_CFG, "2.x", False),
        (MMDET_CFG, "3.x", False),
        (MMDET_CFG, "2.x", True),
        (MMDET_IMPROVED_CFG, "3.x", False),
    ],
    ids=["base-2.x", "base-3.x", "base-2.0-names", "centeronreg-giou-3.x"],
)
def test_mmdet_round_trip_gives_identical_detections(config, version, old_names, tmp_path, capsys):
    source = small_model(config)
    detections = detect(source)
    assert len(detections) == 100
    conv_bias = config == MMDET_IMPROVED_CFG
    foreign = mmdet_layout(source.state_dict(), conv_bias=conv_bias, old_names=old_names)
    path = mmdet_checkpoint(foreign, version, tmp_path)
    out = tmp_path / "converted.pth"
    assert convert(["--from", "mmdet", path, str(out)]) == 0
    printed = capsys.readouterr().out
    extras = (
        "message_hub, meta, optimizer, param_schedulers" if version == "3.x" else "meta, optimizer"
    )
    assert f"dropped top-level entries (not weights): {extras}" in printed
    if version == "3.x":
        assert "mmengine.logging.history_buffer.HistoryBuffer" in printed  # never unpickled
    # R-18's BatchNorm layers: the stem's, 2 in each of 8 blocks, 3 shortcuts'.
    assert "left out 20 keys on purpose: BatchNorm step counter" in printed
    assert "5 per-level Scale tensors reshaped from () to (1,)" in printed
    assert ("added 4 zero biases" in printed) != conv_bias  # 2 convs per tower in the small model
    written = torch.load(out, weights_only=True)
    assert "mmdetection" in written["__author__"]
    assert set(written["model"]) == set(source.state_dict())
    loaded = load_checked(small_cfg(config), out)
    result = detect(loaded)
    assert torch.equal(result.pred_boxes.tensor, detections.pred_boxes.tensor)
    assert torch.equal(result.scores, detections.scores)
    assert torch.equal(result.pred_classes, detections.pred_classes)


def test_mmdet_key_table_as_read_off_its_source():
    up = "backbone.bottom_up."
    known = {
        "backbone.conv1.weight": f"{up}stem.conv1.weight",
        "backbone.bn1.running_mean": f"{up}stem.conv1.norm.running_mean",
        "backbone.layer1.0.conv1.weight": f"{up}res2.0.conv1.weight",
        "backbone.layer4.2.bn3.weight": f"{up}res5.2.conv3.norm.weight",
        "backbone.layer2.0.downsample.0.weight": f"{up}res3.0.shortcut.weight",
        "backbone.layer3.0.downsample.1.running_var": f"{up}res4.0.shortcut.norm.running_var",
        "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral3.weight",
        "neck.lateral_convs.2.conv.bias": "backbone.fpn_lateral5.bias",
        "neck.fpn_convs.1.conv.weight": "backbone.fpn_output4.weight",
        "neck.fpn_convs.3.conv.weight": "backbone.top_block.p6.weight",
        "neck.fpn_convs.4.conv.bias": "backbone.top_block.p7.bias",
        "bbox_head.cls_convs.0.conv.weight": "head.cls_tower.0.weight",
        "bbox_head.cls_convs.3.gn.bias": "head.cls_tower.10.bias",
        "bbox_head.reg_convs.2.conv.bias": "head.bbox_tower.6.bias",
        "bbox_head.conv_cls.weight": "head.cls_logits.weight",
        "bbox_head.fcos_reg.bias": "head.bbox_pred.bias",
        "bbox_head.conv_centerness.weight": "head.ctrness.weight",
        "bbox_head.scales.4.scale": "head.scales.4.scale",
    }
    assert {k: mmdet_key_to_ours(k) for k in known} == known
    for key in (
        "neck.lateral_convs.3.conv.weight",  # an FPN on C2..C5
        "backbone.layer2.0.conv2.conv_offset.weight",  # DCN backbone
        "bbox_head.cls_convs.3.conv.conv_offset.bias",  # DCNv2 tower
        "bbox_head.retina_cls.weight",
    ):
        assert mmdet_key_to_ours(key) is None, key


def test_mmdet_bad_files_are_named(tmp_path, capsys):
    foreign = mmdet_layout(small_model(MMDET_CFG).state_dict())
    out = str(tmp_path / "out.pth")
    dcn = OrderedDict(foreign)
    dcn["backbone.layer2.0.conv2.conv_offset.weight"] = torch.zeros(27, 128, 3, 3)
    dcn["bbox_head.cls_convs.1.conv.conv_offset.weight"] = torch.zeros(27, 64, 3, 3)
    assert convert(["--from", "mmdet", save({"state_dict": dcn}, tmp_path / "d.pth"), out]) == 1
    printed = capsys.readouterr().out
    assert "UNMAPPED backbone.layer2.0.conv2.conv_offset.weight  (deformable convolution" in printed
    assert "UNMAPPED bbox_head.cls_convs.1.conv.conv_offset.weight  (deformable" in printed
    # RetinaNet's head on the same backbone and neck: not an FCOS detector.
    retina = OrderedDict(
        (k.replace("conv_cls", "retina_cls").replace("conv_reg", "retina_reg"), v)
        for k, v in foreign.items()
        if "centerness" not in k
    )
    path = save({"state_dict": retina}, tmp_path / "retinanet.pth")
    assert convert(["--from", "mmdet", path, out]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {path}: not a whole FCOS detector of --from mmdet: nothing maps to "
        "head.cls_logits.weight, head.bbox_pred.weight, head.ctrness.weight"
    ) in err
    assert "unmapped keys found: bbox_head.retina_cls.weight" in err
    # torchvision's file given as mmdetection's.
    tv_state = {k: torch.zeros(1) for k in ("head.classification_head.cls_logits.weight",)}
    path = save(tv_state, tmp_path / "tv.pth")
    assert convert(["--from", "mmdet", path, out]) == 2
    assert "convert it with --from torchvision" in capsys.readouterr().err
    # Not a checkpoint of any of them.
    path = save({"state_dict": {"model.0.weight": torch.zeros(1)}}, tmp_path / "yolo.pth")
    assert convert(["--from", "mmdet", path, out]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {path}: no key matches the --from mmdet layout (its keys: model.0.weight)" in err
    )
    assert not os.path.exists(out)


@pytest.mark.parametrize("version", ["2.x", "3.x"])
def test_mmdet_file_through_model_weights_says_to_convert(version, tmp_path):
    """Not fvcore's "Unsupported type" about the file's other entries, nor the refused mmengine
    objects of a 3.x file: the conversion to run."""
    source = small_model(MMDET_CFG)
    path = mmdet_checkpoint(mmdet_layout(source.state_dict()), version, tmp_path)
    found = {
        "2.x": "keeps its weights under 'state_dict' in mmdetection's FCOS (FCOSHead) layout",
        "3.x": "stores mmengine.logging.history_buffer.HistoryBuffer objects",
    }[version]
    with pytest.raises(ConfigError) as error:
        FCOSCheckpointer(build_model(small_cfg(MMDET_CFG))).load(path)
    assert str(error.value).startswith(f"MODEL.WEIGHTS: {path} {found}")
    assert "`python -m fcos_d2.convert --from mmdet IN OUT` and set MODEL.WEIGHTS to OUT" in str(
        error.value
    )


def test_fine_tuning_converted_mmdet_weights_on_other_classes(tmp_path):
    """5 classes instead of the file's 3: cls_logits skipped, the rest loaded, training runs."""
    source = small_model(MMDET_IMPROVED_CFG)
    path = mmdet_checkpoint(mmdet_layout(source.state_dict(), conv_bias=True), "2.x", tmp_path)
    out = str(tmp_path / "converted.pth")
    assert convert(["--from", "mmdet", path, out]) == 0
    model = build_model(small_cfg(MMDET_IMPROVED_CFG, num_classes=5))
    batch = [synthetic_image(96, 128, boxes=[[10, 10, 60, 50]], classes=[1])]
    assert_fine_tunes(model, out, source.state_dict(), batch, 1e-2, 3, "head.cls_logits.bias")


# --- mmdetection's own code, where it is installed ---------------------------------------------


def stub_mmcv_compiled_ops() -> None:
    """mmcv without its compiled ops (``mmcv._ext``: mmcv-lite, or a failed build) cannot import
    mmdetection's models. Stand-ins: NMS, the only op FCOS inference calls, runs torchvision's
    (the same greedy rule: suppressed above the IoU threshold, no +1 offset); any other op
    raises."""
    import importlib.util

    if "mmcv._ext" in sys.modules or importlib.util.find_spec("mmcv._ext") is not None:
        return
    import torchvision

    def nms(boxes, scores, iou_threshold, offset=0):
        assert offset == 0, "mmdetection's FCOS configs use offset 0"
        return torchvision.ops.nms(boxes, scores, iou_threshold)

    def missing(name):
        if name.startswith("__"):  # module attributes that tools look up (__file__, ...)
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is not available (stubbed)")

        return op

    ext = types.ModuleType("mmcv._ext")
    ext.nms = nms
    ext.__getattr__ = missing
    sys.modules["mmcv._ext"] = ext


def mmdet_model(config_name: str, seed=0):
    """mmdetection's FCOS built from its own config file, with seeded random weights that detect
    (class biases around 0, frozen BatchNorm statistics moved off 0 / 1)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    import mmdet

    folder = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "fcos")
    cfg = Config.fromfile(os.path.join(folder, config_name))
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights = None  # the configs point at ImageNet weights: never fetched
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                tensor.copy_(torch.empty(tensor.shape).uniform_(0.5, 2.0, generator=generator))
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.startswith("bbox_head.conv_cls.bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) - 1.0)
            elif name.startswith("bbox_head.conv_reg.bias"):
                tensor.fill_(1.0)
            elif tensor.is_floating_point() and not name.endswith("num_batches_tracked"):
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return model.eval(), cfg


@pytest.mark.slow
@pytest.mark.parametrize(
    "mmdet_config, config",
    [
        ("fcos_r50-caffe_fpn_gn-head_1x_coco.py", MMDET_CFG),
        (
            "fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py",
            MMDET_IMPROVED_CFG,
        ),
    ],
    ids=["base", "center-normbbox-centeronreg-giou"],
)
def test_mmdetection_code_gives_the_same_detections(mmdet_config, config, tmp_path):
    """mmdetection's FCOS (its model, head and decoding code; NMS by torchvision in place of
    mmcv's compiled op) and the converted model, on the same network input: >= 99% of detections
    matched at box IoU >= 0.99 and score difference <= 1e-4."""
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("mmdet", "mmcv", "mmengine")):
        pytest.skip(
            "mmdetection 3.x (mmdet, mmcv, mmengine) is not installed in this environment; "
            "docs/checkpoints.md says how this test was run and what it gave"
        )
    stub_mmcv_compiled_ops()
    mm_model, mm_cfg = mmdet_model(mmdet_config)
    path = save({"meta": {}, "state_dict": mm_model.state_dict()}, tmp_path / "mmdet.pth")
    out = tmp_path / "converted.pth"
    assert convert(["--from", "mmdet", path, str(out)]) == 0
    cfg = fresh_cfg()
    cfg.merge_from_file(config_path(config))
    model = load_checked(cfg, out).eval()
    preprocessor = mm_cfg.model.data_preprocessor
    assert list(model.pixel_mean.flatten()) == pytest.approx(preprocessor.mean)
    assert list(model.pixel_std.flatten()) == pytest.approx(preprocessor.std)
    generator = torch.Generator().manual_seed(0)
    matched = total = 0
    for height, width in SIZES:
        x = torch.randn(3, height, width, generator=generator) * 50  # BGR minus the mean
        padded = x.new_zeros(1, 3, -(-height // 32) * 32, -(-width // 32) * 32)
        padded[0, :, :height, :width] = x
        meta = {"img_shape": (height, width), "scale_factor": (1.0, 1.0)}
        with torch.no_grad():
            outputs = mm_model.bbox_head(mm_model.extract_feat(padded))
            (result,) = mm_model.bbox_head.predict_by_feat(
                *outputs, batch_img_metas=[meta], rescale=False
            )
        theirs = Instances(
            (height, width),
            pred_boxes=Boxes(result.bboxes),
            scores=result.scores,
            pred_classes=result.labels,
        )
        model.pixel_mean.zero_()
        model.pixel_std.fill_(1.0)
        with torch.no_grad():
            images, features, predictions = model.dense_predictions([{"image": x}])
            assert torch.equal(images.tensor, padded)
            (ours,) = model.forward_inference(images, features, predictions)
        assert len(theirs) > 50
        m, t = match(theirs, ours)
        matched, total = matched + m, total + t
    print(f"mmdetection {mmdet_config}: {matched}/{total} matched")
    assert matched >= 0.99 * total
