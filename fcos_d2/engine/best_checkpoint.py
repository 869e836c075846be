"""``model_best.pth``: the weights that scored best on one evaluation metric during training
(``SOLVER.BEST_CHECKPOINT.METRIC`` / ``.MODE``, ours; ``train.best_checkpoint`` in LazyConfig).

Detectron2's ``hooks.BestCheckpointer`` does the same, but forgets the best score on ``--resume``
(the next evaluation then overwrites a better ``model_best.pth``), saves the raw weights where
the evaluation scored the moving average (``MODEL_EMA``), and only warns about a metric name that
no evaluation produces; this hook keeps its best score in every checkpoint, saves the weights that
were evaluated, and stops with the names of the metrics there are.
"""

import contextlib
import logging
import math
import operator
from typing import Any, Optional

from detectron2.engine import HookBase

from ..checks import ConfigError, check_choice, check_that
from .ema import ModelEMA

logger = logging.getLogger("fcos_d2")

MODES = {"max": operator.gt, "min": operator.lt}
# What the evaluations put in the training storage: COCOEvaluator's box metrics (per-class
# "AP-<class>" too) and, with TEST.VAL_LOSS, the validation losses.
COCO_BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def check_metric(
    metric: str, mode: str, val_loss: bool, key: str = "SOLVER.BEST_CHECKPOINT"
) -> None:
    """The metric's form, before training: ``bbox/<COCO metric>``, ``validation/<loss>`` (which
    needs the validation loss) or another evaluator's ``<task>/<name>``; with several test
    datasets, Detectron2 names the results ``<dataset>/<task>/<name>``."""
    check_choice(mode, tuple(MODES), f"{key}.MODE")
    check_that(
        metric.count("/") in (1, 2) and all(metric.split("/")),
        f"{key}.METRIC",
        "'<task>/<name>' as in metrics.json, e.g. 'bbox/AP50' or 'validation/total_loss' "
        "('<dataset>/<task>/<name>' with several DATASETS.TEST)",
        metric,
    )
    task, name = metric.split("/")[-2:]
    if task == "bbox":
        check_that(
            name in COCO_BOX_METRICS or name.startswith("AP-"),
            f"{key}.METRIC",
            f"a COCO box metric bbox/{{{', '.join(COCO_BOX_METRICS)}, AP-<class>}}",
            metric,
        )
    if task == "validation":
        check_that(
            val_loss,
            f"{key}.METRIC",
            "a metric evaluations compute: 'validation/...' needs TEST.VAL_LOSS True",
            metric,
        )


class BestCheckpoint(HookBase):
    """Saves ``<prefix>.pth`` whenever the evaluation that just ran beats the best ``metric`` so
    far. Place it after the ``EvalHook`` (same ``eval_period``), in the main process."""

    def __init__(
        self,
        checkpointer,
        metric: str,
        mode: str,
        eval_period: int,
        ema: Optional[ModelEMA] = None,
        prefix: str = "model_best",
        key: str = "SOLVER.BEST_CHECKPOINT.METRIC",
    ):
        self.checkpointer, self.metric, self.eval_period = checkpointer, metric, eval_period
        self.key = key  # the config key that names the metric, for errors
        self.better = MODES[mode]
        self.ema, self.prefix = ema, prefix
        self.best: Optional[float] = None
        self.best_iteration: Optional[int] = None

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self.eval_period > 0 and next_iter % self.eval_period == 0:
            if next_iter != self.trainer.max_iter:  # then EvalHook evaluates in after_train
                self._check()

    def after_train(self) -> None:
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._check()

    def _check(self) -> None:
        latest = self.trainer.storage.latest()
        if self.metric not in latest:
            known = sorted(k for k in latest if "/" in k and not k.startswith(("fcos/", "data_")))
            raise ConfigError(
                f"{self.key} {self.metric!r} is not among the evaluation results: {known}"
            )
        value, iteration = latest[self.metric]
        if not math.isfinite(value):
            return
        if self.best is None or self.better(value, self.best):
            self.best, self.best_iteration = float(value), int(iteration)
            # The weights that were evaluated: the moving average, when there is one.
            applied = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
            with applied:
                self.checkpointer.save_weights(
                    self.prefix, iteration=int(iteration), metric={self.metric: float(value)}
                )
            logger.info("%s: %s = %.5f at iteration %d", self.prefix, self.metric, value, iteration)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "iteration": self.best_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_iteration = state["best"], state["iteration"]
