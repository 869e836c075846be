"""Post-processing: ideal head outputs decode back to exactly the ground truth."""

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
