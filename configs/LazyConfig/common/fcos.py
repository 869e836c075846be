"""FCOS R-50-FPN with the authors' improved settings, for LazyConfig files: the model that
configs/FCOS-Detection/Base-FCOS.yaml builds (with add_fcos_config's defaults), every part an
fcos_d2 module built by keyword. Backbone: Detectron2's own FCOS backbone config (ResNet + FPN,
P6/P7 from P5)."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config

from fcos_d2.modeling import (
    FCOS,
    FCOSCore,
    FCOSHead,
    FCOSLoss,
    FCOSPostProcessor,
    FCOSTargetAssigner,
)

constants = get_config("common/data/constants.py").constants

model = L(FCOS)(
    backbone=get_config("common/models/fcos.py").model.backbone,
    head=L(FCOSHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,  # the FPN's out_channels, one per level
        num_classes=80,
        num_cls_convs=4,
        num_box_convs=4,
        num_share_convs=0,
        norm="GN",
        use_deformable=False,
        use_scale=True,
        box_activation="relu",
        centerness_on_reg=True,
        prior_prob=0.01,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    core=L(FCOSCore)(
        strides=[8, 16, 32, 64, 128],
        num_classes="${..head.num_classes}",
        target_assigner=L(FCOSTargetAssigner)(
            strides="${..strides}",
            sizes_of_interest=[64, 128, 256, 512],
            num_classes="${..num_classes}",
            center_sampling_radius=1.5,
            normalize_reg_targets=True,
        ),
        loss=L(FCOSLoss)(
            num_classes="${..num_classes}",
            focal_alpha=0.25,
            focal_gamma=2.0,
            loc_loss_type="giou",
            box_quality="ctrness",
            cls_normalizer="fg",
            reg_loss_weighting="ctrness",
        ),
        postprocessor=L(FCOSPostProcessor)(
            strides="${..strides}",
            score_threshold=0.05,
            pre_nms_topk=1000,
            post_nms_topk=100,
            nms_threshold=0.6,
            thresh_with_quality=False,
            score_sqrt=True,
            normalized_reg=True,
            class_thresholds=(),  # per-class operating points, as MODEL.FCOS.CLASS_THRESHOLDS
        ),
        inference_quality="branch",
    ),
    pixel_mean=constants.imagenet_bgr256_mean,
    pixel_std=constants.imagenet_bgr256_std,
)
