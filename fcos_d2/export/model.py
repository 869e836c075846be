"""The whole detector as one traced graph: image(s) in, boxes / scores / classes out.

Export uses the TorchScript tracer (``torch.jit.trace``, and ``torch.onnx.export(dynamo=False)``,
which traces the same way) rather than torch 2.x's default ``torch.export`` route: FCOS decoding has
data-dependent sizes (score threshold, top-k, NMS) and Detectron2's ``Boxes`` branches on them in
Python (``if tensor.numel() == 0``, finiteness asserts), which ``torch.export`` rejects with
"Could not guard on data-dependent expression". The tracer records the tensor ops instead: shapes
read from tensors stay dynamic (:func:`pad_to_multiple`, ``clamped_count`` in the FCOS
post-processor), and torchvision scripts its ``batched_nms`` under tracing, so its empty-input
branch stays in the graph as a real ``If``. The Python-side checks the tracer warns about (listed
in :func:`quiet_benign_tracer_warnings`) are asserts or no-ops that bake nothing into the graph;
``--verify`` checks the result at sizes other than the traced one.

What is traced is :class:`FCOSGraph`: the model's own preprocessing, backbone and head, and the
FCOS decoding of all images at once (one graph for one image or a dynamic batch);
:class:`ExportableFCOS` (the model's own ``forward``) is the PyTorch reference it is verified
against.
"""

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional

import torch
from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.modeling.meta_arch import ProposalNetwork
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import DeformConv2d

from ..checks import check_choice, fail
from ..modeling.core import FCOSCore
from ..modeling.fcos import FCOS
from ..modeling.proposal_generator import FCOSProposalGenerator

# Output file of each format, in the --output folder.
FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
# Opset 17: NonMaxSuppression, TopK with a runtime k and If are all supported, and every
# onnxruntime release since 1.14 runs it.
ONNX_OPSET = 17
# The extra file of a TorchScript export that holds its metadata (export/metadata.py).
TORCHSCRIPT_METADATA = "fcos_d2_metadata.json"
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "classes"]
BATCHED_INPUT_NAMES = ["images", "image_sizes"]
BATCHED_OUTPUT_NAMES = [*OUTPUT_NAMES, "batch_index"]

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


def check_exportable(model: nn.Module) -> None:
    """The FCOS detector or an FCOS proposal network, else a ConfigError naming the config key."""
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
        check_exportable(model)
        self.model = model
        self.eval()

    def forward(self, image: Tensor) -> Detections:
        # No height/width in the input dict: detections stay in the coordinates of ``image``.
        return detections_of(self.model([{"image": image}])[0])

    def batch(self, images: Sequence[Tensor]) -> list[Detections]:
        """The model's detections of several images run as one batch (padded to the largest)."""
        return [detections_of(output) for output in self.model([{"image": x} for x in images])]


def dense_parts(model: nn.Module) -> tuple[nn.Module, list[str], FCOSCore]:
    """The head, its input features and the FCOS core of the detector or proposal network."""
    if isinstance(model, FCOS):
        return model.head, list(model.head_in_features), model.core
    generator = model.proposal_generator
    return generator.fcos_head, list(generator.in_features), generator.core


def pad_to_multiple(images: Tensor, divisor: int) -> Tensor:
    """Zero padding at the bottom and right up to multiples of ``divisor``, as Detectron2's
    ``ImageList.from_tensors``; under tracing the sizes are tensors, so they stay dynamic."""
    if divisor <= 1:
        return images
    height, width = images.shape[-2:]
    padded_height = (height + (divisor - 1)) // divisor * divisor
    padded_width = (width + (divisor - 1)) // divisor * divisor
    return F.pad(images, [0, padded_width - width, 0, padded_height - height])


