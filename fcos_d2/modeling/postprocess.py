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
import functools
from collections.abc import Sequence
from typing import NamedTuple, Union

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


@functools.lru_cache(maxsize=16)
def thresholds_tensor(values: tuple[float, ...]) -> Tensor:
    """Per-class thresholds as a (read-only) tensor, made once per setting and outside any trace
    (the post-processor makes it when built): a trace records it as a constant of the graph."""
    return torch.tensor(values, dtype=torch.float32)


class BatchedDetections(NamedTuple):
    """The detections of a batch of images in flat tensors, grouped by image (in batch order),
    each image's by descending score: boxes (K, 4), scores (K,), classes (K,), and the index of
    each detection's image in the batch (K,)."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    batch_index: Tensor


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
        class_thresholds: Sequence[float] = (),
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
            class_thresholds: ``MODEL.FCOS.CLASS_THRESHOLDS``, one per class or none: after NMS a
                detection is kept only if its final score is >= its class's value (the operating
                point of a demo's confidence threshold, per class); ``score_threshold`` still
                selects the candidates before NMS. Applied as a gather by class index and a mask,
                so that traced and exported graphs keep it.
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
        self.class_thresholds = tuple(float(t) for t in class_thresholds)
        self._validate()
        thresholds_tensor(self.class_thresholds)

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
        check_that(
            all(0 <= t <= 1 for t in self.class_thresholds),
            "MODEL.FCOS.CLASS_THRESHOLDS",
            "scores in [0, 1]",
            list(self.class_thresholds),
            f"{_WHERE} class_thresholds",
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
            "class_thresholds": configured_class_thresholds(cfg),
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
        thresholds_tensor(tuple(other.class_thresholds))
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

    def batched(
        self,
        locations: list[Tensor],
        cls_probs: list[Tensor],
        box_reg: list[Tensor],
        quality: list[Tensor],
        image_sizes: Tensor,
    ) -> BatchedDetections:
        """What :meth:`__call__` selects, for all images at once, followed by Detectron2's
        ``detector_postprocess`` at the input size (which drops empty boxes).

        No loop over images: the batch size stays dynamic in a traced graph (the batched export).
        Per level, each image's top-k comes from one ``topk`` over its (location, class) pairs in
        which those below the threshold rank last; NMS runs once with one group per (image,
        class); a rank within each image makes the per-image top-N cut. The selection equals
        :meth:`__call__`'s up to the order of exactly equal scores.

        Args:
            image_sizes: (N, 2) int64 (height, width) of each image before padding.
        """
        num_classes = cls_probs[0].shape[2]
        per_level = [
            self._decode_level_batched(
                locations[level],
                cls_probs[level],
                box_reg[level],
                quality[level],
                stride if self.normalized_reg else 1,
            )
            for level, stride in enumerate(self.strides[: len(locations)])
        ]
        boxes, scores, classes, batch_index = (torch.cat(parts) for parts in zip(*per_level))
        sizes = image_sizes.to(boxes.dtype)[batch_index]  # (K, 2): height, width
        zero = torch.zeros_like(boxes[:, 0])
        x0, y0, x1, y1 = boxes.unbind(1)
        boxes = torch.stack(  # Boxes.clip, with each detection's own image size
            [
                torch.minimum(torch.maximum(x0, zero), sizes[:, 1]),
                torch.minimum(torch.maximum(y0, zero), sizes[:, 0]),
                torch.minimum(torch.maximum(x1, zero), sizes[:, 1]),
                torch.minimum(torch.maximum(y1, zero), sizes[:, 0]),
            ],
            dim=1,
        )
        if self.min_box_size >= 0:
            keep = _nonempty(boxes, self.min_box_size)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            batch_index = batch_index[keep]
        groups = batch_index * (1 if self.class_agnostic_nms else num_classes)
        if not self.class_agnostic_nms:
            groups = groups + classes
        keep = batched_nms(boxes, scores, groups, self.nms_threshold)  # by descending score
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        batch_index = batch_index[keep]
        if self.class_thresholds:  # as in _select: before the top-N cut
            thresholds = thresholds_tensor(tuple(self.class_thresholds)).to(scores.device)
            keep = scores >= thresholds[classes]
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            batch_index = batch_index[keep]
        # NMS keeps them by descending score: the first post_nms_topk of each image stay.
        rank, _ = _ranks_in_image(batch_index, image_sizes.shape[0])
        keep = (rank < self.post_nms_topk) & _nonempty(boxes, 0.0)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        batch_index = batch_index[keep]
        # Grouped by image: each detection goes after the earlier images' ones, at its rank.
        rank, before = _ranks_in_image(batch_index, image_sizes.shape[0])
        place = rank + before[batch_index]
        order = torch.zeros_like(place).scatter(0, place, torch.arange(place.shape[0]).to(place))
        return BatchedDetections(boxes[order], scores[order], classes[order], batch_index[order])

    def _decode_level_batched(
        self, locations: Tensor, cls_probs: Tensor, ltrb: Tensor, quality: Tensor, stride: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        num_classes = cls_probs.shape[2]
        product = cls_probs * quality[:, :, None]
        final = None
        if self.thresh_on_score or self.pre_nms_ranking != "cls_quality":
            # The other releases' rules, as in _decode_level_by.
            final = torch.sqrt(product) if self.score_sqrt else product
            thresholded = product if self.thresh_with_quality else cls_probs
            passing = (final if self.thresh_on_score else thresholded) > self.score_threshold
            ranking = {"cls_quality": product, "cls": cls_probs, "score": final}[
                self.pre_nms_ranking
            ]
        else:
            passing = (product if self.thresh_with_quality else cls_probs) > self.score_threshold
            ranking = product
        # Rankings are >= 0: -1 puts the pairs below the threshold after every passing one.
        ranking = torch.where(passing, ranking, torch.full_like(ranking, -1.0)).flatten(1)
        ranking, top = ranking.topk(clamped_count(ranking.shape[1], self.pre_nms_topk), dim=1)
        # Flat indices (one Gather each in ONNX, where two index tensors need a compound op).
        passing = (ranking >= 0).flatten().nonzero().squeeze(1)
        batch_index = passing // ranking.shape[1]
        ranking, top = ranking.flatten()[passing], top.flatten()[passing]
        location_idx, class_idx = top // num_classes, top % num_classes
        ltrb = ltrb.flatten(0, 1)[batch_index * ltrb.shape[1] + location_idx]
        boxes = decode_ltrb(locations[location_idx], ltrb, stride)
        if final is not None:
            final = final.flatten(1)
            scores = final.flatten()[batch_index * final.shape[1] + top]
        else:
            scores = torch.sqrt(ranking) if self.score_sqrt else ranking
        return boxes, scores, class_idx, batch_index

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
        if self.class_thresholds:
            # Before the top-N cut, so that removed detections leave room for others.
            thresholds = thresholds_tensor(tuple(self.class_thresholds)).to(scores.device)
            keep = keep[scores[keep] >= thresholds[classes[keep]]]
        keep = keep[: self.post_nms_topk]
        return Instances(
            image_size, pred_boxes=boxes[keep], scores=scores[keep], pred_classes=classes[keep]
        )


def configured_class_thresholds(cfg) -> tuple[float, ...]:
    """``MODEL.FCOS.CLASS_THRESHOLDS``: empty, or one score per class of ``MODEL.FCOS.NUM_CLASSES``
    (values are checked by :class:`FCOSPostProcessor`)."""
    thresholds, num_classes = tuple(cfg.MODEL.FCOS.CLASS_THRESHOLDS), cfg.MODEL.FCOS.NUM_CLASSES
    if thresholds and len(thresholds) != num_classes:
        raise ConfigError(
            f"MODEL.FCOS.CLASS_THRESHOLDS has {len(thresholds)} values but "
            f"MODEL.FCOS.NUM_CLASSES is {num_classes}: give one score threshold per class, or "
            "none to keep every detection above MODEL.FCOS.INFERENCE_TH_TEST"
        )
    return thresholds


def _ranks_in_image(batch_index: Tensor, num_images: Union[int, Tensor]) -> tuple[Tensor, Tensor]:
    """Each detection's rank among the earlier ones of its image (K,), and the number of
    detections of the images before each image (N,); no loop, so that N stays dynamic."""
    images = torch.arange(num_images, device=batch_index.device)
    member = (batch_index[:, None] == images[None, :]).long()  # (K, N)
    rank = ((member.cumsum(0) - 1) * member).sum(1)
    counts = member.sum(0)
    return rank, counts.cumsum(0) - counts


def _nonempty(boxes: Tensor, threshold: float) -> Tensor:
    """``Boxes.nonempty``: width and height above ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


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
