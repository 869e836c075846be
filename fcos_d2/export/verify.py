"""Does an exported file detect what the PyTorch model detects, at the test size and others?"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, pairwise_iou
from torch import Tensor

from .model import Detections, pad_batch


@dataclass(frozen=True)
class Tolerance:
    """When an exported file "detects what the model detects".

    A detection of the PyTorch model with a score >= ``min_score`` matches when the file gives
    one (of any score) of the same class with box IoU >= ``min_iou`` and a score within
    ``max_score_diff``; the check passes when ``min_matched`` of the detections with a score >=
    ``min_score`` on either side (the larger count) match.
    """

    min_iou: float
    max_score_diff: float
    min_matched: float
    min_score: float = 0.0

    def describe(self) -> str:
        scope = f" of the detections scoring >= {self.min_score:g}" if self.min_score else ""
        return (
            f"box IoU >= {self.min_iou:g} and score diff <= {self.max_score_diff:g}; needs "
            f"{100 * self.min_matched:g}%{scope}"
        )


# Float32 files: every detection. Not 100%: float noise (oneDNN vs onnxruntime kernels) may
# reorder near-equal scores at the top-N cut or flip an NMS decision at a near-threshold overlap.
FLOAT32 = Tolerance(min_iou=0.99, max_score_diff=1e-3, min_matched=0.99)
# int8 files: the confident detections in nearly the same place with nearly the same score.
# Weak ones move in and out of the top N with 8-bit noise, so they are not counted; the AP on a
# dataset (--evaluate-dataset) is the measure of accuracy. On the quickstart model 96% of the
# PyTorch detections scoring >= 0.3 had an int8 one at IoU >= 0.9 within 0.05 (docs/export.md).
INT8 = Tolerance(min_iou=0.8, max_score_diff=0.05, min_matched=0.9, min_score=0.3)
# Sizes besides the test size, relative to it: one smaller, one larger than the traced example.
OTHER_SCALES = (0.75, 1.3)
# Batch sizes a batched file is checked at.
BATCH_SIZES = (1, 2, 4)


def test_resize(cfg) -> T.Augmentation:
    """The test-time resize of Detectron2's ``DefaultPredictor``."""
    return T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )


def off_multiple_of_32(side: int) -> int:
    """``side``, or ``side + 1`` if it is a multiple of 32, so that padding is exercised."""
    return side + 1 if side % 32 == 0 else side


def verify_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """The test size, then :data:`OTHER_SCALES` of it, each side off multiples of 32."""
    others = [
        (off_multiple_of_32(round(height * s)), off_multiple_of_32(round(width * s)))
        for s in OTHER_SCALES
    ]
    return [(height, width), *others]


def images_at_verify_sizes(path: Path, cfg) -> list[Tensor]:
    """``path`` read like Detectron2 does (``INPUT.FORMAT``) as (3, H, W) float32 tensors at the
    test size (ResizeShortestEdge) and at the other :func:`verify_sizes`."""
    original = read_image(str(path), format=cfg.INPUT.FORMAT)
    height, width = original.shape[:2]
    test_size = test_resize(cfg).get_transform(original).apply_image(original).shape[:2]
    images = []
    for new_height, new_width in verify_sizes(*test_size):
        resized = T.ResizeTransform(height, width, new_height, new_width).apply_image(original)
        images.append(torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)))
    return images


@dataclass
class Comparison:
    """Detections of the PyTorch model and the exported file on one image, and how they match."""

    reference: int
    exported: int
    matched: int
    worst_box_diff: float  # largest |coordinate difference| (pixels) over matched pairs
    worst_score_diff: float  # largest |score difference| over matched pairs

    @property
    def total(self) -> int:
        """Detections that should match: the larger of the two counts."""
        return max(self.reference, self.exported)


def compare(
    reference: Detections, exported: Detections, tolerance: Tolerance = FLOAT32
) -> Comparison:
    """Greedy one-to-one matching, reference detections in descending score order."""
    ref_boxes, ref_scores, ref_classes = (x.detach().cpu() for x in reference)
    exp_boxes, exp_scores, exp_classes = (x.detach().cpu() for x in exported)
    ious = pairwise_iou(Boxes(ref_boxes.float()), Boxes(exp_boxes.float())).numpy()
    score_diff = (ref_scores[:, None].double() - exp_scores[None, :].double()).abs().numpy()
    candidate = (
        (ious >= tolerance.min_iou)
        & (score_diff <= tolerance.max_score_diff)
        & (ref_classes[:, None] == exp_classes[None, :]).numpy()
    )
    taken = np.zeros(len(exp_scores), dtype=bool)
    box_diffs, score_diffs = [0.0], [0.0]
    for i in torch.argsort(ref_scores, descending=True).tolist():
        if ref_scores[i] < tolerance.min_score:
            break
        options = np.flatnonzero(candidate[i] & ~taken)
        if options.size == 0:
            continue
        j = options[np.argmax(ious[i, options])]
        taken[j] = True
        box_diffs.append(float((ref_boxes[i] - exp_boxes[j]).abs().max()))
        score_diffs.append(float(score_diff[i, j]))
    return Comparison(
        int((ref_scores >= tolerance.min_score).sum()),
        int((exp_scores >= tolerance.min_score).sum()),
        int(taken.sum()),
        max(box_diffs),
        max(score_diffs),
    )


