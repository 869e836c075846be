"""Test-time augmentation (Detectron2's ``TEST.AUG.*`` keys) for FCOS.

Detectron2's ``GeneralizedRCNNWithTTA`` accepts only R-CNNs; :class:`FCOSWithTTA` is its
counterpart for the FCOS detector. Each image goes through Detectron2's ``DatasetMapperTTA``
(every ``TEST.AUG.MIN_SIZES``, each also flipped with ``TEST.AUG.FLIP``); the detector itself
decodes every augmented input; the detections are mapped back to the original image through the
inverse of the transforms the mapper recorded, then merged per class with NMS at the detector's
own threshold (``MODEL.FCOS.NMS_TH``), keeping its ``TEST.DETECTIONS_PER_IMAGE``, and optionally
with score-weighted box voting (``TEST.AUG.BOX_VOTING``).
"""

import copy
from typing import Callable, Optional

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data.detection_utils import read_image
from detectron2.layers import batched_nms
from detectron2.modeling import DatasetMapperTTA, GeneralizedRCNN, GeneralizedRCNNWithTTA
from detectron2.structures import Boxes, Instances, pairwise_iou
from fvcore.transforms import Transform
from torch import Tensor, nn

from ..checks import check_that
from ..modeling.fcos import FCOS
from ..utils import unwrap_model

_WHERE = "FCOSWithTTA"


