"""Target assignment on hand-worked examples (Sec. 3.1-3.3).

Image 64x64, two levels: P3 (stride 8, locations at 4, 12, ..., 60) with range [0, 32] and P4
(stride 16, locations at 8, 24, 40, 56) with range [32, inf]. Box A = (4, 4, 36, 44), class 2,
area 1280; box B = (12, 8, 60, 60), class 5, area 2496; they overlap in (12, 8, 36, 44).

Without center sampling (worked by hand from eq. (1) and the range rule):
- P3, A: x in {12, 20, 28} x y in {12, 20, 28, 36}, all with max(l,t,r,b) <= 32: 12 locations.
- P3, B: x in {28, 36, 44} x y in {28, 36} (others exceed 32); (28, 28) and (28, 36) are also A's
  and go to the smaller A (at (28, 36) both maxima are exactly 32: the boundary is inclusive).
- P4, A: (8, 8), (24, 8), (8, 40), (24, 40) (max = 36 >= 32); the y = 24 row has max < 32.
- P4, B: all 9 locations of x, y in {24, 40, 56}; (24, 40) goes to A.
"""

import math

import pytest
import torch
from detectron2.structures import Boxes, Instances

from fcos_d2.modeling.box_ops import centerness_from_ltrb, compute_locations
from fcos_d2.modeling.targets import FCOSTargetAssigner, FCOSTargets

STRIDES = (8, 16)
FEATURE_SIZES = ((8, 8), (4, 4))
BOX_A = [4.0, 4.0, 36.0, 44.0]
BOX_B = [12.0, 8.0, 60.0, 60.0]
NUM_CLASSES = 7


def _instances(boxes, classes, crowd=None):
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    if crowd is not None:
        inst.gt_is_crowd = torch.tensor(crowd, dtype=torch.bool)
    return inst


def _assign(
    radius=0.0, normalize=True, boxes=(BOX_A, BOX_B), classes=(2, 5), crowd=None, grid=False, **kw
):
    """Targets of one 64x64 image; ``grid`` passes the grid sizes (nearby-locations matching)."""
    assigner = FCOSTargetAssigner(
        strides=STRIDES,
        sizes_of_interest=[32],
        num_classes=NUM_CLASSES,
        center_sampling_radius=radius,
        normalize_reg_targets=normalize,
        **kw,
    )
    locations = compute_locations(FEATURE_SIZES, STRIDES, torch.device("cpu"))
    grid_sizes = FEATURE_SIZES if grid else None
    return assigner(locations, [_instances(list(boxes), list(classes), crowd)], grid_sizes)


