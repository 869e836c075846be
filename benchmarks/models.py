"""The detectors compared, built with the same test-time settings, behind one small interface.

All are R-50-FPN (P3-P7, 256 channels, 4-conv towers, ImageNet-style frozen BatchNorm, stem and
res2 frozen as when training from an ImageNet backbone) with 80 classes and random weights:
nothing is downloaded.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from torch import Tensor, nn

from .inputs import NUM_CLASSES, Batch

REPO = Path(__file__).resolve().parents[1]
FCOS_D2_CONFIG = "configs/FCOS-Detection/R_50_1x.yaml"
REFERENCE = "d2_fcos"
LABELS = {
    "fcos_d2": f"fcos-d2 FCOS ({FCOS_D2_CONFIG})",
    "d2_fcos": "Detectron2 FCOS (model_zoo COCO-Detection/fcos_R_50_FPN_1x.py)",
    "d2_retinanet": "Detectron2 RetinaNet (model_zoo COCO-Detection/retinanet_R_50_FPN_1x.py)",
    "tv_fcos": "torchvision FCOS (fcos_resnet50_fpn's architecture, FrozenBN, 3 trainable layers)",
}
DETECTORS = tuple(LABELS)
FCOS_VARIANTS = ("fcos_d2", "d2_fcos", "tv_fcos")


@dataclass(frozen=True)
class TestSettings:
    """Post-processing settings given to every detector, so that each does the same work."""

    score_threshold: float = 0.0
    topk_candidates: int = 1000
    detections_per_image: int = 100
    nms_threshold: float = 0.6
    fcos_d2_opts: tuple = ()  # extra KEY VALUE config overrides for fcos-d2 only


class Detector:
    """A model plus conversions of a :class:`Batch` to its input format (done before timing)."""

    def __init__(self, name: str, model: nn.Module):
        self.name = name
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inference_inputs(self, batch: Batch) -> Any:
        raise NotImplementedError

    def training_inputs(self, batch: Batch) -> Any:
        raise NotImplementedError

    def infer(self, inputs) -> int:
        """Detections of the batch, post-processing included; returns how many there are."""
        raise NotImplementedError

    def loss(self, inputs) -> Tensor:
        """The summed training losses of the batch."""
        raise NotImplementedError


class Detectron2Detector(Detector):
    """fcos-d2's FCOS and Detectron2's models share Detectron2's input and output format."""

    def inference_inputs(self, batch: Batch) -> list[dict]:
        height, width = batch.image_size
        images = batch.to(self.device).images
        return [{"image": image, "height": height, "width": width} for image in images]

    def training_inputs(self, batch: Batch) -> list[dict]:
        from detectron2.structures import Boxes, Instances

        batch = batch.to(self.device)
        return [
            {
                "image": image,
                "instances": Instances(batch.image_size, gt_boxes=Boxes(boxes), gt_classes=classes),
            }
            for image, boxes, classes in zip(batch.images, batch.boxes, batch.classes)
        ]

    def infer(self, inputs: list[dict]) -> int:
        return sum(len(output["instances"]) for output in self.model(inputs))

    def loss(self, inputs: list[dict]) -> Tensor:
        from detectron2.utils.events import EventStorage

        with EventStorage(0):  # Detectron2's detectors log scalars to the current storage
            return sum(self.model(inputs).values())


class TorchvisionDetector(Detector):
    """torchvision's FCOS takes [0, 1] images and resizes them itself: the resize is set to keep
    the benchmark's size (scale 1), so every model computes on the same pixels."""

    def _keep_size(self, batch: Batch) -> None:
        self.model.transform.min_size = (min(batch.image_size),)
        self.model.transform.max_size = max(batch.image_size)

    def inference_inputs(self, batch: Batch) -> list[Tensor]:
        self._keep_size(batch)
        return list(batch.to(self.device).images / 255)

    def training_inputs(self, batch: Batch) -> tuple[list[Tensor], list[dict]]:
        self._keep_size(batch)
        batch = batch.to(self.device)
        targets = [{"boxes": b, "labels": c} for b, c in zip(batch.boxes, batch.classes)]
        return list(batch.images / 255), targets

    def infer(self, inputs: list[Tensor]) -> int:
        return sum(len(output["boxes"]) for output in self.model(inputs))

    def loss(self, inputs) -> Tensor:
        return sum(self.model(*inputs).values())


class ShapesOnlyBackbone(Backbone):
    """Stands in for the R-50-FPN where only the strides of P3-P7 matter (target assignment and
    post-processing from given head outputs): building ResNet-50 would only cost time."""

    out_channels = 256  # what torchvision's detectors read

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {f"p{i}": ShapeSpec(channels=256, stride=2**i) for i in range(3, 8)}

    def forward(self, x):
        raise RuntimeError("ShapesOnlyBackbone has no network: build the detector with one")


