"""Key-renaming rules: ordered (regular expression, target) pairs; the first match names a key."""

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor

Rule = tuple["re.Pattern[str]", Callable[["re.Match[str]"], str]]

# Parameter names of a BatchNorm and of a convolution, as a named group ``p``.
BN_PARAM = r"(?P<p>weight|bias|running_mean|running_var)"
CONV_PARAM = r"(?P<p>weight|bias)"

# How torch.load(weights_only=True) and a restricted unpickler name the class they refused.
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global|global (\S+) is not allowed")

# Keys the authors' releases name but fcos_d2 cannot load: say why instead of only "unmapped".
UNSUPPORTED = [
    (
        re.compile(r"\.(?:conv2\.conv|conv2\.offset|\d+\.conv|\d+\.offset)\.(?:weight|bias)$"),
        "deformable convolution (dcnv2 models): the authors' is modulated (27 offset channels), "
        "fcos_d2's tower conv is not, and Detectron2's deformable ResNet needs its compiled ops",
    ),
]


def resnet_block_rules(stages: str) -> list[tuple[str, Callable[["re.Match[str]"], str]]]:
    """Rules for the bottleneck blocks of a torchvision-layout ResNet (``conv1..3``, ``bn1..3``,
    ``downsample.0/1``) whose stages are ``{stages}.layer1`` .. ``layer4``: Detectron2's
    ``res2`` .. ``res5`` (C2..C5) of ``backbone.bottom_up``."""
    layer = rf"{stages}\.layer(?P<layer>[1-4])\.(?P<block>\d+)"

    def res(m: "re.Match[str]") -> str:
        return f"backbone.bottom_up.res{int(m['layer']) + 1}.{m['block']}"

    return [
        (rf"{layer}\.conv(?P<c>[1-3])\.weight", lambda m: f"{res(m)}.conv{m['c']}.weight"),
        (rf"{layer}\.bn(?P<c>[1-3])\.{BN_PARAM}", lambda m: f"{res(m)}.conv{m['c']}.norm.{m['p']}"),
        (rf"{layer}\.downsample\.0\.weight", lambda m: f"{res(m)}.shortcut.weight"),
        (rf"{layer}\.downsample\.1\.{BN_PARAM}", lambda m: f"{res(m)}.shortcut.norm.{m['p']}"),
    ]


def compile_rules(table: list[tuple[str, Callable[["re.Match[str]"], str]]]) -> list[Rule]:
    """Each pattern anchored at both ends."""
    return [(re.compile(f"^{pattern}$"), target) for pattern, target in table]


def apply_rules(rules: list[Rule], key: str) -> Optional[str]:
    """The target of the first rule matching ``key``, or None."""
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target(match)
    return None


def strip_ddp_prefix(key: str) -> str:
    """Releases that saved their DistributedDataParallel wrapper have ``module.`` on every key."""
    return key[len("module.") :] if key.startswith("module.") else key


def is_unsupported(key: str) -> bool:
    return any(pattern.search(key) for pattern, _ in UNSUPPORTED)


def unmapped_reason(key: str) -> str:
    """Why a key has no fcos_d2 name (for the converter's report)."""
    for pattern, reason in UNSUPPORTED:
        if pattern.search(key):
            return reason
    return "no fcos_d2 counterpart"


def _no_reason(key: str) -> Optional[str]:
    return None


def _unchanged(key: str, value: Tensor) -> Tensor:
    return value


def _nothing_implicit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {}


# What a whole FCOS detector has, in fcos_d2's names: a file without one of them is truncated,
# partial, or another architecture.
FCOS_ESSENTIALS = (
    "backbone.bottom_up.stem.conv1.weight",
    "backbone.fpn_lateral5.weight",
    "backbone.fpn_output5.weight",
    "head.cls_tower.0.weight",
    "head.bbox_tower.0.weight",
    "head.cls_logits.weight",
    "head.bbox_pred.weight",
    "head.ctrness.weight",
)


@dataclass(frozen=True)
class Layout:
    """How one release's checkpoint keys and tensors become fcos_d2's (``--from NAME``).

    ``title`` names the release in messages. ``key_to_ours`` names a key (None: no fcos_d2
    name; ``why_unmapped`` may say why). ``markers`` are key prefixes (after a ``module.``
    prefix) that only this layout has: they say which ``--from`` fits a file. Optional:
    ``dropped`` gives the reason a key is left out on purpose (it holds nothing fcos_d2 uses);
    ``rewrite(their key, tensor)`` converts a tensor, and ``rewrite_note`` (formatted with the
    number of tensors it changed) says what it did; ``implicit(converted)`` returns the tensors
    the layout leaves out because they are zero (e.g. absent convolution biases); ``required``:
    our keys a file of this layout must give (else it is truncated, partial or of another
    architecture).
    """

    name: str
    title: str
    author: str
    key_to_ours: Callable[[str], Optional[str]]
    markers: tuple[str, ...]
    dropped: Callable[[str], Optional[str]] = _no_reason
    why_unmapped: Callable[[str], Optional[str]] = _no_reason
    rewrite: Callable[[str, Tensor], Tensor] = _unchanged
    rewrite_note: str = "{} tensors rewritten"
    implicit: Callable[[dict[str, Tensor]], dict[str, Tensor]] = _nothing_implicit
    required: tuple[str, ...] = field(default=())

    def matches(self, key: str) -> bool:
        """Whether ``key`` has this layout's prefixes."""
        return strip_ddp_prefix(key).startswith(self.markers)


# Keys of fcos_d2's own layout (and a Detectron2 FCOS checkpoint in it): nothing to convert.
OURS_MARKERS = ("head.cls_logits.", "head.cls_tower.", "head.bbox_pred.", "head.ctrness.")


def layouts_found(keys, layouts) -> list[Layout]:
    """The layouts whose markers the keys have, the one marking most keys first."""
    names = [strip_ddp_prefix(k) for k in keys]
    counts = [(sum(n.startswith(layout.markers) for n in names), layout) for layout in layouts]
    return [layout for count, layout in sorted(counts, key=lambda c: -c[0]) if count]


def is_ours(keys) -> bool:
    """Whether the keys are in fcos_d2's own layout (the head at ``head.`` with our names)."""
    return any(strip_ddp_prefix(k).startswith(OURS_MARKERS) for k in keys)