def build_tta_model(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """``model`` wrapped for test-time augmentation: FCOS here, R-CNNs (also those with FCOS
    proposals) by Detectron2's ``GeneralizedRCNNWithTTA``."""
    model = unwrap_model(model)
    if isinstance(model, GeneralizedRCNN):
        return GeneralizedRCNNWithTTA(cfg, model)
    return FCOSWithTTA(cfg, model)


class FCOSWithTTA(nn.Module):
    """An FCOS detector with test-time augmentation: same inputs and outputs as ``FCOS.forward``
    in inference, detections in each input's ``height`` x ``width`` (the original image)."""

    @configurable
    def __init__(
        self,
        model: nn.Module,
        *,
        tta_mapper: Callable[[dict], list[dict]],
        box_voting: bool = False,
        input_format: str = "BGR",
        batch_size: int = 3,
    ):
        """
        Args:
            model: an FCOS detector (possibly in DistributedDataParallel); its post-processor's
                NMS threshold and detections per image also apply to the merge.
            tta_mapper: dataset dict -> augmented dicts, each with the ``transforms`` that made
                it from the original image (Detectron2's ``DatasetMapperTTA``).
            box_voting: ``TEST.AUG.BOX_VOTING``, see :func:`merge_detections`.
            input_format: ``INPUT.FORMAT``, for inputs given by ``file_name``.
            batch_size: augmented images per forward pass.

        With a yacs config: ``FCOSWithTTA(cfg, model[, tta_mapper][, batch_size])`` reads
        ``TEST.AUG.*`` (through ``DatasetMapperTTA`` unless ``tta_mapper`` is given),
        ``TEST.AUG.BOX_VOTING`` and ``INPUT.FORMAT``.
        """
        super().__init__()
        model = unwrap_model(model)
        check_that(
            isinstance(model, FCOS),
            "MODEL.META_ARCHITECTURE",
            "FCOS (R-CNNs use Detectron2's GeneralizedRCNNWithTTA)",
            type(model).__name__,
            f"{_WHERE} argument model",
        )
        check_that(
            model.core.inference_quality != "oracle",
            "MODEL.FCOS.INFERENCE_QUALITY",
            "'branch', 'none' or 'from_regression' with TEST.AUG.ENABLED (the oracle needs "
            "ground truth in each augmented image)",
            model.core.inference_quality,
            _WHERE,
        )
        check_that(batch_size >= 1, "batch_size", ">= 1", batch_size, _WHERE)
        self.model = model
        self.tta_mapper = tta_mapper
        self.batch_size = batch_size
        self.box_voting = box_voting
        self.input_format = input_format

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        model: nn.Module,
        tta_mapper: Optional[Callable[[dict], list[dict]]] = None,
        batch_size: int = 3,
    ) -> dict:
        if tta_mapper is None:
            check_that(
                len(cfg.TEST.AUG.MIN_SIZES) > 0,
                "TEST.AUG.MIN_SIZES",
                "a non-empty list of sizes",
                cfg.TEST.AUG.MIN_SIZES,
                _WHERE,
            )
            tta_mapper = DatasetMapperTTA(cfg)
        return {
            "model": model,
            "tta_mapper": tta_mapper,
            "box_voting": cfg.TEST.AUG.BOX_VOTING,
            "input_format": cfg.INPUT.FORMAT,
            "batch_size": batch_size,
        }

    @torch.no_grad()
    def forward(self, batched_inputs: list[dict]) -> list[dict[str, Instances]]:
        return [
            {"instances": self._inference_one_image(self._with_image(x))} for x in batched_inputs
        ]

    def _with_image(self, inputs: dict) -> dict:
        """The input with its image read from ``file_name`` if missing, and its original size."""
        inputs = copy.copy(inputs)
        if "image" not in inputs:
            image = read_image(inputs.pop("file_name"), self.input_format)
            inputs["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        inputs.setdefault("height", inputs["image"].shape[1])
        inputs.setdefault("width", inputs["image"].shape[2])
        return inputs

    def _inference_one_image(self, inputs: dict) -> Instances:
        augmented = self.tta_mapper(inputs)
        transforms = [x.pop("transforms") for x in augmented]
        detections = []
        for start in range(0, len(augmented), self.batch_size):
            chunk = augmented[start : start + self.batch_size]
            images, features, predictions = self.model.dense_predictions(chunk)
            detections.extend(self.model.forward_inference(images, features, predictions))
        postprocessor = self.model.core.postprocessor
        return merge_detections(
            torch.cat(
                [boxes_to_original(d.pred_boxes.tensor, t) for d, t in zip(detections, transforms)]
            ),
            torch.cat([d.scores for d in detections]),
            torch.cat([d.pred_classes for d in detections]),
            (inputs["height"], inputs["width"]),
            nms_threshold=postprocessor.nms_threshold,
            max_detections=postprocessor.post_nms_topk,
            box_voting=self.box_voting,
        )


def boxes_to_original(boxes: Tensor, transform: Transform) -> Tensor:
    """(N, 4) XYXY boxes in an augmented input -> the original image, through the inverse of the
    transform that made the input (as Detectron2's R-CNN TTA does)."""
    original = transform.inverse().apply_box(boxes.detach().cpu().numpy())
    return torch.as_tensor(original).to(boxes)


def merge_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    image_size: tuple[int, int],
    nms_threshold: float,
    max_detections: int,
    box_voting: bool = False,
) -> Instances:
    """Detections of all augmented inputs (in original-image pixels) -> one set.

    Boxes are clipped to the image (empty ones dropped, as ``detector_postprocess`` does), then
    per-class NMS keeps the ``max_detections`` best. With ``box_voting`` each kept box becomes the
    score-weighted mean of the same-class boxes overlapping it at IoU >= ``nms_threshold``; its
    score stays the highest one.
    """
    clipped = Boxes(boxes.clone())
    clipped.clip(image_size)
    nonempty = clipped.nonempty()
    boxes, scores, classes = clipped.tensor[nonempty], scores[nonempty], classes[nonempty]
    keep = batched_nms(boxes, scores, classes, nms_threshold)[:max_detections]
    kept_boxes = boxes[keep]
    if box_voting:
        kept_boxes = vote_boxes(keep, boxes, scores, classes, nms_threshold)
    return Instances(
        image_size, pred_boxes=Boxes(kept_boxes), scores=scores[keep], pred_classes=classes[keep]
    )


def vote_boxes(
    keep: Tensor, boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float
) -> Tensor:
    """For each index in ``keep``: the mean of the same-class ``boxes`` with IoU >= threshold to
    the kept box, weighted by their ``scores``; (K, N) at once."""
    kept = boxes[keep]
    members = (pairwise_iou(Boxes(kept), Boxes(boxes)) >= iou_threshold) & (
        classes[keep][:, None] == classes[None, :]
    )
    # A kept box always votes for itself (its IoU with itself is 0 if its area is 0).
    members[torch.arange(len(keep), device=keep.device), keep] = True
    weights = scores[None, :] * members
    total = weights.sum(dim=1, keepdim=True)
    # Zero-score groups (possible with a score threshold of 0) keep their box.
    return torch.where(total > 0, (weights @ boxes) / total.clamp(min=1e-12), kept)
