"""The FCOS meta-architecture: configs, state-dict layout, head variants, training, overfitting."""

import glob
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage
from helpers import config_path, overfit, synthetic_image

from fcos_d2.modeling.head import FCOSHead

DETECTION_CONFIGS = sorted(
    glob.glob(config_path("configs/FCOS-Detection/**/*.yaml"), recursive=True)
)


def test_config_list_is_complete():
    names = {path.split("FCOS-Detection/")[1] for path in DETECTION_CONFIGS}
    assert names >= {
        "Base-FCOS.yaml",
        "R_50_1x.yaml",
        "MS_R_50_2x.yaml",
        "MS_R_101_2x.yaml",
        "MS_X_101_32x8d_2x.yaml",
        "MS_X_101_64x4d_2x.yaml",
        "R_50_1x_iou.yaml",
        "paper/R_50_1x_iccv2019.yaml",
    }


def _deep_backbone(path: str) -> bool:
    # ResNet-101 / ResNeXt-101: seconds to build and run on a CPU, so in the slow tier.
    return "101" in path.split("/")[-1]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.slow) if _deep_backbone(p) else p
        for p in DETECTION_CONFIGS
    ],
    ids=lambda p: p.split("FCOS-Detection/")[1],
)
def test_every_config_builds_trains_and_infers(cfg, path):
    cfg.merge_from_file(path)
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = [synthetic_image(96, 128, boxes=[[10, 10, 60, 50]], classes=[1])]
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {
        "loss_fcos_cls",
        "loss_fcos_loc",
        f"loss_fcos_{'iou' if cfg.MODEL.FCOS.BOX_QUALITY == 'iou' else 'ctr'}",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model(batch)
    assert out["instances"].image_size == (96, 128)


def test_r50_parameter_count_matches_the_authors_layout(cfg):
    cfg.merge_from_file(config_path("configs/FCOS-Detection/R_50_1x.yaml"))
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 32_244_250


def test_head_state_dict_names_follow_the_authors_release(cfg):
    cfg.merge_from_file(config_path("configs/FCOS-Detection/R_50_1x.yaml"))
    head_keys = {k[len("head.") :] for k in build_model(cfg).state_dict() if k.startswith("head.")}
    expected = set()
    for tower in ("cls_tower", "bbox_tower"):
        for conv, norm in ((0, 1), (3, 4), (6, 7), (9, 10)):  # conv, GN, ReLU per block
            expected |= {f"{tower}.{conv}.weight", f"{tower}.{conv}.bias"}
            expected |= {f"{tower}.{norm}.weight", f"{tower}.{norm}.bias"}
    for predictor in ("cls_logits", "bbox_pred", "ctrness"):
        expected |= {f"{predictor}.weight", f"{predictor}.bias"}
    expected |= {f"scales.{i}.scale" for i in range(5)}
    assert head_keys == expected


def test_top_levels_from_p5_or_c5(cfg):
    cfg.merge_from_file(config_path("configs/FCOS-Detection/R_50_1x.yaml"))
    p6_from_p5 = build_model(cfg).backbone.top_block.p6.weight.shape
    cfg.MODEL.FCOS.TOP_LEVELS_IN_FEATURE = "res5"
    p6_from_c5 = build_model(cfg).backbone.top_block.p6.weight.shape
    assert p6_from_p5 == (256, 256, 3, 3)
    assert p6_from_c5 == (256, 2048, 3, 3)
    cfg.MODEL.FCOS.TOP_LEVELS_IN_FEATURE = "c5"
    with pytest.raises(ValueError, match="TOP_LEVELS_IN_FEATURE.*'c5'"):
        build_model(cfg)


def test_mismatched_strides_are_reported(tiny_cfg):
    tiny_cfg.MODEL.FCOS.FPN_STRIDES = [8, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="FPN_STRIDES"):
        build_model(tiny_cfg)


def _head(**kw):
    from detectron2.layers import ShapeSpec

    torch.manual_seed(0)
    shapes = [ShapeSpec(channels=32, stride=s) for s in (8, 16)]
    return FCOSHead(input_shape=shapes, num_classes=3, num_cls_convs=2, num_box_convs=2, **kw)


def test_head_variants_shared_tower_bn_per_level_and_names():
    head = _head(num_share_convs=1, norm="BN")
    keys = set(head.state_dict())
    assert {"share_tower.0.weight", "share_tower.1.0.weight", "share_tower.1.1.weight"} <= keys
    assert "cls_tower.1.1.running_mean" in keys  # one BatchNorm per level
    features = [torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)]
    out = head(features)
    assert [tuple(x.shape) for x in out.cls_logits] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    assert [tuple(x.shape) for x in out.box_reg] == [(2, 4, 8, 8), (2, 4, 4, 4)]
    assert [tuple(x.shape) for x in out.quality_logits] == [(2, 1, 8, 8), (2, 1, 4, 4)]


