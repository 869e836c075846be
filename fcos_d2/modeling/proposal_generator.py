"""FCOS as the region proposal network of Faster R-CNN (Sec. 5, Table 6): PROPOSAL_GENERATOR "FCOS".

The same head, target assignment, losses and decoding as the detector, with one class-agnostic
"object" classifier; proposals are selected like Detectron2's RPN (pre-NMS top-k per level,
class-agnostic NMS, post-NMS top-k per image, minimum size, clipping) and returned with
``objectness_logits`` = logit of the FCOS ranking score sqrt(p x quality).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from .fcos import check_in_features, dense_probabilities, feature_locations, flatten_predictions
from .head import FCOSHead
from .losses import FCOSLoss
from .postprocess import FCOSPostProcessor
from .targets import FCOSTargetAssigner


def score_to_logit(score: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse sigmoid, so that sorting by the logits equals sorting by the FCOS scores."""
    score = score.clamp(eps, 1 - eps)
    return torch.log(score) - torch.log1p(-score)


def class_agnostic(instances: Instances) -> Instances:
    """A shallow copy whose every box is of the single class 0 ("object")."""
    copy = Instances(instances.image_size, **instances.get_fields())
    copy.gt_classes = torch.zeros_like(instances.gt_classes)
    return copy


class FCOSProposalGenerator(nn.Module):
    """Dense class-agnostic FCOS whose detections become proposals for the ROI heads."""

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        strides: Sequence[int],
        head: FCOSHead,
        target_assigner: FCOSTargetAssigner,
        loss: FCOSLoss,
        train_postprocessor: FCOSPostProcessor,
        test_postprocessor: FCOSPostProcessor,
    ):
        super().__init__()
        if head.num_classes != 1:
            raise ValueError(f"the FCOS proposal head must have 1 class, got {head.num_classes}")
        self.in_features = list(in_features)
        self.strides = list(strides)
        self.fcos_head = head
        self.target_assigner = target_assigner
        self.loss = loss
        self.train_postprocessor = train_postprocessor
        self.test_postprocessor = test_postprocessor

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        agnostic = cfg.clone()
        agnostic.defrost()
        agnostic.MODEL.FCOS.NUM_CLASSES = 1
        rpn = cfg.MODEL.RPN
        # The detector's decoding settings, with Detectron2 RPN-style selection on top.
        rpn_selection = {
            "score_threshold": 0.0,  # like Detectron2's RPN: rank everything, keep the top k
            "nms_threshold": rpn.NMS_THRESH,
            "thresh_with_quality": False,
            "class_agnostic_nms": True,
            "min_box_size": cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE,
        }
        return {
            "in_features": list(cfg.MODEL.FCOS.IN_FEATURES),
            "strides": cfg.MODEL.FCOS.FPN_STRIDES,
            "head": FCOSHead(agnostic, check_in_features(cfg, input_shape)),
            "target_assigner": FCOSTargetAssigner(agnostic),
            "loss": FCOSLoss(agnostic, loss_prefix="loss_fcos_rpn"),
            "train_postprocessor": FCOSPostProcessor(
                cfg, pre_nms_topk=rpn.PRE_NMS_TOPK_TRAIN, post_nms_topk=rpn.POST_NMS_TOPK_TRAIN, **rpn_selection
            ),
            "test_postprocessor": FCOSPostProcessor(
                cfg, pre_nms_topk=rpn.PRE_NMS_TOPK_TEST, post_nms_topk=rpn.POST_NMS_TOPK_TEST, **rpn_selection
            ),
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, Tensor]]:
        feature_list = [features[f] for f in self.in_features]
        predictions = self.fcos_head(feature_list)
        locations = feature_locations(feature_list, self.strides)
        losses: Dict[str, Tensor] = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("FCOS proposal generator needs gt_instances in training")
            targets = self.target_assigner(locations, [class_agnostic(x) for x in gt_instances])
            losses, _ = self.loss(
                flatten_predictions(predictions.cls_logits, 1),
                flatten_predictions(predictions.box_reg, 4),
                flatten_predictions(predictions.quality_logits, 1).squeeze(2),
                targets,
            )
        postprocessor = self.train_postprocessor if self.training else self.test_postprocessor
        with torch.no_grad():
            detections = postprocessor(
                locations, *dense_probabilities(predictions, 1), images.image_sizes
            )
        proposals = [
            Instances(d.image_size, proposal_boxes=d.pred_boxes, objectness_logits=score_to_logit(d.scores))
            for d in detections
        ]
        return proposals, losses


@PROPOSAL_GENERATOR_REGISTRY.register()
def FCOS(cfg, input_shape: Dict[str, ShapeSpec]) -> FCOSProposalGenerator:  # noqa: N802
    """Registry entry: ``MODEL.PROPOSAL_GENERATOR.NAME: "FCOS"`` builds the FCOS proposal generator."""
    return FCOSProposalGenerator(cfg, input_shape)
