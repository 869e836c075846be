"""``python -m fcos_d2.analysis <command> --config-file CFG [--dataset NAME] [KEY VALUE ...]``

Commands (each writes ``<command>.json`` and, where it has a figure, ``<command>.png`` to
``--output``, default ``<OUTPUT_DIR>/analysis``, and prints a short table):

* ``bpr``: best possible recall of FCOS with FPN, FCOS on P4 only, and RetinaNet's anchors under
  three matching rules (Table 1).
* ``ambiguity``: share of ambiguous positive locations, with and without FPN (Table 2), and
  positive / total training samples per image against RetinaNet (arXiv Table 4).
* ``centerness``: classification score vs IoU of detections before NMS, without and with
  center-ness (Fig. 7); needs ``MODEL.WEIGHTS``.
* ``pr-curves``: class-agnostic precision-recall curves at IoU 0.50 / 0.75 / 0.90 and their APs
  (Table 7, Figs. 4-6); needs ``MODEL.WEIGHTS``.
* ``thresholds``: one score threshold per class, of best F1 (``--criterion f1``, as the original
  release computes them for its demo) or the lowest whose precision reaches ``--precision P``;
  prints the ``MODEL.FCOS.CLASS_THRESHOLDS`` override that applies them, and each class's
  precision, recall and F1 at them, at ``--global-threshold`` and, if the config sets
  ``MODEL.FCOS.CLASS_THRESHOLDS``, at those; needs ``MODEL.WEIGHTS``.

Box sizes are those the network sees: images resized by the config's test-time resize (or
train-time, ``--input-size train``). Inference-time center-ness ablations (Table 4) are config
switches instead: ``MODEL.FCOS.INFERENCE_QUALITY branch|none|from_regression|oracle`` with
``train_net.py --eval-only``.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.data import (  # noqa: E402
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.data.datasets.coco import convert_to_coco_dict  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from ..checkpoint import FCOSCheckpointer  # noqa: E402
from ..checks import ConfigError  # noqa: E402
from ..cli import run_command  # noqa: E402
from ..config import build_cfg  # noqa: E402
from ..data.builtin import register_datasets_from_config  # noqa: E402
from ..inference.oracle import build_annotated_test_loader  # noqa: E402
from ..inference.slicing import build_slicing_model  # noqa: E402
from ..modeling.postprocess import configured_class_thresholds  # noqa: E402
from ..modeling.targets import FCOSTargetAssigner  # noqa: E402
from .assignment import (  # noqa: E402
    RETINANET_RULES,
    fcos_assignment_stats,
    ground_truth_at_input_size,
    retinanet_assignment_stats,
)
from .detections import (  # noqa: E402
    class_agnostic_pr,
    coco_detections,
    low_quality_share,
    score_iou_before_nms,
)
from .thresholds import (  # noqa: E402
    choose_thresholds,
    config_line,
    match_detections,
    operating_point,
    summary,
)

# Detections per image while choosing thresholds: more than post-NMS ever keeps.
UNCAPPED = 1 << 20
COMMANDS = ("bpr", "ambiguity", "centerness", "pr-curves", "thresholds")
BPR_COLUMNS = (("bpr", "BPR %"),)
AMBIGUITY_COLUMNS = (
    ("ambiguous", "amb. %"),
    ("ambiguous_diff_class", "amb. diff %"),
    ("positives_per_image", "pos/img"),
    ("samples_per_image", "samples/img"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fcos_d2.analysis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--dataset", help="registered dataset (default: the first of DATASETS.TEST)"
    )
    parser.add_argument("--output", help="folder for the JSON and PNG files")
    parser.add_argument("--input-size", choices=("test", "train"), default="test")
    parser.add_argument("--max-images", type=int, default=0, help="use only the first N images")
    criterion = parser.add_mutually_exclusive_group()
    criterion.add_argument(
        "--criterion", choices=("f1",), default="f1", help="thresholds: best F1 per class"
    )
    criterion.add_argument(
        "--precision",
        type=float,
        metavar="P",
        help="thresholds: the lowest threshold per class whose precision is >= P",
    )
    parser.add_argument(
        "--global-threshold",
        type=float,
        default=0.5,
        metavar="T",
        help="thresholds: the one threshold to compare with, and the value of classes without a "
        "true positive (default 0.5, demo.py's --confidence-threshold)",
    )
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE ...")
    # Intermixed: config overrides may follow the command and the flags, as with train_net.py.
    return parser.parse_intermixed_args(argv)


def fcos_without_fpn(cfg) -> FCOSTargetAssigner:
    """FCOS on P4 alone (stride 16, no size ranges: every box is assigned on that level)."""
    single = cfg.clone()
    single.defrost()
    single.MODEL.FCOS.FPN_STRIDES = [16]
    single.MODEL.FCOS.SIZES_OF_INTEREST = []
    return FCOSTargetAssigner(single)


def run_assignment(command: str, cfg, records: list[dict], input_size: str) -> dict:
    if input_size == "test":
        min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    else:
        min_size, max_size = max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN
    images = ground_truth_at_input_size(records, min_size, max_size)
    results = {
        "FCOS (FPN)": fcos_assignment_stats(FCOSTargetAssigner(cfg), images).summary(),
        "FCOS (P4 only)": fcos_assignment_stats(fcos_without_fpn(cfg), images).summary(),
    }
    rules = RETINANET_RULES if command == "bpr" else ("all-low-quality",)
    for rule in rules:
        stats = retinanet_assignment_stats(images, rule).summary()
        # Anchors are not "inside" boxes: Table 2's ambiguity is defined for FCOS locations only.
        results[f"RetinaNet ({rule})"] = {
            k: v for k, v in stats.items() if not k.startswith("ambiguous")
        }
    columns = BPR_COLUMNS if command == "bpr" else AMBIGUITY_COLUMNS
    print(f"{'method':<30}" + "".join(f"{title:>14}" for _, title in columns))
    for method, values in results.items():
        print(
            f"{method:<30}"
            + "".join(f"{values.get(key, float('nan')):>14.2f}" for key, _ in columns)
        )
    return {"input_size": [min_size, max_size], "num_images": len(images), "results": results}


def load_model(cfg):
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("this command needs trained weights: add MODEL.WEIGHTS path/to/model.pth")
    model = build_model(cfg).eval()
    FCOSCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def run_centerness(cfg, dataset: str, max_images: int, output: Path) -> dict:
    model = load_model(cfg)
    pairs: dict[str, dict[str, list[float]]] = {
        "without_ctr": {"score": [], "iou": []},
        "with_ctr": {"score": [], "iou": []},
    }
    seen = 0
    with torch.no_grad():
        for inputs in build_annotated_test_loader(cfg, dataset):
            for name, values in score_iou_before_nms(model, inputs).items():
                pairs[name]["score"] += values["score"]
                pairs[name]["iou"] += values["iou"]
            seen += len(inputs)
            if max_images and seen >= max_images:
                break
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    summary = {}
    for axis, (name, title) in zip(
        axes, (("without_ctr", "without center-ness"), ("with_ctr", "with center-ness"))
    ):
        scores, ious = pairs[name]["score"], pairs[name]["iou"]
        axis.scatter(scores, ious, s=2, alpha=0.3)
        axis.plot([0, 1], [0, 1], "r--", linewidth=1)
        axis.set(title=title, xlabel="score", xlim=(0, 1), ylim=(0, 1))
        summary[name] = {
            "detections": len(scores),
            "low_quality_share_top10pct": low_quality_share(scores, ious),
        }
    axes[0].set_ylabel("IoU with the best-matching GT box")
    figure.tight_layout()
    figure.savefig(output / "centerness.png", dpi=120)
    plt.close(figure)
    for name, values in summary.items():
        print(
            f"{name:<12} detections {values['detections']:>7}   "
            f"IoU<0.5 among the top 10% by score: {100 * values['low_quality_share_top10pct']:.1f}%"
        )
    return {"num_images": seen, "summary": summary, "pairs": pairs}


def ground_truth_coco(dataset: str) -> COCO:
    """The dataset's annotations as a COCO api object: its json file, or (VOC and other
    non-COCO datasets) Detectron2's conversion of its records."""
    json_file = MetadataCatalog.get(dataset).get("json_file", None)
    if json_file:
        return COCO(json_file)
    coco = COCO()
    coco.dataset = convert_to_coco_dict(dataset)
    coco.createIndex()
    return coco