def test_classifier_prior_and_activations():
    head = _head()
    features = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    probs = torch.sigmoid(head(features).cls_logits[0])
    # Weights N(0, 0.01) and a bias from the prior: probabilities start near 0.01.
    assert probs.mean().item() == pytest.approx(0.01, abs=0.002)
    assert all((x >= 0).all() for x in head(features).box_reg)  # relu
    assert all((x > 0).all() for x in _head(box_activation="exp")(features).box_reg)
    head.scales[1].scale.data.fill_(2.0)
    raw = head.bbox_pred(head.bbox_tower(features[1]))
    torch.testing.assert_close(head(features).box_reg[1], torch.relu(2.0 * raw))


def test_centerness_branch_placement():
    features = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    for on_reg, moved, still in (
        (True, "bbox_tower", "cls_tower"),
        (False, "cls_tower", "bbox_tower"),
    ):
        head = _head(centerness_on_reg=on_reg)
        before = head(features).quality_logits[0].clone()
        with torch.no_grad():
            getattr(head, still)[0].weight.mul_(3.0)
        torch.testing.assert_close(head(features).quality_logits[0], before)
        with torch.no_grad():
            getattr(head, moved)[0].weight.mul_(3.0)
        assert not torch.allclose(head(features).quality_logits[0], before)


def test_deformable_last_conv_starts_as_a_plain_conv():
    head = _head(use_deformable=True)
    deform = head.cls_tower[3]  # second conv of the tower (after conv, GN, ReLU)
    x = torch.randn(1, 32, 6, 6)
    expected = torch.nn.functional.conv2d(x, deform.conv.weight, deform.conv.bias, padding=1)
    torch.testing.assert_close(deform(x), expected, atol=1e-5, rtol=1e-5)
    assert "cls_tower.3.offset.weight" in head.state_dict()


def test_training_step_with_a_zero_box_image(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    batch = [synthetic_image(), synthetic_image(boxes=[[20, 20, 90, 100]], classes=[2], seed=1)]
    empty_only = [synthetic_image()]
    with EventStorage() as storage:
        losses = model(batch)
        sum(losses.values()).backward()
        assert storage.latest()["fcos/num_pos_per_worker"][0] > 0
        model.zero_grad()
        losses = model(empty_only)
        assert losses["loss_fcos_loc"].item() == 0 and losses["loss_fcos_ctr"].item() == 0
        sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_overfits_one_image(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    gt_boxes = [[10, 15, 50, 60], [60, 30, 120, 110], [30, 70, 70, 100]]
    gt_classes = [0, 1, 2]
    batch = [synthetic_image(boxes=gt_boxes, classes=gt_classes)]
    detections = overfit(model, batch, iterations=120)
    top = detections[detections.scores > 0.5]
    assert len(top) == 3
    iou = pairwise_iou(Boxes(torch.tensor(gt_boxes, dtype=torch.float32)), top.pred_boxes)
    best_iou, best = iou.max(dim=1)
    assert (best_iou > 0.8).all(), best_iou
    assert top.pred_classes[best].tolist() == gt_classes


def test_builds_from_lazy_config_keyword_arguments():
    """The same modules build without yacs: LazyCall + instantiate, as Detectron2's LazyConfig."""
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import BasicStem, ResNet
    from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7

    from fcos_d2.modeling import FCOS, FCOSCore, FCOSLoss, FCOSPostProcessor, FCOSTargetAssigner

    strides = [8, 16, 32, 64, 128]
    lazy = L(FCOS)(
        backbone=L(FPN)(
            bottom_up=L(ResNet)(
                stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
                stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
                out_features=["res3", "res4", "res5"],
            ),
            in_features=["res3", "res4", "res5"],
            out_channels=64,
            top_block=L(LastLevelP6P7)(in_channels=64, out_channels=64, in_feature="p5"),
        ),
        head=L(FCOSHead)(
            input_shape=[ShapeSpec(channels=64, stride=s) for s in strides], num_classes=3
        ),
        head_in_features=["p3", "p4", "p5", "p6", "p7"],
        core=L(FCOSCore)(
            strides=strides,
            num_classes=3,
            target_assigner=L(FCOSTargetAssigner)(
                strides=strides, sizes_of_interest=[64, 128, 256, 512], num_classes=3
            ),
            loss=L(FCOSLoss)(num_classes=3),
            postprocessor=L(FCOSPostProcessor)(strides=strides),
        ),
        pixel_mean=[103.53, 116.28, 123.675],
        pixel_std=[1.0, 1.0, 1.0],
    )
    model = instantiate(lazy)
    with EventStorage():
        losses = model([synthetic_image(boxes=[[10, 10, 80, 90]], classes=[1])])
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("PRIOR_PROB", 0.0, "PRIOR_PROB must be in"),
        ("NUM_CLASSES", 0, "NUM_CLASSES must be >= 1"),
        (
            "SIZES_OF_INTEREST",
            [64, 32, 256, 512],
            "SIZES_OF_INTEREST must be positive and increasing",
        ),
        ("POS_RADIUS", -1.0, "POS_RADIUS must be >= 0"),
        ("TARGETS_MAX_PAIRS_PER_CHUNK", 0, "TARGETS_MAX_PAIRS_PER_CHUNK must be >= 1"),
        ("INFERENCE_QUALITY", "magic", "INFERENCE_QUALITY must be one of"),
    ],
)
def test_bad_config_values_are_named(tiny_cfg, key, value, message):
    setattr(tiny_cfg.MODEL.FCOS, key, value)
    with pytest.raises(ValueError, match=message):
        build_model(tiny_cfg)


