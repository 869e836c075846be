"""Training and evaluation from yacs configs (``train_net.py``): Detectron2's ``DefaultTrainer`` +
``COCOEvaluator`` (with faster-coco-eval where Detectron2 has no compiled one), with the runtime
of :mod:`fcos_d2.engine.runtime` (CPU fallback and Gloo DDP, precision, moving average, class
check, oracle and TTA evaluation) and AdamW."""

import logging
import os
from collections import OrderedDict
from typing import Any, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..checkpoint import FCOSCheckpointer
from ..checks import check_choice
from ..config import build_cfg
from ..d2_compat import (
    create_ddp_model_replaced,
    last_eval_results,
    replace_step_runner,
    step_runner,
)
from ..data.augmentation import build_train_mapper
from ..data.builtin import register_datasets_from_config
from ..data.resumable import build_train_loader_from_cfg
from ..data.user_datasets import check_training_data
from ..evaluation import FasterCOCOEvaluator
from ..inference.oracle import build_annotated_test_loader
from ..inference.slicing import build_slicing_model
from ..inference.tta import build_tta_model
from ..inference.validation import validation_losses
from . import runtime
from .best_checkpoint import BestCheckpoint, check_metric
from .resume import trim_metrics

logger = logging.getLogger("fcos_d2")