def run_pr_curves(cfg, dataset: str, max_images: int, output: Path) -> dict:
    model = load_model(cfg)
    detections, image_ids = coco_detections(
        model, build_detection_test_loader(cfg, dataset), max_images
    )
    coco_gt = ground_truth_coco(dataset)
    coco_gt.imgs = {i: coco_gt.imgs[i] for i in image_ids}
    curves = class_agnostic_pr(coco_gt, detections)
    figure, axis = plt.subplots(figsize=(5.5, 4.6))
    for iou, curve in curves.items():
        pairs = [(r, p) for r, p in zip(curve["recall"], curve["precision"]) if p > -1]
        axis.plot(
            [r for r, _ in pairs],
            [p for _, p in pairs],
            label=f"IoU {iou}: AP {100 * curve['ap']:.1f}",
        )
    axis.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title="class-agnostic precision-recall",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(output / "pr-curves.png", dpi=120)
    plt.close(figure)
    for iou, curve in curves.items():
        print(f"IoU {iou}: class-agnostic AP {100 * curve['ap']:.2f}")
    return curves


def check_fraction(flag: str, value, low_inclusive: bool) -> None:
    if value is not None and not ((0 <= value if low_inclusive else 0 < value) and value <= 1):
        raise ConfigError(f"{flag} must be in {'[' if low_inclusive else '('}0, 1], got {value}")


