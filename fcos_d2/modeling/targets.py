"""FCOS target assignment (Sec. 3.1-3.3), vectorised over (location, box) pairs.

With center sampling and the levels' grid sizes (as :class:`~fcos_d2.modeling.core.FCOSCore`
gives them), each box is compared only with the few locations of each level near its center, the
only ones that can lie in its center region: time and memory grow with the number of boxes, not
with locations x boxes. Otherwise every location is compared with every box (in chunks of boxes
when the pair count would exceed a memory cap). Both give the same assignment; neither has a
Python loop over boxes nor a host-device synchronisation.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from detectron2.config import configurable
from detectron2.structures import Instances
from torch import Tensor

from ..checks import check_that
from .box_ops import ltrb_distances

INF = float("inf")
_WHERE = "FCOSTargetAssigner argument"


class FCOSTargets(NamedTuple):
    """Targets of a batch over the concatenation of all levels' locations, shapes (N, L[, 4]).

    ``matched_gt`` is the index of the assigned box in its image's instances, -1 for background;
    ``labels`` is the class, ``num_classes`` for background; ``reg_targets`` are (l*, t*, r*, b*),
    divided by the level's stride when normalized, and 0 on background.
    """

    labels: Tensor
    reg_targets: Tensor
    matched_gt: Tensor


class FCOSTargetAssigner:
    """Assigns each location to at most one ground-truth box.

    A location is a candidate for a box when it is strictly inside the box (min(l*,t*,r*,b*) > 0),
    and, with center sampling, also strictly inside the square of half-side ``radius * stride``
    around the box center clipped to the box; and when its level's range holds the box:
    m_{i-1} <= max(l*,t*,r*,b*) <= m_i (Sec. 3.2). Among candidates the box of minimal area wins,
    ties going to the lowest box index.

    Boxes are first clipped to the image, as Detectron2's ``DatasetMapper`` does (so +-inf
    coordinates become the image's edges). Crowd boxes (``gt_is_crowd``) and boxes that are empty
    after clipping (zero width or height, inverted, entirely outside) or have a NaN coordinate are
    never candidates: a custom mapper that keeps such boxes trains as if they were absent.
    """

    @configurable
    def __init__(
        self,
        *,
        strides: Sequence[int],
        sizes_of_interest: Sequence[float],
        num_classes: int,
        center_sampling_radius: float = 1.5,
        normalize_reg_targets: bool = True,
        max_pairs_per_chunk: int = 1 << 22,
    ):
        """
        Args:
            strides: stride of each level, e.g. (8, 16, 32, 64, 128).
            sizes_of_interest: m_3..m_{L}, one fewer than levels, e.g. (64, 128, 256, 512).
            center_sampling_radius: radius in strides; 0 disables center sampling.
        """
        check_that(
            len(sizes_of_interest) == len(strides) - 1,
            "MODEL.FCOS.SIZES_OF_INTEREST",
            f"{len(strides) - 1} values for {len(strides)} levels (strides {list(strides)})",
            list(sizes_of_interest),
            f"{_WHERE} sizes_of_interest",
            verb="needs",
        )
        bounds = [0.0, *map(float, sizes_of_interest), INF]
        check_that(
            all(low < high for low, high in zip(bounds[:-1], bounds[1:])),
            "MODEL.FCOS.SIZES_OF_INTEREST",
            "positive and increasing",
            list(sizes_of_interest),
            f"{_WHERE} sizes_of_interest",
        )
        check_that(
            center_sampling_radius >= 0,
            "MODEL.FCOS.POS_RADIUS",
            ">= 0",
            center_sampling_radius,
            f"{_WHERE} center_sampling_radius",
        )
        check_that(
            max_pairs_per_chunk >= 1,
            "MODEL.FCOS.TARGETS_MAX_PAIRS_PER_CHUNK",
            ">= 1",
            max_pairs_per_chunk,
            f"{_WHERE} max_pairs_per_chunk",
        )
        self.strides = list(strides)
        self.size_ranges = list(zip(bounds[:-1], bounds[1:]))
        self.num_classes = num_classes
        self.center_sampling_radius = center_sampling_radius
        self.normalize_reg_targets = normalize_reg_targets
        self.max_pairs_per_chunk = max_pairs_per_chunk

    @classmethod
    def from_config(cls, cfg):
        fcos = cfg.MODEL.FCOS
        return {
            "strides": fcos.FPN_STRIDES,
            "sizes_of_interest": fcos.SIZES_OF_INTEREST,
            "num_classes": fcos.NUM_CLASSES,
            "center_sampling_radius": fcos.POS_RADIUS if fcos.CENTER_SAMPLE else 0.0,
            "normalize_reg_targets": fcos.NORM_REG_TARGETS,
            "max_pairs_per_chunk": fcos.TARGETS_MAX_PAIRS_PER_CHUNK,
        }

    def __call__(
        self,
        locations: list[Tensor],
        gt_instances: list[Instances],
        grid_sizes: Optional[Sequence[tuple[int, int]]] = None,
    ) -> FCOSTargets:
        """
        Args:
            locations: per level, (H_i * W_i, 2) image coordinates (``box_ops.compute_locations``).
            gt_instances: per image, with ``gt_boxes``, ``gt_classes`` and maybe ``gt_is_crowd``.
            grid_sizes: per level (H_i, W_i), when ``locations`` are row-major grids of spacing
                the level's stride (as ``compute_locations`` makes them): with center sampling,
                then, only locations near each box are compared with it (:meth:`match_near`).
        """
        points, strides, size_ranges = self.flatten_levels(locations)
        near = grid_sizes is not None and self.center_sampling_radius > 0
        if grid_sizes is not None:
            counts = [len(x) for x in locations]
            check_that(
                len(grid_sizes) == len(locations)
                and all(int(h) * int(w) == n for (h, w), n in zip(grid_sizes, counts)),
                "grid_sizes",
                f"one (H, W) per level with H * W locations ({counts})",
                [tuple(int(v) for v in size) for size in grid_sizes],
                "FCOSTargetAssigner",
            )
        labels, reg_targets, matched = [], [], []
        for instances in gt_instances:
            boxes, ignored = usable_boxes(
                instances.gt_boxes.tensor.to(points.dtype), instances.image_size
            )
            if instances.has("gt_is_crowd"):
                ignored = ignored | instances.gt_is_crowd.bool()
            if near:
                matched_gt = self.match_near(
                    locations, grid_sizes, strides, size_ranges, boxes, ignored
                )
            else:
                matched_gt = self.match(points, strides, size_ranges, boxes, ignored)
            is_fg = matched_gt >= 0
            safe_idx = matched_gt.clamp(min=0)
            if len(boxes):
                ltrb = ltrb_distances(points, boxes[safe_idx])
                cls = instances.gt_classes[safe_idx]
            else:
                ltrb = points.new_zeros(len(points), 4)
                cls = matched_gt.new_zeros(len(points))
            if self.normalize_reg_targets:
                ltrb = ltrb / strides[:, None]
            labels.append(torch.where(is_fg, cls, torch.full_like(cls, self.num_classes)))
            # where(), not a product: background rows may read an ignored NaN box.
            reg_targets.append(torch.where(is_fg[:, None], ltrb, torch.zeros_like(ltrb)))
            matched.append(matched_gt)
        return FCOSTargets(torch.stack(labels), torch.stack(reg_targets), torch.stack(matched))

    def flatten_levels(self, locations: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """All levels' points (L, 2) with each point's stride (L,) and size range (L, 2).

        Built with fills on the points' device: copying Python lists to a GPU would synchronise.
        """
        points = torch.cat(locations, dim=0)
        strides, size_ranges = [], []
        for level_points, stride, (low, high) in zip(locations, self.strides, self.size_ranges):
            count = (len(level_points),)
            strides.append(points.new_full(count, float(stride)))
            size_ranges.append(
                torch.stack([points.new_full(count, low), points.new_full(count, high)], dim=1)
            )
        return points, torch.cat(strides), torch.cat(size_ranges)

    def candidates(
        self,
        points: Tensor,
        strides: Tensor,
        size_ranges: Tensor,
        boxes: Tensor,
        ignored: Optional[Tensor] = None,
    ) -> Tensor:
        """(P, G) bool: location p may regress box g (inside, center region, level range); boxes
        flagged in the (G,) mask ``ignored`` are never candidates."""
        ignored = ignored[None, :] if ignored is not None else None
        return self.pair_is_candidate(
            points[:, None], strides[:, None], size_ranges[:, None], boxes[None], ignored
        )

    def pair_is_candidate(
        self,
        points: Tensor,
        strides: Tensor,
        size_ranges: Tensor,
        boxes: Tensor,
        ignored: Optional[Tensor] = None,
    ) -> Tensor:
        """Element-wise :meth:`candidates`: points (..., 2), strides (...), size ranges (..., 2),
        boxes (..., 4) and ignored flags (...) broadcast to the pairs' shape."""
        ltrb = ltrb_distances(points, boxes)
        if self.center_sampling_radius > 0:
            centers = (boxes[..., :2] + boxes[..., 2:]) / 2
            radius = (strides * self.center_sampling_radius)[..., None]
            region = torch.cat(
                [
                    torch.maximum(centers - radius, boxes[..., :2]),
                    torch.minimum(centers + radius, boxes[..., 2:]),
                ],
                dim=-1,
            )
            inside = ltrb_distances(points, region).min(dim=-1).values > 0
        else:
            inside = ltrb.min(dim=-1).values > 0
        max_distance = ltrb.max(dim=-1).values
        in_range = (max_distance >= size_ranges[..., 0]) & (max_distance <= size_ranges[..., 1])
        is_candidate = inside & in_range
        if ignored is not None:
            is_candidate &= ~ignored
        return is_candidate

    def match(
        self,
        points: Tensor,
        strides: Tensor,
        size_ranges: Tensor,
        boxes: Tensor,
        ignored: Optional[Tensor] = None,
    ) -> Tensor:
        """(P,) index of the minimal-area candidate box of each location, -1 where there is none."""
        num_points = len(points)
        best_area = points.new_full((num_points,), INF)
        best_idx = torch.full((num_points,), -1, dtype=torch.long, device=points.device)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        chunk = max(1, self.max_pairs_per_chunk // max(num_points, 1))
        for start in range(0, len(boxes), chunk):
            stop = start + chunk
            ignored_chunk = ignored[start:stop] if ignored is not None else None
            is_candidate = self.candidates(
                points, strides, size_ranges, boxes[start:stop], ignored_chunk
            )
            candidate_area = torch.where(is_candidate, areas[None, start:stop], INF)
            # min() returns the first minimum, so ties within a chunk go to the lowest index, and
            # the strict < below keeps earlier chunks' winners on ties across chunks.
            chunk_area, chunk_idx = candidate_area.min(dim=1)
            better = chunk_area < best_area
            best_area = torch.where(better, chunk_area, best_area)
            best_idx = torch.where(better, chunk_idx + start, best_idx)
        return best_idx

    def match_near(
        self,
        locations: list[Tensor],
        grid_sizes: Sequence[tuple[int, int]],
        strides: Tensor,
        size_ranges: Tensor,
        boxes: Tensor,
        ignored: Optional[Tensor] = None,
    ) -> Tensor:
        """:meth:`match` with center sampling, comparing each box only with nearby locations.

        A candidate is strictly inside the box's center region, within ``radius`` strides of the
        center: on a level's grid (spacing ``stride``) its column lies in an open interval of
        length 2 * radius, a < col < a + 2 * radius, so in [floor(a) + 1, floor(a) + ceil(2r)].
        A window of ceil(2r) + 2 columns from floor(a) as computed (within 1 of the exact value)
        covers them; the same for rows. The exact rule (:meth:`pair_is_candidate`, the arithmetic
        of :meth:`candidates`) then decides, level by level: memory is O(locations + boxes).
        Ties between boxes of equal area still go to the lowest index.
        """
        points = torch.cat(locations)
        num_points, num_boxes = len(points), len(boxes)
        device = points.device
        best_area = points.new_full((num_points,), INF)
        best_idx = torch.full((num_points,), num_boxes, dtype=torch.long, device=device)
        if num_boxes == 0:
            return best_idx - 1
        window = torch.arange(math.ceil(2 * self.center_sampling_radius) + 2, device=device)
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        box_idx = torch.arange(num_boxes, device=device)[:, None]
        start = 0
        for level_points, (height, width), stride in zip(locations, grid_sizes, self.strides):
            height, width = int(height), int(width)
            if height * width == 0:
                continue
            # a = (center - radius - origin) / stride, the origin being the level's first location.
            low = centers - stride * self.center_sampling_radius - level_points[0]
            first = torch.floor(low / stride).long()  # (G, 2): x then y
            cols = first[:, 0, None] + window  # (G, S)
            rows = first[:, 1, None] + window
            on_grid = (
                (((rows >= 0) & (rows < height))[:, :, None])
                & (((cols >= 0) & (cols < width))[:, None, :])
            )
            index = (
                rows.clamp(0, height - 1)[:, :, None] * width + cols.clamp(0, width - 1)[:, None, :]
            )
            index = (index + start).reshape(num_boxes, -1)  # (G, S * S) locations per box
            is_candidate = on_grid.reshape(num_boxes, -1) & self.pair_is_candidate(
                points[index],
                strides[index],
                size_ranges[index],
                boxes[:, None, :],
                ignored[:, None] if ignored is not None else None,
            )
            # Clamped off-grid pairs repeat an on-grid location, but are never candidates.
            candidate_area = torch.where(is_candidate, areas[:, None], INF).reshape(-1)
            index = index.reshape(-1)
            best_area = best_area.scatter_reduce(0, index, candidate_area, "amin")
            is_best = is_candidate.reshape(-1) & (candidate_area == best_area[index])
            winner = torch.where(is_best, box_idx.expand_as(is_candidate).reshape(-1), num_boxes)
            best_idx = best_idx.scatter_reduce(0, index, winner, "amin")
            start += height * width
        return torch.where(best_idx < num_boxes, best_idx, -1)


def usable_boxes(boxes: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(G, 4) boxes clipped to the image, and the (G,) mask of those to ignore: a NaN coordinate,
    or no area left after clipping (zero width or height, inverted, entirely outside)."""
    height, width = image_size
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    clipped = torch.stack(
        [x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)], dim=1
    )
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    return clipped, empty | boxes.isnan().any(dim=1)
