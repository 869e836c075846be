"""What is timed: whole-model inference and training steps, target assignment + loss on given
dense head outputs, and post-processing of given dense head outputs, per implementation.

Each workload is a :class:`Workload`: an untimed ``setup`` (fresh copies of inputs a run may
modify) and the timed ``run``. :func:`time_interleaved` runs them round-robin.
"""

import contextlib
import copy
import gc
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .inputs import NUM_CLASSES, Batch, DenseOutputs, level_sizes
from .models import Detector, TestSettings, make_optimizer


@dataclass
class Workload:
    run: Callable[..., Any]
    setup: Optional[Callable[[], tuple]] = None

    def __call__(self) -> Any:
        return self.run(*(self.setup() if self.setup else ()))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    workloads: dict[str, Workload], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, dict]:
    """Seconds per run of each workload, ``repeats`` times, round-robin over the workloads.

    Each repetition starts one workload later, so that drift (thermal, other processes) and
    what ran just before (caches, allocator state) affect every workload alike. Returns per
    workload the wall-clock samples, the process CPU-time samples (all threads; less sensitive
    than wall time to other processes on a shared machine) and what the last run returned.
    """
    results = {name: {"samples": [], "cpu_samples": [], "output": None} for name in workloads}
    for name, workload in workloads.items():
        for _ in range(warmup):
            results[name]["output"] = workload()
    names = list(workloads)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            workload = workloads[name]
            args = workload.setup() if workload.setup else ()
            gc.collect()
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            output = workload.run(*args)
            synchronize(device)
            results[name]["samples"].append(time.perf_counter() - start)
            results[name]["cpu_samples"].append(time.process_time() - cpu_start)
            results[name]["output"] = output
    return results


# Whole models --------------------------------------------------------------------------------


