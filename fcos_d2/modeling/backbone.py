"""ResNet-FPN backbone with P6/P7 for FCOS (Sec. 3.2, Fig. 2), built from Detectron2's modules."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..checks import check_choice

_TOP_LEVEL_INPUTS = ("p5", "res5")


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet + FPN on ``MODEL.FPN.IN_FEATURES`` (res3-res5), plus P6 and P7.

    P6 is a stride-2 3x3 conv on P5 (the paper's, ``MODEL.FCOS.TOP_LEVELS_IN_FEATURE: p5``) or
    on C5 (RetinaNet's, ``res5``; Table 3 compares both), and P7 a stride-2 conv on relu(P6).
    """
    top_levels = cfg.MODEL.FCOS.TOP_LEVELS
    in_feature = cfg.MODEL.FCOS.TOP_LEVELS_IN_FEATURE
    check_choice(top_levels, (0, 2), "MODEL.FCOS.TOP_LEVELS", "0: P3-P5 only, 2: P6 and P7 as well")
    check_choice(in_feature, _TOP_LEVEL_INPUTS, "MODEL.FCOS.TOP_LEVELS_IN_FEATURE")
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = None
    if top_levels == 2:
        in_channels = (
            out_channels if in_feature == "p5" else bottom_up.output_shape()["res5"].channels
        )
        top_block = LastLevelP6P7(in_channels, out_channels, in_feature=in_feature)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
