"""Training and evaluation from LazyConfig files (``configs/LazyConfig/``): Detectron2's
tools/lazyconfig_train_net.py with the runtime ``train_net.py`` has (:mod:`.runtime`).

Added to Detectron2's script: ``train.device`` falls back to the CPU without CUDA, CPU processes
share the cores and train with Gloo DDP, ``train.amp.enabled`` follows the precision rule
(``train.amp.cpu_bf16`` as ``SOLVER.AMP.CPU_BF16``), ``train.model_ema`` as ``MODEL_EMA``, the
embedded datasets are registered from a top-level ``datasets`` entry before anything is built, an
FCOS model's class count is checked against the training data, ``model.core.inference_quality =
"oracle"`` evaluates with the ground-truth center-ness, and an optional top-level ``test.aug``
(``enabled``, ``min_sizes``, ``max_size``, ``flip``, ``box_voting``: ``TEST.AUG.*``) adds an
evaluation with test-time augmentation (``bbox_TTA``).
"""

import copy
import logging
from typing import Any

import torch
from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import DatasetMapperTTA
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import FCOSCheckpointer
from ..config import available_device, load_lazy_config
from ..data.resumable import build_resumable_train_loader
from ..inference.oracle import annotated_loader_config, uses_oracle_quality
from ..inference.tta import FCOSWithTTA
from ..inference.validation import validation_losses
from . import runtime
from .best_checkpoint import BestCheckpoint, check_metric
from .resume import trim_metrics

logger = logging.getLogger("fcos_d2")


def setup(args) -> DictConfig:
    """Config (file + ``key=value`` overrides), logging and datasets for one worker process."""
    cfg = load_lazy_config(args.config_file, args.opts)
    cfg.train.device = available_device(cfg.train.device, "train.device")
    default_setup(cfg, args)
    runtime.setup_logging(cfg.train.output_dir)
    runtime.share_cpu_threads(cfg.train.device)
    if "datasets" in cfg:
        instantiate(cfg.datasets)
    return cfg


def build_model(cfg: DictConfig) -> torch.nn.Module:
    model = instantiate(cfg.model)
    return model.to(cfg.train.device)


# How a saved (YAML) LazyConfig names Detectron2's train loader.
DETECTRON2_TRAIN_LOADER_NAMES = (
    "detectron2.data.build_detection_train_loader",
    "detectron2.data.build.build_detection_train_loader",
)


def resumable_loader_config(cfg: DictConfig) -> DictConfig:
    """``dataloader.train`` built by fcos_d2's exactly resumable loader where it names
    Detectron2's ``build_detection_train_loader`` (same arguments), seeded by ``train.seed``."""
    loader = copy.deepcopy(cfg.dataloader.train)
    target = loader.get("_target_")
    if target is build_detection_train_loader or target in DETECTRON2_TRAIN_LOADER_NAMES:
        loader._target_ = build_resumable_train_loader
        if loader.get("seed") is None:
            loader.seed = OmegaConf.select(cfg, "train.seed", default=-1)
    return loader


