"""FCOS modules: backbone builder, head, target assignment, losses, post-processing, meta-arch."""
from .backbone import build_fcos_resnet_fpn_backbone
from .fcos import FCOS
from .head import FCOSHead
from .losses import FCOSLoss
from .postprocess import FCOSPostProcessor
from .proposal_generator import FCOSProposalGenerator
from .targets import FCOSTargetAssigner, FCOSTargets, compute_locations

__all__ = [
    "FCOS",
    "FCOSHead",
    "FCOSLoss",
    "FCOSPostProcessor",
    "FCOSProposalGenerator",
    "FCOSTargetAssigner",
    "FCOSTargets",
    "build_fcos_resnet_fpn_backbone",
    "compute_locations",
]