def pad_batch(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The inputs of a batched file: (3, H_i, W_i) images at the top left of one zero (N, 3, H,
    W) tensor, H and W the largest sides, and their (N, 2) int64 sizes."""
    height = max(x.shape[1] for x in images)
    width = max(x.shape[2] for x in images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for index, image in enumerate(images):
        batch[index, :, : image.shape[1], : image.shape[2]] = image
    return batch, torch.tensor([list(x.shape[1:]) for x in images], dtype=torch.long)


def image_size_of(image: Tensor) -> Tensor:
    """(1, 2) int64 (height, width) of a (3, H, W) image; read from its shape, so dynamic when
    traced."""
    height, width = image.shape[-2:]
    if isinstance(height, Tensor):  # under tracing
        return torch.stack([height, width]).reshape(1, 2).long()
    return torch.tensor([[height, width]], device=image.device)


class FCOSGraph(nn.Module):
    """What export traces: the model's preprocessing, backbone and head, then the FCOS decoding
    of all images at once.

    Single image (``batched=False``): ``forward(image) -> (boxes, scores, classes)`` for one
    (3, H, W) float32 image in ``INPUT.FORMAT``, already resized.

    Batched: ``forward(images, image_sizes) -> (boxes, scores, classes, batch_index)``;
    ``images`` (N, 3, H, W), each image at the top left and the batch padded to the largest (any
    value: the padding is zeroed after normalization, as Detectron2 pads), ``image_sizes`` (N, 2)
    int64 (height, width) of each. Outputs are grouped by image in batch order; ``batch_index``
    (K,) int64 names each detection's image.

    Inside: normalization by ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``, zero padding to the backbone's
    size divisibility, backbone + FPN, head, and :meth:`~fcos_d2.modeling.core.FCOSCore.
    inference_batched`: the model's own selection (threshold, per-level top-k, decoding, clipping,
    NMS, top-N, Detectron2's removal of empty boxes) without a loop over images (which the tracer
    would unroll into a fixed batch size) and without gathering every (location, class) pair
    above the threshold (NonZero and GatherND over up to H/8 x W/8 x C pairs in the graph of
    ``model.forward``: docs/export.md). Boxes are in the pixels of each image; the proposal
    network's scores are its FCOS scores, the sigmoid of the ``objectness_logits`` of its
    proposals.
    """

    def __init__(self, model: nn.Module, batched: bool = False):
        super().__init__()
        check_exportable(model)
        constraints = getattr(model.backbone, "padding_constraints", None) or {}
        if constraints.get("square_size"):
            fail(
                "the backbone's padding_constraints",
                "without square_size for export",
                constraints,
                "FCOSGraph",
            )
        self.model = model
        self.batched = batched
        self.eval()

    def forward(self, images: Tensor, image_sizes: Optional[Tensor] = None):
        model = self.model
        if self.batched:
            assert image_sizes is not None, "a batched graph takes images and image_sizes"
            images = (images - model.pixel_mean) / model.pixel_std
            height, width = images.shape[-2:]
            rows = torch.arange(height, device=images.device)[None, :, None]
            cols = torch.arange(width, device=images.device)[None, None, :]
            inside = (rows < image_sizes[:, :1, None]) & (cols < image_sizes[:, 1:, None])
            images = torch.where(inside[:, None], images, torch.zeros_like(images))
        else:
            image_sizes = image_size_of(images)
            images = ((images - model.pixel_mean) / model.pixel_std)[None]
        images = pad_to_multiple(images, model.backbone.size_divisibility)
        head, in_features, core = dense_parts(model)
        features = model.backbone(images)
        features = [features[f] for f in in_features]
        detections = core.inference_batched(features, head(features), image_sizes)
        return tuple(detections) if self.batched else tuple(detections[:3])


def example_image(cfg) -> Tensor:
    """A fixed noise image at the config's test size, to trace with (any content traces alike)."""
    side = cfg.INPUT.MIN_SIZE_TEST or 224
    if cfg.INPUT.MAX_SIZE_TEST:
        side = min(side, cfg.INPUT.MAX_SIZE_TEST)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, side, side, generator=generator) * 255


@contextlib.contextmanager
def quiet_benign_tracer_warnings() -> Iterator[None]:
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


def exported_file(output_dir: Path, fmt: str, batched: bool = False, int8: bool = False) -> Path:
    """Where the file of ``fmt`` goes: ``model.onnx``, ``model_batched.onnx``,
    ``model_int8.onnx``, ``model_batched_int8.onnx``, ``model.ts``, ``model_batched.ts``."""
    check_choice(fmt, FORMATS, "--format", "fcos_d2.export")
    name = Path(FORMATS[fmt])
    suffix = ("_batched" if batched else "") + ("_int8" if int8 else "")
    return Path(output_dir) / f"{name.stem}{suffix}{name.suffix}"


