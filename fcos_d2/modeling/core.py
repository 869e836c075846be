"""The FCOS core shared by the detector, the proposal generator, the analyses and the exporter.

Given the head's per-level outputs for some feature maps, the core knows where each location is
(Sec. 3.1), turns ground truth into targets and losses (Sec. 3.1-3.3, eq. (2)), and decodes
detections (Sec. 3.1 "Inference"). It owns no parameters: the head stays where Detectron2 users
expect its weights (``head.*`` in the detector, ``proposal_generator.fcos_head.*`` in R-CNNs).
"""

from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Instances
from torch import Tensor

from ..checks import check_choice, check_that
from .box_ops import LOCATION_GRIDS, centerness_from_ltrb, feature_locations
from .head import FCOSHeadOutputs
from .losses import FCOSLoss
from .postprocess import BatchedDetections, FCOSPostProcessor
from .targets import FCOSTargetAssigner, FCOSTargets

# What multiplies the class score at inference (Table 4, arXiv Sec. 4.1.2). "oracle" (ground-truth
# center-ness) needs annotations, so callers pass its maps in: see fcos_d2.inference.oracle.
INFERENCE_QUALITIES = ("branch", "none", "from_regression", "oracle")


def backbone_strides(cfg, shapes: dict[str, ShapeSpec]) -> list[int]:
    """Strides of ``MODEL.FCOS.IN_FEATURES`` as the backbone produces them.

    ``MODEL.FCOS.FPN_STRIDES`` is the authors' key for the same numbers; it must agree.
    """
    in_features, strides = list(cfg.MODEL.FCOS.IN_FEATURES), list(cfg.MODEL.FCOS.FPN_STRIDES)
    missing = [f for f in in_features if f not in shapes]
    check_that(
        not missing,
        "MODEL.FCOS.IN_FEATURES",
        f"outputs of the backbone {cfg.MODEL.BACKBONE.NAME} ({sorted(shapes)})",
        in_features,
    )
    actual = [shapes[f].stride for f in in_features]
    check_that(
        strides == actual,
        "MODEL.FCOS.FPN_STRIDES",
        f"the strides {actual} of MODEL.FCOS.IN_FEATURES={in_features}",
        strides,
    )
    return actual


def dense_per_level(per_level: Sequence[Tensor], dim: int) -> list[Tensor]:
    """Per-level (N, K, H, W) maps -> float32 (N, H*W, K) tensors, in row-major order.

    Float32 because losses and box decoding need its precision under mixed precision.
    """
    return [permute_to_N_HWA_K(x, dim).float() for x in per_level]


def flatten_predictions(per_level: Sequence[Tensor], dim: int) -> Tensor:
    """Per-level (N, K, H, W) maps -> one float32 (N, sum H*W, K) tensor, level after level."""
    return torch.cat(dense_per_level(per_level, dim), dim=1)


class DenseProbabilities(NamedTuple):
    """Per level: class probabilities (N, HW, C), box regressions (N, HW, 4) in target units, and
    the quality branch's probabilities (N, HW)."""

    cls_probs: list[Tensor]
    box_reg: list[Tensor]
    quality: list[Tensor]


def dense_probabilities(predictions: FCOSHeadOutputs, num_classes: int) -> DenseProbabilities:
    """The head's per-level logits as probabilities, flattened per level."""
    return DenseProbabilities(
        [x.sigmoid() for x in dense_per_level(predictions.cls_logits, num_classes)],
        dense_per_level(predictions.box_reg, 4),
        [x.squeeze(2).sigmoid() for x in dense_per_level(predictions.quality_logits, 1)],
    )


