"""The training losses on a validation set (``TEST.VAL_LOSS``, ours): how well a model fits data it
does not train on, at every evaluation, next to COCO AP.

The detector stays in inference mode (BatchNorm statistics are used, not updated) and the losses
use each batch's own normalizers; the result is the mean over images of each loss and their sum
(``total_loss``), averaged over all processes.
"""

from collections.abc import Iterable

import torch
from detectron2.utils import comm
from torch import nn

from ..checks import check_that
from ..modeling.fcos import FCOS
from ..utils import unwrap_model


@torch.no_grad()
def validation_losses(model: nn.Module, loader: Iterable[list[dict]]) -> dict[str, float]:
    """Mean per-image FCOS losses of ``model`` on ``loader``'s annotated inputs (see
    :func:`fcos_d2.inference.oracle.build_annotated_test_loader`), over all processes."""
    detector = unwrap_model(model)
    check_that(
        isinstance(detector, FCOS),
        "TEST.VAL_LOSS",
        "used with MODEL.META_ARCHITECTURE FCOS (the detector's own losses)",
        type(detector).__name__,
    )
    was_training = detector.training
    detector.eval()
    sums: dict[str, float] = {}
    images = 0
    try:
        for batch in loader:
            _, features, predictions = detector.dense_predictions(batch)
            gt = [x["instances"].to(detector.device) for x in batch]
            losses, _ = detector.core.losses(features, predictions, gt, training=False)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(batch)
            images += len(batch)
    finally:
        detector.train(was_training)
    gathered = comm.all_gather((sums, images))
    images = sum(count for _, count in gathered)
    totals = {name: sum(part.get(name, 0.0) for part, _ in gathered) for name in sums}
    means = {name: total / max(images, 1) for name, total in totals.items()}
    means["total_loss"] = sum(means.values())
    return means
