"""Per-class score thresholds: choosing them on hand-made detections, applying them in the
post-processor (also in a traced / exported graph), their config checks, and the command."""

import json

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from helpers import QUICKSTART, args_for, config_path, fresh_cfg, shrink, synthetic_image, tiny_opts
from pycocotools.coco import COCO

from fcos_d2.analysis.thresholds import (
    ClassDetections,
    best_f1_threshold,
    choose_thresholds,
    config_line,
    match_detections,
    operating_point,
    precision_threshold,
    short_threshold,
    summary,
)
from fcos_d2.checks import ConfigError
from fcos_d2.modeling.postprocess import FCOSPostProcessor

# Categories with the dataset's own (non-contiguous) ids: 3 "a", 7 "b", 9 "c", 11 "d".
GROUND_TRUTH = [
    # image, category, bbox (x, y, w, h), iscrowd
    (1, 3, [0, 0, 10, 10], 0),
    (1, 3, [20, 20, 10, 10], 0),
    (2, 3, [0, 0, 10, 10], 0),
    (1, 7, [50, 50, 10, 10], 0),
    (2, 7, [0, 0, 40, 40], 1),  # a crowd: detections inside it are neither right nor wrong
    (2, 9, [30, 30, 10, 10], 0),  # never detected
]
DETECTIONS = [
    # image, category, bbox, score (binary fractions: exact in float32 too)
    (1, 3, [0, 0, 10, 10], 0.875),  # true positive
    (1, 3, [1, 0, 10, 10], 0.75),  # IoU 0.82 with a box already matched: false positive
    (2, 3, [0, 0, 10, 10], 0.625),  # true positive
    (1, 3, [20, 20, 10, 10], 0.375),  # true positive
    (2, 3, [60, 60, 10, 10], 0.25),  # false positive
    (1, 7, [50, 50, 10, 10], 0.5),  # true positive
    (2, 7, [10, 10, 10, 10], 0.625),  # inside the crowd: ignored
    (2, 7, [80, 80, 5, 5], 0.125),  # false positive
    (1, 11, [5, 5, 10, 10], 0.5),  # a class without ground truth
]


def hand_made_coco() -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 100, "height": 100} for i in (1, 2)],
        "categories": [{"id": c, "name": n} for c, n in ((3, "a"), (7, "b"), (9, "c"), (11, "d"))],
        "annotations": [
            {
                "id": k + 1,
                "image_id": image,
                "category_id": category,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": crowd,
            }
            for k, (image, category, box, crowd) in enumerate(GROUND_TRUTH)
        ],
    }
    coco.createIndex()
    return coco


def hand_made_matches() -> dict:
    detections = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in DETECTIONS
    ]
    return match_detections(hand_made_coco(), detections)


def test_matching_is_cocos_greedy_by_score_at_iou_one_half():
    matched = hand_made_matches()
    a, b, c, d = (matched[k] for k in (3, 7, 9, 11))
    order = np.argsort(-a.scores)
    assert a.scores[order].tolist() == [0.875, 0.75, 0.625, 0.375, 0.25]
    assert a.matched[order].tolist() == [True, False, True, True, False]
    assert a.support == 3
    # The crowd's detection is left out; the crowd is not counted.
    assert sorted(zip(b.scores.tolist(), b.matched.tolist())) == [(0.125, False), (0.5, True)]
    assert b.support == 1
    assert (c.support, len(c.scores)) == (1, 0)
    assert (d.support, d.scores.tolist(), d.matched.tolist()) == (0, [0.5], [False])


def test_best_f1_and_precision_thresholds_hand_computed():
    a = hand_made_matches()[3]
    # Cuts (kept, TP): 0.875 (1, 1) F1 0.5; 0.75 (2, 1) 0.4; 0.625 (3, 2) 0.667;
    # 0.375 (4, 3) P 0.75 R 1 F1 0.857; 0.25 (5, 3) 0.75. Best: keep down to 0.375, i.e. any
    # threshold in (0.25, 0.375]: the shortest decimal is 0.3.
    assert best_f1_threshold(a) == 0.3
    point = operating_point(a, 0.3)
    assert (point.detections, point.true_positives, point.support) == (4, 3, 3)
    assert point.precision == 0.75 and point.recall == 1.0
    assert point.f1 == pytest.approx(6 / 7)
    # Precision >= 0.7 at the cuts 0.875 (1.0) and 0.375 (0.75): the lowest is 0.375.
    assert precision_threshold(a, 0.7) == (0.3, True)
    # >= 0.9 only at 0.875: a threshold in (0.75, 0.875].
    assert precision_threshold(a, 0.9) == (0.8, True)
    # A class whose precision never reaches the target: its best precision's threshold, flagged.
    b_like = ClassDetections(np.array([0.9, 0.8, 0.7]), np.array([False, True, True]), 2)
    assert precision_threshold(b_like, 0.95) == (0.7, False)  # 2/3 at 0.7 beats 1/2 at 0.8


