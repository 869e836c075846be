"""Post-processing: ideal head outputs decode back to exactly the ground truth."""

import pytest
import torch
from detectron2.structures import Boxes, Instances

from fcos_d2.modeling.box_ops import centerness_from_ltrb, compute_locations
from fcos_d2.modeling.postprocess import FCOSPostProcessor
from fcos_d2.modeling.targets import FCOSTargetAssigner

STRIDES = (8, 16, 32, 64, 128)
IMAGE_SIZE = (192, 256)
NUM_CLASSES = 4
GT_BOXES = torch.tensor(
    [
        [10.0, 12.0, 50.0, 40.0],
        [30.0, 20.0, 180.0, 150.0],
        [120.0, 100.0, 250.0, 190.0],
        [0, 0, 256, 192],
    ]
)
GT_CLASSES = torch.tensor([2, 0, 3, 1])


def ideal_outputs(normalize: bool):
    """Per-level (N=1) class probabilities, box regressions and qualities made from the targets."""
    sizes = [(-(-IMAGE_SIZE[0] // s), -(-IMAGE_SIZE[1] // s)) for s in STRIDES]
    locations = compute_locations(sizes, STRIDES, torch.device("cpu"))
    assigner = FCOSTargetAssigner(
        strides=STRIDES,
        sizes_of_interest=[64, 128, 256, 512],
        num_classes=NUM_CLASSES,
        normalize_reg_targets=normalize,
    )
    gt = Instances(IMAGE_SIZE, gt_boxes=Boxes(GT_BOXES), gt_classes=GT_CLASSES)
    targets = assigner(locations, [gt])
    is_fg = targets.matched_gt[0] >= 0
    cls = torch.zeros(len(is_fg), NUM_CLASSES)
    cls[is_fg, targets.labels[0][is_fg]] = 0.9
    quality = torch.where(is_fg, centerness_from_ltrb(targets.reg_targets[0]), torch.zeros(()))
    split = [len(loc) for loc in locations]
    return (
        locations,
        [x[None] for x in cls.split(split)],
        [x[None] for x in targets.reg_targets[0].split(split)],
        [x[None] for x in quality.split(split)],
    )


def _sorted(boxes: torch.Tensor, classes: torch.Tensor):
    order = sorted(range(len(boxes)), key=lambda i: boxes[i].tolist())
    return boxes[order], classes[order]


def test_ideal_outputs_decode_to_exactly_the_gt():
    for normalize in (True, False):
        postprocess = FCOSPostProcessor(strides=STRIDES, normalized_reg=normalize)
        (result,) = postprocess(*ideal_outputs(normalize), [IMAGE_SIZE])
        assert len(result) == len(GT_BOXES)
        boxes, classes = _sorted(result.pred_boxes.tensor, result.pred_classes)
        gt_boxes, gt_classes = _sorted(GT_BOXES, GT_CLASSES)
        torch.testing.assert_close(boxes, gt_boxes)
        assert classes.tolist() == gt_classes.tolist()
        # Each box's best location has center-ness 1 or close: score sqrt(0.9 * ctr) <= sqrt(0.9).
        assert (result.scores <= 0.9**0.5 + 1e-6).all() and (result.scores > 0.5).all()
        assert result.scores.tolist() == sorted(result.scores.tolist(), reverse=True)


def test_threshold_topk_and_score_modes():
    locations, cls, reg, quality = ideal_outputs(True)
    # Paper scoring cls * quality, and a threshold on it that removes everything at 0.95.
    paper = FCOSPostProcessor(strides=STRIDES, score_sqrt=False)
    (result,) = paper(locations, cls, reg, quality, [IMAGE_SIZE])
    assert (result.scores <= 0.9 + 1e-6).all()
    strict = FCOSPostProcessor(strides=STRIDES, score_threshold=0.95)
    assert len(strict(locations, cls, reg, quality, [IMAGE_SIZE])[0]) == 0
    # THRESH_WITH_CTR: 0.9 * center-ness must exceed the threshold, so low-ctr locations drop out,
    # but each box keeps its central locations.
    with_ctr = FCOSPostProcessor(strides=STRIDES, score_threshold=0.5, thresh_with_quality=True)
    assert len(with_ctr(locations, cls, reg, quality, [IMAGE_SIZE])[0]) == len(GT_BOXES)
    # post-NMS top-k keeps the best ones only.
    top2 = FCOSPostProcessor(strides=STRIDES, post_nms_topk=2)
    assert len(top2(locations, cls, reg, quality, [IMAGE_SIZE])[0]) == 2


def random_dense(num_images: int, seed: int = 0):
    """Per-level random class probabilities, regressions (0-6 strides) and qualities of
    ``num_images`` images padded to IMAGE_SIZE."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(-(-IMAGE_SIZE[0] // s), -(-IMAGE_SIZE[1] // s)) for s in STRIDES]
    locations = compute_locations(sizes, STRIDES, torch.device("cpu"))
    cls, reg, quality = [], [], []
    for loc in locations:
        cls.append(torch.rand(num_images, len(loc), NUM_CLASSES, generator=generator) ** 3)
        reg.append(6 * torch.rand(num_images, len(loc), 4, generator=generator))
        quality.append(torch.rand(num_images, len(loc), generator=generator))
    return locations, cls, reg, quality


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the improved defaults: threshold 0.05, 1000 per level, per-class NMS, top 100
        {"score_sqrt": False, "thresh_with_quality": True, "score_threshold": 0.2},
        {"pre_nms_topk": 7, "post_nms_topk": 5, "nms_threshold": 0.3},
        # The proposal generator's selection: no threshold, class-agnostic, minimum box size.
        {"score_threshold": 0.0, "class_agnostic_nms": True, "min_box_size": 6.0},
        # Other releases' rules (torchvision, mmdetection) and per-class operating points.
        {"thresh_on_score": True, "pre_nms_ranking": "score", "score_threshold": 0.2},
        {"pre_nms_ranking": "cls", "score_sqrt": False, "min_box_size": 0.0},
        {"class_thresholds": [0.3, 0.5, 0.4, 0.35]},
    ],
    ids=["default", "paper", "few", "proposals", "torchvision", "mmdet", "class_thresholds"],
)
def test_batched_selection_equals_the_per_image_one(settings):
    """FCOSPostProcessor.batched (all images at once, for the batched export) selects exactly
    what __call__ selects per image, followed by Detectron2's removal of empty boxes."""
    image_sizes = [(192, 256), (150, 201), (97, 256)]  # smaller ones: clipped and empty boxes
    inputs = random_dense(len(image_sizes))
    if settings.get("class_agnostic_nms"):
        inputs = (*inputs[:1], [x[..., :1] for x in inputs[1]], *inputs[2:])
    postprocess = FCOSPostProcessor(strides=STRIDES, normalized_reg=True, **settings)
    per_image = postprocess(*inputs, image_sizes)
    batched = postprocess.batched(*inputs, torch.tensor(image_sizes))
    assert batched.batch_index.tolist() == sorted(batched.batch_index.tolist())  # grouped
    emptied = 0
    for index, instances in enumerate(per_image):
        nonempty = instances.pred_boxes.nonempty()
        emptied += int((~nonempty).sum())
        mine = batched.batch_index == index
        assert torch.equal(batched.boxes[mine], instances.pred_boxes.tensor[nonempty])
        assert torch.equal(batched.scores[mine], instances.scores[nonempty])
        assert torch.equal(batched.classes[mine], instances.pred_classes[nonempty])
        assert 0 < int(mine.sum()) <= postprocess.post_nms_topk
    assert emptied > 0 or "min_box_size" in settings  # the removal was exercised
