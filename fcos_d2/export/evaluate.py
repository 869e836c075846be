"""COCO evaluation of an exported file, as ``train_net.py --eval-only`` evaluates the model.

The same test loader (Detectron2's ``DatasetMapper``: ``INPUT.FORMAT``, the test-time
``ResizeShortestEdge``), the same rescaling of the detections to each original image
(``detector_postprocess``) and the same evaluator (:class:`~fcos_d2.evaluation.
FasterCOCOEvaluator`), with the exported file in place of the PyTorch model: the float32 file
and its int8 quantization are compared on equal terms.
"""

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor

from ..evaluation import FasterCOCOEvaluator
from ..modeling.proposal_generator import score_to_logit
from .model import is_batched, load_exported, pad_batch

logger = logging.getLogger(__name__)


class ExportedDetector:
    """Detectron2's model interface (a list of input dicts -> a list of output dicts) around an
    exported file: ``{"instances": ...}`` for a detector, ``{"proposals": ...}`` for a proposal
    network, rescaled to each input's ``height`` x ``width``. A batched file runs the whole list
    in one call. ``seconds`` and ``images`` count the time spent in the file."""

    def __init__(self, run: Callable[..., tuple[Tensor, ...]], batched: bool, proposals: bool):
        self.run = run
        self.batched = batched
        self.proposals = proposals
        self.seconds = 0.0
        self.images = 0

    def __call__(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Instances]]:
        images = [x["image"].float() for x in batched_inputs]
        start = time.perf_counter()
        if self.batched:
            boxes, scores, classes, batch_index = self.run(*pad_batch(images))
            detections = [
                (boxes[batch_index == i], scores[batch_index == i], classes[batch_index == i])
                for i in range(len(images))
            ]
        else:
            detections = [self.run(image) for image in images]
        self.seconds += time.perf_counter() - start
        self.images += len(images)
        outputs = []
        for inputs, image, (boxes, scores, classes) in zip(batched_inputs, images, detections):
            size = tuple(image.shape[1:])
            if self.proposals:
                found = Instances(
                    size, proposal_boxes=Boxes(boxes), objectness_logits=score_to_logit(scores)
                )
            else:
                found = Instances(
                    size, pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes
                )
            height, width = inputs.get("height", size[0]), inputs.get("width", size[1])
            key = "proposals" if self.proposals else "instances"
            outputs.append({key: detector_postprocess(found, height, width)})
        return outputs


def evaluate_exported(
    path: Path,
    cfg,
    dataset_name: str,
    output_dir: Optional[str] = None,
    threads: Optional[int] = None,
) -> tuple[dict, float]:
    """COCO results of the exported file ``path`` on ``dataset_name`` (registered), and its
    seconds per image (time in the file only; onnxruntime with ``threads``, default torch's)."""
    model = ExportedDetector(
        load_exported(path, threads),
        is_batched(path),
        proposals=cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork",
    )
    loader = build_detection_test_loader(cfg, dataset_name)
    evaluator = FasterCOCOEvaluator(dataset_name, output_dir=output_dir)
    results = inference_on_dataset(model, loader, evaluator)
    return results, model.seconds / max(model.images, 1)
