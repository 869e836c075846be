"""mmdetection's FCOS (open-mmlab/mmdetection 2.x and 3.x, ``FCOSHead``), for
``python -m fcos_d2.convert --from mmdet``.

Facts from mmdetection's source (2.28.2 and 3.3.0: ``models/dense_heads/fcos_head.py``,
``anchor_free_head.py``, ``backbones/resnet.py``, ``necks/fpn.py``; mmcv's ``ConvModule``,
``build_norm_layer`` and ``Scale``):

- the weights are under ``state_dict`` (with ``meta``; 2.x adds ``optimizer``, 3.x also
  ``message_hub`` and ``param_schedulers``); the FCOS keys are the same in 2.x and 3.x;
- backbone ``backbone.conv1``/``bn1`` (stem), ``backbone.layer1..4`` = res2..res5 with
  ``conv1..3``/``bn1..3`` and ``downsample.0/1``; BatchNorm with ``num_batches_tracked``, frozen
  in the FCOS configs (``requires_grad=False``, ``norm_eval=True``: eps 1e-5, as Detectron2's
  FrozenBatchNorm2d, so no rewrite); "caffe" style (stride in the 1x1 conv) or "pytorch" (X-101);
- neck ``neck.lateral_convs.{0,1,2}.conv`` / ``neck.fpn_convs.{0,1,2}.conv`` = lateral / output
  convs of C3..C5 (``start_level=1``), ``neck.fpn_convs.3`` / ``.4`` = P6 from P5 and P7 from
  relu(P6) (``add_extra_convs='on_output'``, ``relu_before_extra_convs=True``);
- head ``bbox_head.cls_convs.{i}`` / ``reg_convs.{i}``: ``ConvModule`` = ``.conv`` + ``.gn``
  (GroupNorm 32) + ReLU, so tower block i is our ``cls_tower.{3i}`` / ``{3i+1}``; the convs
  have no bias unless ``conv_bias=True`` (the "center-normbbox-centeronreg-giou" configs):
  an absent bias is a zero bias; predictors ``conv_cls``, ``conv_reg``, ``conv_centerness``
  (``fcos_cls``, ``fcos_reg``, ``fcos_centerness`` in mmdetection 2.0-2.2, which mmdetection
  still renames when it loads such a file); ``scales.{i}.scale`` is 0-dimensional (mmcv's
  ``Scale``), ours has shape (1,);
- ``conv_cls`` has one output per class of the training set, in its order (COCO: increasing
  category id, Detectron2's contiguous order).
"""

from typing import Optional

import torch
from torch import Tensor

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

_FPN_NAMES = {"0": "fpn_output3", "1": "fpn_output4", "2": "fpn_output5", "3": "top_block.p6"}
_FPN_NAMES["4"] = "top_block.p7"
_TOWERS = {"cls_convs": "cls_tower", "reg_convs": "bbox_tower"}
_PREDICTORS = {"cls": "cls_logits", "reg": "bbox_pred", "centerness": "ctrness"}


