"""COCO evaluation at COCO scale: Detectron2's COCOEvaluator with pycocotools against
faster-coco-eval.

    python benchmarks/coco_eval.py [--images 5000] [--boxes-per-image 7.36] [--detections 100]
                                   [--repeats 3] [--quick]

A synthetic COCO val2017-sized case (5,000 images of 640x480 or 480x640, 80 classes, 36,800
boxes of COCO's size mix with 1% crowd boxes, 100 detections per image: jittered copies of the
boxes, scoring higher, some with the wrong class, and lower-scoring false positives) is
evaluated two ways, each timed ``--repeats`` times, alternating:

1. whole ``COCOEvaluator``: ``process()`` of every image's ``Instances`` and ``evaluate()``, by
   Detectron2's ``COCOEvaluator`` (here: pycocotools' ``COCOeval``, as this detectron2 has no
   compiled ``COCOeval_opt``) and by ``fcos_d2.evaluation.FasterCOCOEvaluator``
   (faster-coco-eval's ``COCOeval_faster``); the results dicts (AP, AP50, AP75, APs/m/l and every
   class's AP) are compared;
2. ``COCOeval`` alone on the same loaded results (evaluate, accumulate, summarize): pycocotools'
   against ``COCOeval_faster``; all 12 summary numbers are compared.

Prints medians, ratios and the largest differences; writes ``coco_eval.json`` to ``--output``.
"""

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository (and fcos_d2) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

NUM_CLASSES = 80
# COCO val2017: 36,781 boxes on 5,000 images; 41% small, 34% medium, 24% large; ~1% crowd.
AREA_MIX = (
    (0.41, 8, 32),
    (0.34, 32, 96),
    (0.25, 96, 400),
)  # (share, min side, max side) of sqrt(area)
CROWD_SHARE = 0.01
STATS = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"
)  # fmt: skip


def _box(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """An XYWH box of COCO's size mix inside the image."""
    share, low, high = AREA_MIX[rng.choice(len(AREA_MIX), p=[m[0] for m in AREA_MIX])]
    side = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    w = min(side * aspect, width - 1.0)
    h = min(side / aspect, height - 1.0)
    x = rng.uniform(0, width - w)
    y = rng.uniform(0, height - h)
    return [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]


def synthetic_coco(
    num_images: int = 5000,
    boxes_per_image: float = 7.36,
    detections_per_image: int = 100,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """A COCO ground-truth dict, and per image ``{"image_id", "height", "width", "boxes"
    (XYXY), "scores", "classes" (contiguous 0..79)}`` detections.

    Category ids are 1..80, so the contiguous class c is category c + 1.
    """
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = (640, 480) if rng.random() < 0.7 else (480, 640)
        images.append({"id": image_id, "width": width, "height": height, "file_name": "x.jpg"})
        gt = []
        for _ in range(rng.poisson(boxes_per_image)):
            bbox, category = _box(rng, width, height), int(rng.integers(NUM_CLASSES)) + 1
            crowd = int(rng.random() < CROWD_SHARE)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": crowd,
                }
            )
            gt.append((bbox, category - 1))
        boxes, classes, scores = [], [], []
        for bbox, category in gt:  # 1-4 jittered copies of each box, 20% with another class
            for _ in range(int(rng.integers(1, 5))):
                x, y, w, h = bbox
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                x0, y0 = x + jitter[0], y + jitter[1]
                x1, y1 = x + w + jitter[2], y + h + jitter[3]
                boxes.append([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)])
                other = rng.random() < 0.2
                classes.append(int(rng.integers(NUM_CLASSES)) if other else category)
                scores.append(rng.uniform(0.0, 0.7) if other else rng.uniform(0.3, 1.0))
        boxes, classes = boxes[:detections_per_image], classes[:detections_per_image]
        scores = scores[:detections_per_image]
        while len(boxes) < detections_per_image:  # false positives
            x, y, w, h = _box(rng, width, height)
            boxes.append([x, y, x + w, y + h])
            classes.append(int(rng.integers(NUM_CLASSES)))
            scores.append(rng.uniform(0.0, 0.5))
        boxes = np.clip(np.array(boxes), 0, [width, height, width, height])
        predictions.append(
            {
                "image_id": image_id,
                "height": height,
                "width": width,
                "boxes": boxes.astype(np.float32),
                "scores": np.array(scores, dtype=np.float32),
                "classes": np.array(classes, dtype=np.int64),
            }
        )
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def register(gt: dict, folder: Path, name: str) -> str:
    """Writes the ground truth as a COCO json and registers it for ``COCOEvaluator``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file = folder / f"{name}.json"
    json_file.write_text(json.dumps(gt))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(folder))
    # What load_coco_json would set; loading 5,000 image records is not needed to evaluate.
    ids = [c["id"] for c in gt["categories"]]
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in gt["categories"]],
        thing_dataset_id_to_contiguous_id={i: k for k, i in enumerate(ids)},
    )
    return name


def model_outputs(predictions: list[dict]) -> tuple[list[dict], list[dict]]:
    """``COCOEvaluator.process`` arguments: inputs with ``image_id``, outputs with Instances."""
    from detectron2.structures import Boxes, Instances

    inputs, outputs = [], []
    for p in predictions:
        instances = Instances(
            (p["height"], p["width"]),
            pred_boxes=Boxes(torch.from_numpy(p["boxes"])),
            scores=torch.from_numpy(p["scores"]),
            pred_classes=torch.from_numpy(p["classes"]),
        )
        inputs.append({"image_id": p["image_id"]})
        outputs.append({"instances": instances})
    return inputs, outputs


def as_coco_results(predictions: list[dict]) -> list[dict]:
    """The detections of :func:`synthetic_coco` as COCO results (XYWH, category c + 1)."""
    return [
        {
            "image_id": p["image_id"],
            "category_id": int(c) + 1,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
        }
        for p in predictions
        for b, s, c in zip(p["boxes"], p["scores"], p["classes"])
    ]


def run_evaluator(evaluator, inputs: list[dict], outputs: list[dict]) -> tuple[dict, float, float]:
    """(results, seconds in process(), seconds in evaluate()); Detectron2's printing muted."""
    evaluator.reset()
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        for i, o in zip(inputs, outputs):
            evaluator.process([i], [o])
        processed = time.perf_counter()
        results = evaluator.evaluate()
        done = time.perf_counter()
    return results, processed - start, done - processed


