"""Export of the whole FCOS detector (or FCOS proposal network) to ONNX or TorchScript.

``python -m fcos_d2.export --config-file CFG --format onnx|torchscript --output DIR
[--verify IMG ...] [KEY VALUE ...]``: see ``__main__.py``. In Python: :class:`ExportableFCOS`,
:func:`export_model`, :func:`load_exported`, :func:`~fcos_d2.export.verify.verify`.
"""

from .model import (
    FORMATS,
    ExportableFCOS,
    detections_of,
    example_image,
    export_model,
    load_exported,
)

__all__ = [
    "FORMATS",
    "ExportableFCOS",
    "detections_of",
    "example_image",
    "export_model",
    "load_exported",
]
