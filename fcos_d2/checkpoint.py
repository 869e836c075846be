"""The authors' checkpoint layouts and how they map onto fcos_d2's ``FCOS`` (head at ``head.*``).

Two releases, one table of key names each (facts from the repositories, not their code):

- AdelaiDet (aim-uofa/AdelaiDet, ``adet/modeling/fcos/fcos.py``): Detectron2 backbone names, the
  head at ``proposal_generator.fcos_head.*`` with the same sub-names as ours; the center-ness
  predictor was called ``centerness`` until AdelaiDet commit 281ee24 (2020-04-03), ``ctrness``
  since. :func:`load_adelaidet_keys` renames these keys inside ``load_state_dict``, so
  ``MODEL.WEIGHTS`` can point straight at an AdelaiDet file.
- The original FCOS (tianzhi0549/FCOS, a maskrcnn-benchmark fork): ``module.`` (DDP) prefix,
  ``backbone.body.layer1..4`` = res2..5 with ``bn1..3`` / ``downsample.0/1``,
  ``backbone.fpn.fpn_inner2..4`` / ``fpn_layer2..4`` = lateral / output convs of C3..C5,
  ``top_blocks.p6/p7``, and the head at ``rpn.head.*`` (``centerness``). Its FrozenBatchNorm has
  no eps, Detectron2's adds eps=1e-5 to ``running_var``: :func:`fcos_key_to_ours` renames and
  :func:`frozen_bn_var_for_detectron2` corrects the statistics, both used by
  ``python -m fcos_d2.convert``.
"""

import logging
import os
import pickle
import re
from typing import Any, Callable, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor, nn

from .checks import ConfigError

ADELAIDET_HEAD = "proposal_generator.fcos_head."
CONVERT_HINT = "python -m fcos_d2.convert --from fcos IN OUT"

# Detectron2's FrozenBatchNorm2d default (detectron2/layers/batch_norm.py): it normalizes with
# (running_var + eps).rsqrt(); maskrcnn-benchmark's FrozenBatchNorm2d with running_var.rsqrt().
DETECTRON2_FROZEN_BN_EPS = 1e-5

_BN = r"(?P<p>weight|bias|running_mean|running_var)"
_CONV = r"(?P<p>weight|bias)"

Rule = tuple["re.Pattern[str]", Callable[["re.Match[str]"], str]]


def _rules(table: list[tuple[str, Callable[["re.Match[str]"], str]]]) -> list[Rule]:
    return [(re.compile(f"^{pattern}$"), target) for pattern, target in table]


def _res(m: "re.Match[str]") -> str:
    # maskrcnn-benchmark names stages by index 1..4 = C2..C5; Detectron2 by res2..res5.
    return f"backbone.bottom_up.res{int(m['layer']) + 1}.{m['block']}"


_LAYER = r"backbone\.body\.layer(?P<layer>[1-4])\.(?P<block>\d+)"