def cocoeval_stats(cocoeval_class, coco_gt, coco_results: list[dict]) -> tuple[np.ndarray, float]:
    """The 12 summary numbers of ``cocoeval_class`` on the results, and the seconds it took to
    evaluate, accumulate and summarize them (loading the results is not timed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(coco_results)
        start = time.perf_counter()
        evaluation = cocoeval_class(coco_gt, coco_dt, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        seconds = time.perf_counter() - start
    return np.asarray(evaluation.stats[:12], dtype=np.float64), seconds


def largest_difference(a: dict, b: dict) -> float:
    """Largest |difference| over the numbers of two results dicts (``{"bbox": {...}}``)."""
    keys = set(a["bbox"]) | set(b["bbox"])
    diffs = [abs(a["bbox"][k] - b["bbox"][k]) for k in keys if not np.isnan(a["bbox"][k])]
    return max(diffs, default=0.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--boxes-per-image", type=float, default=7.36)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 images, 1 repeat")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 200, 1
    return args


def main(argv=None) -> dict:
    from detectron2.evaluation import COCOEvaluator
    from pycocotools.cocoeval import COCOeval

    from fcos_d2.evaluation import FasterCOCOEvaluator, coco_eval_backend, faster_coco_eval_class

    args = parse_args(argv)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("fcos_d2").setLevel(logging.WARNING)
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    faster = faster_coco_eval_class()
    if faster is None or coco_eval_backend() != "faster-coco-eval":
        raise SystemExit(
            f"needs faster-coco-eval and a detectron2 without its compiled COCOeval_opt; "
            f"this evaluator would use {coco_eval_backend()}"
        )
    start = time.perf_counter()
    gt, predictions = synthetic_coco(args.images, args.boxes_per_image, args.detections)
    print(
        f"{len(gt['images'])} images, {len(gt['annotations'])} boxes "
        f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), "
        f"{sum(len(p['scores']) for p in predictions)} detections; "
        f"made in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    inputs, outputs = model_outputs(predictions)
    with tempfile.TemporaryDirectory() as folder:
        name = register(gt, Path(folder), "synthetic_coco_eval")
        evaluators = {
            "pycocotools": COCOEvaluator(name, output_dir=None),
            "faster-coco-eval": FasterCOCOEvaluator(name, output_dir=None),
        }
        runs = {k: {"process": [], "evaluate": [], "results": None} for k in evaluators}
        for repeat in range(args.repeats):
            order = list(evaluators) if repeat % 2 == 0 else list(evaluators)[::-1]
            for key in order:
                results, process, evaluate = run_evaluator(evaluators[key], inputs, outputs)
                runs[key]["process"].append(process)
                runs[key]["evaluate"].append(evaluate)
                runs[key]["results"] = results
                print(f"  COCOEvaluator, {key}: process {process:.1f} s, evaluate {evaluate:.1f} s")
        coco_gt = evaluators["pycocotools"]._coco_api
        coco_results = as_coco_results(predictions)
        alone = {k: {"seconds": [], "stats": None} for k in evaluators}
        classes = {"pycocotools": COCOeval, "faster-coco-eval": faster}
        for repeat in range(args.repeats):
            order = list(classes) if repeat % 2 == 0 else list(classes)[::-1]
            for key in order:
                stats, seconds = cocoeval_stats(classes[key], coco_gt, coco_results)
                alone[key]["seconds"].append(seconds)
                alone[key]["stats"] = stats
                print(f"  COCOeval alone, {key}: {seconds:.1f} s")

    def median(values):
        return statistics.median(values)

    slow, fast = runs["pycocotools"], runs["faster-coco-eval"]
    stats_diff = np.abs(alone["pycocotools"]["stats"] - alone["faster-coco-eval"]["stats"])
    summary = {
        "settings": vars(args),
        "boxes": len(gt["annotations"]),
        "detections": sum(len(p["scores"]) for p in predictions),
        "torch_threads": torch.get_num_threads(),
        "evaluator": {
            k: {
                "process_median_s": median(v["process"]),
                "evaluate_median_s": median(v["evaluate"]),
                "process_s": v["process"],
                "evaluate_s": v["evaluate"],
                "results": v["results"]["bbox"],
            }
            for k, v in runs.items()
        },
        "cocoeval_alone": {
            k: {
                "median_s": median(v["seconds"]),
                "seconds": v["seconds"],
                "stats": v["stats"].tolist(),
            }
            for k, v in alone.items()
        },
        "evaluate_ratio": median(fast["evaluate"]) / median(slow["evaluate"]),
        "total_ratio": (median(fast["process"]) + median(fast["evaluate"]))
        / (median(slow["process"]) + median(slow["evaluate"])),
        "cocoeval_ratio": median(alone["faster-coco-eval"]["seconds"])
        / median(alone["pycocotools"]["seconds"]),
        "largest_results_difference": largest_difference(slow["results"], fast["results"]),
        "largest_stats_difference": float(stats_diff.max()),
    }
    print(f"\nmedians of {args.repeats}, {summary['detections']} detections:")
    for key in evaluators:
        row = summary["evaluator"][key]
        total = row["process_median_s"] + row["evaluate_median_s"]
        print(
            f"  COCOEvaluator with {key}: process {row['process_median_s']:.1f} s + evaluate "
            f"{row['evaluate_median_s']:.1f} s = {total:.1f} s; COCOeval alone "
            f"{summary['cocoeval_alone'][key]['median_s']:.1f} s"
        )
    print(
        f"  faster-coco-eval / pycocotools: evaluate() {summary['evaluate_ratio']:.3f}x "
        f"({1 / summary['evaluate_ratio']:.1f} times faster), whole evaluator "
        f"{summary['total_ratio']:.3f}x, COCOeval alone {summary['cocoeval_ratio']:.3f}x"
    )
    print(
        "  12 summary numbers: "
        + ", ".join(
            f"{s} {a:.4f}/{b:.4f}"
            for s, a, b in zip(
                STATS, alone["pycocotools"]["stats"], alone["faster-coco-eval"]["stats"]
            )
        )
    )
    print(
        f"  largest difference: 12 numbers {summary['largest_stats_difference']:.2g}, "
        "COCOEvaluator results (AP in %, per class too) "
        f"{summary['largest_results_difference']:.2g}"
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "coco_eval.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {output / 'coco_eval.json'}")
    return summary


if __name__ == "__main__":
    main()
