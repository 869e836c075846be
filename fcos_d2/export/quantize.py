"""int8 static quantization of an exported ONNX file (onnxruntime's ``quantize_static``).

QDQ format (QuantizeLinear / DequantizeLinear pairs, which onnxruntime's CPU provider fuses into
int8 kernels), uint8 activations and per-channel int8 weights (symmetric), activation ranges
calibrated on images of a registered dataset. Only the network is quantized: the convolutions
of the backbone, FPN and head towers, with the residual additions, max pooling and the FPN's
upsampling between them. Float32 stay the decoding (threshold, top-k, boxes, NMS), the head's
GroupNorm (no int8 kernel) and its three predictors (``cls_logits``, ``bbox_pred``,
``ctrness``): their outputs are the scores and box distances, which 8 bits would coarsen (a
step of about 1/10 of a logit and of a stride at the calibrated ranges) for no time to speak of
(they are the smallest convolutions). Measured accuracy and times: docs/export.md.
"""

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_that
from .model import dense_parts

# Op types quantized inside the network (onnxruntime fuses each with its Q/DQ into an int8
# kernel); GroupNorm's ops and everything after the head stay float32.
QUANTIZED_OP_TYPES = ("Conv", "Add", "MaxPool", "Resize")


def module_scope(model: nn.Module, module: nn.Module) -> re.Pattern:
    """What the ONNX node names of ``module`` start with in a traced ``FCOSGraph(model)``:
    ``/backbone/``, ``/head/``, ``/head/ctrness/``; the tracer adds ``_1``, ``_2``... to a
    module's name for its second, third... call (one per FPN level)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return re.compile(re.escape("/" + name.replace(".", "/")) + r"(_\d+)?/")
    raise ValueError(f"{type(module).__name__} is not a module of the model")


def network_nodes(onnx_model, model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the nodes to quantize, names of the predictor convolutions kept float32)."""
    head, _, _ = dense_parts(model)
    scopes = [module_scope(model, model.backbone), module_scope(model, head)]
    predictors = [
        module_scope(model, getattr(head, n)) for n in ("cls_logits", "bbox_pred", "ctrness")
    ]
    quantized, kept = [], []
    for node in onnx_model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        if any(p.match(node.name) for p in predictors):
            kept.append(node.name)
        elif any(s.match(node.name) for s in scopes):
            quantized.append(node.name)
    return quantized, kept


def without_shared_initializers(onnx_model):
    """The model with each ``Identity`` of an initializer replaced by a copy of it.

    The exporter stores equal weights once (e.g. the zero biases of an untrained head) and feeds
    the others through ``Identity`` nodes; the quantizer needs every weight and bias of a
    convolution to be an initializer, or it leaves that convolution in float32.
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    initializers = {init.name: init for init in graph.initializer}
    copies = [
        node for node in graph.node if node.op_type == "Identity" and node.input[0] in initializers
    ]
    for node in copies:
        array = numpy_helper.to_array(initializers[node.input[0]])
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        graph.node.remove(node)
    return onnx_model


class CalibrationImages:
    """onnxruntime's ``CalibrationDataReader`` over (3, H, W) float32 images, as feeds of a
    single-image or batched file (a batch of one)."""

    def __init__(self, images: Iterable[Tensor], batched: bool):
        self._images: Iterator[Tensor] = iter(images)
        self.batched = batched
        self.count = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        image = next(self._images, None)
        if image is None:
            return None
        self.count += 1
        array = image.float().numpy()
        if not self.batched:
            return {"image": array}
        sizes = np.array([array.shape[1:]], dtype=np.int64)
        return {"images": array[None], "image_sizes": sizes}

    def __iter__(self):
        return self

    def __next__(self):
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds


def quantize_int8(
    float_path: Path,
    int8_path: Path,
    model: nn.Module,
    images: Iterable[Tensor],
    batched: bool = False,
) -> tuple[Path, int]:
    """Writes the int8 quantization of the exported ONNX file ``float_path`` (of ``model``) to
    ``int8_path``, calibrated on ``images``; returns the file and how many images calibrated."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    onnx_model = without_shared_initializers(onnx.load(str(float_path)))
    quantized, kept = network_nodes(onnx_model, model)
    reader = CalibrationImages(images, batched)
    with torch.no_grad(), _without_preprocessing_advice():
        quantize_static(
            onnx_model,
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            nodes_to_quantize=quantized,
            nodes_to_exclude=kept,
            # The range each activation took over the images: the histogram-based methods
            # (percentile, entropy) need every image at one size and every calibrated tensor
            # too, which the decoding's tensors are not.
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    check_that(reader.count > 0, "--calibrate-images", "> 0 images read", 0, "fcos_d2.export")
    return int8_path, reader.count


class _PreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """``quantize_static`` logs (twice, to the root logger) that onnxruntime's pre-processing
    (shape inference, BatchNorm folding) should run first: the exporter already folded the
    BatchNorms into the convolutions and gave every network tensor its shape."""
    advice = _PreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def dataset_images(cfg, dataset_name: str, count: int) -> Iterator[Tensor]:
    """The first ``count`` images of a registered dataset, read and resized as at test time
    (``INPUT.FORMAT``, ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``), (3, H, W) float32."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from .verify import test_resize

    for record in DatasetCatalog.get(dataset_name)[:count]:
        image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        resized = test_resize(cfg).get_transform(image).apply_image(image)
        yield torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