def example_batch(example: Tensor) -> tuple[Tensor, Tensor]:
    """A batch of two made from one (3, H, W) example, the second image smaller (so that the
    traced batch mixes sizes), as :func:`pad_batch` gives."""
    height, width = example.shape[-2:]
    small = example.flip(-1)[:, : max(height * 3 // 4, 1), : max(width * 3 // 4, 1)]
    return pad_batch([example, small])


def export_model(
    model: nn.Module,
    fmt: str,
    output_dir: Path,
    example: Tensor,
    batched: bool = False,
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Trace :class:`FCOSGraph` of ``model`` on ``example`` (one (3, H, W) image) and write it
    in ``fmt`` with ``metadata`` (:func:`~fcos_d2.export.metadata.export_metadata`; read back by
    :func:`read_metadata`); returns the file (:func:`exported_file`).

    The model must be on the CPU in float32. H and W stay dynamic, and with ``batched`` the
    batch size (traced on a batch of two made from ``example``).
    """
    metadata = metadata or {}
    check_choice(fmt, FORMATS, "--format", "fcos_d2.export")
    graph = FCOSGraph(model, batched)
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
    path = exported_file(output_dir, fmt, batched)
    inputs = example_batch(example) if batched else (example,)
    input_names = BATCHED_INPUT_NAMES if batched else INPUT_NAMES
    output_names = BATCHED_OUTPUT_NAMES if batched else OUTPUT_NAMES
    with torch.no_grad(), quiet_benign_tracer_warnings():
        if fmt == "torchscript":
            # check_trace would re-run the model twice more; --verify compares at several sizes.
            traced = torch.jit.trace(graph, inputs, check_trace=False)
            traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
        else:
            dynamic = {name: {0: "detections"} for name in output_names}
            if batched:
                dynamic["images"] = {0: "batch", 2: "height", 3: "width"}
                dynamic["image_sizes"] = {0: "batch"}
            else:
                dynamic["image"] = {1: "height", 2: "width"}
            torch.onnx.export(
                graph,
                inputs,
                str(path),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic,
            )
    if fmt == "onnx":
        import onnx

        onnx.checker.check_model(str(path))
        write_onnx_metadata(path, metadata)
    return path


def write_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the ``metadata_props`` of the ONNX file ``path`` by ``metadata``."""
    import onnx

    onnx_model = onnx.load(str(path))
    del onnx_model.metadata_props[:]
    onnx.helper.set_model_props(onnx_model, metadata)
    onnx.save(onnx_model, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata :func:`export_model` wrote into ``path`` (empty for older files)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        onnx_model = onnx.load(str(path), load_external_data=False)
        return {prop.key: prop.value for prop in onnx_model.metadata_props}
    extra_files = {TORCHSCRIPT_METADATA: ""}
    _load_torchscript(path, extra_files)
    return json.loads(extra_files[TORCHSCRIPT_METADATA] or "{}")


def onnx_session(path: Path, threads: Optional[int] = None):
    """An onnxruntime CPU session of ``path`` with all graph optimizations (the default level)
    and ``threads`` intra-op threads (default: torch's, so that both share the machine alike)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def is_batched(path: Path) -> bool:
    """Whether an exported file takes a batch (``images``, ``image_sizes``)."""
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return [i.name for i in model.graph.input] == BATCHED_INPUT_NAMES
    return len(list(_load_torchscript(path).graph.inputs())) == 3  # self, images, image_sizes


def _load_torchscript(
    path: Path, extra_files: Optional[dict[str, str]] = None
) -> torch.jit.ScriptModule:
    import torchvision  # noqa: F401  (registers torchvision::nms, which the graph calls)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files or {})


def load_exported(path: Path, threads: Optional[int] = None) -> Callable[..., tuple[Tensor, ...]]:
    """A function that runs an exported file (onnxruntime for ``.onnx``, ``torch.jit.load`` for
    ``.ts``): ``run(image)`` for a single-image file, ``run(images, image_sizes)`` for a batched
    one; torch tensors in and out. ``threads``: onnxruntime's (default: torch's)."""
    path = Path(path)
    if path.suffix == ".onnx":
        session = onnx_session(path, threads)
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]

        def run_onnx(*inputs: Tensor) -> tuple[Tensor, ...]:
            feeds = {name: x.numpy() for name, x in zip(input_names, inputs)}
            return tuple(torch.from_numpy(x) for x in session.run(output_names, feeds))

        return run_onnx
    module = _load_torchscript(path)

    def run_torchscript(*inputs: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return tuple(module(*inputs))

    return run_torchscript
