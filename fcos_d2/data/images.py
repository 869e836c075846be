"""Images as the model takes them: (H, W, 3) uint8 in BGR order, from any common file or array.

Detectron2's ``read_image`` applies EXIF orientation but turns a 16-bit PNG into mostly white
(PIL clips its values to 255), and ``DefaultPredictor`` needs (H, W, 3) uint8 arrays. These
helpers accept grayscale, RGBA / palette and 8- or 16-bit images, and name the file they fail on.
"""

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..checks import ConfigError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class ImageReadError(ConfigError):
    """An input that is not an image fcos_d2 can read, with the reason."""


def to_bgr_uint8(image: np.ndarray, channels_order: str = "BGR") -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays of uint8, uint16 or float in [0, 1] to
    (H, W, 3) uint8 BGR. Alpha is dropped; 16-bit values are scaled by 255 / 65535.

    ``channels_order`` is the order of 3- and 4-channel inputs: "BGR" (OpenCV) or "RGB" (PIL).
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageReadError(
            f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}"
        )
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)
    elif image.dtype.kind == "f":
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"expected uint8, uint16 or float pixels, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    return np.ascontiguousarray(image if channels_order == "BGR" else image[:, :, ::-1])


def read_image_bgr(path: Union[str, Path]) -> np.ndarray:
    """The image file at ``path`` as (H, W, 3) uint8 BGR, turned upright by its EXIF orientation."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path} does not exist")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.uint16 if image.mode != "I" else np.int32)
                return to_bgr_uint8(np.clip(pixels, 0, 65535).astype(np.uint16))
            if image.mode not in ("L", "RGB", "RGBA"):
                image = image.convert(
                    "RGBA" if "A" in image.mode or "transparency" in image.info else "RGB"
                )
            return to_bgr_uint8(np.asarray(image), channels_order="RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"{path} is not a readable image ({error})") from None


def collect_image_files(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path or an empty folder
    is an error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageReadError(
                    f"folder {path} holds no images "
                    f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ImageReadError(f"input {raw!r} does not exist")
    return files
