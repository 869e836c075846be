"""``DefaultPredictor`` that also takes image files and grayscale, RGBA or 16-bit arrays."""

from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor

from ..checkpoint import FCOSCheckpointer
from ..config import available_device
from ..data.images import read_image_bgr, to_bgr_uint8
from .slicing import FCOSWithSlicing


class FCOSPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (same config, weights and output), whose input may also
    be a path, or an (H, W), (H, W, 4) or uint16 array (3- and 4-channel arrays in BGR order, as
    OpenCV reads them); Detectron2's needs (H, W, 3) uint8. ``MODEL.DEVICE`` "cuda" falls back to
    the CPU where CUDA is unavailable, as in the commands. A missing or unreadable
    ``MODEL.WEIGHTS`` is a :class:`~fcos_d2.checks.ConfigError` naming the file. With
    ``TEST.SLICE.ENABLED`` each image is detected in tiles (:class:`FCOSWithSlicing`)."""

    def __init__(self, cfg: CfgNode):
        without_weights = cfg.clone()
        without_weights.defrost()
        without_weights.MODEL.WEIGHTS = ""
        # As the commands do: Detectron2's default MODEL.DEVICE "cuda" on a machine without one.
        without_weights.MODEL.DEVICE = available_device(cfg.MODEL.DEVICE)
        super().__init__(without_weights)
        self.cfg = without_weights.clone()
        self.cfg.MODEL.WEIGHTS = cfg.MODEL.WEIGHTS
        FCOSCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.sliced = FCOSWithSlicing(self.cfg, self.model) if cfg.TEST.SLICE.ENABLED else None

    def __call__(self, image: Union[np.ndarray, str, Path]):  # type: ignore[override]
        image = self._bgr(image)
        if self.sliced is None:
            return super().__call__(image)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        # The original pixels: the slicing wrapper resizes each tile as this predictor would.
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        inputs = [{"image": pixels, "height": image.shape[0], "width": image.shape[1]}]
        return self.sliced(inputs)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Union[np.ndarray, str, Path]]) -> list[dict]:
        """:meth:`__call__` for several images in one forward pass (each resized as
        ``DefaultPredictor`` resizes it; the batch padded to the largest). With slicing, each
        image's tiles are the batch."""
        if self.sliced is not None:
            return [self(image) for image in images]
        inputs = []
        for image in images:
            original = self._bgr(image)
            if self.input_format == "RGB":
                original = original[:, :, ::-1]
            height, width = original.shape[:2]
            resized = self.aug.get_transform(original).apply_image(original)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append(
                {"image": tensor.to(self.cfg.MODEL.DEVICE), "height": height, "width": width}
            )
        return self.model(inputs) if inputs else []

    @staticmethod
    def _bgr(image: Union[np.ndarray, str, Path]) -> np.ndarray:
        if isinstance(image, (str, Path)):
            return read_image_bgr(image)
        return to_bgr_uint8(np.asarray(image))