# Original FCOS (maskrcnn-benchmark) key -> ours. Patterns cover every key of the released
# ResNet/ResNeXt-FPN models without deformable convolutions (FPN without GN, GN towers).
FCOS_RULES: list[Rule] = _rules(
    [
        (r"backbone\.body\.stem\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
        (
            rf"backbone\.body\.stem\.bn1\.{_BN}",
            lambda m: f"backbone.bottom_up.stem.conv1.norm.{m['p']}",
        ),
        (rf"{_LAYER}\.conv(?P<c>[1-3])\.weight", lambda m: f"{_res(m)}.conv{m['c']}.weight"),
        (rf"{_LAYER}\.bn(?P<c>[1-3])\.{_BN}", lambda m: f"{_res(m)}.conv{m['c']}.norm.{m['p']}"),
        (rf"{_LAYER}\.downsample\.0\.weight", lambda m: f"{_res(m)}.shortcut.weight"),
        (rf"{_LAYER}\.downsample\.1\.{_BN}", lambda m: f"{_res(m)}.shortcut.norm.{m['p']}"),
        # fpn_inner1/fpn_layer1 do not exist: inner2..4 / layer2..4 are C3..C5.
        (
            rf"backbone\.fpn\.fpn_inner(?P<i>[2-4])\.{_CONV}",
            lambda m: f"backbone.fpn_lateral{int(m['i']) + 1}.{m['p']}",
        ),
        (
            rf"backbone\.fpn\.fpn_layer(?P<i>[2-4])\.{_CONV}",
            lambda m: f"backbone.fpn_output{int(m['i']) + 1}.{m['p']}",
        ),
        (
            rf"backbone\.fpn\.top_blocks\.(?P<l>p6|p7)\.{_CONV}",
            lambda m: f"backbone.top_block.{m['l']}.{m['p']}",
        ),
        (
            rf"rpn\.head\.(?P<t>cls_tower|bbox_tower)\.(?P<i>\d+)\.{_CONV}",
            lambda m: f"head.{m['t']}.{m['i']}.{m['p']}",
        ),
        (
            rf"rpn\.head\.(?P<n>cls_logits|bbox_pred)\.{_CONV}",
            lambda m: f"head.{m['n']}.{m['p']}",
        ),
        (rf"rpn\.head\.centerness\.{_CONV}", lambda m: f"head.ctrness.{m['p']}"),
        (r"rpn\.head\.scales\.(?P<i>\d+)\.scale", lambda m: f"head.scales.{m['i']}.scale"),
    ]
)

# AdelaiDet key -> ours: the ResNet-FPN backbone keeps its (Detectron2) names, the head moves.
ADELAIDET_RULES: list[Rule] = _rules(
    [
        (r"backbone\.bottom_up\.(?:stem|res[2-5])\..+", lambda m: m[0]),
        (r"backbone\.fpn_(?:lateral|output)[3-5]\..+", lambda m: m[0]),
        (rf"backbone\.top_block\.p[67]\.{_CONV}", lambda m: m[0]),
        (
            r"proposal_generator\.fcos_head\.(?P<rest>(?:cls|bbox|share)_tower\.\d+\..+)",
            lambda m: f"head.{m['rest']}",
        ),
        (
            rf"proposal_generator\.fcos_head\.(?P<n>cls_logits|bbox_pred|ctrness)\.{_CONV}",
            lambda m: f"head.{m['n']}.{m['p']}",
        ),
        (
            rf"proposal_generator\.fcos_head\.centerness\.{_CONV}",
            lambda m: f"head.ctrness.{m['p']}",
        ),
        (
            r"proposal_generator\.fcos_head\.scales\.(?P<i>\d+)\.scale",
            lambda m: f"head.scales.{m['i']}.scale",
        ),
    ]
)

# Keys both releases name but fcos_d2 cannot load: say why instead of only "unmapped".
_UNSUPPORTED = [
    (
        re.compile(r"\.(?:conv2\.conv|conv2\.offset|\d+\.conv|\d+\.offset)\.(?:weight|bias)$"),
        "deformable convolution (dcnv2 models): the authors' is modulated (27 offset channels), "
        "fcos_d2's tower conv is not, and Detectron2's deformable ResNet needs its compiled ops",
    ),
]


def _apply(rules: list[Rule], key: str) -> Optional[str]:
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target(match)
    return None


def strip_ddp_prefix(key: str) -> str:
    """The original release saved its DistributedDataParallel wrapper: ``module.`` on every key."""
    return key[len("module.") :] if key.startswith("module.") else key


def fcos_key_to_ours(key: str) -> Optional[str]:
    """Our name for a key of the original FCOS release, or None if it has none."""
    key = strip_ddp_prefix(key)
    if any(pattern.search(key) for pattern, _ in _UNSUPPORTED):
        return None
    return _apply(FCOS_RULES, key)


def adelaidet_key_to_ours(key: str) -> Optional[str]:
    """Our name for a key of an AdelaiDet FCOS checkpoint, or None if it has none."""
    key = strip_ddp_prefix(key)
    if any(pattern.search(key) for pattern, _ in _UNSUPPORTED):
        return None
    return _apply(ADELAIDET_RULES, key)


def unmapped_reason(key: str) -> str:
    """Why a key has no fcos_d2 name (for the converter's report)."""
    for pattern, reason in _UNSUPPORTED:
        if pattern.search(key):
            return reason
    return "no fcos_d2 counterpart"


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


_FCOS_MARKERS = ("backbone.body.", "rpn.head.")
# fvcore's Checkpointer logs the rest of the report (missing / unexpected keys) here: the lines
# for keys this module renames then read and sit together with Detectron2's own.
_report = logging.getLogger("fvcore.common.checkpoint")


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
        names = [strip_ddp_prefix(k[len(prefix) :]) for k in state_dict if k.startswith(prefix)]
        if any(name.startswith(_FCOS_MARKERS) for name in names):
            raise ConfigError(
                "this checkpoint has the original FCOS (maskrcnn-benchmark) layout "
                "(backbone.body.*, rpn.head.*), which fcos_d2 does not load directly: convert it "
                f"first with `{CONVERT_HINT}` and set MODEL.WEIGHTS to OUT"
            )
        return
    own = module.state_dict(prefix=prefix, keep_vars=True)
    metadata = getattr(state_dict, "_metadata", None)
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


def register_adelaidet_loading(module: nn.Module) -> None:
    """Make ``module.load_state_dict`` (and so Detectron2's checkpointer) accept AdelaiDet keys."""
    module._register_load_state_dict_pre_hook(load_adelaidet_keys, with_module=True)


# How torch.load(weights_only=True) and a restricted unpickler name the class they refused.
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global|global (\S+) is not allowed")
# What torch.load / pickle raise for unreadable files.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError)


class FCOSCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` whose files survive a crash and whose load errors
    name the file.

    fvcore writes ``model_XXXX.pth`` and then ``last_checkpoint`` in place: a process killed while
    writing leaves a truncated file that ``--resume`` then fails on. Here both are written to a
    temporary file and renamed, so the file ``last_checkpoint`` names is always complete.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        # fvcore's Checkpointer.save, with the write made atomic.
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(tag, lambda f: f.write(last_filename_basename.encode()))

    def load(self, path: str, checkpointables=None):
        local = path and "://" not in path
        if local and not os.path.isfile(path):
            raise ConfigError(f"MODEL.WEIGHTS: checkpoint file {path} does not exist")
        if path and path.endswith(".pkl"):
            self.logger.warning(
                "%s: Detectron2 reads .pkl (model zoo) files with full unpickling, which can run "
                "code stored in the file: load only files you trust",
                path,
            )
        try:
            return super().load(path, checkpointables)
        except _LOAD_ERRORS as error:
            if isinstance(error, ConfigError) or not local:
                raise
            refused = REFUSED_GLOBAL.search(str(error))
            if refused:
                raise ConfigError(
                    f"MODEL.WEIGHTS: {path} stores a Python object ({refused[1] or refused[2]}) "
                    "that torch.load(weights_only=True) refuses to unpickle, since unpickling can "
                    "run code. If you trust the file, re-save its weights: torch.save("
                    "{'model': torch.load(path, weights_only=False)['model']}, new_path)"
                ) from None
            raise ConfigError(
                f"MODEL.WEIGHTS: {path} is not a readable checkpoint (truncated or corrupt?): "
                f"{type(error).__name__}: {error}"
            ) from None

    def _torch_load(self, f: str) -> Any:
        # Explicit for torch < 2.6, whose torch.load unpickles everything by default.
        return torch.load(f, map_location="cpu", weights_only=True)


def _atomic_write(path: str, write: Callable) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
