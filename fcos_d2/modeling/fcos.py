"""The FCOS detector as a Detectron2 META_ARCH ("FCOS").

Detectron2's :class:`DenseDetector` supplies image preprocessing, the forward skeleton and the
resize of detections to the requested output size; this class wires in the FCOS head, target
assignment, losses and post-processing.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor

from .head import FCOSHead, FCOSHeadOutputs
from .losses import FCOSLoss
from .postprocess import FCOSPostProcessor
from .targets import FCOSTargetAssigner, centerness_from_ltrb, compute_locations

INFERENCE_QUALITIES = ("branch", "none", "from_regression", "oracle")


def check_in_features(cfg, shapes: Dict[str, ShapeSpec]) -> List[ShapeSpec]:
    """Shapes of ``MODEL.FCOS.IN_FEATURES`` among ``shapes``, checked against ``FPN_STRIDES``."""
    in_features, strides = cfg.MODEL.FCOS.IN_FEATURES, cfg.MODEL.FCOS.FPN_STRIDES
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.FCOS.IN_FEATURES {missing} are not produced by the backbone "
            f"{cfg.MODEL.BACKBONE.NAME}, which outputs {sorted(shapes)}"
        )
    actual = [shapes[f].stride for f in in_features]
    if list(strides) != actual:
        raise ValueError(
            f"MODEL.FCOS.FPN_STRIDES={list(strides)} does not match the strides {actual} of "
            f"MODEL.FCOS.IN_FEATURES={list(in_features)}"
        )
    return [shapes[f] for f in in_features]


def feature_locations(features: Sequence[Tensor], strides: Sequence[int]) -> List[Tensor]:
    """Image coordinates of every location of each (N, C, H, W) feature map (Sec. 3.1)."""
    return compute_locations([f.shape[-2:] for f in features], strides, features[0].device)


def dense_per_level(per_level: Sequence[Tensor], dim: int) -> List[Tensor]:
    """Per-level (N, K, H, W) maps -> float32 (N, H*W, K) tensors, in row-major order.

    Float32 because losses and box decoding need its precision under mixed precision.
    """
    return [permute_to_N_HWA_K(x, dim).float() for x in per_level]


def flatten_predictions(per_level: Sequence[Tensor], dim: int) -> Tensor:
    """Per-level (N, K, H, W) maps -> one float32 (N, sum H*W, K) tensor, level after level."""
    return torch.cat(dense_per_level(per_level, dim), dim=1)


def dense_probabilities(
    predictions: FCOSHeadOutputs, num_classes: int
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Per level: class probabilities (N, HW, C), box regressions (N, HW, 4) and the quality
    branch's probabilities (N, HW)."""
    cls_probs = [x.sigmoid() for x in dense_per_level(predictions.cls_logits, num_classes)]
    box_reg = dense_per_level(predictions.box_reg, 4)
    quality = [x.squeeze(2).sigmoid() for x in dense_per_level(predictions.quality_logits, 1)]
    return cls_probs, box_reg, quality


@META_ARCH_REGISTRY.register()
class FCOS(DenseDetector):
    """FCOS (Tian et al., ICCV 2019): per-pixel classification, (l,t,r,b) regression, center-ness."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: FCOSHead,
        head_in_features: List[str],
        strides: Sequence[int],
        target_assigner: FCOSTargetAssigner,
        loss: FCOSLoss,
        postprocessor: FCOSPostProcessor,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        input_format: str = "BGR",
        inference_quality: str = "branch",
    ):
        """
        Args:
            inference_quality: what multiplies the class score at inference (Table 4, arXiv Sec.
                4.1.2): the quality branch, nothing, the center-ness of the predicted (l,t,r,b), or
                the ground-truth center-ness of each location (needs annotated inputs).
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if inference_quality not in INFERENCE_QUALITIES:
            raise ValueError(
                f"MODEL.FCOS.INFERENCE_QUALITY must be one of {INFERENCE_QUALITIES}, got {inference_quality!r}"
            )
        self.inference_quality = inference_quality
        self._oracle_instances: Optional[List[Instances]] = None
        self.strides = list(strides)
        self.target_assigner = target_assigner
        self.loss = loss
        self.postprocessor = postprocessor
        self.input_format = input_format
        self.num_classes = head.num_classes

    @classmethod
    def from_config(cls, cfg) -> Dict:
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "head": FCOSHead(cfg, check_in_features(cfg, backbone.output_shape())),
            "head_in_features": list(cfg.MODEL.FCOS.IN_FEATURES),
            "strides": cfg.MODEL.FCOS.FPN_STRIDES,
            "target_assigner": FCOSTargetAssigner(cfg),
            "loss": FCOSLoss(cfg),
            "postprocessor": FCOSPostProcessor(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "inference_quality": cfg.MODEL.FCOS.INFERENCE_QUALITY,
        }

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        if not self.training and self.inference_quality == "oracle":
            if "instances" not in batched_inputs[0]:
                raise ValueError(
                    "MODEL.FCOS.INFERENCE_QUALITY=oracle needs the annotations at inference: each "
                    "input needs 'instances' (train_net.py's test loader keeps them in this mode)"
                )
            # DenseDetector.forward does not pass the inputs on to forward_inference.
            self._oracle_instances = [x["instances"].to(self.device) for x in batched_inputs]
        try:
            return super().forward(batched_inputs)
        finally:
            self._oracle_instances = None

    def locations(self, features: List[Tensor]) -> List[Tensor]:
        return feature_locations(features, self.strides)

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: FCOSHeadOutputs,
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        targets = self.target_assigner(self.locations(features), gt_instances)
        losses, num_pos = self.loss(
            flatten_predictions(predictions.cls_logits, self.num_classes),
            flatten_predictions(predictions.box_reg, 4),
            flatten_predictions(predictions.quality_logits, 1).squeeze(2),
            targets,
        )
        # float() in put_scalar waits for the forward pass: the one host sync of a training step
        # (Detectron2's default trainer reads every loss back each step as well).
        get_event_storage().put_scalar("fcos/num_pos_per_worker", num_pos)
        return losses

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: FCOSHeadOutputs
    ) -> List[Instances]:
        cls_probs, box_reg, branch_quality = dense_probabilities(predictions, self.num_classes)
        locations = self.locations(features)
        quality = self.inference_quality_maps(branch_quality, box_reg, locations)
        return self.postprocessor(locations, cls_probs, box_reg, quality, images.image_sizes)

    def inference_quality_maps(
        self, branch_quality: List[Tensor], box_reg: List[Tensor], locations: List[Tensor]
    ) -> List[Tensor]:
        """Per level (N, HW_i) quality in [0, 1] that multiplies the class score."""
        if self.inference_quality == "branch":
            return branch_quality
        if self.inference_quality == "none":
            return [torch.ones_like(x[..., 0]) for x in box_reg]
        if self.inference_quality == "from_regression":
            # Predicted distances can be 0 (relu): treat 0/0 as a center-ness of 0.
            return [torch.nan_to_num(centerness_from_ltrb(x), nan=0.0) for x in box_reg]
        targets = self.target_assigner(locations, self._oracle_instances)
        # Background targets are all 0: their 0/0 center-ness becomes 0.
        oracle = torch.nan_to_num(centerness_from_ltrb(targets.reg_targets), nan=0.0)
        return list(oracle.split([len(x) for x in locations], dim=1))