def test_gn_needs_channels_divisible_by_32(tiny_cfg):
    tiny_cfg.MODEL.FPN.OUT_CHANNELS = 48
    with pytest.raises(ValueError, match="channels \\(48\\) must be a multiple of 32"):
        build_model(tiny_cfg)


def test_checkpointed_towers_give_identical_losses_and_gradients():
    """Recomputing the towers in backward (CHECKPOINT_TOWERS) changes memory, not results."""
    results = []
    for checkpoint_towers in (False, True):
        torch.manual_seed(0)
        head = _head(num_share_convs=1, checkpoint_towers=checkpoint_towers)
        features = [
            torch.randn(2, 32, 8, 8, requires_grad=True),
            torch.randn(2, 32, 4, 4, requires_grad=True),
        ]
        out = head(features)
        loss = sum((x * torch.randn_like(x)).sum() for part in out for x in part)
        loss.backward()
        grads = [p.grad.clone() for p in head.parameters()] + [f.grad for f in features]
        results.append((loss.detach(), grads))
        with torch.no_grad():  # inference does not checkpoint
            assert all(torch.equal(a, b) for a, b in zip(head(features).box_reg, out.box_reg))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_plain, loss_ckpt)
    assert len(grads_plain) == len(grads_ckpt) > 10
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_ckpt))


def test_checkpointed_towers_refuse_batchnorm():
    with pytest.raises(ValueError, match="CHECKPOINT_TOWERS must be False with MODEL.FCOS.NORM BN"):
        _head(norm="BN", checkpoint_towers=True)


def test_exp_regression_of_pixel_targets_starts_at_one_stride(cfg):
    cfg.merge_from_file(config_path("configs/FCOS-Detection/paper/R_50_1x_iccv2019.yaml"))
    cfg.MODEL.WEIGHTS = ""
    head = build_model(cfg).head
    assert head.bbox_pred.bias.tolist() == pytest.approx([math.log(8)] * 4)
    with torch.no_grad():
        box_reg = head([torch.randn(1, 256, 8, 8)] * 5).box_reg
    # Weights N(0, 0.01) around the bias ln 8: the locations start near an 8-pixel (l, t, r, b)
    # (within exp(+-0.5) of it), no longer near a 1-pixel one.
    medians = [x.median().item() for x in box_reg]
    assert all(8 / 1.65 < m < 8 * 1.65 for m in medians), medians
    cfg.MODEL.FCOS.INITIAL_BOX_DISTANCE = 1.0  # the original release's zero bias
    assert build_model(cfg).head.bbox_pred.bias.tolist() == [0.0] * 4
    cfg.MODEL.FCOS.INITIAL_BOX_DISTANCE = -2.0
    with pytest.raises(ValueError, match="MODEL.FCOS.INITIAL_BOX_DISTANCE.*-2.0"):
        build_model(cfg)


@pytest.mark.slow
def test_the_iccv2019_settings_overfit_one_image(cfg):
    """Issue #12's recipe: R-18 with GN, 64-channel FPN, SGD lr 0.01, momentum 0.9, gradient
    clipping 10, one 160x160 image with three boxes: all three found at IoU >= 0.8."""
    cfg.merge_from_file(config_path("configs/FCOS-Detection/paper/R_50_1x_iccv2019.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    torch.manual_seed(0)
    model = build_model(cfg)
    gt_boxes = [[10, 15, 60, 70], [70, 40, 150, 130], [30, 100, 80, 140]]
    batch = [synthetic_image(160, 160, boxes=gt_boxes, classes=[0, 1, 2])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage():
        for _ in range(400):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(batch)[0]["instances"]
    top = detections[detections.scores > 0.3]
    iou = pairwise_iou(Boxes(torch.tensor(gt_boxes, dtype=torch.float32)), top.pred_boxes)
    assert (iou.max(dim=1).values >= 0.8).all(), iou.max(dim=1).values