def detections_per_class(cfg, dataset: str, max_images: int) -> tuple[list[str], list, int]:
    """The dataset's class names, each class's detections matched to the ground truth (in class
    index order), and the number of images, with every detection the model gives before
    ``MODEL.FCOS.CLASS_THRESHOLDS`` and ``TEST.DETECTIONS_PER_IMAGE`` (sliced where
    ``TEST.SLICE.ENABLED``).

    Without the cap because the detector applies it after the class thresholds: what they remove
    leaves room for detections that a capped run would not show. So the figures are exact where
    fewer than ``TEST.DETECTIONS_PER_IMAGE`` detections per image pass the thresholds.
    """
    unfiltered = cfg.clone()
    unfiltered.defrost()
    unfiltered.MODEL.FCOS.CLASS_THRESHOLDS = ()
    unfiltered.MODEL.FCOS.POST_NMS_TOPK_TEST = 0
    unfiltered.TEST.DETECTIONS_PER_IMAGE = UNCAPPED
    model = build_slicing_model(unfiltered, load_model(unfiltered))
    loader = build_detection_test_loader(unfiltered, dataset)
    detections, image_ids = coco_detections(model, loader, max_images)
    metadata = MetadataCatalog.get(dataset)  # after the loader: loading sets the id mapping
    # COCO result dicts carry contiguous class indices: back to the dataset's category ids.
    to_dataset_id = {
        index: dataset_id
        for dataset_id, index in metadata.get("thing_dataset_id_to_contiguous_id", {}).items()
    }
    for detection in detections:
        index = detection["category_id"]
        detection["category_id"] = to_dataset_id.get(index, index)
    coco_gt = ground_truth_coco(dataset)
    coco_gt.imgs = {i: coco_gt.imgs[i] for i in image_ids}
    matched = match_detections(coco_gt, detections)
    classes = list(metadata.thing_classes)
    return classes, [matched[to_dataset_id.get(i, i)] for i in range(len(classes))], len(image_ids)


