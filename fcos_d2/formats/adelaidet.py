"""AdelaiDet (aim-uofa/AdelaiDet, ``adet/modeling/fcos/fcos.py``) FCOS checkpoints.

Detectron2 backbone names, the head at ``proposal_generator.fcos_head.*`` with the same sub-names
as ours; the center-ness predictor was called ``centerness`` until AdelaiDet commit 281ee24
(2020-04-03), ``ctrness`` since. :func:`load_adelaidet_keys` renames these keys inside
``load_state_dict``, so ``MODEL.WEIGHTS`` can point straight at an AdelaiDet file.
"""

import logging
from typing import Optional

from torch import nn

from ..checks import ConfigError
from ..d2_compat import state_dict_metadata
from .fcos_release import FCOS_LAYOUT
from .mmdet import MMDET_LAYOUT
from .rules import (
    CONV_PARAM,
    Layout,
    Rule,
    apply_rules,
    compile_rules,
    is_unsupported,
    layouts_found,
    strip_ddp_prefix,
)
from .torchvision import TORCHVISION_LAYOUT

ADELAIDET_HEAD = "proposal_generator.fcos_head."

# AdelaiDet key -> ours: the ResNet-FPN backbone keeps its (Detectron2) names, the head moves.
ADELAIDET_RULES: list[Rule] = compile_rules(
    [
        (r"backbone\.bottom_up\.(?:stem|res[2-5])\..+", lambda m: m[0]),
        (r"backbone\.fpn_(?:lateral|output)[3-5]\..+", lambda m: m[0]),
        (rf"backbone\.top_block\.p[67]\.{CONV_PARAM}", lambda m: m[0]),
        (
            r"proposal_generator\.fcos_head\.(?P<rest>(?:cls|bbox|share)_tower\.\d+\..+)",
            lambda m: f"head.{m['rest']}",
        ),
        (
            rf"proposal_generator\.fcos_head\.(?P<n>cls_logits|bbox_pred|ctrness)\.{CONV_PARAM}",
            lambda m: f"head.{m['n']}.{m['p']}",
        ),
        (
            rf"proposal_generator\.fcos_head\.centerness\.{CONV_PARAM}",
            lambda m: f"head.ctrness.{m['p']}",
        ),
        (
            r"proposal_generator\.fcos_head\.scales\.(?P<i>\d+)\.scale",
            lambda m: f"head.scales.{m['i']}.scale",
        ),
    ]
)

# The layouts MODEL.WEIGHTS cannot load: they are converted once (python -m fcos_d2.convert).
CONVERTED_LAYOUTS = (FCOS_LAYOUT, TORCHVISION_LAYOUT, MMDET_LAYOUT)

# fvcore's Checkpointer logs the rest of the report (missing / unexpected keys) here: the lines
# for keys this module renames then read and sit together with Detectron2's own.
_report = logging.getLogger("fvcore.common.checkpoint")


def adelaidet_key_to_ours(key: str) -> Optional[str]:
    """Our name for a key of an AdelaiDet FCOS checkpoint, or None if it has none."""
    key = strip_ddp_prefix(key)
    if is_unsupported(key):
        return None
    return apply_rules(ADELAIDET_RULES, key)


ADELAIDET_LAYOUT = Layout(
    name="adelaidet",
    title="AdelaiDet's (aim-uofa/AdelaiDet)",
    author="aim-uofa/AdelaiDet, converted by fcos_d2.convert",
    key_to_ours=adelaidet_key_to_ours,
    markers=(ADELAIDET_HEAD,),
)


def load_adelaidet_keys(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """``load_state_dict`` pre-hook of :class:`~fcos_d2.modeling.FCOS`: AdelaiDet head keys.

    Runs inside ``load_state_dict``, before missing / unexpected keys are computed, so every
    Detectron2 loading path (``MODEL.WEIGHTS`` in training, ``--eval-only``, ``DefaultPredictor``,
    ``DetectionCheckpointer.load``) reports the renamed keys as it reports its own. fvcore checks
    shapes before ``load_state_dict``, under the file's names; for renamed keys this hook does that
    check, skipping a mismatch with fvcore's warning (e.g. an 80-class ``cls_logits`` into a
    5-class model), so the key then shows as missing exactly as in Detectron2 fine-tuning. Keys
    with no counterpart in the model keep their file names and are reported as unexpected.
    """
    foreign = [k for k in state_dict if k.startswith(prefix + ADELAIDET_HEAD)]
    if not foreign:
        names = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
        found = layouts_found(names, CONVERTED_LAYOUTS)
        if found:
            layout = found[0]
            raise ConfigError(
                f"this checkpoint has {layout.title} layout ({', '.join(layout.markers)}...), "
                "which fcos_d2 does not load directly: convert it first with `python -m "
                f"fcos_d2.convert --from {layout.name} IN OUT` and set MODEL.WEIGHTS to OUT"
            )
        return
    own = module.state_dict(prefix=prefix, keep_vars=True)
    metadata = state_dict_metadata(state_dict)
    for key in foreign:
        ours = adelaidet_key_to_ours(key[len(prefix) :])
        new_key = prefix + ours if ours is not None else None
        if new_key is None or new_key not in own or new_key in state_dict:
            continue
        value = state_dict.pop(key)
        shape_file, shape_model = tuple(value.shape), tuple(own[new_key].shape)
        if shape_file != shape_model:
            _report.warning(
                f"Skip loading parameter '{new_key}' to the model due to incompatible shapes: "
                f"{shape_file} in the checkpoint but {shape_model} in the model! You might want "
                "to double check if this is expected."
            )
            continue
        state_dict[new_key] = value
        if metadata is not None:  # module versions (e.g. BatchNorm's) travel with the keys
            old_module, new_module = key.rsplit(".", 1)[0], new_key.rsplit(".", 1)[0]
            if old_module in metadata:
                metadata.setdefault(new_module, metadata[old_module])
