"""Export of the whole detector / proposal network (ONNX and TorchScript) and its verification."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import REPO, config_path, overfit, shrink, synthetic_image

from fcos_d2.export import (
    ExportableFCOS,
    FCOSGraph,
    export_model,
    exported_file,
    load_exported,
    pad_batch,
    read_metadata,
)
from fcos_d2.export.__main__ import main, parse_args
from fcos_d2.export.metadata import export_metadata
from fcos_d2.export.verify import (
    FLOAT32,
    INT8,
    Comparison,
    batches,
    compare,
    images_at_verify_sizes,
    verify_sizes,
)

# 128 x 160: not square, and the verify sizes 97 x 120 and 166 x 208 are not multiples of 32.
HEIGHT, WIDTH = 128, 160
GT_BOXES = [[10, 15, 50, 60], [60, 30, 140, 110], [100, 70, 150, 120]]
DETECTOR = "configs/FCOS-Detection/R_50_1x.yaml"
PROPOSALS = "configs/FCOS-RPN/rpn_R_50_FPN_1x.yaml"
# name: (config, overrides); every head normalisation, and the proposal network.
VARIANTS = {
    "GN": (DETECTOR, {}),
    "BN": (DETECTOR, {"MODEL.FCOS.NORM": "BN"}),
    "no-norm": (DETECTOR, {"MODEL.FCOS.NORM": ""}),
    "proposals": (PROPOSALS, {}),
}
TRAIN_ITERATIONS = 20


def variant_cfg(variant: str):
    """The shrunk config of ``variant``, with test size HEIGHT x WIDTH."""
    from detectron2.config import get_cfg

    from fcos_d2 import add_fcos_config

    config, overrides = VARIANTS[variant]
    cfg = shrink(add_fcos_config(get_cfg()), config_path(config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = HEIGHT, WIDTH
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """The training image as a PNG, channels in INPUT.FORMAT (BGR) order, and its input dict."""
    inputs = synthetic_image(HEIGHT, WIDTH, GT_BOXES, [0, 1, 2])
    inputs["image"] = inputs["image"].round()  # what the PNG file holds
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    cv2.imwrite(str(path), inputs["image"].permute(1, 2, 0).numpy().astype("uint8"))
    return path, inputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_file):
    """Per variant, built on first use: (cfg, model, config file, weights file)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            from detectron2.modeling import build_model

            cfg = variant_cfg(variant)
            torch.manual_seed(0)
            model = build_model(cfg)
            overfit(model, [image_file[1]], TRAIN_ITERATIONS)  # real, spread-out scores
            folder = tmp_path_factory.mktemp(variant)
            config_file = folder / "config.yaml"
            config_file.write_text(cfg.dump())
            weights = folder / "model.pth"
            torch.save({"model": model.state_dict()}, weights)
            cache[variant] = cfg, model, config_file, weights
        return cache[variant]

    return get


def test_verify_sizes_keep_the_test_size_and_avoid_multiples_of_32():
    assert verify_sizes(HEIGHT, WIDTH) == [(128, 160), (97, 120), (166, 208)]
    # 0.75 x 256 = 192 = 6 x 32 -> 193; 1.3 x 320 = 416 = 13 x 32 -> 417.
    assert verify_sizes(256, 320) == [(256, 320), (193, 240), (333, 417)]


