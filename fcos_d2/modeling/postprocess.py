"""FCOS inference (Sec. 3.1 "Inference", Sec. 3.3, Sec. 4 "Inference Details").

Per level: keep locations whose class score (or score x quality) exceeds a threshold, take the top
k by score x quality, invert eq. (1) to get boxes; then per image: score = sqrt(cls x quality) (or
cls x quality, the paper), NMS and the top detections. Other releases threshold and rank
differently (torchvision: both on sqrt(cls x quality); mmdetection: both on cls, score cls x
quality, boxes of no area dropped before NMS): ``thresh_on_score``, ``pre_nms_ranking`` and
``min_box_size`` reproduce them.

Written for tracing as well as eager use: candidate counts come from tensor shapes (0-dim tensors
under ``torch.jit.trace``), so an exported graph keeps them dynamic instead of baking in the counts
of the example input.
"""

import copy
from collections.abc import Sequence
from typing import Union

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances
from torch import Tensor

from ..checks import ConfigError, check_choice, check_that
from .box_ops import decode_ltrb

_WHERE = "FCOSPostProcessor argument"
# What ranks a level's candidates for the pre-NMS top k (MODEL.FCOS.PRE_NMS_RANKING).
PRE_NMS_RANKINGS = ("cls_quality", "cls", "score")


def clamped_count(count: Union[int, Tensor], limit: int) -> Union[int, Tensor]:
    """min(count, limit); under tracing ``count`` is a 0-dim tensor and so is the result."""
    if isinstance(count, Tensor):
        return torch.clamp(count, max=limit)
    return min(count, limit)


