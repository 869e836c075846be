"""Training and evaluation from LazyConfig files (``configs/LazyConfig/``): Detectron2's
tools/lazyconfig_train_net.py, plus what ``train_net.py`` offers YAML users.

Added to Detectron2's script: ``train.device`` falls back to the CPU without CUDA, CPU processes
share the cores and train with Gloo DDP, ``train.amp.enabled`` means bfloat16 autocast on a CPU,
the embedded datasets are registered from a top-level ``datasets`` entry before anything is built,
and an FCOS model's class count is checked against the training data.
"""

import logging
from typing import Any

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    TrainerBase,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf

from .checkpoint import FCOSCheckpointer
from .d2_compat import CPUAutocastTrainer
from .ema import EMAHook, ModelEMA, evaluate_with_average
from .engine import available_device, check_dataset_classes, share_cpu_threads
from .modeling import FCOS
from .precision import autocast_dtype

logger = logging.getLogger("fcos_d2")


def setup(args) -> DictConfig:
    """Config (file + ``key=value`` overrides), logging and datasets for one worker process."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    cfg.train.device = available_device(cfg.train.device, "train.device")
    default_setup(cfg, args)
    share_cpu_threads(cfg.train.device)
    if "datasets" in cfg:
        instantiate(cfg.datasets)
    return cfg


def build_model(cfg: DictConfig) -> torch.nn.Module:
    model = instantiate(cfg.model)
    return model.to(cfg.train.device)


def wrap_ddp(cfg: DictConfig, model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model`` (a no-op in one process); CPU models take no device ids."""
    if cfg.train.device == "cpu":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def build_trainer(cfg: DictConfig, model, data_loader, optimizer) -> TrainerBase:
    """``SimpleTrainer``, or with ``train.amp.enabled`` Detectron2's ``AMPTrainer`` (CUDA,
    float16) or bfloat16 autocast on CPUs that compute it natively (``train.amp.cpu_bf16``:
    "auto", "always" or "never", as ``SOLVER.AMP.CPU_BF16``)."""
    if not cfg.train.amp.enabled:
        return SimpleTrainer(model, data_loader, optimizer)
    if cfg.train.device == "cpu":
        cpu_bf16 = OmegaConf.select(cfg, "train.amp.cpu_bf16", default="auto")
        if autocast_dtype("cpu", cpu_bf16, "train.amp.enabled") is None:
            return SimpleTrainer(model, data_loader, optimizer)
        return CPUAutocastTrainer(model, data_loader, optimizer)
    return AMPTrainer(model, data_loader, optimizer)


def check_model_classes(cfg: DictConfig, model: torch.nn.Module) -> None:
    names = OmegaConf.select(cfg, "dataloader.train.dataset.names", default=None)
    if isinstance(model, FCOS) and names is not None:
        names = [names] if isinstance(names, str) else list(names)
        check_dataset_classes(model.num_classes, names, "model.head.num_classes")


def do_test(cfg: DictConfig, model: torch.nn.Module) -> dict[str, Any]:
    """COCO-style evaluation of ``dataloader.test`` with ``dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args, cfg: DictConfig) -> dict[str, Any]:
    """Train (resuming with ``--resume``) with Detectron2's standard hooks; returns the results
    of the last evaluation (one always runs at the end of training)."""
    model = build_model(cfg)
    logger.info("Model:\n%s", model)
    check_model_classes(cfg, model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = wrap_ddp(cfg, model, **cfg.train.ddp)
    trainer = build_trainer(cfg, model, train_loader, optimizer)
    # train.model_ema.{enabled, decay}: MODEL_EMA.* of the YAML configs (fcos_d2/ema.py).
    ema = None
    if OmegaConf.select(cfg, "train.model_ema.enabled", default=False):
        ema = ModelEMA(model, OmegaConf.select(cfg, "train.model_ema.decay", default=0.999))
    checkpointables = {"trainer": trainer, **({"ema": ema} if ema is not None else {})}
    checkpointer = FCOSCheckpointer(model, cfg.train.output_dir, **checkpointables)
    last_results: dict[str, Any] = {}

    def test_and_keep_results() -> dict[str, Any]:
        last_results.clear()
        last_results.update(do_test(cfg, model))
        return last_results

    evaluate = (
        test_and_keep_results if ema is None else evaluate_with_average(ema, test_and_keep_results)
    )

    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            EMAHook(ema) if ema is not None else None,
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if main_process
            else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main_process
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that just finished: resume at the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results


def main(args) -> dict[str, Any]:
    """``lazyconfig_train_net.py``'s body: train then evaluate, or only evaluate
    ``train.init_checkpoint`` with ``--eval-only``."""
    cfg = setup(args)
    if args.eval_only:
        model = wrap_ddp(cfg, build_model(cfg))
        FCOSCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(args, cfg)
