"""FCOS: Fully Convolutional One-Stage Object Detection (Tian et al., ICCV 2019) for Detectron2.

``import fcos_d2`` registers the META_ARCH "FCOS" and the backbone
"build_fcos_resnet_fpn_backbone"; :func:`add_fcos_config` adds the ``MODEL.FCOS`` keys.
"""

from .config import add_fcos_config
from .modeling import FCOS, FCOSHead, build_fcos_resnet_fpn_backbone

__version__ = "0.1.0"

__all__ = ["FCOS", "FCOSHead", "add_fcos_config", "build_fcos_resnet_fpn_backbone", "__version__"]
