"""Per-class score thresholds (operating points) chosen on a validation set.

The original FCOS release prints, after each COCO evaluation, the score of each class at which its
F-measure (F1) is highest, and pastes those numbers into its demo as per-class thresholds (its
``compute_thresholds_for_classes``: COCOeval at IoU 0.5, all areas, on the 101-point interpolated
precision-recall curve). Here detections are matched to the ground truth by COCOeval itself (IoU
>= 0.5, greedily by score, each ground-truth box matched at most once, crowd boxes ignored), and
precision and recall are computed exactly at every distinct score instead of on the interpolated
grid. A class's threshold ``t`` keeps the detections with score >= ``t``, which is what
``MODEL.FCOS.CLASS_THRESHOLDS`` applies (:class:`~fcos_d2.modeling.postprocess.FCOSPostProcessor`).
"""

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Optional

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

MATCH_IOU = 0.5
# Up to this many decimals are tried for a threshold that keeps exactly the chosen detections.
MAX_DECIMALS = 8


@dataclass(frozen=True)
class ClassDetections:
    """One class's detections on a dataset: their scores, whether each matched a ground-truth box,
    and the number of (non-ignored) ground-truth boxes."""

    scores: np.ndarray
    matched: np.ndarray
    support: int


@dataclass(frozen=True)
class OperatingPoint:
    """What a score threshold gives on one class: counts, precision, recall and F1 (0 where
    undefined: no detection kept, or no ground truth)."""

    threshold: float
    detections: int
    true_positives: int
    support: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.detections if self.detections else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.support if self.support else 0.0

    @property
    def f1(self) -> float:
        return f1_score(self.precision, self.recall)

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


def f1_score(precision: float, recall: float) -> float:
    total = precision + recall
    return 2 * precision * recall / total if total > 0 else 0.0


def match_detections(
    coco_gt: COCO, detections: Sequence[dict], iou_threshold: float = MATCH_IOU
) -> dict[int, ClassDetections]:
    """Per category id of ``coco_gt``: its detections (COCO result dicts, ``category_id`` in the
    dataset's ids) matched to the ground truth by COCOeval at ``iou_threshold``, every area, no
    cap on detections per image. Only the images of ``coco_gt.imgs`` count."""
    category_ids = sorted(coco_gt.getCatIds())
    image_ids = sorted(coco_gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(list(detections))) if detections else COCO()
        evaluation = COCOeval(coco_gt, coco_dt, "bbox")
        params = evaluation.params
        params.imgIds, params.catIds = image_ids, category_ids
        params.iouThrs = np.asarray([iou_threshold])
        params.areaRng, params.areaRngLbl = [[0, 1e10]], ["all"]
        params.maxDets = [max(1, len(detections))]
        evaluation.evaluate()
    scores: dict[int, list[np.ndarray]] = {c: [] for c in category_ids}
    matched: dict[int, list[np.ndarray]] = {c: [] for c in category_ids}
    support = dict.fromkeys(category_ids, 0)
    # evalImgs: one entry per (category, area range, image), None where the image has neither
    # ground truth nor detections of that category. Detections matched to crowd boxes are ignored.
    for result in evaluation.evalImgs:
        if result is None:
            continue
        category = result["category_id"]
        counted = ~result["dtIgnore"][0].astype(bool)
        scores[category].append(np.asarray(result["dtScores"], dtype=np.float64)[counted])
        matched[category].append(result["dtMatches"][0][counted] > 0)
        support[category] += int((~np.asarray(result["gtIgnore"], dtype=bool)).sum())
    return {
        c: ClassDetections(
            np.concatenate([np.zeros(0), *scores[c]]),
            np.concatenate([np.zeros(0, dtype=bool), *matched[c]]),
            support[c],
        )
        for c in category_ids
    }


def operating_point(detections: ClassDetections, threshold: float) -> OperatingPoint:
    """Counts for the detections with score >= ``threshold``."""
    kept = detections.scores >= threshold
    return OperatingPoint(
        threshold=float(threshold),
        detections=int(kept.sum()),
        true_positives=int(detections.matched[kept].sum()),
        support=detections.support,
    )