def test_choose_thresholds_falls_back_where_no_true_positive():
    chosen = choose_thresholds(hand_made_matches(), fallback=0.45)
    assert {k: v["threshold"] for k, v in chosen.items()} == {3: 0.3, 7: 0.5, 9: 0.45, 11: 0.45}
    assert chosen[7]["f1"] == 1.0 and chosen[7]["note"] == ""
    assert chosen[9]["note"] == "no true positive at any threshold: the fallback 0.45"
    assert chosen[11]["note"].startswith("no ground truth in this dataset")
    strict = choose_thresholds(hand_made_matches(), precision=0.99)
    assert strict[3]["threshold"] == 0.8 and strict[3]["precision"] == 1.0
    # All classes at the global 0.5: a keeps 0.875, 0.75, 0.625 (2 TP); b keeps 0.5 (TP);
    # d keeps 0.5 (FP): 5 detections, 3 TP, 5 ground-truth boxes.
    matched = hand_made_matches()
    points = [operating_point(matched[k], 0.5) for k in (3, 7, 9, 11)]
    total = summary(points)
    assert total["precision"] == 3 / 5 and total["recall"] == 3 / 5
    # Macro F1 over the classes with ground truth: a 2/3, b 1, c 0.
    assert total["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_short_threshold_keeps_exactly_the_chosen_scores():
    assert short_threshold(0.375, 0.25) == 0.3
    assert short_threshold(0.5, 0.49) == 0.5
    assert short_threshold(0.4321, 0.432) == 0.4321
    low = np.float32(0.3)
    high = float(np.nextafter(low, np.float32(1)))  # the next float32: no decimal between?
    t = short_threshold(high, float(low))
    assert low < np.float32(t) <= high  # also in the model's float32 comparison


def test_config_line_round_trips_through_yacs():
    line = config_line([0.3, 0.5, 0.45])
    assert line == 'MODEL.FCOS.CLASS_THRESHOLDS "(0.3, 0.5, 0.45)"'
    cfg = fresh_cfg()
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    cfg.merge_from_list(["MODEL.FCOS.CLASS_THRESHOLDS", "(0.3, 0.5, 0.45)"])
    assert tuple(cfg.MODEL.FCOS.CLASS_THRESHOLDS) == (0.3, 0.5, 0.45)
    assert config_line([0.25]) == 'MODEL.FCOS.CLASS_THRESHOLDS "(0.25,)"'


def dense_outputs():
    """One level (stride 8) of four locations in a row, 8 px apart, each predicting an 8 px box of
    one class: scores sqrt(p) = 0.9 (class 0), 0.6 (class 0), 0.7 (class 1), 0.4 (class 2)."""
    locations = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0], [28.0, 4.0]])
    cls = torch.zeros(1, 4, 3)
    for loc, (c, p) in enumerate([(0, 0.81), (0, 0.36), (1, 0.49), (2, 0.16)]):
        cls[0, loc, c] = p
    ltrb = torch.full((1, 4, 4), 0.5)  # x 4 px each side at stride 8: no two boxes overlap
    return [locations], [cls], [ltrb], [torch.ones(1, 4)], [(8, 32)]


