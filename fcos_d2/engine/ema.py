"""Exponential moving average (EMA) of the weights during training (``MODEL_EMA.*``, ours).

Short schedules end on noisy weights: the last updates move the model by about as much as the
seed changes it. The average of the recent weights is a smoother model (Polyak averaging) that
evaluates better and varies less from run to run. The average covers every floating-point
parameter and buffer (BatchNorm statistics included) and is updated after each step with
``decay_t = min(decay, (1 + t) / (10 + t))``, so that the first updates are not dominated by the
initial weights.

With the hook, evaluations during training use the average, and after the last step the model
takes the average for good: ``model_final.pth`` holds it as ``model``. Every checkpoint also
stores the average under ``ema`` (with its update count), so ``--resume`` continues it.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from detectron2.engine import HookBase
from torch import nn

from ..checks import check_that
from ..d2_compat import lerp_all_
from ..utils import unwrap_model


class ModelEMA:
    """The moving average of a model's state; ``state_dict``/``load_state_dict`` make it a
    Detectron2 checkpointable."""

    def __init__(self, model: nn.Module, decay: float):
        check_that(0.0 <= decay < 1.0, "MODEL_EMA.DECAY", "in [0, 1)", decay, "ModelEMA decay")
        self.model = unwrap_model(model)
        self.decay = decay
        self.num_updates = 0
        self.final = False
        self.state = self._copy_of_model_state()

    def _copy_of_model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def reset(self) -> None:
        """Start the average from the model's current weights (e.g. just loaded)."""
        self.state = self._copy_of_model_state()
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        averaged, current = [], []
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                averaged.append(self.state[name])
                current.append(value)
            else:  # e.g. BatchNorm's num_batches_tracked
                self.state[name].copy_(value)
        if averaged:
            lerp_all_(averaged, current, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Give the model the averaged weights for good (after the last step)."""
        self.model.load_state_dict(self.state)
        self.final = True

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own after it."""
        if self.final:  # already averaged for good
            yield
            return
        own = self._copy_of_model_state()
        self.model.load_state_dict(self.state)
        try:
            yield
        finally:
            self.model.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.state) - set(state["state"]))
        unexpected = sorted(set(state["state"]) - set(self.state))
        check_that(
            not missing and not unexpected,
            "the checkpoint's ema",
            "an average of this model's weights",
            f"an average without {missing[:5]} and with {unexpected[:5]}",
            "ModelEMA.load_state_dict",
        )
        self.state = {k: v.to(self.state[k].device) for k, v in state["state"].items()}
        self.num_updates = int(state["num_updates"])


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every step and gives the model the average after the
    last one. Place it before the checkpointer and evaluation hooks, so that they see it."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def before_train(self) -> None:
        if self.ema.num_updates == 0:  # not resumed: average from the loaded weights
            self.ema.reset()

    def after_step(self) -> None:
        self.ema.update()
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.ema.copy_to_model()


def evaluate_with_average(ema: ModelEMA, evaluate: Callable[[], Any]) -> Callable[[], Any]:
    """``evaluate`` run with the averaged weights in the model."""

    def run() -> Any:
        with ema.applied():
            return evaluate()

    return run
