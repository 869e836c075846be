"""torchvision's FCOS (``torchvision.models.detection.fcos_resnet50_fpn``, weights
``FCOS_ResNet50_FPN_Weights.COCO_V1``, file ``fcos_resnet50_fpn_coco-99b0c9b7.pth``), for
``python -m fcos_d2.convert --from torchvision``.

Facts from torchvision 0.29's source (``models/detection/fcos.py``, ``backbone_utils.py``,
``ops/feature_pyramid_network.py``, ``ops/misc.py``):

- backbone ``backbone.body.*``: torchvision's ResNet (stride in the 3x3 conv, ``conv1``/``bn1``
  stem, ``layer1..4`` = res2..res5 with ``conv1..3``/``bn1..3``, ``downsample.0/1``), with
  FrozenBatchNorm2d (eps 1e-5 added to ``running_var``, as Detectron2's: no rewrite; no
  ``num_batches_tracked``) when built with weights;
- FPN ``backbone.fpn.inner_blocks.{0,1,2}`` / ``layer_blocks.{0,1,2}`` = lateral / output convs
  of C3..C5, each a ``Conv2dNormActivation`` (``.0.weight``) since torchvision 0.13; its FPN
  (state-dict version 2) still loads the older names without ``.0``, which this table accepts;
  ``backbone.fpn.extra_blocks.p6/p7`` from P5 (``LastLevelP6P7(256, 256)``);
- head ``head.classification_head.conv.{0..11}`` (4 x [conv, GroupNorm(32), ReLU]) and
  ``cls_logits``; ``head.regression_head.conv.*``, ``bbox_reg``, ``bbox_ctrness``; no per-level
  Scale;
- ``cls_logits`` has 91 outputs indexed by COCO category id (0 = background and the ten ids COCO
  leaves unused, all "N/A"): fcos_d2 keeps the 80 real classes in Detectron2's contiguous order
  (increasing category id, ``COCO_CATEGORIES`` of ``detectron2.data.datasets.builtin_meta``), so
  Detectron2's COCO metadata and evaluation apply unchanged.
"""

from typing import Optional

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from torch import Tensor

from ..checks import ConfigError
from .rules import (
    BN_PARAM,
    CONV_PARAM,
    FCOS_ESSENTIALS,
    Layout,
    apply_rules,
    compile_rules,
    resnet_block_rules,
    strip_ddp_prefix,
)

# torchvision's COCO models have one output per category id 0..90.
TORCHVISION_COCO_OUTPUTS = 91
# Category id of each of Detectron2's 80 contiguous COCO classes, in order.
COCO_THING_IDS: list[int] = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
CLS_LOGITS = "head.classification_head.cls_logits."

TORCHVISION_RULES = compile_rules(
    [
        (r"backbone\.body\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
        (
            rf"backbone\.body\.bn1\.{BN_PARAM}",
            lambda m: f"backbone.bottom_up.stem.conv1.norm.{m['p']}",
        ),
        *resnet_block_rules(r"backbone\.body"),
        (
            rf"backbone\.fpn\.inner_blocks\.(?P<i>[0-2])(?:\.0)?\.{CONV_PARAM}",
            lambda m: f"backbone.fpn_lateral{int(m['i']) + 3}.{m['p']}",
        ),
        (
            rf"backbone\.fpn\.layer_blocks\.(?P<i>[0-2])(?:\.0)?\.{CONV_PARAM}",
            lambda m: f"backbone.fpn_output{int(m['i']) + 3}.{m['p']}",
        ),
        (
            rf"backbone\.fpn\.extra_blocks\.(?P<l>p6|p7)\.{CONV_PARAM}",
            lambda m: f"backbone.top_block.{m['l']}.{m['p']}",
        ),
        (
            rf"head\.classification_head\.conv\.(?P<i>\d+)\.{CONV_PARAM}",
            lambda m: f"head.cls_tower.{m['i']}.{m['p']}",
        ),
        (
            rf"head\.classification_head\.cls_logits\.{CONV_PARAM}",
            lambda m: f"head.cls_logits.{m['p']}",
        ),
        (
            rf"head\.regression_head\.conv\.(?P<i>\d+)\.{CONV_PARAM}",
            lambda m: f"head.bbox_tower.{m['i']}.{m['p']}",
        ),
        (rf"head\.regression_head\.bbox_reg\.{CONV_PARAM}", lambda m: f"head.bbox_pred.{m['p']}"),
        (
            rf"head\.regression_head\.bbox_ctrness\.{CONV_PARAM}",
            lambda m: f"head.ctrness.{m['p']}",
        ),
    ]
)


def torchvision_key_to_ours(key: str) -> Optional[str]:
    """Our name for a key of torchvision's FCOS, or None if it has none."""
    return apply_rules(TORCHVISION_RULES, strip_ddp_prefix(key))


def dropped_torchvision_key(key: str) -> Optional[str]:
    """BatchNorm2d counters, present when torchvision built the backbone without weights (then
    with trainable BatchNorm): Detectron2's FrozenBatchNorm2d has no counter."""
    key = strip_ddp_prefix(key)
    if key.startswith("backbone.body.") and key.endswith(".num_batches_tracked"):
        return "BatchNorm step counter, unused by FrozenBatchNorm"
    return None


def coco_classes_from_torchvision(key: str, value: Tensor) -> Tensor:
    """``cls_logits`` rows of the 80 COCO classes, in Detectron2's contiguous order."""
    key = strip_ddp_prefix(key)
    if not key.startswith(CLS_LOGITS):
        return value
    if value.shape[0] != TORCHVISION_COCO_OUTPUTS:
        raise ConfigError(
            f"{key} has {value.shape[0]} class outputs, torchvision's COCO models "
            f"{TORCHVISION_COCO_OUTPUTS} (one per COCO category id, 0 = background): only that "
            "layout maps onto Detectron2's 80 COCO classes. A model trained on other classes "
            "has no COCO category ids to map"
        )
    return value[torch.tensor(COCO_THING_IDS)].clone()


TORCHVISION_LAYOUT = Layout(
    name="torchvision",
    title="torchvision's FCOS (fcos_resnet50_fpn)",
    author="torchvision fcos_resnet50_fpn, converted by fcos_d2.convert",
    key_to_ours=torchvision_key_to_ours,
    markers=("head.classification_head.", "head.regression_head.", "backbone.fpn.inner_blocks."),
    dropped=dropped_torchvision_key,
    rewrite=coco_classes_from_torchvision,
    rewrite_note=(
        "{} cls_logits tensors: the 80 COCO classes of the 91 outputs kept, in Detectron2's order"
    ),
    required=FCOS_ESSENTIALS + ("backbone.top_block.p6.weight", "backbone.top_block.p7.weight"),
)