def test_class_thresholds_remove_exactly_the_detections_below_their_class():
    plain = FCOSPostProcessor(strides=[8], score_threshold=0.1)
    (all_detections,) = plain(*dense_outputs())
    assert all_detections.scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.4])
    per_class = plain.replace(class_thresholds=(0.65, 0.75, 0.3))
    (kept,) = per_class(*dense_outputs())
    # Class 0 keeps 0.9 (not 0.6), class 1 loses 0.7 (< 0.75), class 2 keeps 0.4.
    assert kept.scores.tolist() == pytest.approx([0.9, 0.4])
    assert kept.pred_classes.tolist() == [0, 2]
    assert kept.pred_boxes.tensor.tolist() == [[0.0, 0.0, 8.0, 8.0], [24.0, 0.0, 32.0, 8.0]]
    # The top-N cut comes after the thresholds: removed detections leave room for others.
    (top2,) = per_class.replace(class_thresholds=(0.95, 0.0, 0.0), post_nms_topk=2)(
        *dense_outputs()
    )
    assert top2.scores.tolist() == pytest.approx([0.7, 0.4])
    # Equal to the threshold is kept.
    (edge,) = plain.replace(class_thresholds=(0.9, 1.0, 1.0))(*dense_outputs())
    assert edge.scores.tolist() == pytest.approx([0.9])


def test_class_threshold_settings_are_checked(cfg):
    shrink(cfg, config_path("configs/FCOS-Detection/Base-FCOS.yaml"))  # 3 classes
    cfg.MODEL.FCOS.CLASS_THRESHOLDS = (0.5, 0.4)
    with pytest.raises(
        ConfigError,
        match="MODEL.FCOS.CLASS_THRESHOLDS has 2 values but MODEL.FCOS.NUM_CLASSES is 3",
    ):
        build_model(cfg)
    cfg.MODEL.FCOS.CLASS_THRESHOLDS = (0.5, 0.4, 1.5)
    with pytest.raises(ConfigError, match=r"CLASS_THRESHOLDS must be scores in \[0, 1\]"):
        build_model(cfg)
    cfg.MODEL.FCOS.CLASS_THRESHOLDS = (0.5, 0.4, 0.3)
    assert build_model(cfg).core.postprocessor.class_thresholds == (0.5, 0.4, 0.3)
    rcnn = shrink(fresh_cfg(), config_path("configs/FCOS-RPN/faster_rcnn_R_50_FPN_1x.yaml"))
    rcnn.MODEL.FCOS.CLASS_THRESHOLDS = (0.5, 0.4, 0.3)
    with pytest.raises(ConfigError, match="MODEL.ROI_HEADS.SCORE_THRESH_TEST"):
        build_model(rcnn)


def midpoint_thresholds(scores, classes, num_classes: int) -> tuple[float, ...]:
    """Per class, a threshold halfway between two of its scores near the median: some of its
    detections go, some stay, none sits at the threshold."""
    thresholds = []
    for c in range(num_classes):
        values = sorted(scores[classes == c].tolist())
        k = len(values) // 2
        thresholds.append((values[k - 1] + values[k]) / 2 if len(values) >= 2 else 0.0)
    return tuple(thresholds)


@pytest.mark.slow
def test_exported_graphs_honour_the_class_thresholds(tiny_cfg, tmp_path):
    """Traced and ONNX graphs of a detector with per-class thresholds give exactly the
    detections of the same graph without them that reach their class's threshold."""
    from fcos_d2.export import ExportableFCOS, export_model, load_exported

    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    # Untrained: keep every candidate, so that each class has many detections; no top-N cut
    # (thresholds leave room under it for detections that the plain graph cuts).
    plain = model.core.postprocessor.replace(score_threshold=0.0, post_nms_topk=100_000)
    model.core.postprocessor = plain
    image = synthetic_image(96, 128, boxes=[(10, 20, 60, 70)], classes=[1], seed=3)["image"]
    other_size = synthetic_image(80, 150, seed=4)["image"]
    with torch.no_grad():
        boxes, scores, classes = ExportableFCOS(model)(image)
    thresholds = midpoint_thresholds(scores, classes, 3)
    keep = scores >= torch.tensor(thresholds)[classes]
    assert 0 < keep.sum() < len(keep)
    with_thresholds = plain.replace(class_thresholds=thresholds)
    model.core.postprocessor = with_thresholds
    with torch.no_grad():
        eager = ExportableFCOS(model)(image)
    assert torch.equal(eager[0], boxes[keep]) and torch.equal(eager[1], scores[keep])
    for fmt in ("torchscript", "onnx"):
        runs = {}
        for name, postprocessor in (("plain", plain), ("thresholds", with_thresholds)):
            model.core.postprocessor = postprocessor
            run = load_exported(export_model(model, fmt, tmp_path / fmt / name, image))
            runs[name] = [run(image), run(other_size)]
        for (b, s, c), filtered in zip(runs["plain"], runs["thresholds"]):
            kept = s >= torch.tensor(thresholds)[c]
            assert 0 < kept.sum() < len(kept), fmt
            for expected, actual in zip((b, s, c), filtered):
                assert torch.equal(actual, expected[kept]), fmt