class FCOSCore:
    """Locations, target assignment + losses, and decoding for one set of FPN strides."""

    @configurable
    def __init__(
        self,
        *,
        strides: Sequence[int],
        num_classes: int,
        target_assigner: FCOSTargetAssigner,
        loss: FCOSLoss,
        postprocessor: FCOSPostProcessor,
        inference_quality: str = "branch",
        location_grid: str = "half_stride",
    ):
        """
        Args:
            strides: stride of each head input level; the assigner and post-processor must agree.
            num_classes: classes of the head; the assigner and loss must agree.
            inference_quality: see :data:`INFERENCE_QUALITIES`.
            location_grid: where each level's locations lie, one of
                :data:`~fcos_d2.modeling.box_ops.LOCATION_GRIDS` (see
                :func:`~fcos_d2.modeling.box_ops.compute_locations`): "half_stride" (the paper's)
                or "torchvision" (torchvision's anchor centers, for its converted weights).
        """
        strides = list(strides)
        for part, part_strides in (
            ("target_assigner", target_assigner.strides),
            ("postprocessor", postprocessor.strides),
        ):
            check_that(
                list(part_strides) == strides,
                f"the {part}'s strides",
                f"the head levels' strides {strides}",
                list(part_strides),
                "FCOSCore",
            )
        for part, part_classes in (
            ("target_assigner", target_assigner.num_classes),
            ("loss", loss.num_classes),
        ):
            check_that(
                part_classes == num_classes,
                f"the {part}'s num_classes",
                f"the head's {num_classes}",
                part_classes,
                "FCOSCore",
            )
        check_that(
            len(postprocessor.class_thresholds) in (0, num_classes),
            "MODEL.FCOS.CLASS_THRESHOLDS",
            f"empty or one score per class ({num_classes})",
            list(postprocessor.class_thresholds),
            "FCOSCore argument postprocessor",
        )
        check_choice(
            inference_quality,
            INFERENCE_QUALITIES,
            "MODEL.FCOS.INFERENCE_QUALITY",
            "FCOSCore argument inference_quality",
        )
        check_choice(
            location_grid,
            LOCATION_GRIDS,
            "MODEL.FCOS.LOCATION_GRID",
            "FCOSCore argument location_grid",
        )
        self.strides = strides
        self.num_classes = num_classes
        self.target_assigner = target_assigner
        self.loss = loss
        self.postprocessor = postprocessor
        self.inference_quality = inference_quality
        self.location_grid = location_grid

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        """Every part built from ``cfg`` with the strides the backbone actually produces."""
        strides = backbone_strides(cfg, input_shape)
        return {
            "strides": strides,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "target_assigner": FCOSTargetAssigner(cfg, strides=strides),
            "loss": FCOSLoss(cfg),
            "postprocessor": FCOSPostProcessor(cfg, strides=strides),
            "inference_quality": cfg.MODEL.FCOS.INFERENCE_QUALITY,
            "location_grid": cfg.MODEL.FCOS.LOCATION_GRID,
        }

    def locations(self, features: Sequence[Tensor]) -> list[Tensor]:
        """(H_i * W_i, 2) image coordinates of each level's locations."""
        return feature_locations(features, self.strides, self.location_grid)

    def targets(self, features: Sequence[Tensor], gt_instances: list[Instances]) -> FCOSTargets:
        """Each location's targets (Sec. 3.1-3.3); on the half-stride grid, the levels' grid sizes
        let the assigner compare each box only with the locations near its center (torchvision's
        grid is not spaced by the stride on every level: every pair is compared, same rule)."""
        grid_sizes = None
        if self.location_grid == "half_stride":
            grid_sizes = [tuple(f.shape[-2:]) for f in features]
        return self.target_assigner(self.locations(features), gt_instances, grid_sizes)

    def losses(
        self,
        features: Sequence[Tensor],
        predictions: FCOSHeadOutputs,
        gt_instances: list[Instances],
        training: bool = True,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The loss dict and the worker-averaged number of positives (a tensor: no host sync);
        ``training=False``: a validation loss (see :class:`FCOSLoss`)."""
        targets = self.targets(features, gt_instances)
        return self.loss(
            flatten_predictions(predictions.cls_logits, self.num_classes),
            flatten_predictions(predictions.box_reg, 4),
            flatten_predictions(predictions.quality_logits, 1).squeeze(2),
            targets,
            training=training,
        )

    def inference(
        self,
        features: Sequence[Tensor],
        predictions: FCOSHeadOutputs,
        image_sizes: list[tuple[int, int]],
        quality: Union[None, str, list[Tensor]] = None,
        postprocessor: Optional[FCOSPostProcessor] = None,
    ) -> list[Instances]:
        """Detections per image, in the coordinates of the (unpadded) network input.

        Args:
            quality: what multiplies the class score: None for ``inference_quality``, another
                mode name, or per-level (N, HW_i) maps in [0, 1] (e.g. the oracle's).
            postprocessor: None for ``self.postprocessor``.
        """
        postprocessor = postprocessor or self.postprocessor
        return postprocessor(*self._decoding_inputs(features, predictions, quality), image_sizes)

    def inference_batched(
        self,
        features: Sequence[Tensor],
        predictions: FCOSHeadOutputs,
        image_sizes: Tensor,
        quality: Union[None, str, list[Tensor]] = None,
        postprocessor: Optional[FCOSPostProcessor] = None,
    ) -> BatchedDetections:
        """:meth:`inference` as flat tensors with each detection's image index, without a loop
        over images (:meth:`FCOSPostProcessor.batched`); ``image_sizes``: (N, 2) int64 (height,
        width) of each image before padding."""
        postprocessor = postprocessor or self.postprocessor
        inputs = self._decoding_inputs(features, predictions, quality)
        return postprocessor.batched(*inputs, image_sizes)

    def _decoding_inputs(
        self,
        features: Sequence[Tensor],
        predictions: FCOSHeadOutputs,
        quality: Union[None, str, list[Tensor]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Locations, class probabilities, box regressions and quality maps, per level."""
        dense = dense_probabilities(predictions, self.num_classes)
        if quality is None or isinstance(quality, str):
            quality = self.quality_maps(dense, quality or self.inference_quality)
        return self.locations(features), dense.cls_probs, dense.box_reg, quality

    @staticmethod
    def quality_maps(dense: DenseProbabilities, mode: str) -> list[Tensor]:
        """Per level (N, HW_i) quality in [0, 1] that multiplies the class score."""
        check_choice(
            mode,
            INFERENCE_QUALITIES[:-1],
            "MODEL.FCOS.INFERENCE_QUALITY",
            "oracle quality needs the annotations: evaluate with train_net.py --eval-only or "
            "fcos_d2.inference.oracle",
        )
        if mode == "branch":
            return dense.quality
        if mode == "none":
            return [torch.ones_like(x[..., 0]) for x in dense.box_reg]
        # Predicted distances can be 0 (relu): treat 0/0 as a center-ness of 0.
        return [torch.nan_to_num(centerness_from_ltrb(x), nan=0.0) for x in dense.box_reg]
