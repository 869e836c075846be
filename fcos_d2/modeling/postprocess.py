"""FCOS inference (Sec. 3.1 "Inference", Sec. 3.3, Sec. 4 "Inference Details").

Per level: keep locations whose class score (or score x quality) exceeds a threshold, take the top
k by score x quality, invert eq. (1) to get boxes; then per image: score = sqrt(cls x quality) (or
cls x quality, the paper), NMS and the top detections.
"""
from typing import List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances
from torch import Tensor


def decode_boxes(locations: Tensor, ltrb: Tensor) -> Tensor:
    """Inverse of eq. (1): (x - l, y - t, x + r, y + b), with ``ltrb`` in pixels."""
    return torch.cat([locations - ltrb[..., :2], locations + ltrb[..., 2:]], dim=-1)


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
        min_box_size: float = 0.0,
    ):
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

    @classmethod
    def from_config(cls, cfg):
        """The detector's test-time settings; callers override any of them by keyword."""
        fcos = cfg.MODEL.FCOS
        return {
            "strides": fcos.FPN_STRIDES,
            "score_threshold": fcos.INFERENCE_TH_TEST,
            "pre_nms_topk": fcos.PRE_NMS_TOPK_TEST,
            "post_nms_topk": fcos.POST_NMS_TOPK_TEST,
            "nms_threshold": fcos.NMS_TH,
            "thresh_with_quality": fcos.THRESH_WITH_CTR,
            "score_sqrt": fcos.SCORE_SQRT,
            "normalized_reg": fcos.NORM_REG_TARGETS,
        }

    def __call__(
        self,
        locations: List[Tensor],
        cls_probs: List[Tensor],
        box_reg: List[Tensor],
        quality: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
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
                    box_reg[level][image_idx] * (stride if self.normalized_reg else 1),
                    quality[level][image_idx],
                )
                for level, stride in enumerate(self.strides[: len(locations)])
            ]
            boxes, scores, classes = (torch.cat(parts) for parts in zip(*per_level))
            results.append(self._select(boxes, scores, classes, image_size))
        return results

    def _decode_level(
        self, locations: Tensor, cls_probs: Tensor, ltrb: Tensor, quality: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        ranking = cls_probs * quality[:, None]
        keep = (ranking if self.thresh_with_quality else cls_probs) > self.score_threshold
        ranking = ranking[keep]
        location_idx, class_idx = keep.nonzero(as_tuple=True)
        ranking, top = ranking.topk(min(self.pre_nms_topk, len(ranking)))
        location_idx, class_idx = location_idx[top], class_idx[top]
        boxes = decode_boxes(locations[location_idx], ltrb[location_idx])
        scores = torch.sqrt(ranking) if self.score_sqrt else ranking
        return boxes, scores, class_idx

    def _select(self, boxes: Tensor, scores: Tensor, classes: Tensor, image_size) -> Instances:
        boxes = Boxes(boxes)
        boxes.clip(image_size)
        if self.min_box_size > 0:
            keep = boxes.nonempty(threshold=self.min_box_size)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        nms_groups = torch.zeros_like(classes) if self.class_agnostic_nms else classes
        keep = batched_nms(boxes.tensor, scores, nms_groups, self.nms_threshold)
        keep = keep[: self.post_nms_topk]
        return Instances(image_size, pred_boxes=boxes[keep], scores=scores[keep], pred_classes=classes[keep])
