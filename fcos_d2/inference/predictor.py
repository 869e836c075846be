"""``DefaultPredictor`` that also takes image files and grayscale, RGBA or 16-bit arrays."""

from pathlib import Path
from typing import Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor

from ..checkpoint import FCOSCheckpointer
from ..data.images import read_image_bgr, to_bgr_uint8
from .slicing import FCOSWithSlicing


class FCOSPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (same config, weights and output), whose input may also
    be a path, or an (H, W), (H, W, 4) or uint16 array (3- and 4-channel arrays in BGR order, as
    OpenCV reads them); Detectron2's needs (H, W, 3) uint8. A missing or unreadable
    ``MODEL.WEIGHTS`` is a :class:`~fcos_d2.checks.ConfigError` naming the file. With
    ``TEST.SLICE.ENABLED`` each image is detected in tiles (:class:`FCOSWithSlicing`)."""

    def __init__(self, cfg: CfgNode):
        without_weights = cfg.clone()
        without_weights.defrost()
        without_weights.MODEL.WEIGHTS = ""
        super().__init__(without_weights)
        self.cfg = cfg.clone()
        FCOSCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.sliced = FCOSWithSlicing(cfg, self.model) if cfg.TEST.SLICE.ENABLED else None

    def __call__(self, image: Union[np.ndarray, str, Path]):  # type: ignore[override]
        if isinstance(image, (str, Path)):
            image = read_image_bgr(image)
        else:
            image = to_bgr_uint8(np.asarray(image))
        if self.sliced is None:
            return super().__call__(image)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        # The original pixels: the slicing wrapper resizes each tile as this predictor would.
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return self.sliced([{"image": pixels, "height": image.shape[0], "width": image.shape[1]}])[
            0
        ]