def _index(level: int, x: int, y: int) -> int:
    stride = STRIDES[level]
    width = FEATURE_SIZES[level][1]
    offset = sum(h * w for h, w in FEATURE_SIZES[:level])
    return offset + ((y - stride // 2) // stride) * width + (x - stride // 2) // stride


def _positives(targets, level: int, box: int):
    """Set of (x, y) image coordinates on ``level`` assigned to ``box``."""
    stride = STRIDES[level]
    height, width = FEATURE_SIZES[level]
    found = set()
    for row in range(height):
        for col in range(width):
            x, y = stride // 2 + col * stride, stride // 2 + row * stride
            if targets.matched_gt[0, _index(level, x, y)].item() == box:
                found.add((x, y))
    return found


def test_locations_follow_floor_half_stride_rule():
    locations = compute_locations([(2, 3), (1, 1)], [8, 5], torch.device("cpu"))
    assert locations[0].tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert locations[1].tolist() == [[2, 2]]  # floor(5 / 2)


def test_positive_locations_levels_and_min_area_without_center_sampling():
    targets = _assign(radius=0.0)
    a_p3 = {(x, y) for x in (12, 20, 28) for y in (12, 20, 28, 36)}
    assert _positives(targets, 0, 0) == a_p3
    assert _positives(targets, 0, 1) == {(36, 28), (36, 36), (44, 28), (44, 36)}
    assert _positives(targets, 1, 0) == {(8, 8), (24, 8), (8, 40), (24, 40)}
    assert _positives(targets, 1, 1) == {(x, y) for x in (24, 40, 56) for y in (24, 40, 56)} - {
        (24, 40)
    }
    assert int((targets.matched_gt >= 0).sum()) == 12 + 4 + 4 + 8
    # Labels follow the matched box; background is NUM_CLASSES.
    labels = targets.labels[0]
    assert labels[_index(0, 20, 20)].item() == 2
    assert labels[_index(1, 40, 40)].item() == 5
    assert labels[_index(0, 4, 4)].item() == NUM_CLASSES


def test_regression_and_centerness_targets_are_exact():
    targets = _assign(radius=0.0, normalize=True)
    reg = targets.reg_targets[0]
    # (20, 20) on P3 regresses A: (16, 16, 16, 24) / 8.
    assert reg[_index(0, 20, 20)].tolist() == [2.0, 2.0, 2.0, 3.0]
    # (36, 36) on P3 regresses B: (24, 28, 24, 24) / 8.
    assert reg[_index(0, 36, 36)].tolist() == [3.0, 3.5, 3.0, 3.0]
    # (40, 40) on P4 regresses B: (28, 32, 20, 20) / 16.
    assert reg[_index(1, 40, 40)].tolist() == [1.75, 2.0, 1.25, 1.25]
    assert reg[_index(0, 4, 4)].tolist() == [0.0, 0.0, 0.0, 0.0]
    ctr = centerness_from_ltrb(reg)
    assert ctr[_index(0, 20, 20)].item() == pytest.approx(math.sqrt(16 / 24))
    assert ctr[_index(0, 36, 36)].item() == pytest.approx(math.sqrt(24 / 28))
    assert ctr[_index(1, 40, 40)].item() == pytest.approx(math.sqrt(20 / 28 * 20 / 32))
    # Unnormalized targets are in pixels.
    raw = _assign(radius=0.0, normalize=False).reg_targets[0]
    assert raw[_index(1, 40, 40)].tolist() == [28.0, 32.0, 20.0, 20.0]


@pytest.mark.parametrize("grid", [False, True], ids=["all_pairs", "nearby"])
def test_center_sampling_restricts_positives_to_the_center_region(grid):
    # Radius 1.5: on P3 the regions are A (8, 12, 32, 36) and B (24, 22, 48, 46) (inside the boxes);
    # on P4 they cover the whole boxes (A) or (12, 10, 60, 58) (B), leaving P4 unchanged.
    targets = _assign(radius=1.5, grid=grid)
    assert _positives(targets, 0, 0) == {(x, y) for x in (12, 20, 28) for y in (20, 28)}
    # (28, 36) is outside A's region (y must be < 36), so it now goes to B.
    assert _positives(targets, 0, 1) == {(28, 36), (36, 28), (36, 36), (44, 28), (44, 36)}
    assert _positives(targets, 1, 0) == {(8, 8), (24, 8), (8, 40), (24, 40)}
    assert len(_positives(targets, 1, 1)) == 8


def test_equal_areas_tie_goes_to_lowest_box_index():
    targets = _assign(boxes=(BOX_B, BOX_B), classes=(3, 4))
    fg = targets.matched_gt[0] >= 0
    assert fg.any()
    assert set(targets.matched_gt[0][fg].tolist()) == {0}
    assert set(targets.labels[0][fg].tolist()) == {3}


def test_chunked_assignment_matches_single_pass():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=generator) * 50
    wh = torch.rand(40, 2, generator=generator) * 40 + 2
    boxes = torch.cat([xy, (xy + wh).clamp(max=64)], dim=1).tolist()
    classes = list(range(40))
    # Duplicate a box across the chunk boundary to exercise the cross-chunk tie rule.
    boxes[25] = boxes[3]
    whole = _assign(radius=1.5, boxes=boxes, classes=classes)
    chunked = _assign(radius=1.5, boxes=boxes, classes=classes, max_pairs_per_chunk=80 * 7)
    assert torch.equal(whole.matched_gt, chunked.matched_gt)
    assert torch.equal(whole.reg_targets, chunked.reg_targets)
    assert (whole.matched_gt == 25).sum() == 0


def test_image_without_boxes_is_all_background():
    targets = _assign(boxes=(), classes=())
    assert targets.labels.shape == (1, 80)
    assert (targets.labels == NUM_CLASSES).all()
    assert (targets.matched_gt == -1).all()
    assert (targets.reg_targets == 0).all()


def test_crowd_boxes_never_create_positives():
    targets = _assign(crowd=[True, False])
    assert (targets.matched_gt[0] != 0).all()
    # Without A competing, B now owns its overlap locations on P3, e.g. (28, 28).
    assert targets.matched_gt[0, _index(0, 28, 28)].item() == 1


def test_sizes_of_interest_must_fit_the_levels():
    with pytest.raises(ValueError, match="SIZES_OF_INTEREST needs 1 values"):
        FCOSTargetAssigner(strides=STRIDES, sizes_of_interest=[32, 64], num_classes=2)


@pytest.mark.parametrize("radius", [0.5, 1.5, 2.5])
def test_nearby_matching_equals_all_pairs_matching(radius):
    """Windows around box centers must find every candidate of the all-pairs rule, bit for bit:
    random, pixel-aligned, stride-aligned, duplicated (ties), crowd and off-image boxes, on levels
    whose sizes are not powers of two."""
    strides, height, width = (8, 16, 32), 200, 136
    sizes = [(25, 17), (13, 9), (7, 5)]
    assigner = FCOSTargetAssigner(
        strides=strides,
        sizes_of_interest=[48, 96],
        num_classes=NUM_CLASSES,
        center_sampling_radius=radius,
    )
    locations = compute_locations(sizes, strides, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    positives = 0
    for trial in range(6):
        xy = torch.rand(60, 2, generator=generator) * torch.tensor([width, height]) * 1.3 - 20
        wh = torch.exp(torch.rand(60, 2, generator=generator) * 5.5)
        if trial % 3 == 1:
            xy, wh = xy.round(), wh.round() + 1
        elif trial % 3 == 2:
            xy, wh = (xy / 4).round() * 4, (wh / 8).round() * 8 + 8
        boxes = torch.cat([xy, xy + wh], dim=1)
        boxes[7] = boxes[3]
        instances = Instances((height, width), gt_boxes=Boxes(boxes))
        instances.gt_classes = torch.randint(NUM_CLASSES, (60,), generator=generator)
        instances.gt_is_crowd = torch.rand(60, generator=generator) < 0.1
        everywhere = assigner(locations, [instances])
        nearby = assigner(locations, [instances], sizes)
        for field in FCOSTargets._fields:
            assert torch.equal(getattr(nearby, field), getattr(everywhere, field)), (trial, field)
        positives += int((everywhere.matched_gt >= 0).sum())
    assert positives >= 50  # not a vacuous comparison (78, 470, 769 positives for these radii)


def test_grid_sizes_must_match_the_locations():
    assigner = FCOSTargetAssigner(
        strides=STRIDES, sizes_of_interest=[32], num_classes=2, center_sampling_radius=1.5
    )
    locations = compute_locations(FEATURE_SIZES, STRIDES, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"grid_sizes must be one \(H, W\) per level"):
        assigner(locations, [_instances([BOX_A], [0])], [(8, 8), (4, 5)])
