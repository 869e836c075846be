"""Training and evaluation in the Detectron2 style: ``DefaultTrainer`` + ``COCOEvaluator``.

Everything here is Detectron2's own machinery; this module adds the FCOS/dataset config keys, a
CPU fallback, and multi-process training on CPUs (Gloo), which Detectron2's ``create_ddp_model``
breaks by passing ``device_ids`` (CPU DistributedDataParallel rejects them).
"""
import contextlib
import logging
import os
from typing import Any, Dict, Iterator

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_test_loader
from detectron2.data import detection_utils
from detectron2.engine import DefaultTrainer, SimpleTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm

from .config import add_fcos_config
from .data.builtin import add_shapes_config, register_shapes_from_config

logger = logging.getLogger("fcos_d2")


@contextlib.contextmanager
def cpu_friendly_ddp() -> Iterator[None]:
    """While active, Detectron2's ``create_ddp_model`` omits ``device_ids`` for CPU models."""
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


def check_num_classes(cfg: CfgNode) -> None:
    """FCOS's class count must match the training data's (once loaded, its metadata knows).

    A mismatch would otherwise go unnoticed: class NUM_CLASSES becomes background, larger ones
    fail deep inside the loss.
    """
    if cfg.MODEL.META_ARCHITECTURE != "FCOS":
        return
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.FCOS.NUM_CLASSES:
            raise ValueError(
                f"MODEL.FCOS.NUM_CLASSES={cfg.MODEL.FCOS.NUM_CLASSES} but dataset {name!r} has "
                f"{len(classes)} classes {list(classes)}"
            )


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose steps run under CPU bfloat16 autocast.

    Detectron2's ``AMPTrainer`` is CUDA-only (float16 with a gradient scaler); bfloat16 keeps
    float32's exponent range, so it needs no scaler. On CPUs with AVX512-BF16 or AMX it roughly
    halves the time of a step; the FCOS losses are computed in float32 regardless.
    """

    def run_step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with COCO evaluation, CPU multi-process training and
    ``SOLVER.AMP.ENABLED`` meaning bfloat16 autocast on the CPU."""

    def __init__(self, cfg: CfgNode):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"
        base_cfg = cfg
        if cpu_amp:
            base_cfg = cfg.clone()
            base_cfg.defrost()
            base_cfg.SOLVER.AMP.ENABLED = False  # else DefaultTrainer builds the CUDA-only AMPTrainer
        with cpu_friendly_ddp():
            super().__init__(base_cfg)
        check_num_classes(cfg)
        if cpu_amp:
            # self.cfg is DefaultTrainer's (possibly worker-scaled) copy of base_cfg.
            self.cfg.defrost()
            self.cfg.SOLVER.AMP.ENABLED = True
            self.cfg.freeze()
            plain = self._trainer
            self._trainer = CPUAutocastTrainer(plain.model, plain.data_loader, plain.optimizer)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Detectron2's SGD, or AdamW with ``SOLVER.OPTIMIZER: ADAMW`` (same parameter groups)."""
        if cfg.SOLVER.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        if cfg.SOLVER.OPTIMIZER != "ADAMW":
            raise ValueError(f"SOLVER.OPTIMIZER must be SGD or ADAMW, got {cfg.SOLVER.OPTIMIZER!r}")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        adamw = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return maybe_add_gradient_clipping(cfg, adamw)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """Detectron2's test loader; it keeps the annotations for the oracle center-ness ablation."""
        if cfg.MODEL.META_ARCHITECTURE != "FCOS" or cfg.MODEL.FCOS.INFERENCE_QUALITY != "oracle":
            return super().build_test_loader(cfg, dataset_name)
        mapper = DatasetMapper(
            is_train=True,  # the only mode in which DatasetMapper keeps (and resizes) annotations
            augmentations=detection_utils.build_augmentation(cfg, is_train=False),
            image_format=cfg.INPUT.FORMAT,
        )
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def build_cfg(config_file: str = "", opts: list = ()) -> CfgNode:
    """Detectron2 defaults + FCOS + shapes keys, merged with a YAML file and ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    add_fcos_config(cfg)
    add_shapes_config(cfg)
    cfg.SOLVER.OPTIMIZER = "SGD"  # or "ADAMW" (see Trainer.build_optimizer)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def setup(args) -> CfgNode:
    """Config, logging and the embedded datasets for one worker process."""
    cfg = build_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        # Processes share the machine's cores; oversubscription only slows every one of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    register_shapes_from_config(cfg)
    return cfg


def main(args) -> Dict[str, Any]:
    """``train_net.py``'s body: train (optionally resuming) then evaluate, or only evaluate."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer's EvalHook always evaluates once at the end of training.
    return getattr(trainer, "_last_eval_results", {})
