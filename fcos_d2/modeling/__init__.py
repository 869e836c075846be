"""FCOS modules: backbone, head, box geometry, target assignment, losses, post-processing, the
shared core, and its two adapters (the ``FCOS`` meta-architecture and proposal generator)."""

from .backbone import build_fcos_resnet_fpn_backbone
from .box_ops import compute_locations
from .core import FCOSCore
from .fcos import FCOS
from .head import FCOSHead
from .losses import FCOSLoss
from .one_stage_detector import OneStageDetector  # noqa: F401 (registers the name)
from .postprocess import FCOSPostProcessor
from .proposal_generator import FCOSProposalGenerator
from .targets import FCOSTargetAssigner, FCOSTargets

__all__ = [
    "FCOS",
    "FCOSCore",
    "FCOSHead",
    "FCOSLoss",
    "FCOSPostProcessor",
    "FCOSProposalGenerator",
    "FCOSTargetAssigner",
    "FCOSTargets",
    "build_fcos_resnet_fpn_backbone",
    "compute_locations",
]