@pytest.mark.slow
def test_thresholds_command_and_the_detector_agree(tmp_path, capsys):
    """The command on a briefly trained detector; the detector built with the thresholds it
    prints gives, per class, as many detections as it reported."""
    from detectron2.data import build_detection_test_loader

    from fcos_d2.analysis.__main__ import main
    from fcos_d2.analysis.detections import coco_detections
    from fcos_d2.checkpoint import FCOSCheckpointer
    from fcos_d2.config import build_cfg
    from fcos_d2.data.builtin import register_datasets_from_config
    from fcos_d2.engine import main as train

    train_opts = {"DATASETS.TEST": "()", "SOLVER.OPTIMIZER": "ADAMW", "SOLVER.BASE_LR": 0.002}
    train(args_for(tiny_opts(tmp_path, 40, **{**train_opts, "SOLVER.CHECKPOINT_PERIOD": 1000})))
    weights = str(tmp_path / "out" / "model_final.pth")
    opts = tiny_opts(tmp_path, 40, **{"MODEL.WEIGHTS": weights})
    # On its training images, where 40 iterations already find some objects.
    command = ["thresholds", "--config-file", QUICKSTART, "--dataset", "shapes_train"]
    command += ["--max-images", "8", "--output", str(tmp_path / "analysis")]
    assert main([*command, *opts]) == 0
    result = json.loads((tmp_path / "analysis" / "thresholds.json").read_text())
    line = result["config_line"]
    assert line in capsys.readouterr().out
    chosen = result["settings"]["per-class (chosen here)"]["classes"]
    assert [v["threshold"] for v in result["thresholds"].values()] == [
        v["threshold"] for v in chosen.values()
    ]
    assert any(not v["note"] and v["true_positives"] for v in result["thresholds"].values())

    cfg = build_cfg(QUICKSTART, [*opts, "MODEL.FCOS.CLASS_THRESHOLDS", line.split('"')[1]])
    register_datasets_from_config(cfg)
    model = build_model(cfg).eval()
    FCOSCheckpointer(model).load(weights)
    detections, _ = coco_detections(model, build_detection_test_loader(cfg, "shapes_train"), 8)
    counts = np.bincount([d["category_id"] for d in detections], minlength=5)
    assert counts.tolist() == [v["detections"] for v in chosen.values()]
    assert counts.sum() > 0
    with pytest.raises(ConfigError, match=r"--precision must be in \(0, 1\]"):
        main([*command, "--precision", "1.5", *opts])


def test_demo_draws_what_the_class_thresholds_keep(tmp_path, capsys):
    """demo.py with MODEL.FCOS.CLASS_THRESHOLDS draws the predictor's detections as they are: its
    --confidence-threshold (0.5, above every score of this untrained model) no longer applies."""
    import cv2
    from helpers import load_script

    from fcos_d2.config import build_cfg
    from fcos_d2.inference import FCOSPredictor

    opts = tiny_opts(tmp_path, 1, **{"MODEL.FCOS.INFERENCE_TH_TEST": 0.0})
    cfg = build_cfg(QUICKSTART, opts)
    torch.manual_seed(0)
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "image.png"), image)
    thresholds = "(0.06, 0.07, 0.06, 0.07, 0.06)"
    opts += ["MODEL.WEIGHTS", str(weights), "MODEL.FCOS.CLASS_THRESHOLDS", thresholds]
    expected = FCOSPredictor(build_cfg(QUICKSTART, opts))(image)["instances"]
    assert 0 < len(expected) < 100 and expected.scores.max() < 0.5
    demo = load_script("demo.py")
    command = ["--config-file", QUICKSTART, "--input", str(tmp_path / "image.png")]
    assert demo.main([*command, "--output", str(tmp_path / "vis"), *opts]) == 0
    assert f"image.png: {len(expected)} detections" in capsys.readouterr().out
    # Without them, the confidence threshold still applies.
    assert demo.main([*command, "--output", str(tmp_path / "vis"), *opts[:-2]]) == 0
    assert "image.png: 0 detections" in capsys.readouterr().out
