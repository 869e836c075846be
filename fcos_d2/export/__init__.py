"""Export of the whole FCOS detector (or FCOS proposal network) to ONNX or TorchScript.

``python -m fcos_d2.export --config-file CFG --format onnx|torchscript --output DIR [--batched]
[--quantize int8 --calibrate-dataset NAME] [--verify IMG ...] [--evaluate-dataset NAME]
[KEY VALUE ...]``: see ``__main__.py``. In Python: :class:`FCOSGraph` (what is traced),
:func:`export_model`, :func:`load_exported`, :func:`read_metadata` (class names and test sizes
stored in the file), :func:`~fcos_d2.export.quantize.quantize_int8`,
:func:`~fcos_d2.export.verify.verify`, :func:`~fcos_d2.export.evaluate.evaluate_exported`.
"""

from .model import (
    FORMATS,
    ExportableFCOS,
    FCOSGraph,
    detections_of,
    example_image,
    export_model,
    exported_file,
    load_exported,
    onnx_session,
    pad_batch,
    read_metadata,
)

__all__ = [
    "FORMATS",
    "ExportableFCOS",
    "FCOSGraph",
    "detections_of",
    "example_image",
    "export_model",
    "exported_file",
    "load_exported",
    "onnx_session",
    "pad_batch",
    "read_metadata",
]
