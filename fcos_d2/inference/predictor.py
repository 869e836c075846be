"""``DefaultPredictor`` that also takes image files and grayscale, RGBA or 16-bit arrays."""

from pathlib import Path
from typing import Union

import numpy as np
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor

from ..checkpoint import FCOSCheckpointer
from ..data.images import read_image_bgr, to_bgr_uint8


class FCOSPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (same config, weights and output), whose input may also
    be a path, or an (H, W), (H, W, 4) or uint16 array (3- and 4-channel arrays in BGR order, as
    OpenCV reads them); Detectron2's needs (H, W, 3) uint8. A missing or unreadable
    ``MODEL.WEIGHTS`` is a :class:`~fcos_d2.checks.ConfigError` naming the file."""

    def __init__(self, cfg: CfgNode):
        without_weights = cfg.clone()
        without_weights.defrost()
        without_weights.MODEL.WEIGHTS = ""
        super().__init__(without_weights)
        self.cfg = cfg.clone()
        FCOSCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)

    def __call__(self, image: Union[np.ndarray, str, Path]):  # type: ignore[override]
        if isinstance(image, (str, Path)):
            return super().__call__(read_image_bgr(image))
        return super().__call__(to_bgr_uint8(np.asarray(image)))
