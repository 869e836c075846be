"""Export a trained FCOS detector (or FCOS proposal network) as one file, and check it.

    python -m fcos_d2.export --config-file CFG --format onnx --output DIR [--batched] \\
        [--quantize int8 --calibrate-dataset NAME [--calibrate-images N]] \\
        [--verify IMG ... | --verify-dataset NAME] [--evaluate-dataset NAME] [KEY VALUE ...]

Writes DIR/model.onnx (``--format onnx``) or DIR/model.ts (``--format torchscript``). The file
takes one float32 (3, H, W) image in INPUT.FORMAT, already resized to the test size (any H, W),
and returns boxes (K, 4) in its pixel coordinates, scores (K,) and int64 classes (K,).
``--batched`` writes DIR/model_batched.* instead: images (N, 3, H, W) padded to the largest and
their int64 (N, 2) sizes in, and also the int64 batch_index (K,) of each detection out.

``--quantize int8`` also writes DIR/model_int8.onnx (model_batched_int8.onnx): static int8
quantization (QDQ, per-channel weights) of the network, calibrated on the first
``--calibrate-images`` images of ``--calibrate-dataset``; the decoding stays float32.

``--verify IMG ...`` then runs the file (onnxruntime / torch.jit.load) and the PyTorch model on
each image at the test size (ResizeShortestEdge of INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) and two
other sizes (a batched file: in batches of 1, 2 and 4), and exits with 1 unless 99% of the
detections match (box IoU >= 0.99, score difference <= 1e-3); an int8 file is held to its own
criterion (90% of the detections scoring >= 0.3 at IoU >= 0.8 within 0.05). ``--evaluate-dataset``
prints the COCO box AP of each file on a registered dataset. ``--verify-only`` checks existing
files against the config's weights.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from ..checkpoint import FCOSCheckpointer
from ..checks import ConfigError
from ..cli import run_command, split_config_overrides
from ..config import build_cfg
from ..data.builtin import register_datasets_from_config
from .evaluate import evaluate_exported
from .metadata import export_metadata
from .model import (
    FORMATS,
    ExportableFCOS,
    example_image,
    export_model,
    exported_file,
    load_exported,
    write_onnx_metadata,
)
from .quantize import dataset_images, quantize_int8
from .verify import FLOAT32, INT8, verify, verify_batched

logger = logging.getLogger(__name__)
PROGRAM = "python -m fcos_d2.export"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the file")
    parser.add_argument(
        "--batched", action="store_true", help="a dynamic batch dimension (model_batched.*)"
    )
    parser.add_argument("--quantize", choices=["int8"], help="also write the int8 file (ONNX only)")
    parser.add_argument(
        "--calibrate-dataset", metavar="NAME", help="registered dataset to calibrate int8 on"
    )
    parser.add_argument(
        "--calibrate-images", type=int, default=64, help="images to calibrate on (default 64)"
    )
    parser.add_argument("--verify", nargs="+", default=[], metavar="IMG", help="images to check")
    parser.add_argument(
        "--verify-dataset",
        metavar="NAME",
        help="check on the first --max-images images of a registered dataset (DATASETS.* keys)",
    )
    parser.add_argument("--max-images", type=int, default=3, help="with --verify-dataset")
    parser.add_argument(
        "--evaluate-dataset",
        metavar="NAME",
        help="COCO evaluation of each file on a registered dataset (as train_net.py --eval-only)",
    )
    parser.add_argument(
        "--verify-only", action="store_true", help="do not export: check the existing file(s)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    args.verify, args.opts = split_config_overrides(args.verify, args.opts)
    missing = [p for p in args.verify if not Path(p).is_file()]
    if missing:
        parser.error(f"--verify: no such image file(s): {missing}")
    checks_something = args.verify or args.verify_dataset or args.evaluate_dataset
    if args.verify_only and not checks_something:
        parser.error(
            "--verify-only needs images or a dataset: --verify IMG ..., --verify-dataset NAME "
            "or --evaluate-dataset NAME"
        )
    if args.quantize and args.format != "onnx":
        parser.error("--quantize int8 needs --format onnx (onnxruntime's quantization)")
    if args.quantize and not (args.calibrate_dataset or args.verify_only):
        parser.error("--quantize int8 needs --calibrate-dataset NAME (images to calibrate on)")
    if args.calibrate_images < 1:
        parser.error(f"--calibrate-images must be >= 1, got {args.calibrate_images}")
    return args


def registered(name: str, option: str) -> str:
    if name not in DatasetCatalog.list():
        raise ConfigError(
            f"{option} {name!r} is not a registered dataset (register it with the config's "
            "DATASETS.* keys)"
        )
    return name


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # the exported graph is device-neutral; trace in float32 on the CPU
    cfg.freeze()
    if args.verify_dataset or args.calibrate_dataset or args.evaluate_dataset:
        register_datasets_from_config(cfg)
    if args.verify_dataset:
        records = DatasetCatalog.get(registered(args.verify_dataset, "--verify-dataset"))
        args.verify += [r["file_name"] for r in records[: args.max_images]]
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        FCOSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    model.eval()
    output = Path(args.output)
    files = [(exported_file(output, args.format, args.batched), FLOAT32)]
    if args.quantize:
        files.append((exported_file(output, args.format, args.batched, int8=True), INT8))
    if args.verify_only:
        missing = [str(path) for path, _ in files if not path.is_file()]
        if missing:
            raise ConfigError(f"--verify-only: {', '.join(missing)} does not exist")
    else:
        write_files(args, cfg, model, [path for path, _ in files])
    passed = True
    if args.verify:
        for path, tolerance in files:
            print(f"verifying {path} against the PyTorch model:")
            passed &= verify_file(path, model, cfg, args, tolerance)
    if args.evaluate_dataset:
        dataset = registered(args.evaluate_dataset, "--evaluate-dataset")
        for path, _ in files:
            results, seconds = evaluate_exported(path, cfg, dataset)
            print(f"{path} on {dataset}: " + describe_results(results, seconds))
    return 0 if passed else 1


def write_files(args: argparse.Namespace, cfg, model, paths: list[Path]) -> None:
    start = time.perf_counter()
    metadata = export_metadata(cfg)
    path = export_model(
        model, args.format, Path(args.output), example_image(cfg), args.batched, metadata
    )
    print(f"wrote {path} ({size_mib(path)}) in {time.perf_counter() - start:.1f} s")
    if args.quantize:
        start = time.perf_counter()
        dataset = registered(args.calibrate_dataset, "--calibrate-dataset")
        images = dataset_images(cfg, dataset, args.calibrate_images)
        int8_path, count = quantize_int8(path, paths[1], model, images, args.batched)
        write_onnx_metadata(int8_path, metadata)
        print(
            f"wrote {int8_path} ({size_mib(int8_path)}) in {time.perf_counter() - start:.1f} s, "
            f"calibrated on {count} images of {dataset}"
        )


def verify_file(path: Path, model, cfg, args: argparse.Namespace, tolerance) -> bool:
    run = load_exported(path)
    if not args.batched:
        return verify(run, ExportableFCOS(model), cfg, args.verify, tolerance=tolerance)
    reference = ExportableFCOS(model)
    return verify_batched(run, reference.batch, cfg, args.verify, tolerance=tolerance)


def size_mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def describe_results(results: dict, seconds: float) -> str:
    """One line: the box (or proposal) metrics and the time per image."""
    task = "bbox" if "bbox" in results else "box_proposals"
    metrics = results.get(task, {})
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl") if task == "bbox" else sorted(metrics)
    values = ", ".join(f"{name} {metrics[name]:.2f}" for name in names if name in metrics)
    return f"{values}; {1000 * seconds:.1f} ms per image in the file"


if __name__ == "__main__":
    sys.exit(run_command(PROGRAM, main))
