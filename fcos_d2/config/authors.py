"""AdelaiDet's config keys that fcos_d2 accepts only where they change nothing.

Configs dumped by AdelaiDet (``output/.../config.yaml``) set keys for features of AdelaiDet that
fcos_d2 does not have; :func:`~fcos_d2.config.defaults.add_fcos_config` adds them so those files
merge, and :func:`check_authors_keys` refuses values that would make AdelaiDet behave otherwise.
"""

from detectron2.config import CfgNode as CN

from ..checks import check_that


def add_authors_keys(cfg: CN) -> None:
    """The AdelaiDet-only keys, with AdelaiDet's defaults (or None: not set)."""
    # Accepted for the authors' YAML files (AdelaiDet adet/config/defaults.py); no effect. Their
    # FCOS files set none of them, but configs dumped by AdelaiDet (output/.../config.yaml) set
    # all. Values that would change AdelaiDet's behaviour are refused by check_authors_keys.
    cfg.MODEL.FCOS.USE_RELU = True  # unused by AdelaiDet too: its regression is always relu
    cfg.MODEL.FCOS.YIELD_PROPOSAL = False
    cfg.MODEL.FCOS.YIELD_BOX_FEATURES = False
    cfg.MODEL.MOBILENET = False
    cfg.MODEL.BACKBONE.ANTI_ALIAS = False
    cfg.MODEL.RESNETS.DEFORM_INTERVAL = 1
    cfg.INPUT.IS_ROTATE = False
    # None = not set. AdelaiDet flips by INPUT.HFLIP_TRAIN (default True) and crops around
    # instances (INPUT.CROP.CROP_INSTANCE); fcos_d2 uses Detectron2's INPUT.RANDOM_FLIP and crop.
    cfg.INPUT.HFLIP_TRAIN = None
    cfg.INPUT.CROP.CROP_INSTANCE = None


# AdelaiDet-only key -> (is its value inert here?, the requirement reported when it is not).
_AUTHORS_KEYS = {
    "MODEL.FCOS.YIELD_PROPOSAL": (
        lambda v, cfg: not v,
        "False (AdelaiDet's instance-segmentation heads consume it; fcos_d2 has none)",
    ),
    "MODEL.FCOS.YIELD_BOX_FEATURES": (
        lambda v, cfg: not v,
        "False (AdelaiDet's instance-segmentation heads consume it; fcos_d2 has none)",
    ),
    "MODEL.MOBILENET": (
        lambda v, cfg: not v,
        "False (AdelaiDet's MobileNetV2 backbone is not part of fcos_d2)",
    ),
    "MODEL.BACKBONE.ANTI_ALIAS": (
        lambda v, cfg: not v,
        "False (AdelaiDet's anti-aliased ResNet is not part of fcos_d2)",
    ),
    "MODEL.RESNETS.DEFORM_INTERVAL": (
        lambda v, cfg: v in (None, 1),
        "1 (for deformable convolutions use Detectron2's MODEL.RESNETS.DEFORM_ON_PER_STAGE)",
    ),
    "INPUT.IS_ROTATE": (
        lambda v, cfg: not v,
        "False (AdelaiDet's random rotation is not part of fcos_d2)",
    ),
    "INPUT.HFLIP_TRAIN": (
        lambda v, cfg: v is None or cfg.INPUT.RANDOM_FLIP == ("horizontal" if v else "none"),
        "None, or agree with INPUT.RANDOM_FLIP (Detectron2's key, which fcos_d2 uses): True "
        "with 'horizontal', False with 'none'",
    ),
    "INPUT.CROP.CROP_INSTANCE": (
        lambda v, cfg: v is None or not cfg.INPUT.CROP.ENABLED,
        "None when INPUT.CROP.ENABLED (AdelaiDet crops around instances, fcos_d2 as Detectron2)",
    ),
}


def check_authors_keys(cfg: CN) -> None:
    """Refuse AdelaiDet-only keys whose value would make AdelaiDet do something fcos_d2 does not."""
    for key, (is_inert, requirement) in _AUTHORS_KEYS.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        check_that(
            is_inert(node, cfg),
            key,
            requirement,
            node,
            "an AdelaiDet key, accepted only where it has no effect",
        )