class FCOSPostProcessor:
    """Turns dense per-level predictions into per-image :class:`Instances`.

    The detector uses it with per-class NMS; the proposal generator with one class, class-agnostic
    NMS, a minimum box size, and the final score returned as ``objectness_logits``.
    """

    @configurable
    def __init__(
        self,
        *,
        strides: Sequence[int],
        score_threshold: float = 0.05,
        pre_nms_topk: int = 1000,
        post_nms_topk: int = 100,
        nms_threshold: float = 0.6,
        thresh_with_quality: bool = False,
        score_sqrt: bool = True,
        normalized_reg: bool = True,
        class_agnostic_nms: bool = False,
        min_box_size: float = -1.0,
        thresh_on_score: bool = False,
        pre_nms_ranking: str = "cls_quality",
    ):
        """
        Args:
            strides: stride of each level; regressions are multiplied by it when ``normalized_reg``.
            score_threshold: candidates need a class score (x quality with ``thresh_with_quality``,
                the final score with ``thresh_on_score``) above it.
            pre_nms_topk: candidates kept per level, ranked by ``pre_nms_ranking``: "cls_quality"
                (class score x quality, the authors'), "cls" (class score, mmdetection's) or
                "score" (the final score, torchvision's: the order of "cls_quality" except where
                the square root rounds two products to one value).
            post_nms_topk: detections kept per image after NMS.
            score_sqrt: final score sqrt(cls x quality) (improved) or cls x quality (paper).
            min_box_size: when >= 0, candidates whose clipped width or height is not above it are
                dropped before NMS (mmdetection's ``min_bbox_size``); negative: none dropped.
            thresh_on_score: compare ``score_threshold`` with the final score (torchvision's
                0.2 on sqrt(cls x quality)); exclusive with ``thresh_with_quality``.
        """
        self.strides = list(strides)
        self.score_threshold = score_threshold
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_threshold = nms_threshold
        self.thresh_with_quality = thresh_with_quality
        self.score_sqrt = score_sqrt
        self.normalized_reg = normalized_reg
        self.class_agnostic_nms = class_agnostic_nms
        self.min_box_size = min_box_size
        self.thresh_on_score = thresh_on_score
        self.pre_nms_ranking = pre_nms_ranking
        self._validate()

    def _validate(self) -> None:
        check_that(
            len(self.strides) > 0 and all(s > 0 for s in self.strides),
            "MODEL.FCOS.FPN_STRIDES",
            "a non-empty list of positive strides",
            self.strides,
            f"{_WHERE} strides",
        )
        check_that(
            self.pre_nms_topk >= 1,
            "MODEL.FCOS.PRE_NMS_TOPK_TEST",
            ">= 1",
            self.pre_nms_topk,
            f"{_WHERE} pre_nms_topk",
        )
        check_that(
            self.post_nms_topk >= 1,
            "TEST.DETECTIONS_PER_IMAGE",
            ">= 1",
            self.post_nms_topk,
            f"{_WHERE} post_nms_topk",
        )
        check_that(
            0 <= self.nms_threshold <= 1,
            "MODEL.FCOS.NMS_TH",
            "in [0, 1]",
            self.nms_threshold,
            f"{_WHERE} nms_threshold",
        )
        check_that(
            0 <= self.score_threshold < 1,
            "MODEL.FCOS.INFERENCE_TH_TEST",
            "in [0, 1)",
            self.score_threshold,
            f"{_WHERE} score_threshold",
        )
        check_that(
            not (self.thresh_on_score and self.thresh_with_quality),
            "MODEL.FCOS.THRESH_ON_SCORE",
            "False when MODEL.FCOS.THRESH_WITH_CTR is True (the threshold applies to one value)",
            self.thresh_on_score,
            f"{_WHERE} thresh_on_score",
        )
        check_choice(
            self.pre_nms_ranking,
            PRE_NMS_RANKINGS,
            "MODEL.FCOS.PRE_NMS_RANKING",
            f"{_WHERE} pre_nms_ranking",
        )

    @classmethod
    def from_config(cls, cfg):
        """The detector's test-time settings; callers override any of them by keyword."""
        fcos = cfg.MODEL.FCOS
        return {
            "strides": fcos.FPN_STRIDES,
            "score_threshold": fcos.INFERENCE_TH_TEST,
            "pre_nms_topk": fcos.PRE_NMS_TOPK_TEST,
            "post_nms_topk": detections_per_image(cfg),
            "nms_threshold": fcos.NMS_TH,
            "thresh_with_quality": fcos.THRESH_WITH_CTR,
            "score_sqrt": fcos.SCORE_SQRT,
            "normalized_reg": fcos.NORM_REG_TARGETS,
            "min_box_size": fcos.MIN_BOX_SIZE_TEST,
            "thresh_on_score": fcos.THRESH_ON_SCORE,
            "pre_nms_ranking": fcos.PRE_NMS_RANKING,
        }

    def replace(self, **changes) -> "FCOSPostProcessor":
        """A copy with some settings changed (e.g. ``nms_threshold=1.0`` to see every candidate)."""
        unknown = sorted(set(changes) - set(vars(self)))
        if unknown:
            raise TypeError(
                f"FCOSPostProcessor has no setting(s) {unknown}; known: {sorted(vars(self))}"
            )
        other = copy.copy(self)
        vars(other).update(changes)
        other._validate()
        return other

    def __call__(
        self,
        locations: list[Tensor],
        cls_probs: list[Tensor],
        box_reg: list[Tensor],
        quality: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[Instances]:
        """
        Args:
            locations: per level (HW_i, 2).
            cls_probs: per level (N, HW_i, C) class probabilities.
            box_reg: per level (N, HW_i, 4), in target units (see ``normalized_reg``).
            quality: per level (N, HW_i) quality in [0, 1] (center-ness, IoU, or 1 for none).
            image_sizes: (height, width) of each image before padding, for clipping.
        """
        results = []
        for image_idx, image_size in enumerate(image_sizes):
            per_level = [
                self._decode_level(
                    locations[level],
                    cls_probs[level][image_idx],
                    box_reg[level][image_idx],
                    quality[level][image_idx],
                    stride if self.normalized_reg else 1,
                )
                for level, stride in enumerate(self.strides[: len(locations)])
            ]
            boxes, scores, classes = (torch.cat(parts) for parts in zip(*per_level))
            results.append(self._select(boxes, scores, classes, image_size))
        return results

    def _decode_level(
        self, locations: Tensor, cls_probs: Tensor, ltrb: Tensor, quality: Tensor, stride: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.thresh_on_score or self.pre_nms_ranking != "cls_quality":
            return self._decode_level_by(locations, cls_probs, ltrb, quality, stride)
        ranking = cls_probs * quality[:, None]
        keep = (ranking if self.thresh_with_quality else cls_probs) > self.score_threshold
        ranking = ranking[keep]
        location_idx, class_idx = keep.nonzero(as_tuple=True)
        ranking, top = ranking.topk(clamped_count(ranking.shape[0], self.pre_nms_topk))
        location_idx, class_idx = location_idx[top], class_idx[top]
        boxes = decode_ltrb(locations[location_idx], ltrb[location_idx], stride)
        scores = torch.sqrt(ranking) if self.score_sqrt else ranking
        return boxes, scores, class_idx

    def _decode_level_by(
        self, locations: Tensor, cls_probs: Tensor, ltrb: Tensor, quality: Tensor, stride: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_decode_level` for the other releases' rules: the final score computed for
        every pair before thresholding and ranking, as they do (same values, same order)."""
        product = cls_probs * quality[:, None]
        final = torch.sqrt(product) if self.score_sqrt else product
        if self.thresh_on_score:
            thresholded = final
        else:
            thresholded = product if self.thresh_with_quality else cls_probs
        keep = thresholded > self.score_threshold
        location_idx, class_idx = keep.nonzero(as_tuple=True)
        ranking = {"cls_quality": product, "cls": cls_probs, "score": final}[self.pre_nms_ranking]
        ranking = ranking[keep]
        _, top = ranking.topk(clamped_count(ranking.shape[0], self.pre_nms_topk))
        location_idx, class_idx = location_idx[top], class_idx[top]
        boxes = decode_ltrb(locations[location_idx], ltrb[location_idx], stride)
        return boxes, final[keep][top], class_idx

    def _select(self, boxes: Tensor, scores: Tensor, classes: Tensor, image_size) -> Instances:
        boxes = Boxes(boxes)
        boxes.clip(image_size)
        if self.min_box_size >= 0:
            keep = boxes.nonempty(threshold=self.min_box_size)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        nms_groups = torch.zeros_like(classes) if self.class_agnostic_nms else classes
        keep = batched_nms(boxes.tensor, scores, nms_groups, self.nms_threshold)
        keep = keep[: self.post_nms_topk]
        return Instances(
            image_size, pred_boxes=boxes[keep], scores=scores[keep], pred_classes=classes[keep]
        )


def detections_per_image(cfg) -> int:
    """Detections kept per image: ``TEST.DETECTIONS_PER_IMAGE``, as in Detectron2's detectors.

    ``MODEL.FCOS.POST_NMS_TOPK_TEST`` is the authors' name for the same number; 0 (our default)
    defers to ``TEST.DETECTIONS_PER_IMAGE``, and a YAML that sets both must set them alike.
    """
    authors, detectron2 = cfg.MODEL.FCOS.POST_NMS_TOPK_TEST, cfg.TEST.DETECTIONS_PER_IMAGE
    if authors and authors != detectron2:
        raise ConfigError(
            f"MODEL.FCOS.POST_NMS_TOPK_TEST={authors} and TEST.DETECTIONS_PER_IMAGE={detectron2} "
            "both set "
            "the number of detections per image: set them to the same value (or leave "
            "POST_NMS_TOPK_TEST at 0 to follow TEST.DETECTIONS_PER_IMAGE)"
        )
    return detectron2
