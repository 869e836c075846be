"""What both trainers (yacs ``train_net.py`` and ``lazyconfig_train_net.py``) do the same way:
threads and DDP on CPUs, the step runner for the chosen precision, the class-count check, the
moving average of the weights, and the model an evaluation runs (the oracle wrapper or not).

The yacs trainer hands these to Detectron2's ``DefaultTrainer``; the LazyConfig trainer assembles
Detectron2's ``SimpleTrainer`` and hooks with them, as Detectron2's lazy script does.
"""

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from ..checks import ConfigError
from ..d2_compat import wrap_eval_function
from ..inference.oracle import OracleQualityFCOS, uses_oracle_quality
from ..modeling.fcos import FCOS
from ..precision import autocast_dtype
from ..utils import unwrap_model
from .ema import EMAHook, ModelEMA, evaluate_with_average
from .resume import PreemptionHook, TrainingState

logger = logging.getLogger("fcos_d2")


def setup_logging(output_dir: str) -> None:
    """fcos_d2's log lines (the precision used, metrics trimmed on resume, a preemption...) on
    the console and in ``log.txt``, as ``default_setup`` does for Detectron2's."""
    setup_logger(
        output_dir, distributed_rank=comm.get_rank(), name="fcos_d2", abbrev_name="fcos_d2"
    )


def share_cpu_threads(device: str) -> None:
    """On the CPU, split the machine's cores between this machine's worker processes."""
    if device == "cpu" and comm.get_local_size() > 1:
        # Processes share the machine's cores; oversubscription only slows every one of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """Detectron2's ``create_ddp_model`` (a no-op in one process), without the ``device_ids``
    that CPU ``DistributedDataParallel`` rejects."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return d2_create_ddp_model(model, **kwargs)


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose steps run under CPU bfloat16 autocast.

    Detectron2's ``AMPTrainer`` is CUDA-only (float16 with a gradient scaler); bfloat16 keeps
    float32's exponent range, so it needs no scaler. The FCOS losses are computed in float32
    regardless.
    """

    def run_step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


def build_step_runner(
    model: nn.Module,
    data_loader,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool,
    cpu_bf16: str = "auto",
    amp_key: str = "SOLVER.AMP.ENABLED",
) -> TrainerBase:
    """What runs each training step: ``SimpleTrainer`` in float32; with ``amp``, Detectron2's
    ``AMPTrainer`` (float16 + gradient scaler) on CUDA, or bfloat16 autocast on CPUs where
    :func:`~fcos_d2.precision.autocast_dtype` allows it (``cpu_bf16``), else float32."""
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    device_type = next(model.parameters()).device.type
    if device_type == "cuda":
        return AMPTrainer(model, data_loader, optimizer)
    if autocast_dtype(device_type, cpu_bf16, amp_key) is torch.bfloat16:
        return CPUAutocastTrainer(model, data_loader, optimizer)
    return SimpleTrainer(model, data_loader, optimizer)


def check_dataset_classes(num_classes: int, dataset_names: Sequence[str], key: str) -> None:
    """``num_classes`` (set by ``key``) must be the class count of every dataset that knows it.

    A mismatch would otherwise go unnoticed: class ``num_classes`` becomes background, larger ones
    fail deep inside the loss.
    """
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ConfigError(
                f"{key}={num_classes} but dataset {name!r} has {len(classes)} classes "
                f"{list(classes)}"
            )


def check_model_classes(model: nn.Module, dataset_names: Sequence[str], key: str) -> None:
    """An FCOS detector's class count (set by ``key``) against its training datasets'."""
    model = unwrap_model(model)
    if isinstance(model, FCOS):
        check_dataset_classes(model.num_classes, dataset_names, key)


def build_ema(model: nn.Module, enabled: bool, decay: float) -> Optional[ModelEMA]:
    """The moving average of ``model``'s weights (``MODEL_EMA.*`` / ``train.model_ema.*``)."""
    return ModelEMA(model, decay) if enabled else None


def add_ema_hooks(hook_list: list, ema: Optional[ModelEMA]) -> list:
    """``hook_list`` with the average updated after each step (after the LR scheduler, before the
    checkpointer and the evaluations) and every evaluation run on the averaged weights."""
    if ema is None:
        return hook_list
    hook_list = [h for h in hook_list if h is not None]
    scheduler = [isinstance(h, hooks.LRScheduler) for h in hook_list].index(True)
    hook_list.insert(scheduler + 1, EMAHook(ema))
    for hook in hook_list:
        if isinstance(hook, hooks.EvalHook):
            wrap_eval_function(hook, partial(evaluate_with_average, ema))
    return hook_list


def add_best_checkpoint_hook(hook_list: list, best: HookBase) -> list:
    """``hook_list`` with ``best`` right after the evaluation hook, whose results it reads."""
    hook_list = [h for h in hook_list if h is not None]
    evaluation = [isinstance(h, hooks.EvalHook) for h in hook_list].index(True)
    return hook_list[: evaluation + 1] + [best] + hook_list[evaluation + 1 :]


def add_resume_hooks(
    hook_list: list, data_loader, model: nn.Module, checkpointer, checkpoint_period: int
) -> list:
    """``hook_list`` with what an exact ``--resume`` needs in each checkpoint (first, so that it
    is gathered before the checkpointer writes) and the stop on a preemption signal (last)."""
    state = TrainingState(data_loader, model, checkpoint_period)
    return [state, *hook_list, PreemptionHook(checkpointer, state)]


@contextlib.contextmanager
def preemption_handlers_restored(hook_list: list) -> Iterator[None]:
    """Run training; afterwards, whatever happened, the signal handlers of the
    :class:`PreemptionHook` in ``hook_list`` are restored."""
    try:
        yield
    finally:
        for hook in hook_list:
            if isinstance(hook, PreemptionHook):
                hook.restore()


def evaluation_model(model: nn.Module) -> nn.Module:
    """``model`` as evaluations run it: wrapped to score with the ground-truth center-ness where
    its config asks for the oracle (then its inputs must keep their annotations)."""
    return OracleQualityFCOS(model) if uses_oracle_quality(model) else model