MMDET_RULES = compile_rules(
    [
        (r"backbone\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
        (rf"backbone\.bn1\.{BN_PARAM}", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m['p']}"),
        *resnet_block_rules(r"backbone"),
        (
            rf"neck\.lateral_convs\.(?P<i>[0-2])\.conv\.{CONV_PARAM}",
            lambda m: f"backbone.fpn_lateral{int(m['i']) + 3}.{m['p']}",
        ),
        (
            rf"neck\.fpn_convs\.(?P<i>[0-4])\.conv\.{CONV_PARAM}",
            lambda m: f"backbone.{_FPN_NAMES[m['i']]}.{m['p']}",
        ),
        (
            rf"bbox_head\.(?P<t>cls_convs|reg_convs)\.(?P<i>\d+)\.conv\.{CONV_PARAM}",
            lambda m: f"head.{_TOWERS[m['t']]}.{3 * int(m['i'])}.{m['p']}",
        ),
        (
            rf"bbox_head\.(?P<t>cls_convs|reg_convs)\.(?P<i>\d+)\.gn\.{CONV_PARAM}",
            lambda m: f"head.{_TOWERS[m['t']]}.{3 * int(m['i']) + 1}.{m['p']}",
        ),
        (
            rf"bbox_head\.(?:conv|fcos)_(?P<n>cls|reg|centerness)\.{CONV_PARAM}",
            lambda m: f"head.{_PREDICTORS[m['n']]}.{m['p']}",
        ),
        (r"bbox_head\.scales\.(?P<i>\d+)\.scale", lambda m: f"head.scales.{m['i']}.scale"),
    ]
)


def _is_deformable(key: str) -> bool:
    # mmcv's DCN / DCNv2 (ModulatedDeformConv2dPack) keep their offsets in ``conv_offset``.
    return ".conv_offset." in key


def mmdet_key_to_ours(key: str) -> Optional[str]:
    """Our name for a key of an mmdetection FCOS checkpoint, or None if it has none."""
    key = strip_ddp_prefix(key)
    if _is_deformable(key):
        return None
    return apply_rules(MMDET_RULES, key)


def dropped_mmdet_key(key: str) -> Optional[str]:
    """BatchNorm step counters: the backbone's BatchNorm is frozen in mmdetection's FCOS configs,
    and Detectron2's FrozenBatchNorm2d has no counter."""
    key = strip_ddp_prefix(key)
    if key.startswith("backbone.") and key.endswith(".num_batches_tracked"):
        return "BatchNorm step counter, unused by FrozenBatchNorm"
    return None


def unmapped_mmdet_reason(key: str) -> Optional[str]:
    """Why an mmdetection key has no fcos_d2 name, where there is more to say than "none"."""
    key = strip_ddp_prefix(key)
    if _is_deformable(key):
        return (
            "deformable convolution (the dcn models: mmcv's modulated DCNv2 in the backbone or "
            "the towers' last conv), which fcos_d2's ResNet and towers do not have"
        )
    if key.startswith("neck.lateral_convs."):
        return "an FPN input below C3: mmdetection's FCOS configs start the FPN at C3"
    return None


def scale_shape_for_ours(key: str, value: Tensor) -> Tensor:
    """mmcv's ``Scale`` holds a 0-dimensional tensor, fcos_d2's a (1,) tensor."""
    if strip_ddp_prefix(key).startswith("bbox_head.scales.") and value.dim() == 0:
        return value.reshape(1)
    return value


def zero_tower_biases(converted: dict[str, Tensor]) -> dict[str, Tensor]:
    """Zero biases for the tower convs that mmdetection builds without one (``conv_bias='auto'``
    with GroupNorm): adding 0 is exact, so the outputs are unchanged."""
    zeros = {}
    for key, value in converted.items():
        if key.startswith(("head.cls_tower.", "head.bbox_tower.")) and value.dim() == 4:
            bias = key[: -len("weight")] + "bias"
            if bias not in converted:
                zeros[bias] = torch.zeros(value.shape[0], dtype=value.dtype)
    return zeros


MMDET_LAYOUT = Layout(
    name="mmdet",
    title="mmdetection's FCOS (FCOSHead)",
    author="open-mmlab/mmdetection FCOSHead, converted by fcos_d2.convert",
    key_to_ours=mmdet_key_to_ours,
    markers=("bbox_head.", "neck."),
    dropped=dropped_mmdet_key,
    why_unmapped=unmapped_mmdet_reason,
    rewrite=scale_shape_for_ours,
    rewrite_note="{} per-level Scale tensors reshaped from () to (1,)",
    implicit=zero_tower_biases,
    required=FCOS_ESSENTIALS + ("backbone.top_block.p6.weight", "backbone.top_block.p7.weight"),
)
