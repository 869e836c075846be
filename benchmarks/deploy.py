"""The exported file on onnxruntime's CPU provider against fcos-d2's PyTorch inference.

Two cases, each built once: R_50_1x (random weights, the benchmark's settings) on the 800x1216
image of the inference benchmark, and the quickstart model on a 256x256 shapes val image (its
trained weights when ``--quickstart-weights`` exists, else random weights with threshold 0).
Each is exported to ONNX (float32) and quantized to int8 (calibrated on noise images for the
random R-50, on shapes train images for the quickstart); PyTorch, the float32 file and the int8
file are then timed round-robin in this process on the same image, and the files' detections
are compared with PyTorch's (fcos_d2.export.verify: the float32 file at the export's --verify
criterion, the int8 file at its own).
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .inputs import random_batch
from .models import REPO, TestSettings, build_fcos_d2
from .workloads import Workload

QUICKSTART_CONFIG = "configs/quickstart/FCOS_R_18_shapes.yaml"
QUICKSTART_WEIGHTS = "output/quickstart/FCOS_R_18_shapes/model_final.pth"
RUNTIMES = ("pytorch", "onnxruntime", "onnxruntime_int8")
LABELS = {
    "pytorch": "PyTorch (fcos-d2)",
    "onnxruntime": "ONNX Runtime float32",
    "onnxruntime_int8": "ONNX Runtime int8",
}


@dataclass
class DeployCase:
    """A model, the image it is timed on, and the images its int8 file is calibrated on."""

    key: str
    title: str
    model: nn.Module
    image: Tensor
    calibration: list[Tensor]
    weights: str


def r50_case(size: tuple[int, int], settings: TestSettings, calibration_images: int) -> DeployCase:
    height, width = size
    torch.manual_seed(0)
    model = build_fcos_d2(settings, network=True).eval()
    image = random_batch(1, height, width, 0).images[0]
    noise = random_batch(calibration_images, height, width, 0, seed=1).images
    return DeployCase(
        f"r50_{height}x{width}",
        f"R_50_1x, batch 1 at {height}x{width}",
        model,
        image,
        list(noise),
        "random (seed 0)",
    )


def quickstart_case(
    side: int, weights: Optional[str], calibration_images: int, score_threshold: float
) -> DeployCase:
    """The quickstart model at ``side`` x ``side``: trained weights if the file exists (the
    config's threshold; shapes images), else random ones (``score_threshold``; noise images)."""
    from detectron2.modeling import build_model

    from fcos_d2.checkpoint import FCOSCheckpointer
    from fcos_d2.config import build_cfg
    from fcos_d2.data.builtin import register_datasets_from_config
    from fcos_d2.export.quantize import dataset_images

    weights_path = Path(weights) if weights else None
    trained = weights_path is not None and weights_path.is_file()
    opts = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", side, "INPUT.MAX_SIZE_TEST", side]
    if not trained:
        opts += ["MODEL.FCOS.INFERENCE_TH_TEST", score_threshold]
    cfg = build_cfg(str(REPO / QUICKSTART_CONFIG), opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if trained:
        FCOSCheckpointer(model).load(str(weights_path))
        register_datasets_from_config(cfg)
        # The second val image: the first has few objects, the second several.
        image = list(dataset_images(cfg, "shapes_val", 2))[1]
        calibration = list(dataset_images(cfg, "shapes_train", calibration_images))
    else:
        batch = random_batch(1 + calibration_images, side, side, 0)
        image, calibration = batch.images[0], list(batch.images[1:])
    return DeployCase(
        f"quickstart_{side}",
        f"quickstart R-18, batch 1 at {side}x{side}",
        model,
        image,
        calibration,
        str(weights_path) if trained else "random (no trained quickstart weights found)",
    )


@dataclass
class Deployed:
    """One case exported: the workloads to time and how to compare their detections."""

    workloads: dict[str, Workload]
    files: dict[str, Path]
    seconds_to_export: float
    seconds_to_quantize: float


def deploy(case: DeployCase, folder: Path, threads: int) -> Deployed:
    """Exports and quantizes ``case.model`` into ``folder``; a workload per runtime, each
    returning (boxes, scores, classes) for ``case.image``."""
    import time

    from fcos_d2.export import ExportableFCOS, export_model, exported_file, load_exported
    from fcos_d2.export.quantize import quantize_int8

    start = time.perf_counter()
    float_path = export_model(case.model, "onnx", folder, case.image)
    exported = time.perf_counter()
    int8_path = exported_file(folder, "onnx", int8=True)
    quantize_int8(float_path, int8_path, case.model, case.calibration)
    quantized = time.perf_counter()
    reference = ExportableFCOS(case.model)
    image = case.image

    def run_pytorch():
        with torch.no_grad():
            return reference(image)

    runs = {"pytorch": run_pytorch}
    for name, path in (("onnxruntime", float_path), ("onnxruntime_int8", int8_path)):
        runs[name] = _bound(load_exported(path, threads), image)
    return Deployed(
        {name: Workload(run) for name, run in runs.items()},
        {"onnxruntime": float_path, "onnxruntime_int8": int8_path},
        exported - start,
        quantized - exported,
    )


def _bound(run, image: Tensor):
    return lambda: run(image)


def temporary_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="fcos_d2_deploy_")
