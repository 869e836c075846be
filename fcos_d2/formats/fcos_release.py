"""The original FCOS release (tianzhi0549/FCOS, a maskrcnn-benchmark fork): key names and the
FrozenBatchNorm convention, for ``python -m fcos_d2.convert --from fcos``.

Its checkpoints have a ``module.`` (DDP) prefix, ``backbone.body.layer1..4`` = res2..5 with
``bn1..3`` / ``downsample.0/1``, ``backbone.fpn.fpn_inner2..4`` / ``fpn_layer2..4`` = lateral /
output convs of C3..C5, ``top_blocks.p6/p7``, and the head at ``rpn.head.*`` (``centerness``).
Its FrozenBatchNorm has no eps; Detectron2's adds eps=1e-5 to ``running_var``.
"""

import re
from typing import Optional

from torch import Tensor

from .rules import (
    BN_PARAM,
    CONV_PARAM,
    Layout,
    Rule,
    apply_rules,
    compile_rules,
    is_unsupported,
    resnet_block_rules,
    strip_ddp_prefix,
)

# Key prefixes that only this layout has (torchvision's backbone is also at backbone.body.*).
MARKERS = ("backbone.body.stem.", "rpn.head.", "backbone.fpn.fpn_inner", "backbone.fpn.fpn_layer")

# Detectron2's FrozenBatchNorm2d default (detectron2/layers/batch_norm.py): it normalizes with
# (running_var + eps).rsqrt(); maskrcnn-benchmark's FrozenBatchNorm2d with running_var.rsqrt().
DETECTRON2_FROZEN_BN_EPS = 1e-5


# Original FCOS key -> ours. Patterns cover every key of the released ResNet/ResNeXt-FPN models
# without deformable convolutions (FPN without GN, GN towers).
FCOS_RULES: list[Rule] = compile_rules(
    [
        (r"backbone\.body\.stem\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
        (
            rf"backbone\.body\.stem\.bn1\.{BN_PARAM}",
            lambda m: f"backbone.bottom_up.stem.conv1.norm.{m['p']}",
        ),
        *resnet_block_rules(r"backbone\.body"),
        # fpn_inner1/fpn_layer1 do not exist: inner2..4 / layer2..4 are C3..C5.
        (
            rf"backbone\.fpn\.fpn_inner(?P<i>[2-4])\.{CONV_PARAM}",
            lambda m: f"backbone.fpn_lateral{int(m['i']) + 1}.{m['p']}",
        ),
        (
            rf"backbone\.fpn\.fpn_layer(?P<i>[2-4])\.{CONV_PARAM}",
            lambda m: f"backbone.fpn_output{int(m['i']) + 1}.{m['p']}",
        ),
        (
            rf"backbone\.fpn\.top_blocks\.(?P<l>p6|p7)\.{CONV_PARAM}",
            lambda m: f"backbone.top_block.{m['l']}.{m['p']}",
        ),
        (
            rf"rpn\.head\.(?P<t>cls_tower|bbox_tower)\.(?P<i>\d+)\.{CONV_PARAM}",
            lambda m: f"head.{m['t']}.{m['i']}.{m['p']}",
        ),
        (
            rf"rpn\.head\.(?P<n>cls_logits|bbox_pred)\.{CONV_PARAM}",
            lambda m: f"head.{m['n']}.{m['p']}",
        ),
        (rf"rpn\.head\.centerness\.{CONV_PARAM}", lambda m: f"head.ctrness.{m['p']}"),
        (r"rpn\.head\.scales\.(?P<i>\d+)\.scale", lambda m: f"head.scales.{m['i']}.scale"),
    ]
)


def fcos_key_to_ours(key: str) -> Optional[str]:
    """Our name for a key of the original FCOS release, or None if it has none."""
    key = strip_ddp_prefix(key)
    if is_unsupported(key):
        return None
    return apply_rules(FCOS_RULES, key)


def is_frozen_bn_running_var(fcos_key: str) -> bool:
    """A backbone BatchNorm ``running_var`` of the original release (its FrozenBatchNorm2d)."""
    return bool(re.match(r"^backbone\.body\..*\.(?:bn[1-3]|downsample\.1)\.running_var$", fcos_key))


def frozen_bn_var_for_detectron2(
    running_var: Tensor, eps: float = DETECTRON2_FROZEN_BN_EPS
) -> Tensor:
    """Detectron2's ``running_var`` for a maskrcnn-benchmark one: ``result + eps == running_var``.

    maskrcnn-benchmark's FrozenBatchNorm2d scales by ``running_var.rsqrt()``, Detectron2's by
    ``(running_var + eps).rsqrt()``. In float32, ``(v - eps) + eps == v`` holds for every ``v``
    that such a sum can produce at all (checked over millions of values, tests/
    test_checkpoints.py): the released models' ``running_var`` of 1 included. The exceptions are
    half the variances in [2**-14, 2**-13) (about 6e-5 to 1.2e-4), which float32 ``x + 1e-5``
    never yields (1e-5 sits exactly halfway between grid points there); they stay one unit in
    the last place (6e-8 relative) off.
    """
    return running_var - eps


def frozen_bn_for_detectron2(key: str, value: Tensor) -> Tensor:
    """The release's backbone ``running_var`` rewritten for Detectron2's eps; others unchanged."""
    if is_frozen_bn_running_var(strip_ddp_prefix(key)):
        return frozen_bn_var_for_detectron2(value)
    return value


FCOS_LAYOUT = Layout(
    name="fcos",
    title="the original FCOS release's (tianzhi0549/FCOS, maskrcnn-benchmark)",
    author="tianzhi0549/FCOS (maskrcnn-benchmark), converted by fcos_d2.convert",
    key_to_ours=fcos_key_to_ours,
    markers=MARKERS,
    rewrite=frozen_bn_for_detectron2,
    rewrite_note="FrozenBN running_var of {} layers rewritten for Detectron2's eps (1e-5)",
)
