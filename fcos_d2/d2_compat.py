"""Every private name of Detectron2, fvcore and torch that fcos_d2 relies on, each with its reason.

The rest of fcos_d2 uses only public API; a Detectron2 or torch upgrade that breaks one of these
breaks it here, in one place.
"""

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

import torch
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.engine import defaults as d2_defaults


@contextlib.contextmanager
def create_ddp_model_replaced(replacement: Callable[..., Any]) -> Iterator[None]:
    """While active, ``DefaultTrainer.__init__`` wraps its model with ``replacement`` instead of
    Detectron2's ``create_ddp_model``.

    ``DefaultTrainer.__init__`` calls the module-level ``create_ddp_model(model,
    broadcast_buffers=False)``, which passes ``device_ids=[local_rank]``; CPU
    ``DistributedDataParallel`` rejects device ids, and there is no argument to change it.
    """
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = replacement
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


def step_runner(trainer: DefaultTrainer) -> TrainerBase:
    """The ``SimpleTrainer`` / ``AMPTrainer`` that runs ``DefaultTrainer``'s steps
    (``trainer._trainer``: no public getter)."""
    return trainer._trainer


def replace_step_runner(trainer: DefaultTrainer, runner: TrainerBase) -> None:
    """Make ``runner`` run ``DefaultTrainer``'s steps (``trainer._trainer``: no public setter);
    ``DefaultTrainer`` checkpoints and resumes its state through ``trainer.state_dict()``."""
    trainer._trainer = runner


def last_eval_results(trainer: DefaultTrainer) -> dict[str, Any]:
    """The results of the trainer's last evaluation (its ``EvalHook`` runs at the end of training).

    ``DefaultTrainer`` keeps them in ``_last_eval_results`` and returns them from ``train()``
    only when ``TEST.EXPECTED_RESULTS`` is set; evaluating again would double the time.
    """
    return getattr(trainer, "_last_eval_results", {})


def wrap_eval_function(hook: hooks.EvalHook, wrapper: Callable[[Callable], Callable]) -> None:
    """Replace the function an ``EvalHook`` runs by ``wrapper(function)``.

    ``DefaultTrainer.build_hooks`` builds its ``EvalHook`` around a closure that stores the
    results where :func:`last_eval_results` reads them; the hook keeps it in ``_func`` and has no
    public way to change it short of copying ``build_hooks``.
    """
    hook._func = wrapper(hook._func)


class WeightsOnlyTorchLoad:
    """Mixin for ``DetectionCheckpointer``: ``.pth`` files read with
    ``torch.load(weights_only=True)``, which refuses pickled code, also on torch < 2.6 (whose
    default unpickles everything). ``DetectionCheckpointer._torch_load`` is Detectron2's own
    override point for how a ``.pth`` file is read."""

    def _torch_load(self, f: str) -> Any:
        return torch.load(f, map_location="cpu", weights_only=True)


def state_dict_metadata(state_dict: dict) -> Optional[dict]:
    """The per-module versions that ``nn.Module.state_dict()`` attaches as ``_metadata`` (read by
    e.g. BatchNorm's ``_load_from_state_dict``); renamed keys must take theirs along."""
    return getattr(state_dict, "_metadata", None)


def lerp_all_(targets: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weight: float) -> None:
    """``t.lerp_(e, weight)`` for every pair, in one multi-tensor kernel (``torch._foreach_lerp_``,
    what ``torch.optim`` uses; there is no public multi-tensor API): a moving average of a model's
    weights costs one launch instead of one per tensor."""
    torch._foreach_lerp_(list(targets), list(ends), weight)


def cpu_has_native_bf16() -> bool:
    """True where the CPU has AVX512-BF16 or AMX tiles: torch's own checks,
    ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` (no public ones)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def detectron2_has_compiled_coco_eval() -> bool:
    """Whether Detectron2 was built with its C++ ``COCOeval_opt``: without it
    ``detectron2.evaluation.coco_evaluation`` binds the name to pycocotools' ``COCOeval`` (the test
    its own ``COCOEvaluator`` makes; there is no public flag)."""
    from detectron2.evaluation import coco_evaluation

    return coco_evaluation.COCOeval_opt is not coco_evaluation.COCOeval


@contextlib.contextmanager
def coco_eval_class_replaced(replacement: type) -> Iterator[None]:
    """While active, ``COCOEvaluator`` evaluates with ``replacement`` where it would run
    pycocotools' ``COCOeval`` (its compiled ``COCOeval_opt`` absent).

    ``COCOEvaluator._eval_predictions`` passes the module-level ``COCOeval`` of
    ``detectron2.evaluation.coco_evaluation`` to ``_evaluate_predictions_on_coco``; no argument
    chooses another class.
    """
    from detectron2.evaluation import coco_evaluation

    original = coco_evaluation.COCOeval
    coco_evaluation.COCOeval = replacement
    try:
        yield
    finally:
        coco_evaluation.COCOeval = original
