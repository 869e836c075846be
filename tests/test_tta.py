"""Test-time augmentation: mapping back to the original image, per-class merging, box voting,
the real detector under an identity augmentation, and train_net.py with TEST.AUG.ENABLED."""

import json

import pytest
import torch
from detectron2.modeling import DatasetMapperTTA, GeneralizedRCNNWithTTA, build_model
from detectron2.structures import Boxes, ImageList, Instances
from helpers import (
    QUICKSTART,
    args_for,
    config_path,
    run_python,
    shrink,
    synthetic_image,
    tiny_opts,
)
from torch import nn

from fcos_d2.engine import main
from fcos_d2.inference.tta import FCOSWithTTA, boxes_to_original, build_tta_model, merge_detections
from fcos_d2.modeling import FCOS
from fcos_d2.modeling.postprocess import FCOSPostProcessor


class FixedFractionFCOS(FCOS):
    """FCOS's inference interface (``dense_predictions`` + ``forward_inference`` + ``core``) with
    hand-set detections: boxes at fixed fractions of each network input's size.

    Scores tell the augmented inputs apart: x1 for an unflipped input (its left half is the bright
    one), x0.5 for a flipped one; x1 at the smallest size, x0.75 at the larger one.
    """

    def __init__(self, fractions, classes, weights, small_size):
        nn.Module.__init__(self)
        self.fractions = torch.tensor(fractions, dtype=torch.float32)
        self.classes = torch.tensor(classes)
        self.weights = torch.tensor(weights)
        self.small_size = small_size
        self.core = nn.Module()  # what FCOSWithTTA reads: the post-processor and quality mode
        self.core.postprocessor = FCOSPostProcessor(strides=[8], nms_threshold=0.6)
        self.core.inference_quality = "branch"

    def dense_predictions(self, batched_inputs):
        images = ImageList.from_tensors([x["image"].float() for x in batched_inputs])
        return images, [], None

    def forward_inference(self, images, features, predictions):
        results = []
        for image, (h, w) in zip(images.tensor, images.image_sizes):
            left, right = image[:, :h, : w // 2].mean(), image[:, :h, w // 2 : w].mean()
            factor = (1.0 if left > right else 0.5) * (1.0 if h == self.small_size else 0.75)
            boxes = Boxes(self.fractions * torch.tensor([w, h, w, h], dtype=torch.float32))
            scores = self.weights * factor
            results.append(
                Instances((h, w), pred_boxes=boxes, scores=scores, pred_classes=self.classes)
            )
        return results


def tta_cfg(cfg, min_sizes, flip=True, box_voting=False, detections=100):
    cfg.TEST.AUG.MIN_SIZES = min_sizes
    cfg.TEST.AUG.MAX_SIZE = 1000
    cfg.TEST.AUG.FLIP = flip
    cfg.TEST.AUG.BOX_VOTING = box_voting
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    return cfg


def half_bright_image(size=64):
    image = torch.full((3, size, size), 50, dtype=torch.uint8)
    image[:, :, : size // 2] = 200
    return image


# Class 0: a box whose mirror image overlaps it at IoU 0.8 (> NMS_TH 0.6), so all four augmented
# detections merge into one. Class 1: a corner box, whose mirror image does not overlap it.
FRACTIONS = [[0.25, 0.25, 0.8125, 0.5], [0.0, 0.0, 0.25, 0.25]]


def fixed_model(postprocessor_detections=100):
    model = FixedFractionFCOS(FRACTIONS, classes=[0, 1], weights=[0.8, 0.4], small_size=64)
    model.core.postprocessor.post_nms_topk = postprocessor_detections
    return model


@pytest.mark.parametrize("scale", [1, 2])
def test_detections_at_two_scales_and_flipped_merge_in_original_pixels(cfg, scale):
    """64x64 input at sizes 64 and 128, each also flipped: 4 augmented inputs. ``scale`` 2: the
    input was already downscaled from a 128x128 original (``height``/``width``), so every box is
    reported in the original's pixels, twice as large."""
    tta = FCOSWithTTA(tta_cfg(cfg, (64, 128)), fixed_model())
    image = {"image": half_bright_image(), "height": 64 * scale, "width": 64 * scale}
    (out,) = tta([image])
    instances = out["instances"]
    assert instances.image_size == (64 * scale, 64 * scale)
    # Unflipped 64: class 0 at [16, 16, 52, 32] (0.8); flipped: mirrored to [12, 16, 48, 32]
    # (0.4); at 128: the same boxes (0.6 and 0.3). NMS keeps the 0.8 one.
    # Class 1: unflipped [0, 0, 16, 16] (0.4, 0.3), flipped [48, 0, 64, 16] (0.2, 0.15).
    expected_boxes = torch.tensor([[16, 16, 52, 32], [0, 0, 16, 16], [48, 0, 64, 16]]) * scale
    assert instances.pred_boxes.tensor.tolist() == expected_boxes.float().tolist()
    assert instances.scores.tolist() == pytest.approx([0.8, 0.4, 0.2])
    assert instances.pred_classes.tolist() == [0, 1, 1]


def test_merge_keeps_the_detections_per_image_and_votes_boxes(cfg):
    tta = FCOSWithTTA(tta_cfg(cfg, (64, 128), box_voting=True), fixed_model(2))
    (out,) = tta([{"image": half_bright_image(), "height": 64, "width": 64}])
    instances = out["instances"]
    assert instances.pred_classes.tolist() == [0, 1]  # the 2 best of 3
    assert instances.scores.tolist() == pytest.approx([0.8, 0.4])
    # Class 0 votes: [16, 52] x-range weighted 0.8 + 0.6, the mirrored [12, 48] 0.4 + 0.3.
    x0 = (1.4 * 16 + 0.7 * 12) / 2.1
    x1 = (1.4 * 52 + 0.7 * 48) / 2.1
    assert instances.pred_boxes.tensor[0].tolist() == pytest.approx([x0, 16, x1, 32])
    # Class 1's kept box only overlaps copies of itself: voting leaves it unchanged.
    assert instances.pred_boxes.tensor[1].tolist() == pytest.approx([0, 0, 16, 16])


def test_flipped_detection_maps_to_mirrored_x_range():
    image = {"image": torch.zeros(3, 50, 80, dtype=torch.uint8), "height": 50, "width": 80}
    unflipped, flipped = DatasetMapperTTA(min_sizes=[50], max_size=1000, flip=True)(image)
    boxes = torch.tensor([[5.0, 10.0, 20.0, 30.0]])
    assert boxes_to_original(boxes, unflipped["transforms"]).tolist() == boxes.tolist()
    # x0..x1 in the flipped input is W-x1..W-x0 in the original; y is unchanged.
    assert boxes_to_original(boxes, flipped["transforms"]).tolist() == [[60.0, 10.0, 75.0, 30.0]]
    # At twice the size, the flipped input is 160 wide: 160-20..160-5 -> halved.
    _, flipped2 = DatasetMapperTTA(min_sizes=[100], max_size=1000, flip=True)(image)
    assert flipped2["image"].shape[1:] == (100, 160)
    assert boxes_to_original(boxes, flipped2["transforms"]).tolist() == [[70.0, 5.0, 77.5, 15.0]]


def test_box_voting_gives_the_score_weighted_mean():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.3, 0.5])
    classes = torch.tensor([0, 0, 1])  # the third box is another class: it neither votes nor goes
    voted = merge_detections(boxes, scores, classes, (20, 20), 0.6, 100, box_voting=True)
    # IoU(box 0, box 1) = 90 / 110 > 0.6: box 1 is suppressed and votes with weight 0.3.
    assert voted.pred_classes.tolist() == [0, 1]
    assert voted.scores.tolist() == pytest.approx([0.9, 0.5])
    torch.testing.assert_close(
        voted.pred_boxes.tensor,
        torch.tensor([[0.3 / 1.2, 0.0, (0.9 * 10 + 0.3 * 11) / 1.2, 10.0], [0.0, 0.0, 10.0, 10.0]]),
    )
    plain = merge_detections(boxes, scores, classes, (20, 20), 0.6, 100)
    assert plain.pred_boxes.tensor.tolist() == [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]
    # Below the threshold boxes neither merge nor vote; clipping happens before both.
    apart = merge_detections(boxes, scores, classes, (20, 20), 0.95, 100, box_voting=True)
    assert apart.pred_boxes.tensor.tolist() == boxes[[0, 2, 1]].tolist()  # by score
    clipped = merge_detections(boxes + 15, scores, classes, (20, 20), 0.6, 100)
    assert clipped.pred_boxes.tensor.tolist() == [[15.0, 15.0, 20.0, 20.0]] * 2


