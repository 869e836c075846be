"""Mixed precision that never slows a machine down.

On CUDA, mixed precision is float16 autocast (Detectron2's ``AMPTrainer`` in training). On a CPU it
is bfloat16 autocast, which halves the time of a step where the CPU computes bfloat16 natively
(AVX512-BF16 or AMX) but is emulated, and about 2.7x slower than float32, where it does not. So by
default (``"auto"``) a CPU uses bfloat16 only where it is native and otherwise stays in float32,
saying so once in the log.
"""

import logging
from typing import Optional

import torch

from . import d2_compat
from .checks import check_choice

logger = logging.getLogger(__name__)

# SOLVER.AMP.CPU_BF16: "auto" (native bfloat16 only), "always" (also emulated: for measurements),
# "never" (float32 on every CPU).
CPU_BF16_MODES = ("auto", "always", "never")
_reported: set = set()


def cpu_has_native_bf16() -> bool:
    """True where the CPU has AVX512-BF16 or AMX tiles."""
    return d2_compat.cpu_has_native_bf16()


def autocast_dtype(
    device_type: str, cpu_bf16: str = "auto", purpose: str = "SOLVER.AMP"
) -> Optional[torch.dtype]:
    """The autocast dtype for mixed precision on ``device_type``, or None for float32."""
    check_choice(cpu_bf16, CPU_BF16_MODES, "SOLVER.AMP.CPU_BF16")
    if device_type == "cuda":
        return torch.float16
    if device_type != "cpu" or cpu_bf16 == "never":
        return None
    if cpu_bf16 == "always" or cpu_has_native_bf16():
        return torch.bfloat16
    if purpose not in _reported:
        _reported.add(purpose)
        logger.warning(
            "%s: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where bfloat16 autocast is "
            "emulated and slower than float32: running in float32 (SOLVER.AMP.CPU_BF16 'always' "
            "forces bfloat16)",
            purpose,
        )
    return None