def amp_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision as each trainer means it: float16 on CUDA (Detectron2's ``AMPTrainer``),
    bfloat16 on CPUs (fcos-d2's CPU autocast; the CPU benchmarks only check the code path)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()


def inference_workload(
    detector: Detector, batch: Batch, autocast: Optional[torch.dtype] = None
) -> Workload:
    """Eval mode, no autograd: preprocessing, network, post-processing, rescaling; under
    ``autocast`` to that dtype if given (for the peers: fcos-d2 has its own switch)."""
    inputs = detector.inference_inputs(batch)

    def run():
        with torch.no_grad(), _autocast(detector.device, autocast):
            return detector.infer(inputs)

    detector.model.eval()
    return Workload(run)


def train_step(
    detector: Detector,
    optimizer: torch.optim.Optimizer,
    inputs,
    autocast: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> float:
    """Forward with losses (under ``autocast`` if given), backward, update; with a ``scaler``,
    as Detectron2's ``AMPTrainer`` does it in float16."""
    with _autocast(detector.device, autocast):
        loss = detector.loss(inputs)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def training_workload(detector: Detector, batch: Batch, amp: bool = False) -> Workload:
    """One SGD step: forward with losses, backward, parameter update; with ``amp``, under
    :func:`amp_dtype` autocast, with a gradient scaler in float16."""
    detector.model.train()
    optimizer = make_optimizer(detector.model)
    inputs = detector.training_inputs(batch)
    dtype = amp_dtype(detector.device) if amp else None
    scaler = torch.amp.GradScaler(detector.device.type) if dtype == torch.float16 else None
    return Workload(lambda: train_step(detector, optimizer, inputs, dtype, scaler))


# Target assignment + loss, and post-processing, on given dense outputs ------------------------


def empty_features(outputs: DenseOutputs) -> list[Tensor]:
    """Stand-ins for the FPN features: only their shapes and device are read."""
    return [x.new_empty((x.shape[0], 0, *x.shape[-2:])) for x in outputs.cls_logits]


def gt_instances_of(batch: Batch):
    from detectron2.structures import Boxes, Instances

    return [
        Instances(batch.image_size, gt_boxes=Boxes(b), gt_classes=c)
        for b, c in zip(batch.boxes, batch.classes)
    ]


def _flatten(per_level: list[Tensor], channels: int) -> Tensor:
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

    return torch.cat([permute_to_N_HWA_K(x, channels) for x in per_level], dim=1)


def _torchvision_anchors(model, outputs: DenseOutputs, image_size: tuple[int, int]):
    from torchvision.models.detection.image_list import ImageList

    features = empty_features(outputs)
    num_images = features[0].shape[0]
    images = ImageList(
        features[0].new_empty((num_images, 0, *image_size)), [image_size] * num_images
    )
    return model.anchor_generator(images, features), [f.shape[-2] * f.shape[-1] for f in features]


def assign_loss_workload(detector: Detector, outputs: DenseOutputs, batch: Batch) -> Workload:
    """Target assignment and losses from per-level NCHW head outputs, then the backward pass to
    those outputs; flattening the outputs and making the locations / anchors are included."""
    device = outputs.cls_logits[0].device
    batch = batch.to(device)
    features = empty_features(outputs)

    def fresh():
        return (outputs.clone(requires_grad=True),)

    if detector.name == "fcos_d2":
        from fcos_d2.modeling.head import FCOSHeadOutputs

        core, gt = detector.model.core, gt_instances_of(batch)

        def run(dense: DenseOutputs):
            predictions = FCOSHeadOutputs(dense.cls_logits, dense.box_reg, dense.ctrness)
            losses, _ = core.losses(features, predictions, gt)
            sum(losses.values()).backward()

    elif detector.name == "d2_fcos":
        from detectron2.utils.events import EventStorage

        model, gt = detector.model, gt_instances_of(batch)

        def run(dense: DenseOutputs):
            logits, deltas, ctrness = model._transpose_dense_predictions(
                [dense.cls_logits, dense.box_reg, dense.ctrness], [NUM_CLASSES, 4, 1]
            )
            anchors = model.anchor_generator(features)
            with EventStorage(0):
                labels, boxes = model.label_anchors(anchors, gt)
                losses = model.losses(anchors, logits, labels, deltas, boxes, ctrness)
            sum(losses.values()).backward()

    elif detector.name == "tv_fcos":
        model = detector.model
        targets = [{"boxes": b, "labels": c} for b, c in zip(batch.boxes, batch.classes)]

        def run(dense: DenseOutputs):
            head_outputs = {
                "cls_logits": _flatten(dense.cls_logits, NUM_CLASSES),
                "bbox_regression": _flatten(dense.box_reg, 4),
                "bbox_ctrness": _flatten(dense.ctrness, 1),
            }
            anchors, per_level = _torchvision_anchors(model, dense, batch.image_size)
            losses = model.compute_loss(targets, head_outputs, anchors, per_level)
            sum(losses.values()).backward()

    else:
        raise ValueError(f"no target assignment + loss workload for {detector.name!r}")
    return Workload(run, fresh)


def postprocess_workload(
    detector: Detector, outputs: DenseOutputs, image_size: tuple[int, int], settings: TestSettings
) -> Workload:
    """Scores, thresholding, per-level top-k, box decoding, NMS from per-level NCHW outputs, in
    eval mode without autograd, with ``settings`` (the detector itself keeps its own); returns the
    number of detections."""
    features = empty_features(outputs)
    num_images = features[0].shape[0]
    image_sizes = [image_size] * num_images

    if detector.name == "fcos_d2":
        from fcos_d2.modeling.head import FCOSHeadOutputs

        core = detector.model.core
        postprocessor = core.postprocessor.replace(
            score_threshold=settings.score_threshold,
            pre_nms_topk=settings.topk_candidates,
            post_nms_topk=settings.detections_per_image,
            nms_threshold=settings.nms_threshold,
        )
        predictions = FCOSHeadOutputs(outputs.cls_logits, outputs.box_reg, outputs.ctrness)

        def run():
            with torch.no_grad():
                results = core.inference(
                    features, predictions, image_sizes, postprocessor=postprocessor
                )
                return sum(len(r) for r in results)

        return Workload(run)

    if detector.name == "d2_fcos":
        from detectron2.structures import ImageList

        model = copy.copy(detector.model)  # shares the weights; the settings are its own
        model.test_score_thresh = settings.score_threshold
        model.test_topk_candidates = settings.topk_candidates
        model.test_nms_thresh = settings.nms_threshold
        model.max_detections_per_image = settings.detections_per_image
        images = ImageList(features[0], image_sizes)

        def fresh():
            # Detectron2 applies sigmoid_ in place to a view of the center-ness input.
            return ([x.clone() for x in outputs.ctrness],)

        def run(ctrness):
            with torch.no_grad():
                predictions = [outputs.cls_logits, outputs.box_reg, ctrness]
                return sum(len(r) for r in model.forward_inference(images, features, predictions))

        return Workload(run, fresh)

    if detector.name == "tv_fcos":
        model = copy.copy(detector.model)
        model.score_thresh = settings.score_threshold
        model.topk_candidates = settings.topk_candidates
        model.nms_thresh = settings.nms_threshold
        model.detections_per_img = settings.detections_per_image

        def run():
            with torch.no_grad():
                anchors, per_level = _torchvision_anchors(model, outputs, image_size)
                head_outputs = {
                    "cls_logits": _flatten(outputs.cls_logits, NUM_CLASSES),
                    "bbox_regression": _flatten(outputs.box_reg, 4),
                    "bbox_ctrness": _flatten(outputs.ctrness, 1),
                }
                split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
                split_anchors = [list(a.split(per_level)) for a in anchors]
                detections = model.postprocess_detections(split, split_anchors, image_sizes)
                return sum(len(d["boxes"]) for d in detections)

        return Workload(run)

    raise ValueError(f"no post-processing workload for {detector.name!r}")


def candidates_per_level(height: int, width: int, limit: int) -> list[int]:
    """(location, class) pairs each level can offer, capped at ``limit`` (for reporting)."""
    return [min(h * w * NUM_CLASSES, limit) for h, w in level_sizes(height, width)]
