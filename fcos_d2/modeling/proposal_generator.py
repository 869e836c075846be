"""FCOS as the region proposal network of Faster R-CNN (Sec. 5, Table 6): PROPOSAL_GENERATOR "FCOS".

The same head, target assignment, losses and decoding as the detector, with one class-agnostic
"object" classifier; proposals are selected like Detectron2's RPN (pre-NMS top-k per level,
class-agnostic NMS, post-NMS top-k per image, minimum size, clipping) and returned with
``objectness_logits`` = logit of the FCOS ranking score sqrt(p x quality).
"""

from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from ..checks import check_that
from ..config import check_authors_keys
from .core import FCOSCore
from .head import FCOSHead
from .losses import FCOSLoss
from .postprocess import FCOSPostProcessor


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
        in_features: list[str],
        head: FCOSHead,
        core: FCOSCore,
        train_postprocessor: FCOSPostProcessor,
    ):
        """
        Args:
            core: the class-agnostic FCOS core; its post-processor selects the test proposals.
            train_postprocessor: selects the proposals in training (``MODEL.RPN.*_TRAIN``).
        """
        super().__init__()
        check_that(
            head.num_classes == 1 and core.num_classes == 1,
            "the FCOS proposal head's num_classes",
            "1 (class-agnostic)",
            (head.num_classes, core.num_classes),
            "FCOSProposalGenerator",
        )
        self.in_features = list(in_features)
        self.fcos_head = head
        self.core = core
        self.train_postprocessor = train_postprocessor

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        check_authors_keys(cfg)
        check_that(
            not cfg.MODEL.FCOS.CLASS_THRESHOLDS,
            "MODEL.FCOS.CLASS_THRESHOLDS",
            "empty with PROPOSAL_GENERATOR FCOS (the ROI heads score the final detections: "
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST)",
            list(cfg.MODEL.FCOS.CLASS_THRESHOLDS),
        )
        agnostic = cfg.clone()
        agnostic.defrost()
        agnostic.MODEL.FCOS.NUM_CLASSES = 1
        rpn = cfg.MODEL.RPN
        min_size = cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE
        # The detector's decoding settings, with Detectron2 RPN-style selection on top.
        rpn_selection = {
            "score_threshold": 0.0,  # like Detectron2's RPN: rank everything, keep the top k
            "nms_threshold": rpn.NMS_THRESH,
            "thresh_with_quality": False,
            "class_agnostic_nms": True,
            # A size of 0 filters nothing here (Detectron2's RPN drops empty boxes even then).
            "min_box_size": min_size if min_size > 0 else -1.0,
            "thresh_on_score": False,
            "pre_nms_ranking": "cls_quality",
        }
        detector_core = FCOSCore.from_config(agnostic, input_shape)
        postprocessor = detector_core["postprocessor"].replace(**rpn_selection)
        core = FCOSCore(
            **{
                **detector_core,
                "loss": FCOSLoss(agnostic, loss_prefix="loss_fcos_rpn"),
                "postprocessor": postprocessor.replace(
                    pre_nms_topk=rpn.PRE_NMS_TOPK_TEST, post_nms_topk=rpn.POST_NMS_TOPK_TEST
                ),
                "inference_quality": "branch",
            }
        )
        in_features = list(cfg.MODEL.FCOS.IN_FEATURES)
        return {
            "in_features": in_features,
            "head": FCOSHead(agnostic, [input_shape[f] for f in in_features]),
            "core": core,
            "train_postprocessor": postprocessor.replace(
                pre_nms_topk=rpn.PRE_NMS_TOPK_TRAIN, post_nms_topk=rpn.POST_NMS_TOPK_TRAIN
            ),
        }

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        gt_instances: Optional[list[Instances]] = None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        feature_list = [features[f] for f in self.in_features]
        predictions = self.fcos_head(feature_list)
        losses: dict[str, Tensor] = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("FCOS proposal generator needs gt_instances in training")
            agnostic = [class_agnostic(x) for x in gt_instances]
            losses, _ = self.core.losses(feature_list, predictions, agnostic)
        with torch.no_grad():
            detections = self.core.inference(
                feature_list,
                predictions,
                images.image_sizes,
                postprocessor=self.train_postprocessor if self.training else None,
            )
        proposals = [
            Instances(
                d.image_size,
                proposal_boxes=d.pred_boxes,
                objectness_logits=score_to_logit(d.scores),
            )
            for d in detections
        ]
        return proposals, losses


def build_fcos_proposal_generator(cfg, input_shape: dict[str, ShapeSpec]) -> FCOSProposalGenerator:
    """Builds :class:`FCOSProposalGenerator` for ``MODEL.PROPOSAL_GENERATOR.NAME: "FCOS"``."""
    return FCOSProposalGenerator(cfg, input_shape)


# Registries key entries by __name__; "FCOS" is the name users write in their YAML files.
build_fcos_proposal_generator.__name__ = "FCOS"
PROPOSAL_GENERATOR_REGISTRY.register(build_fcos_proposal_generator)
