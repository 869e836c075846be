"""``DefaultPredictor`` that also takes image files and grayscale, RGBA or 16-bit arrays."""

from pathlib import Path
from typing import Union

import numpy as np
from detectron2.engine import DefaultPredictor

from .data.images import read_image_bgr, to_bgr_uint8


class FCOSPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (same config, weights and output), whose input may also
    be a path, or an (H, W), (H, W, 4) or uint16 array (3- and 4-channel arrays in BGR order, as
    OpenCV reads them); Detectron2's needs (H, W, 3) uint8."""

    def __call__(self, image: Union[np.ndarray, str, Path]):  # type: ignore[override]
        if isinstance(image, (str, Path)):
            return super().__call__(read_image_bgr(image))
        return super().__call__(to_bgr_uint8(np.asarray(image)))
