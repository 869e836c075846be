"""Box geometry of FCOS: the location grid, (l, t, r, b) encoding and decoding, center-ness, IoU.

Every other module takes these from here. All functions are element-wise or broadcasting tensor
code with no data-dependent shapes, so they trace (``torch.jit.trace``, ONNX) for any input size.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

# Where the locations of a level lie (MODEL.FCOS.LOCATION_GRID).
LOCATION_GRIDS = ("half_stride", "torchvision")


def compute_locations(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device,
    grid: str = "half_stride",
) -> list[Tensor]:
    """Image coordinates of every feature location, per level, as (H_i * W_i, 2) (x, y) tensors.

    In row-major order, matching the flattening of an (N, K, H, W) prediction map. ``grid``:

    - ``"half_stride"``: (floor(s/2) + x s, floor(s/2) + y s) on a level of stride s (Sec. 3.1;
      AdelaiDet, and mmdetection's point generator with its default offset 0.5).
    - ``"torchvision"``: the centers of torchvision's FCOS anchors, (x * step_x, y * step_y)
      with no offset, where a level's step is the padded input's size divided (integer
      division) by the level's grid size, per axis. That is the stride wherever the grid divides
      the input exactly (P3-P5 of inputs padded to a multiple of 32) and less on P6/P7 otherwise
      (800 px: 800 // 13 = 61 on P6). The padded input is the first level's grid times its
      stride, as inputs are padded to a multiple of it.
    """
    if grid == "torchvision":
        image_size = [side * strides[0] for side in feature_sizes[0]]
    locations = []
    for (height, width), stride in zip(feature_sizes, strides):
        if grid == "torchvision":
            step_y, step_x = image_size[0] // height, image_size[1] // width
            xs = torch.arange(width, dtype=torch.float32, device=device) * step_x
            ys = torch.arange(height, dtype=torch.float32, device=device) * step_y
        else:
            xs = torch.arange(width, dtype=torch.float32, device=device) * stride + stride // 2
            ys = torch.arange(height, dtype=torch.float32, device=device) * stride + stride // 2
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        locations.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
    return locations


def feature_locations(
    features: Sequence[Tensor], strides: Sequence[int], grid: str = "half_stride"
) -> list[Tensor]:
    """:func:`compute_locations` of (N, C, H, W) feature maps; under tracing H, W stay dynamic."""
    return compute_locations([f.shape[-2:] for f in features], strides, features[0].device, grid)


def ltrb_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """Eq. (1): (l*, t*, r*, b*) = (x - x0, y - y0, x1 - x, y1 - y).

    ``points`` (..., 2) and ``boxes`` (..., 4) broadcast against each other: pass (P, 1, 2) and
    (1, G, 4) for all pairs, or (P, 2) and (P, 4) for matched pairs.
    """
    x, y = points[..., 0], points[..., 1]
    return torch.stack(
        [x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], -1
    )


def decode_ltrb(points: Tensor, ltrb: Tensor, stride: float = 1.0) -> Tensor:
    """Inverse of eq. (1): boxes (x - l, y - t, x + r, y + b), distances in units of ``stride``."""
    ltrb = ltrb * stride
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def centerness_from_ltrb(ltrb: Tensor) -> Tensor:
    """Eq. (3): sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) for (..., 4) distances."""
    left_right = ltrb[..., [0, 2]]
    top_bottom = ltrb[..., [1, 3]]
    ratio = (left_right.min(dim=-1).values / left_right.max(dim=-1).values) * (
        top_bottom.min(dim=-1).values / top_bottom.max(dim=-1).values
    )
    return torch.sqrt(ratio)


def iou_and_giou_from_ltrb(
    pred: Tensor, target: Tensor, eps: float = 1e-7
) -> tuple[Tensor, Tensor]:
    """IoU and GIoU of two boxes given as (l, t, r, b) distances from the same location.

    Both boxes contain the location, so the intersection is (min(l,l*) + min(r,r*)) x
    (min(t,t*) + min(b,b*)) with no clamping (UnitBox's formulation). fvcore's and torchvision's
    GIoU take corner boxes and check them with boolean indexing, a host sync in the training step.
    """
    pred_area = (pred[..., 0] + pred[..., 2]) * (pred[..., 1] + pred[..., 3])
    target_area = (target[..., 0] + target[..., 2]) * (target[..., 1] + target[..., 3])
    inter_w = torch.minimum(pred[..., 0::2], target[..., 0::2]).sum(-1)
    inter_h = torch.minimum(pred[..., 1::2], target[..., 1::2]).sum(-1)
    enclose_w = torch.maximum(pred[..., 0::2], target[..., 0::2]).sum(-1)
    enclose_h = torch.maximum(pred[..., 1::2], target[..., 1::2]).sum(-1)
    inter = inter_w * inter_h
    union = pred_area + target_area - inter
    enclose = enclose_w * enclose_h
    iou = inter / (union + eps)
    giou = iou - (enclose - union) / (enclose + eps)
    return iou, giou
