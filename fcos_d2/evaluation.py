"""COCO evaluation: Detectron2's ``COCOEvaluator`` with the fastest exact COCOeval installed.

Detectron2 evaluates with its compiled ``COCOeval_opt`` where it was built with its C++ ops, and
otherwise (the pure-Python detectron2 of the set-up) falls back to pycocotools' pure-Python
``COCOeval`` loop, minutes at COCO scale. There :class:`FasterCOCOEvaluator` evaluates with
faster-coco-eval's ``COCOeval_faster`` (a C++ port of the same algorithm, a dependency of
fcos_d2), which gives the same 12 numbers (tested; README, "Speed", for the measured gain).
Detectron2's own compiled path is kept where it exists, and ``use_fast_impl=False`` still means
the official pycocotools code.
"""

import logging
from typing import Optional

from detectron2.evaluation import COCOEvaluator

from .d2_compat import coco_eval_class_replaced, detectron2_has_compiled_coco_eval

logger = logging.getLogger(__name__)

# Which COCOeval an evaluator runs: Detectron2's compiled one, faster-coco-eval's, or pycocotools'.
COCO_EVAL_BACKENDS = ("detectron2", "faster-coco-eval", "pycocotools")


def faster_coco_eval_class() -> Optional[type]:
    """faster-coco-eval's ``COCOeval_faster``, or None when the package is not installed."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


def coco_eval_backend(use_fast_impl: bool = True) -> str:
    """The COCOeval a :class:`FasterCOCOEvaluator` built with ``use_fast_impl`` runs (one of
    :data:`COCO_EVAL_BACKENDS`)."""
    if not use_fast_impl:
        return "pycocotools"
    if detectron2_has_compiled_coco_eval():
        return "detectron2"
    return "faster-coco-eval" if faster_coco_eval_class() is not None else "pycocotools"


class FasterCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` (same arguments, results and files) that, where Detectron2
    has no compiled ``COCOeval_opt``, evaluates with faster-coco-eval's ``COCOeval_faster``.

    With ``max_dets_per_image`` other than 100 Detectron2 uses its own pycocotools subclass
    (``COCOevalMaxDets``), and so does this evaluator; so it does for datasets whose image ids
    are not integers (Pascal VOC's file names), which faster-coco-eval cannot index.
    """

    def __init__(self, dataset_name: str, *args, use_fast_impl: bool = True, **kwargs):
        super().__init__(dataset_name, *args, use_fast_impl=use_fast_impl, **kwargs)
        self.backend = coco_eval_backend(use_fast_impl)
        logger.info(f"COCO evaluation of {dataset_name} with {self.backend}'s COCOeval")

    def evaluate(self, img_ids=None):
        if self.backend != "faster-coco-eval":
            return super().evaluate(img_ids)
        if not all(isinstance(i, int) for i in self._coco_api.getImgIds()):
            # faster-coco-eval indexes images by number; Pascal VOC datasets name them by file.
            logger.info("image ids that are not integers: evaluating with pycocotools' COCOeval")
            return super().evaluate(img_ids)
        with coco_eval_class_replaced(faster_coco_eval_class()):
            return super().evaluate(img_ids)
