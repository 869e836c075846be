"""Export a trained FCOS detector (or FCOS proposal network) as one file, and check it.

    python -m fcos_d2.export --config-file CFG --format onnx --output DIR \\
        [--verify IMG ...] [KEY VALUE ...]

Writes DIR/model.onnx (``--format onnx``) or DIR/model.ts (``--format torchscript``). The file
takes one float32 (3, H, W) image in INPUT.FORMAT, already resized to the test size (any H, W),
and returns boxes (K, 4) in its pixel coordinates, scores (K,) and int64 classes (K,).

``--verify IMG ...`` then runs the file (onnxruntime / torch.jit.load) and the PyTorch model on
each image at the test size (ResizeShortestEdge of INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) and two
other sizes, and exits with 1 unless 99% of the detections match (box IoU >= 0.99, score
difference <= 1e-3). ``--verify-only`` checks an existing DIR/model.* against the config's weights.
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
from .model import FORMATS, ExportableFCOS, example_image, export_model, load_exported
from .verify import verify

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fcos_d2.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the file")
    parser.add_argument("--verify", nargs="+", default=[], metavar="IMG", help="images to check")
    parser.add_argument(
        "--verify-dataset",
        metavar="NAME",
        help="check on the first --max-images images of a registered dataset (DATASETS.* keys)",
    )
    parser.add_argument("--max-images", type=int, default=3, help="with --verify-dataset")
    parser.add_argument(
        "--verify-only", action="store_true", help="do not export: check the existing file"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    args.verify, args.opts = split_config_overrides(args.verify, args.opts)
    missing = [p for p in args.verify if not Path(p).is_file()]
    if missing:
        parser.error(f"--verify: no such image file(s): {missing}")
    if args.verify_only and not (args.verify or args.verify_dataset):
        parser.error("--verify-only needs images: --verify IMG ... or --verify-dataset NAME")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # the exported graph is device-neutral; trace in float32 on the CPU
    cfg.freeze()
    if args.verify_dataset:
        register_datasets_from_config(cfg)
        if args.verify_dataset not in DatasetCatalog.list():
            raise ConfigError(
                f"--verify-dataset {args.verify_dataset!r} is not a registered dataset"
            )
        records = DatasetCatalog.get(args.verify_dataset)[: args.max_images]
        args.verify += [r["file_name"] for r in records]
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        FCOSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    model.eval()
    output = Path(args.output)
    path = output / FORMATS[args.format]
    if args.verify_only:
        if not path.is_file():
            raise ConfigError(f"--verify-only: {path} does not exist")
    else:
        start = time.perf_counter()
        export_model(model, args.format, output, example_image(cfg))
        print(
            f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in "
            f"{time.perf_counter() - start:.1f} s"
        )
    if not args.verify:
        return 0
    print(f"verifying {path} against the PyTorch model:")
    passed = verify(load_exported(path), ExportableFCOS(model), cfg, args.verify)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(run_command("python -m fcos_d2.export", main))
