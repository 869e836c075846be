"""Workarounds for Detectron2 behaviour that fcos_d2 needs changed, each in one place.

Everything else in fcos_d2 uses Detectron2's public API as documented.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm


@contextlib.contextmanager
def cpu_friendly_ddp() -> Iterator[None]:
    """While active, Detectron2's ``create_ddp_model`` omits ``device_ids`` for CPU models.

    ``DefaultTrainer.__init__`` calls ``create_ddp_model(model, broadcast_buffers=False)`` with
    ``device_ids=[local_rank]``, which CPU ``DistributedDataParallel`` rejects; there is no
    argument to change it, so the module-level function is swapped for the duration.
    """
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose steps run under CPU bfloat16 autocast.

    Detectron2's ``AMPTrainer`` is CUDA-only (float16 with a gradient scaler) and
    ``DefaultTrainer`` builds it whenever ``SOLVER.AMP.ENABLED``; bfloat16 keeps float32's
    exponent range, so it needs no scaler. The FCOS losses are computed in float32 regardless.
    """

    def run_step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


def use_cpu_autocast(trainer: DefaultTrainer) -> None:
    """Replace the step runner that ``DefaultTrainer`` built (``trainer._trainer``, no public
    setter) by a :class:`CPUAutocastTrainer` on the same model, data loader and optimizer."""
    plain = trainer._trainer
    trainer._trainer = CPUAutocastTrainer(plain.model, plain.data_loader, plain.optimizer)


def last_eval_results(trainer: DefaultTrainer) -> dict[str, Any]:
    """The results of the trainer's last evaluation (its ``EvalHook`` runs at the end of training).

    ``DefaultTrainer`` keeps them in ``_last_eval_results`` and returns them from ``train()``
    only when ``TEST.EXPECTED_RESULTS`` is set; evaluating again would double the time.
    """
    return getattr(trainer, "_last_eval_results", {})
