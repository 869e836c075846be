"""Training and evaluation in the Detectron2 style: ``DefaultTrainer`` + ``COCOEvaluator``.

Everything here is Detectron2's own machinery; this module adds the fcos_d2 config keys, a CPU
fallback, AdamW, CPU bfloat16 autocast and multi-process training on CPUs (Gloo). Workarounds for
Detectron2 internals live in :mod:`fcos_d2.d2_compat`.
"""

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from .checkpoint import FCOSCheckpointer
from .checks import ConfigError, check_choice
from .config import add_fcos_config
from .d2_compat import cpu_friendly_ddp, last_eval_results, use_cpu_autocast
from .data.augmentation import build_train_mapper
from .data.builtin import register_datasets_from_config
from .data.user_datasets import check_training_data
from .ema import EMAHook, ModelEMA, evaluate_with_average
from .precision import autocast_dtype
from .tta import build_tta_model

logger = logging.getLogger("fcos_d2")

OPTIMIZERS = ("SGD", "ADAMW")


def check_num_classes(cfg: CfgNode) -> None:
    """FCOS's class count must match the training data's (once loaded, its metadata knows).

    A mismatch would otherwise go unnoticed: class NUM_CLASSES becomes background, larger ones
    fail deep inside the loss.
    """
    if cfg.MODEL.META_ARCHITECTURE == "FCOS":
        check_dataset_classes(
            cfg.MODEL.FCOS.NUM_CLASSES, cfg.DATASETS.TRAIN, "MODEL.FCOS.NUM_CLASSES"
        )


def check_dataset_classes(num_classes: int, dataset_names: Sequence[str], key: str) -> None:
    """``num_classes`` (set by ``key``) must be the class count of every dataset that knows it."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ConfigError(
                f"{key}={num_classes} but dataset {name!r} has {len(classes)} classes "
                f"{list(classes)}"
            )


def available_device(device: str, key: str = "MODEL.DEVICE") -> str:
    """``device`` (set by ``key``), or "cpu" where it names CUDA and CUDA is unavailable."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("%s=%s but CUDA is not available: using the CPU", key, device)
        return "cpu"
    return device


def share_cpu_threads(device: str) -> None:
    """On the CPU, split the machine's cores between this machine's worker processes."""
    if device == "cpu" and comm.get_local_size() > 1:
        # Processes share the machine's cores; oversubscription only slows every one of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with COCO evaluation, CPU multi-process training and
    ``SOLVER.AMP.ENABLED`` meaning bfloat16 autocast on the CPU."""

    def __init__(self, cfg: CfgNode):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"
        base_cfg = cfg
        if cpu_amp:
            base_cfg = cfg.clone()
            base_cfg.defrost()
            # Else DefaultTrainer builds the CUDA-only AMPTrainer.
            base_cfg.SOLVER.AMP.ENABLED = False
        check_training_data(cfg)
        with cpu_friendly_ddp():
            super().__init__(base_cfg)
        check_num_classes(cfg)
        if cpu_amp:
            # self.cfg is DefaultTrainer's (possibly worker-scaled) copy of base_cfg.
            self.cfg.defrost()
            self.cfg.SOLVER.AMP.ENABLED = True
            self.cfg.freeze()
            if autocast_dtype("cpu", cfg.SOLVER.AMP.CPU_BF16, "SOLVER.AMP.ENABLED") is not None:
                use_cpu_autocast(self)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    def build_hooks(self) -> list:
        # DefaultTrainer made a DetectionCheckpointer just before: use ours (atomic saves, named
        # load errors) in the hooks and for resume_or_load.
        checkpointables = dict(self.checkpointer.checkpointables)
        self.ema = None
        if self.cfg.MODEL_EMA.ENABLED:
            self.ema = ModelEMA(self.model, self.cfg.MODEL_EMA.DECAY)
            checkpointables["ema"] = self.ema
        self.checkpointer = FCOSCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **checkpointables
        )
        hook_list = super().build_hooks()
        if self.ema is not None:
            # After the LR scheduler, before the checkpointer and the evaluation.
            scheduler = [isinstance(h, hooks.LRScheduler) for h in hook_list].index(True)
            hook_list.insert(scheduler + 1, EMAHook(self.ema))
            for hook in hook_list:
                if isinstance(hook, hooks.EvalHook):
                    hook._func = evaluate_with_average(self.ema, hook._func)
        return hook_list

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
            # One fused kernel instead of a loop over tensors: 6x faster updates on a CPU (R-18:
            # 13 vs 80 ms per step, 1 thread), 5% of a quickstart step; the same update up to
            # float rounding. Not on CUDA, where fused optimizers skip GradScaler's unscale_
            # that Detectron2's gradient clipping relies on.
            try:
                adamw = torch.optim.AdamW(params, fused=True, **settings)
            except (RuntimeError, TypeError):  # torch < 2.4 fuses on CUDA only
                pass
        adamw = adamw or torch.optim.AdamW(params, **settings)
        return maybe_add_gradient_clipping(cfg, adamw)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None) -> "OrderedDict[str, Any]":
        """Detectron2's evaluation; ``MODEL.FCOS.INFERENCE_QUALITY: oracle`` evaluates through the
        analysis API, which feeds the model ground-truth center-ness."""
        if cfg.MODEL.META_ARCHITECTURE == "FCOS" and cfg.MODEL.FCOS.INFERENCE_QUALITY == "oracle":
            from .analysis.oracle import test_with_oracle_quality

            return test_with_oracle_quality(cfg, model, lambda name: cls.build_evaluator(cfg, name))
        return super().test(cfg, model, evaluators)

    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model: torch.nn.Module) -> "OrderedDict[str, Any]":
        """Evaluation with test-time augmentation (``TEST.AUG.*``, :mod:`fcos_d2.tta`), as in
        Detectron2's tools/train_net.py: result keys get a ``_TTA`` suffix."""
        logger.info("Running inference with test-time augmentation ...")
        model = build_tta_model(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in results.items())


def build_cfg(config_file: str = "", opts: list = ()) -> CfgNode:
    """Detectron2 defaults + fcos_d2 keys, merged with a YAML file and ``KEY VALUE`` overrides.

    yacs' errors (unknown key, wrong type, odd number of overrides) become :class:`ConfigError`
    naming the file or the command line.
    """
    cfg = add_fcos_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError) as error:
            raise ConfigError(
                f"in {config_file} (or its _BASE_ files): {_yacs_message(error)}"
            ) from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as error:
        raise ConfigError(f"in the command-line overrides: {_yacs_message(error)}") from None
    cfg.MODEL.DEVICE = available_device(cfg.MODEL.DEVICE)
    return cfg


def _yacs_message(error: Exception) -> str:
    # KeyError's str() quotes its message; the others are plain.
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


def setup(args) -> CfgNode:
    """Config, logging and the embedded datasets for one worker process."""
    cfg = build_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    share_cpu_threads(cfg.MODEL.DEVICE)
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
