#!/usr/bin/env python
"""Run a trained FCOS on images, a dataset, a video or a camera; draw the detections and/or save
them as COCO results.

    python demo.py --config-file CFG --input img.jpg folder/ --output out/ MODEL.WEIGHTS w.pth
    python demo.py --config-file CFG --dataset shapes_val --json preds.json MODEL.WEIGHTS w.pth
    python demo.py --config-file CFG --video-input clip.mp4 --output det.mp4 MODEL.WEIGHTS w.pth
    python demo.py --config-file CFG --webcam --max-frames 300 --output cam.mp4 MODEL.WEIGHTS w.pth

Uses Detectron2's ``DefaultPredictor`` (through :class:`fcos_d2.inference.FCOSPredictor`, which
also reads grayscale, RGBA, 16-bit and EXIF-rotated files), ``Visualizer`` and
``VideoVisualizer``. ``--json`` writes COCO results (``image_id``, ``category_id`` in the
dataset's own ids, ``bbox`` as absolute XYWH, ``score``, plus ``file_name``; ``frame`` for
videos), loadable by ``pycocotools.COCO.loadRes``; both outputs keep the detections scoring at
least ``--confidence-threshold``, or, with ``MODEL.FCOS.CLASS_THRESHOLDS``, those the per-class
thresholds keep.
"""

import fcos_d2  # noqa: F401  (first: it quiets fvcore's import-time warnings)

# isort: split
import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from fcos_d2.checks import ConfigError
from fcos_d2.cli import run_command, split_config_overrides
from fcos_d2.config import build_cfg
from fcos_d2.data.builtin import register_datasets_from_config
from fcos_d2.data.images import ImageReadError, collect_image_files, read_image_bgr
from fcos_d2.inference import FCOSPredictor
from fcos_d2.inference.results import CocoResults, unique_names
from fcos_d2.inference.video import VideoSink, VideoSource


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    sources = parser.add_argument_group("what to run on (exactly one)")
    sources.add_argument("--input", nargs="+", default=[], help="images and/or folders of images")
    sources.add_argument("--dataset", help="a registered dataset (DATASETS.* keys) whose images")
    sources.add_argument("--video-input", metavar="FILE", help="a video file")
    sources.add_argument("--webcam", action="store_true", help="camera 0 (stop with Ctrl-C)")
    parser.add_argument("--max-images", type=int, default=0, help="only the first N images")
    parser.add_argument("--max-frames", type=int, default=0, help="only the first N video frames")
    parser.add_argument(
        "--output", help="folder for annotated images, or the annotated video (.mp4)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the detections as COCO results")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="keep detections of at least this score (unless MODEL.FCOS.CLASS_THRESHOLDS is set)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per forward pass (README: when it helps)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    args.input, args.opts = split_config_overrides(args.input, args.opts)
    given = [bool(args.input), bool(args.dataset), bool(args.video_input), args.webcam]
    if sum(given) != 1:
        parser.error("give exactly one of --input, --dataset, --video-input and --webcam")
    if not (args.output or args.json):
        parser.error("nothing to write: give --output and/or --json")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    if cfg.MODEL.FCOS.CLASS_THRESHOLDS:
        # The model already keeps only what reaches its class's threshold: nothing more to cut.
        args.confidence_threshold = 0.0
    else:
        cfg.MODEL.FCOS.INFERENCE_TH_TEST = min(
            cfg.MODEL.FCOS.INFERENCE_TH_TEST, args.confidence_threshold
        )
    cfg.freeze()
    register_datasets_from_config(cfg)
    if args.dataset and args.dataset not in DatasetCatalog.list():
        raise ConfigError(
            f"--dataset {args.dataset!r} is not registered: name one of DATASETS.TRAIN/TEST, "
            "the shapes splits, or a DATASETS.COCO_JSON / VOC_DIR entry"
        )
    metadata = MetadataCatalog.get(
        args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    )
    results = CocoResults(metadata)
    if args.video_input or args.webcam:
        source = VideoSource(0 if args.webcam else args.video_input)
        predictor = FCOSPredictor(cfg)
        failures = run_on_video(args, predictor, source, metadata, results)
    else:
        if args.dataset:
            records = DatasetCatalog.get(args.dataset)
            inputs = [(Path(r["file_name"]), r["image_id"]) for r in records]
        else:
            inputs = [(path, i) for i, path in enumerate(collect_image_files(args.input), 1)]
        if args.max_images > 0:
            inputs = inputs[: args.max_images]
        predictor = FCOSPredictor(cfg)
        failures = run_on_images(args, predictor, inputs, metadata, results)
    if args.json:
        results.write(args.json)
        print(f"wrote {len(results.records)} detections to {args.json}")
    return 1 if failures else 0


def run_on_images(args, predictor, inputs: list, metadata, results: CocoResults) -> int:
    output = Path(args.output) if args.output else None
    if output:
        output.mkdir(parents=True, exist_ok=True)
    names = unique_names([path for path, _ in inputs])
    failures, written = 0, 0
    batch: list = []

    def flush() -> None:
        nonlocal written
        images = [image for image, _, _, _ in batch]
        for (image, path, image_id, name), prediction in zip(
            batch, predictor.predict_batch(images)
        ):
            instances = prediction["instances"].to("cpu")
            instances = instances[instances.scores >= args.confidence_threshold]
            results.add(instances, image_id, file_name=str(path))
            if output:
                drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
                cv2.imwrite(str(output / name), drawn.get_image()[:, :, ::-1])
                written += 1
            target = f" -> {output / name}" if output else ""
            tqdm.write(f"{path}: {len(instances)} detections{target}")
        batch.clear()

    for (path, image_id), name in tqdm(list(zip(inputs, names)), desc="images", unit="img"):
        try:
            image = read_image_bgr(path)  # upright (EXIF), 3-channel 8-bit, BGR
        except ImageReadError as error:
            tqdm.write(f"demo.py: skipped an input: {error}", file=sys.stderr)
            failures += 1
            continue
        batch.append((image, path, image_id, name))
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    if output:
        print(f"wrote {written} annotated images to {output}")
    return failures


def run_on_video(args, predictor, source: VideoSource, metadata, results: CocoResults) -> int:
    visualizer = VideoVisualizer(metadata)
    sink: Optional[VideoSink] = None
    total = source.frame_count
    if args.max_frames > 0:
        total = min(total, args.max_frames) if total else args.max_frames
    start, count = time.perf_counter(), 0
    try:
        for frame in tqdm(source.frames(), total=total, desc="frames", unit="frame"):
            if args.max_frames and count >= args.max_frames:
                break
            instances = predictor(frame)["instances"].to("cpu")
            instances = instances[instances.scores >= args.confidence_threshold]
            results.add(instances, count, frame=count, file_name=str(source.source))
            if args.output:
                if sink is None:
                    height, width = frame.shape[:2]
                    sink = VideoSink(args.output, source.fps, width, height)
                drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
                sink.write(drawn.get_image()[:, :, ::-1])
            count += 1
    except KeyboardInterrupt:  # --webcam runs until stopped
        pass
    finally:
        if sink is not None:
            sink.close()
    seconds = time.perf_counter() - start
    print(f"{count} frames in {seconds:.1f} s: {count / max(seconds, 1e-9):.1f} frames per second")
    if sink is not None:
        print(f"wrote the annotated video to {sink.path}")
    if count == 0:
        raise ConfigError(f"no frame could be read from {source.source}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("demo.py", main))
