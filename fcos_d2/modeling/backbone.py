"""ResNet-FPN backbone with P6/P7 for FCOS (Sec. 3.2, Fig. 2), built from Detectron2's own modules."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

_TOP_LEVEL_INPUTS = ("p5", "res5")


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet + FPN on ``MODEL.FPN.IN_FEATURES`` (res3-res5), plus P6 and P7.

    P6 is a stride-2 3x3 conv on P5 (the paper's choice, ``MODEL.FCOS.TOP_LEVELS_IN_FEATURE: p5``) or
    on C5 (RetinaNet's, ``res5``; Table 3 compares both), and P7 a stride-2 conv on relu(P6).
    """
    top_levels = cfg.MODEL.FCOS.TOP_LEVELS
    in_feature = cfg.MODEL.FCOS.TOP_LEVELS_IN_FEATURE
    if top_levels not in (0, 2):
        raise ValueError(f"MODEL.FCOS.TOP_LEVELS must be 0 or 2 (P6 and P7), got {top_levels!r}")
    if in_feature not in _TOP_LEVEL_INPUTS:
        raise ValueError(
            f"MODEL.FCOS.TOP_LEVELS_IN_FEATURE must be one of {_TOP_LEVEL_INPUTS}, got {in_feature!r}"
        )
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = None
    if top_levels == 2:
        in_channels = out_channels if in_feature == "p5" else bottom_up.output_shape()["res5"].channels
        top_block = LastLevelP6P7(in_channels, out_channels, in_feature=in_feature)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
