"""FCOS: Fully Convolutional One-Stage Object Detection (Tian et al., ICCV 2019) for Detectron2.

``import fcos_d2`` registers the META_ARCH "FCOS", the PROPOSAL_GENERATOR "FCOS" and the backbone
"build_fcos_resnet_fpn_backbone"; :func:`add_fcos_config` adds fcos_d2's config keys and
:func:`build_cfg` gives a ready config (YAML file + overrides, CPU fallback). The layers of the
package and the one rule between them: README, "Layout".
"""

from .config import add_fcos_config, build_cfg
from .modeling import FCOS, FCOSHead, build_fcos_resnet_fpn_backbone

__version__ = "0.1.0"

__all__ = [
    "FCOS",
    "FCOSHead",
    "add_fcos_config",
    "build_cfg",
    "build_fcos_resnet_fpn_backbone",
    "__version__",
]
