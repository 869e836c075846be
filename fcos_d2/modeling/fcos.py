"""The FCOS detector as a Detectron2 META_ARCH ("FCOS").

Detectron2's :class:`DenseDetector` supplies image preprocessing and the device handling; the
FCOS work is done by the head and :class:`~fcos_d2.modeling.core.FCOSCore`. The detector's public
steps (:meth:`FCOS.dense_predictions`, :meth:`FCOS.output_dicts`) let wrappers (test-time
augmentation, export, the analyses) reuse it piece by piece.
"""

import contextlib
import platform
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..checks import check_choice, check_that
from ..config import check_authors_keys
from ..formats.adelaidet import load_adelaidet_keys
from ..precision import autocast_dtype
from .core import FCOSCore
from .head import FCOSHead, FCOSHeadOutputs


def channels_last_for(setting: Optional[bool], device: str) -> bool:
    """Whether ``MODEL.CHANNELS_LAST`` means channels-last on ``device``.

    True and False are kept; None picks NHWC where it was measured faster: x86-64 CPUs, where
    oneDNN runs the convolutions (figures: README, "Speed"). CUDA and other CPUs stay NCHW until
    measured there.
    """
    check_choice(setting, (None, True, False), "MODEL.CHANNELS_LAST", "channels_last_for setting")
    if setting is not None:
        return bool(setting)
    return (
        torch.device(device).type == "cpu"
        and platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
    )


@META_ARCH_REGISTRY.register()
class FCOS(DenseDetector):
    """FCOS (Tian et al., ICCV 2019): per-pixel classes, (l,t,r,b) regression, center-ness."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: FCOSHead,
        head_in_features: list[str],
        core: FCOSCore,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        inference_mixed_precision: bool = False,
        cpu_bf16: str = "auto",
        channels_last: bool = False,
    ):
        """
        Args:
            inference_mixed_precision: run backbone and head under autocast at inference: float16
                on CUDA, bfloat16 on a CPU as ``cpu_bf16`` allows (see :mod:`fcos_d2.precision`).
                Decoding stays in float32.
            channels_last: keep convolution weights and inputs in channels-last (NHWC) memory
                format, which oneDNN runs faster on CPUs; outputs change only by float rounding
                (other kernels sum in another order: about 1e-6 relative).
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        shapes = backbone.output_shape()
        strides = [shapes[f].stride for f in head_in_features]
        check_that(
            strides == core.strides,
            "the core's strides",
            f"the backbone's {strides} for {head_in_features}",
            core.strides,
            "FCOS argument core",
        )
        check_that(
            head.num_classes == core.num_classes,
            "the core's num_classes",
            f"the head's {head.num_classes}",
            core.num_classes,
            "FCOS argument core",
        )
        self.core = core
        self.inference_mixed_precision = inference_mixed_precision
        self.cpu_bf16 = cpu_bf16
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        # MODEL.WEIGHTS may be an AdelaiDet checkpoint (head at proposal_generator.fcos_head.*).
        self.register_load_state_dict_pre_hook(load_adelaidet_keys)

    @classmethod
    def from_config(cls, cfg) -> dict:
        check_authors_keys(cfg)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        core = FCOSCore(cfg, shapes)
        in_features = list(cfg.MODEL.FCOS.IN_FEATURES)
        return {
            "backbone": backbone,
            "head": FCOSHead(cfg, [shapes[f] for f in in_features]),
            "head_in_features": in_features,
            "core": core,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "inference_mixed_precision": cfg.TEST.AMP.ENABLED,
            "cpu_bf16": cfg.SOLVER.AMP.CPU_BF16,
            "channels_last": channels_last_for(cfg.MODEL.CHANNELS_LAST, cfg.MODEL.DEVICE),
        }

    @property
    def num_classes(self) -> int:
        return self.core.num_classes

    def forward(self, batched_inputs: list[dict[str, Tensor]]):
        """Detectron2's model interface: losses in training, ``[{"instances": ...}]`` otherwise."""
        images, features, predictions = self.dense_predictions(batched_inputs)
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("FCOS training needs annotations: each input needs 'instances'")
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            return self.forward_training(images, features, predictions, gt_instances)
        results = self.forward_inference(images, features, predictions)
        return self.output_dicts(results, batched_inputs, images.image_sizes)

    def dense_predictions(
        self, batched_inputs: list[dict[str, Tensor]]
    ) -> tuple[ImageList, list[Tensor], FCOSHeadOutputs]:
        """Normalized, padded images; the head's input features; the head's outputs."""
        images = self.preprocess_image(batched_inputs)
        tensor = images.tensor
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with self._inference_autocast():
            features = self.backbone(tensor)
            features = [features[f] for f in self.head_in_features]
            predictions = self.head(features)
        return images, features, predictions

    def _inference_autocast(self) -> contextlib.AbstractContextManager:
        if self.training or not self.inference_mixed_precision:
            return contextlib.nullcontext()
        device_type = self.device.type
        dtype = autocast_dtype(device_type, self.cpu_bf16, "TEST.AMP.ENABLED")
        return torch.autocast(device_type, dtype) if dtype else contextlib.nullcontext()

    def forward_training(
        self,
        images: ImageList,
        features: list[Tensor],
        predictions: FCOSHeadOutputs,
        gt_instances: list[Instances],
    ) -> dict[str, Tensor]:
        losses, num_pos = self.core.losses(features, predictions, gt_instances)
        # float() in put_scalar waits for the forward pass: the one host sync of a training step
        # (Detectron2's default trainer reads every loss back each step as well).
        get_event_storage().put_scalar("fcos/num_pos_per_worker", num_pos)
        return losses

    def forward_inference(
        self, images: ImageList, features: list[Tensor], predictions: FCOSHeadOutputs
    ) -> list[Instances]:
        return self.core.inference(features, predictions, images.image_sizes)

    @staticmethod
    def output_dicts(
        results: list[Instances], batched_inputs: list[dict], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Instances]]:
        """Detections rescaled to each input's requested ``height`` x ``width`` (original size)."""
        outputs = []
        for instances, inputs, image_size in zip(results, batched_inputs, image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            outputs.append({"instances": detector_postprocess(instances, height, width)})
        return outputs