def run_thresholds(cfg, dataset: str, args: argparse.Namespace) -> dict:
    check_fraction("--precision", args.precision, low_inclusive=False)
    check_fraction("--global-threshold", args.global_threshold, low_inclusive=True)
    configured = list(configured_class_thresholds(cfg))
    classes, per_class, num_images = detections_per_class(cfg, dataset, args.max_images)
    chosen = choose_thresholds(
        dict(enumerate(per_class)), precision=args.precision, fallback=args.global_threshold
    )
    thresholds = [chosen[index]["threshold"] for index in range(len(classes))]
    settings = {
        "per-class (chosen here)": thresholds,
        f"global {args.global_threshold}": [args.global_threshold] * len(classes),
    }
    if configured:
        settings["MODEL.FCOS.CLASS_THRESHOLDS of the config"] = configured
    results = {}
    for setting, values in settings.items():
        points = [operating_point(d, t) for d, t in zip(per_class, values)]
        results[setting] = {
            "classes": {name: p.as_dict() for name, p in zip(classes, points)},
            "all": summary(points),
        }
    print_thresholds(classes, chosen, results)
    line = config_line(thresholds)
    print(line)
    return {
        "criterion": "f1" if args.precision is None else f"precision >= {args.precision}",
        "num_images": num_images,
        "thresholds": {name: chosen[index] for index, name in enumerate(classes)},
        "config_line": line,
        "settings": results,
    }


def print_thresholds(classes: list[str], chosen: dict[int, dict], results: dict) -> None:
    others = list(results)[1:]
    print(
        f"{'class':<14}{'support':>8}{'threshold':>10}{'precision':>10}{'recall':>8}{'F1':>7}"
        + "".join(f"   F1 at {name}" for name in others)
    )
    for index, name in enumerate(classes):
        point = chosen[index]
        print(
            f"{name:<14}{point['support']:>8}{point['threshold']:>10.4g}"
            f"{point['precision']:>10.3f}{point['recall']:>8.3f}{point['f1']:>7.3f}"
            + "".join(f"{results[o]['classes'][name]['f1']:>{len(o) + 9}.3f}" for o in others)
            + (f"   ({point['note']})" if point["note"] else "")
        )
    for setting, result in results.items():
        total = result["all"]
        print(
            f"all classes, {setting}: precision {total['precision']:.3f} recall "
            f"{total['recall']:.3f} F1 {total['f1']:.3f} (macro F1 {total['macro_f1']:.3f})"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if not dataset:
        raise ConfigError("no dataset: pass --dataset NAME or set DATASETS.TEST in the config")
    cfg.DATASETS.TEST = (dataset,)
    cfg.freeze()
    register_datasets_from_config(cfg)
    if dataset not in DatasetCatalog.list():
        raise ConfigError(
            f"dataset {dataset!r} is not registered (known: {sorted(DatasetCatalog.list())[:8]}...)"
        )
    output = Path(args.output or Path(cfg.OUTPUT_DIR) / "analysis")
    output.mkdir(parents=True, exist_ok=True)
    if args.command in ("bpr", "ambiguity"):
        records = DatasetCatalog.get(dataset)
        records = records[: args.max_images] if args.max_images else records
        result = run_assignment(args.command, cfg, records, args.input_size)
    elif args.command == "centerness":
        result = run_centerness(cfg, dataset, args.max_images, output)
    elif args.command == "thresholds":
        result = run_thresholds(cfg, dataset, args)
    else:
        result = run_pr_curves(cfg, dataset, args.max_images, output)
    target = output / f"{args.command}.json"
    target.write_text(json.dumps(result, indent=1))
    print(
        f"wrote {target}"
        + (f" and {target.with_suffix('.png')}" if args.command in COMMANDS[2:4] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_command("python -m fcos_d2.analysis", main))
