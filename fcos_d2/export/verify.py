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

from .model import Detections

# A detection matches when the other side has one of the same class with box IoU >= MIN_IOU and a
# score within MAX_SCORE_DIFF; verification passes when MIN_MATCHED of all detections match. Not
# 100%: float noise (oneDNN vs onnxruntime kernels) may reorder near-equal scores at the top-N cut
# or flip an NMS decision at a near-threshold overlap.
MIN_IOU = 0.99
MAX_SCORE_DIFF = 1e-3
MIN_MATCHED = 0.99
# Sizes besides the test size, relative to it: one smaller, one larger than the traced example.
OTHER_SCALES = (0.75, 1.3)


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


def compare(reference: Detections, exported: Detections) -> Comparison:
    """Greedy one-to-one matching, reference detections in descending score order."""
    ref_boxes, ref_scores, ref_classes = (x.detach().cpu() for x in reference)
    exp_boxes, exp_scores, exp_classes = (x.detach().cpu() for x in exported)
    ious = pairwise_iou(Boxes(ref_boxes.float()), Boxes(exp_boxes.float())).numpy()
    score_diff = (ref_scores[:, None].double() - exp_scores[None, :].double()).abs().numpy()
    candidate = (
        (ious >= MIN_IOU)
        & (score_diff <= MAX_SCORE_DIFF)
        & (ref_classes[:, None] == exp_classes[None, :]).numpy()
    )
    taken = np.zeros(len(exp_scores), dtype=bool)
    box_diffs, score_diffs = [0.0], [0.0]
    for i in torch.argsort(ref_scores, descending=True).tolist():
        options = np.flatnonzero(candidate[i] & ~taken)
        if options.size == 0:
            continue
        j = options[np.argmax(ious[i, options])]
        taken[j] = True
        box_diffs.append(float((ref_boxes[i] - exp_boxes[j]).abs().max()))
        score_diffs.append(float(score_diff[i, j]))
    return Comparison(
        len(ref_scores), len(exp_scores), int(taken.sum()), max(box_diffs), max(score_diffs)
    )


def worst_differences(box: float, score: float) -> str:
    return f"worst box diff {box:.2g} px, worst score diff {score:.2g}"


def verify(
    run_exported: Callable[[Tensor], Detections],
    run_reference: Callable[[Tensor], Detections],
    cfg,
    image_paths: Sequence[Path],
    log: Callable[[str], None] = print,
) -> bool:
    """Compare both on every image at every :func:`verify_sizes`; log a line per run and a summary.

    Returns whether at least :data:`MIN_MATCHED` of all detections matched.
    """
    results = []
    for path in image_paths:
        for image in images_at_verify_sizes(Path(path), cfg):
            with torch.no_grad():
                result = compare(run_reference(image), run_exported(image))
            results.append(result)
            log(
                f"  {Path(path).name} {image.shape[1]}x{image.shape[2]}: pytorch "
                f"{result.reference}, exported {result.exported}, matched {result.matched}; "
                + worst_differences(result.worst_box_diff, result.worst_score_diff)
            )
    total = sum(r.total for r in results)
    matched = sum(r.matched for r in results)
    fraction = matched / total if total else 1.0
    passed = fraction >= MIN_MATCHED
    worst = worst_differences(
        max((r.worst_box_diff for r in results), default=0.0),
        max((r.worst_score_diff for r in results), default=0.0),
    )
    log(
        f"verify: {matched}/{total} detections matched ({100 * fraction:.2f}%) at box IoU >= "
        f"{MIN_IOU} and score diff <= {MAX_SCORE_DIFF:g}; {worst}: "
        f"{'PASS' if passed else 'FAIL'} (needs {100 * MIN_MATCHED:g}%)"
    )
    if total == 0:
        log(
            "verify: WARNING: no detections on any image, so the comparison shows nothing; use "
            "images with objects (or a lower MODEL.FCOS.INFERENCE_TH_TEST)"
        )
    return passed
