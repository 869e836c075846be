"""Analyses of a trained model's detections: class-agnostic precision-recall curves at IoU 0.50,
0.75 and 0.90 (appendix, Table 7 / Figs. 4-6) and classification score vs IoU before NMS, without
and with center-ness (appendix Sec. 8, Fig. 7).
"""

import contextlib
import copy
import io
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import pairwise_iou
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from ..checks import ConfigError
from ..modeling.fcos import FCOS

PR_IOUS = (0.50, 0.75, 0.90)


def class_agnostic_pr(coco_gt: COCO, detections: list[dict], ious: Sequence[float] = PR_IOUS):
    """COCOeval with categories ignored: per IoU, the 101-point recall grid, the interpolated
    precision at each point (-1 where the recall is not reached) and the AP (all areas, 100
    detections per image)."""
    if not detections:
        raise ConfigError(
            "no detections to evaluate: the model detects nothing above "
            "MODEL.FCOS.INFERENCE_TH_TEST on these images"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluation = COCOeval(coco_gt, coco_dt, "bbox")
        evaluation.params.useCats = 0
        evaluation.params.iouThrs = np.asarray(ious, dtype=np.float64)
        evaluation.evaluate()
        evaluation.accumulate()
    recall = evaluation.params.recThrs
    curves = {}
    for t, iou in enumerate(ious):
        precision = evaluation.eval["precision"][t, :, 0, 0, -1]
        valid = precision > -1
        curves[f"{iou:.2f}"] = {
            "recall": recall.tolist(),
            "precision": precision.tolist(),
            "ap": float(precision[valid].mean()) if valid.any() else float("nan"),
        }
    return curves


def coco_detections(
    model: FCOS, loader: Iterable, max_images: int = 0
) -> tuple[list[dict], list[int]]:
    """Run ``model`` over ``loader``: its detections in COCO json form, and the ids of every image
    it ran on (also those without detections, whose boxes still count as missed)."""
    results: list[dict] = []
    image_ids: list[int] = []
    with torch.no_grad():
        for inputs in loader:
            for record, output in zip(inputs, model(inputs)):
                results += instances_to_coco_json(output["instances"].to("cpu"), record["image_id"])
                image_ids.append(record["image_id"])
            if max_images and len(image_ids) >= max_images:
                break
    return results, image_ids


def score_iou_before_nms(model: FCOS, inputs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Every detection that survives the score threshold and the per-level top-k, before NMS, as
    (score, IoU with its best-matching GT box): scored by the class probability alone
    ("without_ctr") and by class probability x center-ness ("with_ctr")."""
    images, features, predictions = model.dense_predictions(inputs)
    # Every candidate that survives the threshold and top-k: nothing suppressed, nothing capped.
    no_nms = model.core.postprocessor.replace(
        post_nms_topk=1 << 30, nms_threshold=1.0, score_sqrt=False
    )
    pairs: dict[str, dict[str, list[float]]] = {}
    for name, quality in (("without_ctr", "none"), ("with_ctr", "branch")):
        scores: list[float] = []
        ious: list[float] = []
        detections_per_image = model.core.inference(
            features, predictions, images.image_sizes, quality=quality, postprocessor=no_nms
        )
        for record, detections in zip(inputs, detections_per_image):
            gt_boxes = record["instances"].gt_boxes.to(detections.pred_boxes.device)
            best = _best_iou(gt_boxes, detections.pred_boxes)
            scores += detections.scores.tolist()
            ious += best.tolist()
        pairs[name] = {"score": scores, "iou": ious}
    return pairs


def _best_iou(gt_boxes, pred_boxes) -> Tensor:
    if len(gt_boxes) == 0:
        return torch.zeros(len(pred_boxes))
    return pairwise_iou(pred_boxes, gt_boxes).max(dim=1).values


def low_quality_share(
    scores: Sequence[float], ious: Sequence[float], top_fraction: float = 0.1
) -> float:
    """Share of IoU < 0.5 boxes among the ``top_fraction`` highest-scored detections."""
    if not scores:
        return float("nan")
    order = np.argsort(-np.asarray(scores))
    top = order[: max(1, int(round(len(order) * top_fraction)))]
    return float((np.asarray(ious)[top] < 0.5).mean())