def test_compare_counts_matches_by_class_iou_and_score():
    boxes = torch.tensor([[0.0, 0, 100, 100], [50, 50, 80, 90], [10, 10, 20, 20]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    classes = torch.tensor([0, 1, 2])
    same = compare((boxes, scores, classes), (boxes.clone(), scores.clone(), classes.clone()))
    assert same == Comparison(3, 3, 3, 0.0, 0.0)

    moved = boxes.clone()
    moved[0] += torch.tensor([0.5, 0, 0.5, 0])  # IoU 99.5 / 100.5 = 0.990: still a match
    moved[1, 2] += 1.0  # IoU 30 / 31 = 0.968: no match
    rescored = scores + torch.tensor([5e-4, 0, 2e-3])  # the third is 2e-3 off: no match
    result = compare((boxes, scores, classes), (moved, rescored, classes))
    assert (result.reference, result.exported, result.matched) == (3, 3, 1)
    assert result.worst_box_diff == 0.5
    assert result.worst_score_diff == pytest.approx(5e-4, abs=1e-7)

    relabelled = compare((boxes, scores, classes), (boxes, scores, torch.tensor([0, 2, 1])))
    assert relabelled.matched == 1
    # One extra exported detection: 3 of max(3, 4) match.
    extra = compare(
        (boxes, scores, classes),
        (torch.cat([boxes, boxes[:1]]), torch.cat([scores, scores[:1]]), torch.arange(4) % 3),
    )
    assert (extra.matched, extra.total) == (3, 4)


def test_cli_puts_overrides_after_the_images_into_opts(image_file):
    args = parse_args(
        ["--config-file", "c.yaml", "--format", "onnx", "--output", "out", "--verify"]
        + [str(image_file[0]), "MODEL.WEIGHTS", "w.pth", "MODEL.FCOS.NORM", "BN"]
    )
    assert args.verify == [str(image_file[0])]
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "MODEL.FCOS.NORM", "BN"]
    with pytest.raises(SystemExit):
        parse_args(["--config-file", "c", "--format", "onnx", "--output", "o", "--verify", "x.png"])


def test_only_fcos_models_are_exportable(cfg):
    from detectron2.modeling import build_model

    shrink(cfg, config_path("configs/FCOS-RPN/faster_rcnn_R_50_FPN_1x.yaml"))
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE must be the FCOS detector"):
        ExportableFCOS(build_model(cfg))


def test_deformable_heads_are_refused_for_onnx(tmp_path):
    from detectron2.modeling import build_model

    cfg = variant_cfg("GN")
    cfg.MODEL.FCOS.USE_DEFORMABLE = True
    with pytest.raises(ValueError, match="--format must be torchscript for deformable conv"):
        export_model(build_model(cfg), "onnx", tmp_path, torch.zeros(3, 64, 64))
    assert not any(tmp_path.iterdir())


def test_verify_images_are_read_and_resized_like_detectron2(image_file):
    images = images_at_verify_sizes(image_file[0], variant_cfg("GN"))
    assert [tuple(x.shape) for x in images] == [(3, 128, 160), (3, 97, 120), (3, 166, 208)]
    assert images[0].dtype == torch.float32
    assert torch.equal(images[0], image_file[1]["image"])  # test size = file size: unchanged


def run_cli(argv: list, capsys) -> tuple[int, str]:
    """``python -m fcos_d2.export`` in this process: its exit code and what it printed."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def matched_and_total(output: str) -> tuple[int, int]:
    """From the summary line ``verify: M/T detections matched ...``."""
    summary = [line for line in output.splitlines() if line.startswith("verify: ")][-1]
    matched, total = summary.split()[1].split("/")
    return int(matched), int(total)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_file_matches_pytorch_at_three_sizes(
    variant, fmt, trained, image_file, tmp_path, capsys
):
    _, _, config_file, weights = trained(variant)
    rc, output = run_cli(
        ["--config-file", config_file, "--format", fmt, "--output", tmp_path]
        + ["--verify", image_file[0], "MODEL.WEIGHTS", weights],
        capsys,
    )
    assert rc == 0, output
    assert "PASS" in output
    # Real detections at each of the three sizes (not a vacuous comparison), all matched.
    matched, total = matched_and_total(output)
    assert matched == total >= 3 * 5, output

    # What a user of the file needs to draw and to resize, stored in it (numbered classes: the
    # shrunk config has 3 classes, its COCO datasets 80).
    assert read_metadata(next(tmp_path.glob("model.*"))) == {
        "class_names": '["0", "1", "2"]',
        "input_format": "BGR",
        "min_size_test": str(HEIGHT),
        "max_size_test": str(WIDTH),
        "meta_architecture": "ProposalNetwork" if variant == "proposals" else "FCOS",
    }

    # The file at a size it was not traced at: output types, and boxes clipped to the image.
    boxes, scores, classes = load_exported(next(tmp_path.glob("model.*")))(
        torch.rand(3, 97, 120) * 255
    )
    assert boxes.dtype == scores.dtype == torch.float32 and classes.dtype == torch.int64
    assert boxes.shape == (len(scores), 4) and classes.shape == scores.shape
    assert (boxes >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 97).all()
    if variant == "proposals":
        assert (classes == 0).all()
        assert len(scores) > 100  # RPN selection: no score threshold


def test_metadata_names_the_classes_of_the_test_or_training_dataset(tmp_path, caplog):
    cfg = variant_cfg("GN")  # 3 classes
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    categories = [{"id": 7, "name": "gull"}, {"id": 3, "name": "heron"}, {"id": 5, "name": "ibis"}]
    images = [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}]
    coco = {"images": images, "annotations": [], "categories": categories}
    (tmp_path / "birds.json").write_text(json.dumps(coco))
    cfg.DATASETS.COCO_JSON = (("export_birds", str(tmp_path / "birds.json"), str(tmp_path)),)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("export_birds",), ()
    # Detectron2's contiguous classes: categories in increasing id.
    assert json.loads(export_metadata(cfg)["class_names"]) == ["heron", "ibis", "gull"]
    # A dataset that cannot be read here (a deployment machine) does not stop the export.
    cfg.DATASETS.COCO_JSON = (("export_absent", str(tmp_path / "absent.json"), str(tmp_path)),)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ("export_absent",)
    with caplog.at_level(logging.WARNING, logger="fcos_d2.export.metadata"):
        names = json.loads(export_metadata(cfg)["class_names"])
    assert names == ["0", "1", "2"]
    assert "could not be read" in caplog.text and "absent.json" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_nothing_of_the_traced_example_is_baked_in(fmt, trained, image_file, tmp_path):
    """Traced on a NaN image (no candidate survives the threshold: every count is 0), the file
    still detects what the model detects; and it returns empty outputs when nothing passes."""
    cfg, model, _, _ = trained("GN")
    nan_image = torch.full((3, 64, 96), float("nan"))
    with torch.no_grad():
        assert len(ExportableFCOS(model)(nan_image)[0]) == 0
    run = load_exported(export_model(model, fmt, tmp_path, nan_image))
    reference = ExportableFCOS(model)
    for image in images_at_verify_sizes(image_file[0], cfg):
        with torch.no_grad():
            result = compare(reference(image), run(image))
        assert result.matched == result.total >= 5
    boxes, scores, classes = run(torch.full((3, 50, 70), float("nan")))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)


@pytest.mark.slow
def test_verify_fails_when_the_weights_differ(trained, image_file, tmp_path, capsys):
    cfg, model, config_file, weights = trained("GN")
    argv = ["--config-file", config_file, "--format", "onnx", "--output", tmp_path]
    assert run_cli([*argv, "MODEL.WEIGHTS", weights], capsys)[0] == 0  # export only
    # The same network with a shifted center-ness bias: the same boxes, other scores.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.ctrness.bias"] += 0.5
    other = tmp_path / "other.pth"
    torch.save({"model": state}, other)
    verify_only = [*argv, "--verify-only", "--verify", image_file[0]]
    rc, output = run_cli([*verify_only, "MODEL.WEIGHTS", other], capsys)
    assert rc == 1 and "FAIL" in output, output
    matched, total = matched_and_total(output)
    assert total > 0 and matched / total < 0.5
    # The real process exits non-zero as well; and 0 with the weights the file was made from.
    command = [sys.executable, "-m", "fcos_d2.export", *map(str, verify_only)]
    assert subprocess.run([*command, "MODEL.WEIGHTS", str(other)], cwd=REPO).returncode == 1
    rc, output = run_cli([*verify_only, "MODEL.WEIGHTS", weights], capsys)
    assert rc == 0 and matched_and_total(output)[0] == matched_and_total(output)[1] > 0


def test_int8_options_are_checked(capsys):
    base = ["--config-file", "c.yaml", "--output", "out", "--quantize", "int8"]
    with pytest.raises(SystemExit):  # onnxruntime's quantization: ONNX only
        parse_args([*base, "--format", "torchscript", "--calibrate-dataset", "d"])
    with pytest.raises(SystemExit):  # calibration images are needed
        parse_args([*base, "--format", "onnx"])
    assert "--calibrate-dataset" in capsys.readouterr().err
    args = parse_args([*base, "--format", "onnx", "--calibrate-dataset", "d"])
    assert (args.quantize, args.calibrate_images) == ("int8", 64)


def test_int8_comparison_counts_only_confident_detections():
    boxes = torch.tensor([[0.0, 0, 100, 100], [50, 50, 80, 90], [10, 10, 20, 20]])
    scores = torch.tensor([0.9, 0.5, 0.1])
    classes = torch.tensor([0, 1, 2])
    # int8 noise: boxes 2 px off (IoU 0.92), scores 0.03 off, and the weak one gone.
    moved = boxes[:2] + torch.tensor([2.0, 0, 2, 0])
    result = compare((boxes, scores, classes), (moved, scores[:2] - 0.03, classes[:2]), INT8)
    assert (result.reference, result.exported, result.matched) == (2, 2, 2)
    # The float32 criterion fails the same pair of files.
    assert compare((boxes, scores, classes), (moved, scores[:2] - 0.03, classes[:2])).matched == 0
    assert FLOAT32.min_score == 0  # float32 files are checked on every detection


def test_batches_cover_every_image_with_full_batches():
    images = list(range(5))
    assert batches(images, 1) == [[0], [1], [2], [3], [4]]
    assert batches(images, 2) == [[0, 1], [2, 3], [4, 0]]
    assert batches(images, 4) == [[0, 1, 2, 3], [4, 0, 1, 2]]


def split_by_image(outputs, count: int) -> list:
    boxes, scores, classes, batch_index = outputs
    assert batch_index.tolist() == sorted(batch_index.tolist())  # grouped by image, in order
    return [
        (boxes[batch_index == i], scores[batch_index == i], classes[batch_index == i])
        for i in range(count)
    ]


def test_batched_graph_detects_what_the_model_detects(trained, image_file):
    """The graph that --batched traces, run eagerly: a batch of same-size images gives each
    image's own detections, and a batch of mixed sizes gives what the model gives for it."""
    cfg, model, _, _ = trained("GN")
    graph = FCOSGraph(model, batched=True)
    same_size = [image_file[1]["image"]] + [
        synthetic_image(HEIGHT, WIDTH, GT_BOXES, [0, 1, 2], seed=s)["image"] for s in (1, 2)
    ]
    mixed = images_at_verify_sizes(image_file[0], cfg)  # 128x160, 97x120, 166x208
    with torch.no_grad():
        per_image = [ExportableFCOS(model)(x) for x in same_size]
        for reference, mine in zip(per_image, split_by_image(graph(*pad_batch(same_size)), 3)):
            result = compare(reference, mine)
            assert result.matched == result.total >= 3
        references = ExportableFCOS(model).batch(mixed)
        for reference, mine in zip(references, split_by_image(graph(*pad_batch(mixed)), 3)):
            result = compare(reference, mine)
            assert result.matched == result.total >= 3
        # Single-image graph (what --format onnx traces without --batched) = the model.
        result = compare(per_image[0], FCOSGraph(model)(same_size[0]))
        assert result.matched == result.total and result.worst_box_diff < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_batched_file_matches_pytorch_at_batch_1_2_and_4(
    fmt, trained, image_file, tmp_path, capsys
):
    _, _, config_file, weights = trained("GN")
    argv = ["--config-file", config_file, "--format", fmt, "--output", tmp_path]
    rc, output = run_cli(
        [*argv, "--batched", "--verify", image_file[0], "MODEL.WEIGHTS", weights], capsys
    )
    assert rc == 0 and "PASS" in output, output
    for size in (1, 2, 4):
        assert f"  batch of {size} (" in output
    matched, total = matched_and_total(output)
    assert matched == total >= 3 * 3 * 5, output  # each image at 3 sizes, in 3 batch sizes
    # The batched file on a batch of three same-size images gives what the single-image file
    # gives on each.
    assert run_cli([*argv, "MODEL.WEIGHTS", weights], capsys)[0] == 0
    single = load_exported(exported_file(tmp_path, fmt))
    batched = load_exported(exported_file(tmp_path, fmt, batched=True))
    images = [image_file[1]["image"]] + [
        synthetic_image(HEIGHT, WIDTH, GT_BOXES, [0, 1, 2], seed=s)["image"] for s in (1, 2)
    ]
    outputs = batched(*pad_batch(images))
    assert outputs[3].dtype == torch.int64
    for image, mine in zip(images, split_by_image(outputs, 3)):
        result = compare(single(image), mine)
        assert result.matched == result.total >= 3


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Four images of the training boxes (seeds 0-3) as a COCO json, for DATASETS.COCO_JSON."""
    import json

    folder = tmp_path_factory.mktemp("tiny_dataset")
    images, annotations = [], []
    for seed in range(4):
        image = synthetic_image(HEIGHT, WIDTH, GT_BOXES, [0, 1, 2], seed=seed)["image"].round()
        name = f"{seed}.png"
        cv2.imwrite(str(folder / name), image.permute(1, 2, 0).numpy().astype("uint8"))
        images.append({"id": seed + 1, "file_name": name, "height": HEIGHT, "width": WIDTH})
        for label, (x0, y0, x1, y1) in enumerate(GT_BOXES):
            box = [x0, y0, x1 - x0, y1 - y0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": seed + 1,
                    "category_id": label + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": f"class{i}"} for i in range(3)]
    json_file = folder / "tiny.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    entry = f"(('export_tiny', '{json_file}', '{folder}'),)"
    return "export_tiny", ["DATASETS.COCO_JSON", entry, "DATALOADER.NUM_WORKERS", "0"], folder


def best_of_each_class(detections, count: int) -> list:
    boxes, scores, classes = detections
    best = []
    for label in range(count):
        mine = classes == label
        assert mine.any(), f"no detection of class {label}"
        best.append(boxes[mine][scores[mine].argmax()])
    return best


@pytest.mark.slow
def test_int8_file_keeps_the_detections_in_place(
    trained, image_file, tiny_dataset, tmp_path, capsys
):
    """--quantize int8 on a model trained on three boxes: the int8 file finds the same boxes as
    the model, at its own verify criterion, and the COCO evaluation of the float32 file is the
    model's."""
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset
    from detectron2.structures import Boxes, pairwise_iou

    from fcos_d2.evaluation import FasterCOCOEvaluator
    from fcos_d2.export.evaluate import evaluate_exported

    cfg, model, config_file, weights = trained("GN")
    name, dataset_opts, _ = tiny_dataset
    argv = ["--config-file", config_file, "--format", "onnx", "--output", tmp_path]
    argv += ["--quantize", "int8", "--calibrate-dataset", name, "--calibrate-images", 4]
    argv += ["--verify", image_file[0], "--evaluate-dataset", name]
    rc, output = run_cli([*argv, "MODEL.WEIGHTS", weights, *dataset_opts], capsys)
    assert rc == 0, output
    assert "calibrated on 4 images of export_tiny" in output
    summaries = [line for line in output.splitlines() if line.startswith("verify: ")]
    assert len(summaries) == 2 and all("PASS" in line for line in summaries), output
    assert "scoring >= 0.3" in summaries[1]  # the int8 criterion
    int8 = load_exported(exported_file(tmp_path, "onnx", int8=True))
    with torch.no_grad():
        reference = ExportableFCOS(model)(image_file[1]["image"])
    mine = int8(image_file[1]["image"])
    result = compare(reference, mine, INT8)
    assert result.matched == result.total >= 3
    # The best int8 detection of each class is on its box, where the model's best one is.
    gt = Boxes(torch.tensor(GT_BOXES, dtype=torch.float32))
    for label, (ours, theirs) in enumerate(
        zip(best_of_each_class(mine, 3), best_of_each_class(reference, 3))
    ):
        assert pairwise_iou(gt[label], Boxes(ours[None]))[0, 0] >= 0.7
        assert pairwise_iou(Boxes(theirs[None]), Boxes(ours[None]))[0, 0] >= 0.9
    # Both files evaluated; the float32 file scores what the model scores on the same loader.
    lines = [line for line in output.splitlines() if " on export_tiny: AP " in line]
    assert [Path(line.split()[0]).name for line in lines] == ["model.onnx", "model_int8.onnx"]
    cfg = cfg.clone()
    cfg.merge_from_list(dataset_opts)
    exported, _ = evaluate_exported(exported_file(tmp_path, "onnx"), cfg, name)
    pytorch = inference_on_dataset(
        model, build_detection_test_loader(cfg, name), FasterCOCOEvaluator(name)
    )
    assert exported["bbox"]["AP"] == pytest.approx(pytorch["bbox"]["AP"], abs=0.01)
    assert pytorch["bbox"]["AP50"] > 50
