#!/usr/bin/env python
"""Run a trained FCOS on images and write them with the detections drawn on.

    python demo.py --config-file CFG --input img.jpg folder/ --output out/ MODEL.WEIGHTS w.pth
    python demo.py --config-file CFG --dataset shapes_val --max-images 8 --output out/ \
        MODEL.WEIGHTS w.pth

Uses Detectron2's ``DefaultPredictor`` (through :class:`fcos_d2.inference.FCOSPredictor`, which also
reads grayscale, RGBA, 16-bit and EXIF-rotated files) and ``Visualizer``.
"""

import argparse
import sys
from pathlib import Path

import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.visualizer import Visualizer

from fcos_d2.checks import ConfigError
from fcos_d2.cli import run_command, split_config_overrides
from fcos_d2.config import build_cfg
from fcos_d2.data.builtin import register_datasets_from_config
from fcos_d2.data.images import ImageReadError, collect_image_files, read_image_bgr
from fcos_d2.inference import FCOSPredictor


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", default=[], help="images and/or folders of images")
    parser.add_argument(
        "--dataset", help="a registered dataset whose images to use instead of --input"
    )
    parser.add_argument("--max-images", type=int, default=0, help="use only the first N images")
    parser.add_argument("--output", required=True, help="folder for the annotated images")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="draw detections of at least this score (unless MODEL.FCOS.CLASS_THRESHOLDS is set)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    args.input, args.opts = split_config_overrides(args.input, args.opts)
    if bool(args.input) == bool(args.dataset):
        parser.error("give exactly one of --input and --dataset")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    cfg.MODEL.FCOS.INFERENCE_TH_TEST = min(
        cfg.MODEL.FCOS.INFERENCE_TH_TEST, args.confidence_threshold
    )
    cfg.freeze()
    register_datasets_from_config(cfg)
    if args.dataset:
        if args.dataset not in DatasetCatalog.list():
            raise ConfigError(
                f"--dataset {args.dataset!r} is not registered: name one of "
                "DATASETS.TRAIN/TEST, the shapes splits, or a DATASETS.COCO_JSON / VOC_DIR entry"
            )
        inputs = [Path(d["file_name"]) for d in DatasetCatalog.get(args.dataset)]
        metadata = MetadataCatalog.get(args.dataset)
    else:
        inputs = collect_image_files(args.input)
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    if args.max_images > 0:
        inputs = inputs[: args.max_images]
    predictor = FCOSPredictor(cfg)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in inputs:
        try:
            image = read_image_bgr(path)  # upright (EXIF), 3-channel 8-bit, BGR
        except ImageReadError as error:
            print(f"demo.py: cannot read image {error}; skipped", file=sys.stderr)
            failures += 1
            continue
        instances = predictor(image)["instances"].to("cpu")
        # With per-class thresholds the model already kept only what reaches its class's value.
        if not cfg.MODEL.FCOS.CLASS_THRESHOLDS:
            instances = instances[instances.scores >= args.confidence_threshold]
        drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        target = output / f"{path.stem}.png"
        cv2.imwrite(str(target), drawn.get_image()[:, :, ::-1])
        print(f"{path}: {len(instances)} detections -> {target}")
    print(f"wrote {len(inputs) - failures} annotated images to {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_command("demo.py", main))