def worst_differences(box: float, score: float) -> str:
    return f"worst box diff {box:.2g} px, worst score diff {score:.2g}"


def verify(
    run_exported: Callable[[Tensor], Detections],
    run_reference: Callable[[Tensor], Detections],
    cfg,
    image_paths: Sequence[Path],
    log: Callable[[str], None] = print,
    tolerance: Tolerance = FLOAT32,
) -> bool:
    """Compare both on every image at every :func:`verify_sizes`; log a line per run and a summary.

    Returns whether at least ``tolerance.min_matched`` of all detections matched.
    """
    results = []
    for path in image_paths:
        for image in images_at_verify_sizes(Path(path), cfg):
            with torch.no_grad():
                result = compare(run_reference(image), run_exported(image), tolerance)
            results.append(result)
            log(f"  {Path(path).name} {image.shape[1]}x{image.shape[2]}: " + _counts(result))
    return summarize(results, tolerance, log)


def batches(images: list[Tensor], batch_size: int) -> list[list[Tensor]]:
    """Consecutive groups of ``batch_size`` images, the last one completed from the start, so
    that every image is in one batch and every batch is full."""
    count = -(-len(images) // batch_size)
    cycle = images * batch_size
    return [cycle[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def verify_batched(
    run_exported: Callable[[Tensor, Tensor], tuple[Tensor, ...]],
    run_reference: Callable[[list[Tensor]], list[Detections]],
    cfg,
    image_paths: Sequence[Path],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    log: Callable[[str], None] = print,
    tolerance: Tolerance = FLOAT32,
) -> bool:
    """:func:`verify` for a batched file: the images at every :func:`verify_sizes`, in batches
    of each of ``batch_sizes`` (sizes mixed within a batch), run by the file (padded to the
    largest, with their sizes) and by the PyTorch model on the same list; compared per image.
    """
    images = [x for path in image_paths for x in images_at_verify_sizes(Path(path), cfg)]
    results = []
    for batch_size in batch_sizes:
        for batch in batches(images, batch_size):
            with torch.no_grad():
                references = run_reference(batch)
                boxes, scores, classes, batch_index = run_exported(*pad_batch(batch))
            compared = [
                compare(
                    reference,
                    (boxes[batch_index == i], scores[batch_index == i], classes[batch_index == i]),
                    tolerance,
                )
                for i, reference in enumerate(references)
            ]
            results += compared
            sizes = ", ".join(f"{x.shape[1]}x{x.shape[2]}" for x in batch)
            total = Comparison(
                sum(c.reference for c in compared),
                sum(c.exported for c in compared),
                sum(c.matched for c in compared),
                max(c.worst_box_diff for c in compared),
                max(c.worst_score_diff for c in compared),
            )
            log(f"  batch of {batch_size} ({sizes}): " + _counts(total))
    return summarize(results, tolerance, log)


def _counts(result: Comparison) -> str:
    return (
        f"pytorch {result.reference}, exported {result.exported}, matched {result.matched}; "
        + worst_differences(result.worst_box_diff, result.worst_score_diff)
    )


def summarize(
    results: Sequence[Comparison], tolerance: Tolerance, log: Callable[[str], None] = print
) -> bool:
    """Logs the summary line of a verification; whether it passed."""
    total = sum(r.total for r in results)
    matched = sum(r.matched for r in results)
    fraction = matched / total if total else 1.0
    passed = fraction >= tolerance.min_matched
    worst = worst_differences(
        max((r.worst_box_diff for r in results), default=0.0),
        max((r.worst_score_diff for r in results), default=0.0),
    )
    log(
        f"verify: {matched}/{total} detections matched ({100 * fraction:.2f}%) at "
        f"{tolerance.describe()}; {worst}: {'PASS' if passed else 'FAIL'}"
    )
    if total == 0:
        log(
            "verify: WARNING: no detections on any image, so the comparison shows nothing; use "
            "images with objects (or a lower MODEL.FCOS.INFERENCE_TH_TEST)"
        )
    return passed