def train_dataset_names(cfg: DictConfig) -> list[str]:
    names = OmegaConf.select(cfg, "dataloader.train.dataset.names", default=None)
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def do_test(cfg: DictConfig, model: torch.nn.Module, suffix: str = "") -> dict[str, Any]:
    """COCO-style evaluation of ``dataloader.test`` with ``dataloader.evaluator`` (through the
    oracle wrapper, with annotated inputs, where the model is set to the oracle)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    loader = cfg.dataloader.test
    if uses_oracle_quality(model):
        loader = annotated_loader_config(loader)
    evaluator = copy.deepcopy(cfg.dataloader.evaluator)
    if suffix and evaluator.get("output_dir"):
        evaluator.output_dir += suffix  # inference_TTA/, as train_net.py writes
    results = inference_on_dataset(
        runtime.evaluation_model(model), instantiate(loader), instantiate(evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    if not suffix and OmegaConf.select(cfg, "test.val_loss", default=False):
        annotated = instantiate(annotated_loader_config(cfg.dataloader.test))
        results["validation"] = validation_losses(model, annotated)
    return {k + suffix: v for k, v in results.items()}


def tta_enabled(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "test.aug.enabled", default=False))


def do_test_with_tta(cfg: DictConfig, model: torch.nn.Module) -> dict[str, Any]:
    """:func:`do_test` of the model with test-time augmentation (``test.aug.*``)."""
    aug = cfg.test.aug
    logger.info("Running inference with test-time augmentation ...")
    mapper = DatasetMapperTTA(
        min_sizes=list(aug.min_sizes), max_size=aug.max_size, flip=aug.get("flip", True)
    )
    image_format = OmegaConf.select(cfg, "dataloader.test.mapper.image_format", default="BGR")
    tta_model = FCOSWithTTA(
        model,
        tta_mapper=mapper,
        box_voting=bool(aug.get("box_voting", False)),
        input_format=image_format,
    )
    return do_test(cfg, tta_model, suffix="_TTA")


def evaluate(cfg: DictConfig, model: torch.nn.Module) -> dict[str, Any]:
    results = do_test(cfg, model)
    if tta_enabled(cfg):
        results.update(do_test_with_tta(cfg, model))
    return results


def do_train(args, cfg: DictConfig) -> dict[str, Any]:
    """Train (resuming with ``--resume``) with Detectron2's standard hooks; returns the results
    of the last evaluation (one always runs at the end of training)."""
    model = build_model(cfg)
    logger.info("Model:\n%s", model)
    runtime.check_model_classes(model, train_dataset_names(cfg), "model.head.num_classes")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(resumable_loader_config(cfg))
    model = runtime.create_ddp_model(model, **cfg.train.ddp)
    trainer = runtime.build_step_runner(
        model,
        train_loader,
        optimizer,
        amp=cfg.train.amp.enabled,
        cpu_bf16=OmegaConf.select(cfg, "train.amp.cpu_bf16", default="auto"),
        amp_key="train.amp.enabled",
    )
    # train.model_ema.{enabled, decay}: MODEL_EMA.* of the YAML configs (fcos_d2/engine/ema.py).
    ema = runtime.build_ema(
        model,
        OmegaConf.select(cfg, "train.model_ema.enabled", default=False),
        OmegaConf.select(cfg, "train.model_ema.decay", default=0.999),
    )
    checkpointables = {"trainer": trainer, **({"ema": ema} if ema is not None else {})}
    checkpointer = FCOSCheckpointer(model, cfg.train.output_dir, **checkpointables)
    last_results: dict[str, Any] = {}

    def test_and_keep_results() -> dict[str, Any]:
        last_results.clear()
        last_results.update(do_test(cfg, model))
        return last_results

    main_process = comm.is_main_process()
    hook_list = [
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if main_process
        else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep_results),
        hooks.PeriodicWriter(
            default_writers(cfg.train.output_dir, cfg.train.max_iter),
            period=cfg.train.log_period,
        )
        if main_process
        else None,
    ]
    if tta_enabled(cfg):
        hook_list.append(
            hooks.EvalHook(0, lambda: last_results.update(do_test_with_tta(cfg, model)))
        )
    hook_list = runtime.add_ema_hooks(hook_list, ema)
    metric = OmegaConf.select(cfg, "train.best_checkpoint.metric", default="")
    if metric:
        mode = OmegaConf.select(cfg, "train.best_checkpoint.mode", default="max")
        val_loss = OmegaConf.select(cfg, "test.val_loss", default=False)
        check_metric(metric, mode, val_loss, key="train.best_checkpoint")
        if main_process:
            best = BestCheckpoint(
                checkpointer,
                metric,
                mode,
                cfg.train.eval_period,
                ema,
                key="train.best_checkpoint.metric",
            )
            hook_list = runtime.add_best_checkpoint_hook(hook_list, best)
    period = cfg.train.checkpointer.get("period", 0)
    hook_list = runtime.add_resume_hooks(hook_list, train_loader, model, checkpointer, period)
    trainer.register_hooks(hook_list)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that just finished: resume at the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if start_iter and main_process:
        trim_metrics(cfg.train.output_dir, start_iter)
    with runtime.preemption_handlers_restored(hook_list):
        trainer.train(start_iter, cfg.train.max_iter)
    return last_results


def main(args) -> dict[str, Any]:
    """``lazyconfig_train_net.py``'s body: train then evaluate, or only evaluate
    ``train.init_checkpoint`` with ``--eval-only``."""
    cfg = setup(args)
    if args.eval_only:
        model = runtime.create_ddp_model(build_model(cfg))
        FCOSCheckpointer(model).load(cfg.train.init_checkpoint)
        return evaluate(cfg, model)
    return do_train(args, cfg)