OPTIMIZERS = ("SGD", "ADAMW")


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with COCO evaluation, CPU multi-process training,
    ``SOLVER.AMP.ENABLED`` by the precision rule, ``MODEL_EMA``, ``SOLVER.OPTIMIZER`` and sliced
    evaluation (``TEST.SLICE.*``)."""

    def __init__(self, cfg: CfgNode):
        check_training_data(cfg)
        if cfg.SOLVER.BEST_CHECKPOINT.METRIC:
            best = cfg.SOLVER.BEST_CHECKPOINT
            check_metric(best.METRIC, best.MODE, cfg.TEST.VAL_LOSS)
        # Else DefaultTrainer builds the CUDA-only AMPTrainer, which warns on CPUs; the runtime
        # then picks the step runner by device.
        float32_cfg = cfg.clone()
        float32_cfg.defrost()
        float32_cfg.SOLVER.AMP.ENABLED = False
        with create_ddp_model_replaced(runtime.create_ddp_model):
            super().__init__(float32_cfg)
        # self.cfg is DefaultTrainer's (possibly worker-scaled) copy: it says what was asked for.
        self.cfg.defrost()
        self.cfg.SOLVER.AMP.ENABLED = cfg.SOLVER.AMP.ENABLED
        self.cfg.freeze()
        runtime.check_model_classes(self.model, cfg.DATASETS.TRAIN, "MODEL.FCOS.NUM_CLASSES")
        runner = runtime.build_step_runner(
            self.model,
            self.data_loader,
            self.optimizer,
            amp=cfg.SOLVER.AMP.ENABLED,
            cpu_bf16=cfg.SOLVER.AMP.CPU_BF16,
        )
        replace_step_runner(self, runner)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Resumable exactly (:mod:`fcos_d2.data.resumable`), one training size per batch with
        ``INPUT.MIN_SIZE_TRAIN_SAMPLING: choice_per_batch``."""
        return build_train_loader_from_cfg(cfg, build_train_mapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        if cfg.MODEL.META_ARCHITECTURE == "FCOS" and cfg.MODEL.FCOS.INFERENCE_QUALITY == "oracle":
            return build_annotated_test_loader(cfg, dataset_name)
        return build_detection_test_loader(cfg, dataset_name)

    def build_hooks(self) -> list:
        # DefaultTrainer made a DetectionCheckpointer just before: use ours (atomic saves, named
        # load errors) in the hooks and for resume_or_load.
        checkpointables = dict(self.checkpointer.checkpointables)
        self.ema = runtime.build_ema(
            self.model, self.cfg.MODEL_EMA.ENABLED, self.cfg.MODEL_EMA.DECAY
        )
        if self.ema is not None:
            checkpointables["ema"] = self.ema
        self.checkpointer = FCOSCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **checkpointables
        )
        hook_list = runtime.add_ema_hooks(super().build_hooks(), self.ema)
        best = self.cfg.SOLVER.BEST_CHECKPOINT
        if best.METRIC and comm.is_main_process():
            hook_list = runtime.add_best_checkpoint_hook(
                hook_list,
                BestCheckpoint(
                    self.checkpointer, best.METRIC, best.MODE, self.cfg.TEST.EVAL_PERIOD, self.ema
                ),
            )
        self.resume_hooks = runtime.add_resume_hooks(
            hook_list,
            step_runner(self).data_loader,
            self.model,
            self.checkpointer,
            self.cfg.SOLVER.CHECKPOINT_PERIOD,
        )
        return self.resume_hooks

    def train(self):
        with runtime.preemption_handlers_restored(self.resume_hooks):
            return super().train()

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if resume and self.start_iter > 0 and comm.is_main_process():
            trim_metrics(self.cfg.OUTPUT_DIR, self.start_iter)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Detectron2's SGD, or AdamW with ``SOLVER.OPTIMIZER: ADAMW`` (same parameter groups)."""
        check_choice(cfg.SOLVER.OPTIMIZER, OPTIMIZERS, "SOLVER.OPTIMIZER")
        if cfg.SOLVER.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        settings = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
        adamw = None
        if all(p.device.type == "cpu" for p in model.parameters()):
            # One fused kernel instead of a loop over tensors on CPUs (docs/benchmarks.md), the
            # same update up to float rounding. Not on CUDA, where fused optimizers skip
            # GradScaler's unscale_ that Detectron2's gradient clipping relies on.
            try:
                adamw = torch.optim.AdamW(params, fused=True, **settings)
            except (RuntimeError, TypeError):  # torch < 2.4 fuses on CUDA only
                pass
        adamw = adamw or torch.optim.AdamW(params, **settings)
        return maybe_add_gradient_clipping(cfg, adamw)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return FasterCOCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = super().build_model(cfg)
        # Checks TEST.SLICE.* against the model now, not at the first evaluation after training.
        build_slicing_model(cfg, model)
        return model

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None) -> "OrderedDict[str, Any]":
        """Detectron2's evaluation; ``MODEL.FCOS.INFERENCE_QUALITY: oracle`` evaluates the model
        through the oracle wrapper, on inputs that keep their annotations; ``TEST.SLICE.ENABLED``
        on tiles of each original image (:class:`~fcos_d2.inference.FCOSWithSlicing`);
        ``TEST.VAL_LOSS`` adds the losses on each test set as ``validation``."""
        if cfg.TEST.SLICE.ENABLED:
            evaluated = build_slicing_model(cfg, model)
        else:
            evaluated = runtime.evaluation_model(model)
        results = super().test(cfg, evaluated, evaluators)
        if cfg.TEST.VAL_LOSS:
            for name in cfg.DATASETS.TEST:
                losses = validation_losses(model, build_annotated_test_loader(cfg, name))
                # DefaultTrainer.test returns one dataset's results unnested.
                (results if len(cfg.DATASETS.TEST) == 1 else results[name])["validation"] = losses
        return results

    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model: torch.nn.Module) -> "OrderedDict[str, Any]":
        """Evaluation with test-time augmentation (``TEST.AUG.*``, :mod:`fcos_d2.inference.tta`),
        as in Detectron2's tools/train_net.py: result keys get a ``_TTA`` suffix."""
        logger.info("Running inference with test-time augmentation ...")
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        results = DefaultTrainer.test(cfg, build_tta_model(cfg, model), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in results.items())


def setup(args) -> CfgNode:
    """Config, logging and the datasets the config names, for one worker process."""
    cfg = build_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    runtime.setup_logging(cfg.OUTPUT_DIR)
    runtime.share_cpu_threads(cfg.MODEL.DEVICE)
    register_datasets_from_config(cfg)
    return cfg


def main(args) -> dict[str, Any]:
    """``train_net.py``'s body: train (optionally resuming) then evaluate, or only evaluate."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        FCOSCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    tta_results: dict[str, Any] = {}
    if cfg.TEST.AUG.ENABLED:

        def test_with_tta() -> dict[str, Any]:
            tta_results.update(Trainer.test_with_TTA(cfg, trainer.model))
            return tta_results

        trainer.register_hooks([hooks.EvalHook(0, test_with_tta)])  # after training ends
    trainer.train()
    # DefaultTrainer's EvalHook always evaluates once at the end of training.
    return {**last_eval_results(trainer), **tta_results}
