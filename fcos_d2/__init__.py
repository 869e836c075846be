"""FCOS: Fully Convolutional One-Stage Object Detection (Tian et al., ICCV 2019) for Detectron2.

``import fcos_d2`` registers the META_ARCH "FCOS", the PROPOSAL_GENERATOR "FCOS" and the backbone
"build_fcos_resnet_fpn_backbone"; :func:`add_fcos_config` adds fcos_d2's config keys and
:func:`build_cfg` gives a ready config (YAML file + overrides, CPU fallback). The layers of the
package and the one rule between them: README, "Layout".
"""

import warnings

with warnings.catch_warnings():
    # fvcore and Detectron2's box coder compile functions with torch.jit.script when first
    # imported, which torch deprecates: warnings in every command, about code fcos-d2 never runs.
    # Silenced for these imports only: torch.jit.script elsewhere still warns.
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    import detectron2.modeling  # noqa: F401
    import fvcore.nn  # noqa: F401

from .config import add_fcos_config, build_cfg  # noqa: E402
from .modeling import FCOS, FCOSHead, build_fcos_resnet_fpn_backbone  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FCOS",
    "FCOSHead",
    "add_fcos_config",
    "build_cfg",
    "build_fcos_resnet_fpn_backbone",
    "__version__",
]
