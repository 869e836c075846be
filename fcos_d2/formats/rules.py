"""Key-renaming rules: ordered (regular expression, target) pairs; the first match names a key."""

import re
from typing import Callable, Optional

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
