"""Sec. 4.1.1 as measurements: best possible recall (Table 1), ambiguous samples (Table 2) and the
number of training samples per image (arXiv Table 4), for FCOS with FPN, FCOS on P4 alone, and
RetinaNet's anchors.

FCOS numbers come from the detector's own :class:`FCOSTargetAssigner`; RetinaNet's from
Detectron2's ``DefaultAnchorGenerator`` (9 anchors per location) and ``Matcher``.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers import nonzero_tuple
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from torch import Tensor

from ..checks import check_choice
from ..modeling.box_ops import compute_locations
from ..modeling.targets import FCOSTargetAssigner

RETINANET_STRIDES = (8, 16, 32, 64, 128)
RETINANET_SIZES = [[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in (32, 64, 128, 256, 512)]
RETINANET_ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
# Table 1's three matching rules: positives at IoU >= 0.5 only; plus each box's best anchors when
# their IoU is >= 0.4; plus each box's best anchors whatever their IoU.
RETINANET_RULES = ("iou>=0.5", "low-quality>=0.4", "all-low-quality")


@dataclass
class GroundTruth:
    """One image's boxes (XYXY, at network input scale), classes and input size (h, w)."""

    boxes: Tensor
    classes: Tensor
    image_size: tuple[int, int]


def ground_truth_at_input_size(
    records: Iterable[dict], min_size: int, max_size: int
) -> list[GroundTruth]:
    """Non-crowd boxes of each record, resized as ResizeShortestEdge(min_size, max_size) would."""
    images = []
    for record in records:
        height, width = record["height"], record["width"]
        new_h, new_w = ResizeShortestEdge.get_output_shape(height, width, min_size, max_size)
        annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
            dtype=torch.float32,
        ).reshape(-1, 4)
        boxes *= torch.tensor([new_w / width, new_h / height] * 2)
        classes = torch.tensor([a["category_id"] for a in annotations], dtype=torch.long)
        images.append(GroundTruth(boxes, classes, (new_h, new_w)))
    return images


def feature_sizes(image_size: tuple[int, int], strides: Sequence[int], size_divisibility: int = 32):
    """(H, W) of each level for an input padded to ``size_divisibility``.

    Levels above the padding unit (P6, P7) come from stride-2 convs, i.e. ceil-halving, which from
    a multiple of 32 gives the same ceil(padded / stride).
    """
    padded = [math.ceil(s / size_divisibility) * size_divisibility for s in image_size]
    return [tuple(math.ceil(p / stride) for p in padded) for stride in strides]


@dataclass
class AssignmentStats:
    """Counts accumulated over images; ratios are derived in :meth:`summary`."""

    num_boxes: int = 0
    recalled: int = 0
    positives: int = 0
    ambiguous: int = 0
    ambiguous_diff_class: int = 0
    samples: int = 0
    images: int = 0

    def summary(self) -> dict[str, float]:
        pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
        return {
            "bpr": pct(self.recalled, self.num_boxes),
            "ambiguous": pct(self.ambiguous, self.positives),
            "ambiguous_diff_class": pct(self.ambiguous_diff_class, self.positives),
            "positives_per_image": self.positives / max(self.images, 1),
            "samples_per_image": self.samples / max(self.images, 1),
            "num_boxes": self.num_boxes,
        }


def fcos_assignment_stats(
    assigner: FCOSTargetAssigner, images: list[GroundTruth]
) -> AssignmentStats:
    """BPR (a box counts if at least one location is assigned to it) and ambiguity: a positive
    location is ambiguous when it is a candidate of several boxes (Table 2), of different classes
    for the "diff." column."""
    stats = AssignmentStats()
    for gt in images:
        locations = compute_locations(
            feature_sizes(gt.image_size, assigner.strides), assigner.strides, torch.device("cpu")
        )
        points, strides, size_ranges = assigner.flatten_levels(locations)
        candidates = assigner.candidates(points, strides, size_ranges, gt.boxes)
        matched = assigner.match(points, strides, size_ranges, gt.boxes)
        stats.samples += len(points)
        stats.images += 1
        if not len(gt.boxes):
            continue
        num_candidates = candidates.sum(dim=1)
        positive = num_candidates > 0
        max_class = torch.where(candidates, gt.classes[None, :], -1).max(dim=1).values
        min_class = torch.where(candidates, gt.classes[None, :], 1 << 30).min(dim=1).values
        stats.num_boxes += len(gt.boxes)
        stats.recalled += len(torch.unique(matched[matched >= 0]))
        stats.positives += int(positive.sum())
        stats.ambiguous += int((num_candidates > 1).sum())
        stats.ambiguous_diff_class += int((positive & (max_class != min_class)).sum())
    return stats


def retinanet_assignment_stats(images: list[GroundTruth], rule: str) -> AssignmentStats:
    """BPR and sample counts of RetinaNet's anchors under one of :data:`RETINANET_RULES`."""
    check_choice(rule, RETINANET_RULES, "RetinaNet matching rule", "retinanet_assignment_stats")
    generator = DefaultAnchorGenerator(
        sizes=RETINANET_SIZES,
        aspect_ratios=RETINANET_ASPECT_RATIOS,
        strides=list(RETINANET_STRIDES),
        offset=0.0,
    )
    matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=rule != "iou>=0.5")
    stats = AssignmentStats()
    for gt in images:
        grids = [
            torch.zeros(1, 1, h, w) for h, w in feature_sizes(gt.image_size, RETINANET_STRIDES)
        ]
        anchors = Boxes.cat(generator(grids))
        stats.num_boxes += len(gt.boxes)
        stats.samples += len(anchors)
        stats.images += 1
        if not len(gt.boxes):
            continue
        iou = pairwise_iou(Boxes(gt.boxes), anchors)
        matches, labels = matcher(iou)
        positive = labels == 1
        if rule == "low-quality>=0.4":
            positive &= iou[matches, torch.arange(len(anchors))] >= 0.4
        stats.positives += int(positive.sum())
        stats.recalled += len(torch.unique(matches[nonzero_tuple(positive)[0]]))
    return stats