def _cuts(detections: ClassDetections) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every cut that changes what is kept: for each distinct score, from the highest, the score,
    the next lower distinct score (0 after the lowest), the detections and true positives kept."""
    order = np.argsort(-detections.scores, kind="mergesort")
    scores = detections.scores[order]
    true_positives = np.cumsum(detections.matched[order])
    last_of_score = np.append(scores[1:] != scores[:-1], True)
    index = np.flatnonzero(last_of_score)
    highs = scores[index]
    lows = np.append(highs[1:], 0.0)
    return highs, lows, index + 1, true_positives[index]


def short_threshold(high: float, low: float) -> float:
    """The shortest decimal t with low < t <= high, also as float32 (the model compares its
    float32 scores), so that ``score >= t`` keeps the scores down to ``high`` and none below."""
    digits = Decimal(repr(float(high)))  # the shortest decimal of the float: no rounding noise
    for decimals in range(1, MAX_DECIMALS + 1):
        candidate = float(digits.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_FLOOR))
        if low < candidate and low < np.float32(candidate) <= high:
            return candidate
    return float(high)


def best_f1_threshold(detections: ClassDetections) -> Optional[float]:
    """The threshold of highest F1 (the highest such threshold on ties); None if no threshold
    gives a true positive."""
    if not detections.support or not detections.matched.any():
        return None
    highs, lows, kept, true_positives = _cuts(detections)
    precision = true_positives / kept
    recall = true_positives / detections.support
    f1 = np.where(true_positives > 0, 2 * precision * recall / (precision + recall + 1e-300), 0.0)
    best = int(np.argmax(f1))  # first maximum: the highest threshold
    return short_threshold(highs[best], lows[best])


def precision_threshold(detections: ClassDetections, target: float) -> tuple[Optional[float], bool]:
    """The lowest threshold whose precision is >= ``target`` and True; where none reaches it, the
    threshold of highest precision (the lowest such) and False; (None, False) without a true
    positive."""
    if not detections.support or not detections.matched.any():
        return None, False
    highs, lows, kept, true_positives = _cuts(detections)
    precision = true_positives / kept
    reached = np.flatnonzero(precision >= target)
    if reached.size:
        best = int(reached[-1])
    else:
        best = int(np.flatnonzero(precision == precision.max())[-1])
    return short_threshold(highs[best], lows[best]), bool(reached.size)


def choose_thresholds(
    per_class: Mapping[int, ClassDetections],
    *,
    precision: Optional[float] = None,
    fallback: float = 0.5,
) -> dict[int, dict]:
    """Per class: the threshold of best F1 (or, with ``precision``, the lowest that reaches it),
    its operating point, and a note where the class has no true positive at any threshold (it
    then gets ``fallback``) or its precision target is out of reach."""
    chosen = {}
    for class_id, detections in per_class.items():
        note = ""
        if precision is None:
            threshold = best_f1_threshold(detections)
        else:
            threshold, reached = precision_threshold(detections, precision)
            if threshold is not None and not reached:
                note = f"precision {precision} not reached: highest-precision threshold"
        if threshold is None:
            threshold = fallback
            note = (
                "no ground truth in this dataset"
                if not detections.support
                else "no true positive at any threshold"
            ) + f": the fallback {fallback}"
        chosen[class_id] = {**operating_point(detections, threshold).as_dict(), "note": note}
    return chosen


def summary(points: Sequence[OperatingPoint]) -> dict:
    """All classes together: micro precision / recall / F1 (counts summed) and macro F1 (mean of
    the classes' F1, over the classes with ground truth)."""
    detections = sum(p.detections for p in points)
    true_positives = sum(p.true_positives for p in points)
    support = sum(p.support for p in points)
    total = OperatingPoint(float("nan"), detections, true_positives, support)
    with_support = [p.f1 for p in points if p.support]
    return {
        "precision": total.precision,
        "recall": total.recall,
        "f1": total.f1,
        "macro_f1": float(np.mean(with_support)) if with_support else 0.0,
    }


def config_line(thresholds: Sequence[float]) -> str:
    """The override that applies ``thresholds`` (in class-index order)."""
    values = ", ".join(repr(float(t)) for t in thresholds)
    return f'MODEL.FCOS.CLASS_THRESHOLDS "({values}{"," if len(thresholds) == 1 else ""})"'