def build_fcos_d2(
    settings: TestSettings, network: bool, device: str = "cpu", amp: bool = False
) -> nn.Module:
    """fcos-d2's R_50_1x built for ``device`` (which decides its memory format, as for users:
    ``MODEL.CHANNELS_LAST`` None); with ``amp``, its own mixed-precision inference
    (``TEST.AMP.ENABLED``), in bfloat16 on every CPU like the peers' autocast."""
    from detectron2.modeling import build_model

    from fcos_d2.config import build_cfg
    from fcos_d2.modeling import FCOS, FCOSCore, FCOSHead

    amp_opts = ("TEST.AMP.ENABLED", True, "SOLVER.AMP.CPU_BF16", "always") if amp else ()
    cfg = build_cfg(
        str(REPO / FCOS_D2_CONFIG),
        [
            *("MODEL.DEVICE", torch.device(device).type, "MODEL.WEIGHTS", ""),
            *("MODEL.FCOS.INFERENCE_TH_TEST", settings.score_threshold),
            *("MODEL.FCOS.PRE_NMS_TOPK_TEST", settings.topk_candidates),
            *("MODEL.FCOS.NMS_TH", settings.nms_threshold),
            *("TEST.DETECTIONS_PER_IMAGE", settings.detections_per_image),
            *amp_opts,
            *settings.fcos_d2_opts,
        ],
    )
    if network:
        return build_model(cfg)
    backbone = ShapesOnlyBackbone()
    shapes = backbone.output_shape()
    in_features = list(cfg.MODEL.FCOS.IN_FEATURES)
    return FCOS(
        backbone=backbone,
        head=FCOSHead(cfg, [shapes[f] for f in in_features]),
        head_in_features=in_features,
        core=FCOSCore(cfg, shapes),
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
    )


def detectron2_config_file(config: str) -> Path:
    """A config file of Detectron2's model zoo, found without ``detectron2.model_zoo``, which
    imports ``pkg_resources`` (gone from setuptools >= 82, as on some GPU machines)."""
    import detectron2

    return Path(detectron2.__file__).resolve().parent / "model_zoo" / "configs" / config


def build_detectron2_lazy(config: str, settings: TestSettings, network: bool) -> nn.Module:
    from detectron2.config import LazyCall, LazyConfig, instantiate

    model_cfg = LazyConfig.load(str(detectron2_config_file(config))).model
    if not network:
        model_cfg.backbone = LazyCall(ShapesOnlyBackbone)()
    model_cfg.test_score_thresh = settings.score_threshold
    model_cfg.test_topk_candidates = settings.topk_candidates
    model_cfg.test_nms_thresh = settings.nms_threshold
    model_cfg.max_detections_per_image = settings.detections_per_image
    return instantiate(model_cfg)


def losses_in_float32(model: nn.Module) -> nn.Module:
    """Detectron2's FCOS with its losses computed on float32 copies of the head outputs.

    As released it cannot train under autocast (float16 ``AMPTrainer`` or bfloat16): fvcore's
    ``giou_loss`` writes float32 values (the predicted boxes meet the float32 ground truth) into a
    tensor made like the half-precision predictions, and PyTorch refuses ("Index put requires the
    source and destination dtypes match"). This is the change its users would need; in float32 the
    copies are no-ops, so nothing changes there.
    """
    losses = model.losses

    def float32(tensors: list[Tensor]) -> list[Tensor]:
        return [x.float() for x in tensors]

    def losses_of_float32_outputs(anchors, logits, gt_labels, deltas, gt_boxes, centerness):
        return losses(
            anchors, float32(logits), gt_labels, float32(deltas), gt_boxes, float32(centerness)
        )

    model.losses = losses_of_float32_outputs
    return model


def build_torchvision_fcos(settings: TestSettings, network: bool) -> nn.Module:
    """``fcos_resnet50_fpn`` as torchvision builds it for training from an ImageNet backbone
    (FrozenBatchNorm, 3 trainable ResNet stages), but with random weights.

    ``fcos_resnet50_fpn(weights=None, weights_backbone=None)`` would switch to trainable
    BatchNorm in all 5 stages, a different (and slower) network from the one users train.
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if network:
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50",
            weights=None,
            norm_layer=FrozenBatchNorm2d,
            trainable_layers=3,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(256, 256),
        )
    else:
        backbone = ShapesOnlyBackbone()
    return FCOS(
        backbone,
        NUM_CLASSES,
        score_thresh=settings.score_threshold,
        nms_thresh=settings.nms_threshold,
        detections_per_img=settings.detections_per_image,
        topk_candidates=settings.topk_candidates,
    )


def build_detector(
    name: str,
    settings: TestSettings,
    device: str,
    network: bool = True,
    seed: int = 0,
    amp: bool = False,
) -> Detector:
    """The detector ``name`` (one of :data:`DETECTORS`) on ``device``, weights from ``seed``;
    without ``network`` its backbone is a :class:`ShapesOnlyBackbone`. ``amp``: fcos-d2 with its
    own mixed-precision inference switch (the peers have none: their workloads autocast)."""
    torch.manual_seed(seed)
    if name == "fcos_d2":
        return Detectron2Detector(name, build_fcos_d2(settings, network, device, amp).to(device))
    if name == "d2_fcos":
        model = build_detectron2_lazy("COCO-Detection/fcos_R_50_FPN_1x.py", settings, network)
        return Detectron2Detector(name, losses_in_float32(model).to(device))
    if name == "d2_retinanet":
        config = "COCO-Detection/retinanet_R_50_FPN_1x.py"
        return Detectron2Detector(name, build_detectron2_lazy(config, settings, network).to(device))
    if name == "tv_fcos":
        return TorchvisionDetector(name, build_torchvision_fcos(settings, network).to(device))
    raise ValueError(f"detector must be one of {DETECTORS}, got {name!r}")


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, as all four are trained; a small learning rate keeps
    the random networks finite over the repetitions (the rate does not change the cost)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