def test_one_unflipped_size_reproduces_the_detector(tiny_cfg):
    """The real detector through TTA at its own test size: the same detections, bit for bit."""
    model = build_model(tiny_cfg).eval()
    # Untrained, nothing would pass the default 0.05 threshold: keep every candidate.
    model.core.postprocessor = model.core.postprocessor.replace(score_threshold=0.0)
    inputs = synthetic_image(96, 128, boxes=[(10, 20, 60, 70)], classes=[1], seed=3)
    del inputs["instances"]
    with torch.no_grad():
        (expected,) = model([inputs])
    tta = FCOSWithTTA(tta_cfg(tiny_cfg, (96,), flip=False), model)
    (merged,) = tta([inputs])
    expected, merged = expected["instances"], merged["instances"]
    assert len(expected) > 10
    assert merged.image_size == expected.image_size == (96, 128)
    assert torch.equal(merged.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(merged.scores, expected.scores)
    assert torch.equal(merged.pred_classes, expected.pred_classes)


def test_wrapping_picks_the_tta_of_the_architecture(cfg):
    fcos_cfg = shrink(cfg.clone(), config_path("configs/FCOS-Detection/Base-FCOS.yaml"))
    assert isinstance(build_tta_model(fcos_cfg, build_model(fcos_cfg)), FCOSWithTTA)
    rcnn_cfg = shrink(cfg.clone(), config_path("configs/FCOS-RPN/faster_rcnn_R_50_FPN_1x.yaml"))
    rcnn_tta = build_tta_model(tta_cfg(rcnn_cfg, (64,)), build_model(rcnn_cfg).eval())
    assert isinstance(rcnn_tta, GeneralizedRCNNWithTTA)
    # Detectron2's R-CNN TTA runs with FCOS proposals.
    with torch.no_grad():
        (out,) = rcnn_tta([{"image": half_bright_image(48), "height": 96, "width": 96}])
    assert out["instances"].image_size == (96, 96)
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE must be FCOS .*'Linear'"):
        FCOSWithTTA(fcos_cfg, nn.Linear(1, 1))
    fcos_cfg.MODEL.FCOS.INFERENCE_QUALITY = "oracle"
    with pytest.raises(ValueError, match="MODEL.FCOS.INFERENCE_QUALITY must be .* got 'oracle'"):
        FCOSWithTTA(fcos_cfg, build_model(fcos_cfg))


@pytest.mark.slow
def test_train_then_train_net_eval_only_with_tta(tmp_path):
    aug = {
        "TEST.AUG.ENABLED": True,
        "TEST.AUG.MIN_SIZES": (96, 128),
        "TEST.AUG.MAX_SIZE": 200,
        "SOLVER.CHECKPOINT_PERIOD": 100,
    }
    trained = main(args_for(tiny_opts(tmp_path, max_iter=4, **aug)))
    assert set(trained) == {"bbox", "bbox_TTA"}  # training ends with both evaluations
    predictions = {
        task: tmp_path / f"out/{folder}/shapes_val/coco_instances_results.json"
        for task, folder in (("bbox", "inference"), ("bbox_TTA", "inference_TTA"))
    }
    after_training = {task: json.loads(path.read_text()) for task, path in predictions.items()}
    assert after_training["bbox_TTA"] and after_training["bbox_TTA"] != after_training["bbox"]
    weights = str(tmp_path / "out/model_final.pth")
    opts = tiny_opts(tmp_path, max_iter=4, **aug, **{"MODEL.WEIGHTS": weights})
    done = run_python("train_net.py", "--config-file", QUICKSTART, "--eval-only", *opts)
    assert done.returncode == 0, done.stderr[-3000:]
    # After "Final evaluation:", print_csv_format gives 3 lines a task: name, metric names, values.
    final = done.stdout.split("Final evaluation:")[-1]
    lines = [line.split("copypaste: ")[1] for line in final.splitlines() if "copypaste: " in line]
    printed = {lines[i].removeprefix("Task: "): lines[i + 2] for i in range(0, len(lines), 3)}
    assert set(printed) == {"bbox", "bbox_TTA"}, done.stdout[-3000:]
    for task, values in printed.items():
        # The same weights and data give the same numbers as at the end of training.
        assert float(values.split(",")[0]) == pytest.approx(trained[task]["AP"], abs=1e-3)
        assert json.loads(predictions[task].read_text()) == after_training[task]
