"""The paper's analyses as tools: known answers on crafted annotations and detections."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import REPO, args_for, config_path, tiny_opts
from pycocotools.coco import COCO

from fcos_d2.analysis.assignment import (
    GroundTruth,
    fcos_assignment_stats,
    feature_sizes,
    ground_truth_at_input_size,
    retinanet_assignment_stats,
)
from fcos_d2.analysis.detections import class_agnostic_pr, low_quality_share
from fcos_d2.engine import main
from fcos_d2.modeling.targets import FCOSTargetAssigner


def _gt(boxes, classes, size=(64, 64)):
    return GroundTruth(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(classes), size
    )


def _assigner(strides, sizes, radius=0.0):
    return FCOSTargetAssigner(
        strides=strides, sizes_of_interest=sizes, num_classes=10, center_sampling_radius=radius
    )


def test_feature_sizes_follow_padding_and_ceil_halving():
    assert feature_sizes((800, 1216), (8, 16, 32, 64, 128)) == [
        (100, 152),
        (50, 76),
        (25, 38),
        (13, 19),
        (7, 10),
    ]
    assert feature_sizes((250, 250), (16,)) == [(16, 16)]  # padded to 256


def test_bpr_small_box_needs_fpn():
    # A 6x6 box at (1, 1): no stride-16 location (8, 24, ...) lies strictly inside it, but the
    # stride-8 location (4, 4) does. A 40x40 box is recallable either way.
    images = [_gt([[1, 1, 7, 7], [20, 20, 60, 60]], [0, 1])]
    with_fpn = fcos_assignment_stats(_assigner((8, 16), [32], radius=1.5), images).summary()
    p4_only = fcos_assignment_stats(_assigner((16,), []), images).summary()
    assert with_fpn["bpr"] == 100.0
    assert p4_only["bpr"] == 50.0


def test_images_without_boxes_count_as_samples_only():
    empty = _gt([], [])
    stats = fcos_assignment_stats(_assigner((8, 16), [32]), [empty, _gt([[20, 20, 60, 60]], [1])])
    assert stats.images == 2 and stats.samples == 2 * 80 and stats.num_boxes == 1
    assert stats.summary()["bpr"] == 100.0
    retina = retinanet_assignment_stats([_gt([], [], (256, 256))], "all-low-quality").summary()
    assert retina["num_boxes"] == 0 and retina["samples_per_image"] == 9 * 1364


def test_ambiguity_hand_counted():
    # The boxes of tests/test_targets.py without center sampling: 28 positive locations, of
    # which (28, 28), (28, 36) on P3 and (24, 40) on P4 lie in both boxes.
    a, b = [4, 4, 36, 44], [12, 8, 60, 60]
    different = fcos_assignment_stats(_assigner((8, 16), [32]), [_gt([a, b], [2, 5])]).summary()
    assert different["positives_per_image"] == 28
    assert different["samples_per_image"] == 64 + 16
    assert different["ambiguous"] == pytest.approx(100 * 3 / 28)
    assert different["ambiguous_diff_class"] == pytest.approx(100 * 3 / 28)
    same = fcos_assignment_stats(_assigner((8, 16), [32]), [_gt([a, b], [2, 2])]).summary()
    assert same["ambiguous"] == pytest.approx(100 * 3 / 28)
    assert same["ambiguous_diff_class"] == 0.0


def test_retinanet_matching_rules_on_crafted_boxes():
    # In a 256x256 image (anchor centers on multiples of the stride, smallest anchors 32^2):
    # C = [112, 112, 144, 144] equals the 32x32 anchor at (128, 128): IoU 1, recalled by all rules.
    # A = [5, 5, 27, 27] (22x22 around (16, 16)): best IoU 484 / 1024 = 0.47, only with the
    #     low-quality rules. B = [100, 100, 108, 108] (8x8): best IoU <= 64 / 1024, only "all".
    images = [
        _gt([[5, 5, 27, 27], [100, 100, 108, 108], [112, 112, 144, 144]], [0, 0, 0], (256, 256))
    ]
    bpr = {
        rule: retinanet_assignment_stats(images, rule).summary()["bpr"]
        for rule in ("iou>=0.5", "low-quality>=0.4", "all-low-quality")
    }
    assert bpr == pytest.approx(
        {"iou>=0.5": 100 / 3, "low-quality>=0.4": 200 / 3, "all-low-quality": 100.0}
    )
    # 9 anchors per location on P3-P7 of a 256x256 input: 9 * (32^2 + 16^2 + 8^2 + 4^2 + 2^2).
    assert retinanet_assignment_stats(images, "iou>=0.5").summary()["samples_per_image"] == 9 * 1364
    with pytest.raises(ValueError, match="RetinaNet matching rule must be one of"):
        retinanet_assignment_stats(images, "iou>=0.3")


def test_ground_truth_is_resized_like_the_network_input():
    from detectron2.structures import BoxMode

    record = {
        "height": 100,
        "width": 200,
        "annotations": [
            {"bbox": [10, 20, 30, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3},
            {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 1},
        ],
    }
    (gt,) = ground_truth_at_input_size([record], 200, 1000)  # scale x2
    assert gt.image_size == (200, 400)
    assert gt.boxes.tolist() == [[20.0, 40.0, 80.0, 120.0]]
    assert gt.classes.tolist() == [3]


def _coco(tmp_path, boxes):
    data = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1 + i % 2,
                "bbox": b,
                "area": b[2] * b[3],
                "iscrowd": 0,
            }
            for i, b in enumerate(boxes)
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return COCO(str(path))


GT_XYWH = [[5, 5, 20, 20], [40, 10, 30, 20], [10, 50, 25, 40], [60, 60, 30, 30]]


def test_pr_curves_perfect_detections_give_ap_one(tmp_path):
    coco = _coco(tmp_path, GT_XYWH)
    # Class-agnostic: the detections' categories are deliberately all wrong.
    dets = [
        {"image_id": 1, "category_id": 2 - i % 2, "bbox": b, "score": 0.9 - 0.1 * i}
        for i, b in enumerate(GT_XYWH)
    ]
    curves = class_agnostic_pr(coco, dets)
    assert set(curves) == {"0.50", "0.75", "0.90"}
    for curve in curves.values():
        assert curve["ap"] == pytest.approx(1.0)


def test_pr_curves_exact_precision_with_false_positives(tmp_path):
    coco = _coco(tmp_path, GT_XYWH)
    true = [
        {"image_id": 1, "category_id": 1, "bbox": b, "score": 0.8 - 0.1 * i}
        for i, b in enumerate(GT_XYWH)
    ]
    # Two confident false positives far from any box: precision at the k-th hit is k / (k + 2),
    # so the interpolated precision is 4/6 at every recall level and AP = 4/6.
    false = [
        {"image_id": 1, "category_id": 1, "bbox": [80, 0, 5, 5], "score": 0.99},
        {"image_id": 1, "category_id": 1, "bbox": [0, 90, 5, 5], "score": 0.95},
    ]
    curves = class_agnostic_pr(coco, true + false)
    for curve in curves.values():
        assert curve["ap"] == pytest.approx(4 / 6)
        assert curve["precision"][-1] == pytest.approx(4 / 6)
    # A box shifted to IoU 0.8 with its GT counts at 0.50 and 0.75 but not at 0.90.
    shifted = [dict(true[0], bbox=[5 + 20 / 9, 5, 20, 20])] + true[1:]  # IoU = 17.78/22.22 = 0.8
    curves = class_agnostic_pr(coco, shifted)
    assert curves["0.75"]["ap"] == pytest.approx(1.0)
    assert curves["0.90"]["ap"] < 1.0


def test_low_quality_share():
    assert low_quality_share([0.9, 0.8, 0.1, 0.05], [0.3, 0.9, 0.95, 0.2], top_fraction=0.5) == 0.5
    assert math.isnan(low_quality_share([], []))


@pytest.mark.slow
def test_oracle_centerness_beats_no_quality_and_cli_runs(tmp_path):
    opts = tiny_opts(
        tmp_path,
        max_iter=40,
        **{
            "SOLVER.CHECKPOINT_PERIOD": 1000,
            "DATASETS.TEST": "()",
            "SOLVER.OPTIMIZER": "ADAMW",
            "SOLVER.BASE_LR": 0.002,
        },
    )
    main(args_for(opts))
    weights = str(tmp_path / "out" / "model_final.pth")
    ap = {}
    for quality in ("none", "oracle", "from_regression", "branch"):
        eval_opts = tiny_opts(
            tmp_path,
            40,
            **{
                "MODEL.WEIGHTS": weights,
                "DATASETS.TEST": "('shapes_train',)",
                "MODEL.FCOS.INFERENCE_QUALITY": quality,
            },
        )
        ap[quality] = main(args_for(eval_opts, eval_only=True))["bbox"]["AP"]
    assert ap["oracle"] > ap["none"], ap

    base = [sys.executable, "-m", "fcos_d2.analysis"]
    common = [
        "--config-file",
        config_path("configs/quickstart/FCOS_R_18_shapes.yaml"),
        "--dataset",
        "shapes_train",
        "--output",
        str(tmp_path / "analysis"),
        "--max-images",
        "4",
    ]
    for command in ("bpr", "ambiguity", "centerness", "pr-curves"):
        done = subprocess.run(
            base + [command] + common + tiny_opts(tmp_path, 40, **{"MODEL.WEIGHTS": weights}),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "analysis" / f"{command}.json").exists()
    assert (
        "RetinaNet (low-quality>=0.4)"
        in json.loads((tmp_path / "analysis" / "bpr.json").read_text())["results"]
    )
    assert (tmp_path / "analysis" / "centerness.png").exists()
    assert (tmp_path / "analysis" / "pr-curves.png").exists()


def test_coco_detections_keeps_images_without_detections():
    from detectron2.structures import Boxes, Instances

    from fcos_d2.analysis.detections import coco_detections

    def model(inputs):
        outputs = []
        for record in inputs:
            n = 1 if record["image_id"] == 1 else 0
            outputs.append(
                {
                    "instances": Instances(
                        (10, 10),
                        pred_boxes=Boxes(torch.ones(n, 4) * torch.tensor([1, 1, 5, 5])),
                        scores=torch.ones(n),
                        pred_classes=torch.zeros(n, dtype=torch.long),
                    )
                }
            )
        return outputs

    detections, image_ids = coco_detections(
        model, [[{"image_id": 1}, {"image_id": 2}], [{"image_id": 3}]], max_images=2
    )
    assert image_ids == [1, 2]  # stopped after 2 images, image 2 kept though it has no detection
    assert [d["image_id"] for d in detections] == [1]
