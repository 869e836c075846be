"""The whole detector as one traced graph: image in, boxes / scores / classes out.

Export uses the TorchScript tracer (``torch.jit.trace``, and ``torch.onnx.export(dynamo=False)``,
which traces the same way) rather than torch 2.x's default ``torch.export`` route: FCOS decoding has
data-dependent sizes (score threshold, top-k, NMS) and Detectron2's ``Boxes`` branches on them in
Python (``if tensor.numel() == 0``, finiteness asserts), which ``torch.export`` rejects with
"Could not guard on data-dependent expression". The tracer records the tensor ops instead: shapes
read from tensors stay dynamic (``ImageList.from_tensors``, ``clamped_count`` in the FCOS
post-processor), and torchvision scripts its ``batched_nms`` under tracing, so its empty-input
branch stays in the graph as a real ``If``. The Python-side checks the tracer warns about (listed
in :func:`_quiet_benign_tracer_warnings`) are asserts or no-ops that bake nothing into the graph;
``--verify`` checks the result at sizes other than the traced one.
"""

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import torch
from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.modeling.meta_arch import ProposalNetwork
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from ..checks import check_choice, fail
from ..modeling.fcos import FCOS
from ..modeling.proposal_generator import FCOSProposalGenerator

# Output file of each format, in the --output folder.
FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
# Opset 17: NonMaxSuppression, TopK with a runtime k and If are all supported, and every
# onnxruntime release since 1.14 runs it.
ONNX_OPSET = 17
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "classes"]

Detections = tuple[Tensor, Tensor, Tensor]
_DEFORMABLE_CONVS = (DeformConv2d, DeformConv, ModulatedDeformConv)


def detections_of(output: dict) -> Detections:
    """Boxes (K, 4), scores (K,) and int64 classes (K,) of one image's Detectron2 model output.

    Proposal networks give ``proposals`` with ``objectness_logits``; their scores are the sigmoid of
    those logits (the FCOS ranking score sqrt(p x center-ness) of the proposal head) and their
    classes are all 0.
    """
    if "instances" in output:
        instances = output["instances"]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes
    proposals = output["proposals"]
    logits = proposals.objectness_logits
    return (
        proposals.proposal_boxes.tensor,
        logits.sigmoid(),
        torch.zeros_like(logits, dtype=torch.long),
    )


class ExportableFCOS(nn.Module):
    """``forward(image) -> (boxes, scores, classes)``: the model's own ``forward``, tensors out.

    ``image``: one (3, H, W) float32 tensor in ``INPUT.FORMAT``, already resized to the test size.
    Everything else runs inside: the model's own preprocessing (pixel mean/std, padding to the
    backbone's size divisibility), backbone, head and FCOS decoding (score threshold, per-level
    top-k, NMS, clipping, top-N), and Detectron2's ``detector_postprocess`` (drops empty boxes).
    Boxes are in the pixel coordinates of ``image``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        is_detector = isinstance(model, FCOS)
        is_proposer = isinstance(model, ProposalNetwork) and isinstance(
            getattr(model, "proposal_generator", None), FCOSProposalGenerator
        )
        if not (is_detector or is_proposer):
            fail(
                "MODEL.META_ARCHITECTURE",
                'the FCOS detector ("FCOS") or a "ProposalNetwork" with PROPOSAL_GENERATOR "FCOS"',
                type(model).__name__,
                "ExportableFCOS",
            )
        self.model = model
        self.eval()

    def forward(self, image: Tensor) -> Detections:
        # No height/width in the input dict: detections stay in the coordinates of ``image``.
        return detections_of(self.model([{"image": image}])[0])


def example_image(cfg) -> Tensor:
    """A fixed noise image at the config's test size, to trace with (any content traces alike)."""
    side = cfg.INPUT.MIN_SIZE_TEST or 224
    if cfg.INPUT.MAX_SIZE_TEST:
        side = min(side, cfg.INPUT.MAX_SIZE_TEST)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, side, side, generator=generator) * 255


@contextlib.contextmanager
def _quiet_benign_tracer_warnings() -> Iterator[None]:
    """Silence the warnings that are expected when tracing Detectron2 code, and only those.

    Detectron2 ``structures`` / ``layers`` convert tensors to Python values in shape asserts
    (``ImageList.from_tensors``, ``Boxes.__init__``, ``batched_nms``), its finiteness assert
    (``Boxes.clip``), a no-op ``reshape(-1, 4)`` when a box tensor is empty, and the unpacking of
    an (h, w) size tensor; ``torch.nn.functional`` in GroupNorm's input-size check (it only
    raises); torchvision's ``batched_nms`` in its choice of algorithm, which is fixed while tracing
    (the coordinate trick). None of these changes the recorded graph. The deprecation warnings of
    the tracer-based exporters are expected too (see the module docstring for why we use them).
    Tracer warnings from any other code still show.
    """
    benign = (
        r"(detectron2\.(structures|layers)\.\w+|torch\.nn\.functional|torchvision\.ops\.boxes)$"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=benign)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings(
            "ignore", message=r"You are using the legacy TorchScript-based ONNX"
        )
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        yield


def export_model(model: nn.Module, fmt: str, output_dir: Path, example: Tensor) -> Path:
    """Trace ``ExportableFCOS(model)`` on ``example`` and write it in ``fmt``; returns the file.

    The model must be on the CPU in float32. H and W of the input stay dynamic.
    """
    check_choice(fmt, FORMATS, "--format", "fcos_d2.export")
    wrapper = ExportableFCOS(model)
    deformable = [n for n, m in model.named_modules() if isinstance(m, _DEFORMABLE_CONVS)]
    if fmt == "onnx" and deformable:
        fail(
            "--format",
            "torchscript for deformable convolutions (they have no ONNX export: "
            "MODEL.FCOS.USE_DEFORMABLE, MODEL.RESNETS.DEFORM_ON_PER_STAGE)",
            fmt,
            f"modules {deformable[:3]}",
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / FORMATS[fmt]
    with torch.no_grad(), _quiet_benign_tracer_warnings():
        if fmt == "torchscript":
            # check_trace would re-run the model twice more; --verify compares at several sizes.
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            traced.save(str(path))
        else:
            dynamic = {name: {0: "detections"} for name in OUTPUT_NAMES}
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                dynamic_axes={"image": {1: "height", 2: "width"}, **dynamic},
            )
    if fmt == "onnx":
        import onnx

        onnx.checker.check_model(str(path))
    return path


def load_exported(path: Path) -> Callable[[Tensor], Detections]:
    """A function that runs an exported file on a (3, H, W) image: onnxruntime for ``.onnx``,
    ``torch.jit.load`` for ``.ts``."""
    if path.suffix == ".onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # share the machine like PyTorch
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

        def run_onnx(image: Tensor) -> Detections:
            outputs = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: image.numpy()})
            return tuple(torch.from_numpy(x) for x in outputs)  # type: ignore[return-value]

        return run_onnx
    import torchvision  # noqa: F401  (registers torchvision::nms, which the graph calls)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")
        module = torch.jit.load(str(path), map_location="cpu")

    def run_torchscript(image: Tensor) -> Detections:
        with torch.no_grad():
            return tuple(module(image))  # type: ignore[return-value]

    return run_torchscript
