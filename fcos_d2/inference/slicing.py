"""Sliced inference (``TEST.SLICE.*``): small objects in large images.

A detector resizes its input to the test size (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), so in
a large image small objects shrink below what its finest level (stride 8) resolves.
:class:`FCOSWithSlicing` instead cuts the original image into overlapping square tiles of
``TEST.SLICE.SIZE`` pixels, runs the detector on every tile (batched; each tile is resized like any
input, so a tile of the test size is seen at its own pixels), optionally also on the whole image
(``TEST.SLICE.FULL_IMAGE``, for the objects larger than a tile), maps the boxes back to the image
and merges them per class: NMS at ``MODEL.FCOS.NMS_TH`` or box voting (``TEST.SLICE.MERGE``), the
merge of test-time augmentation (:func:`~fcos_d2.inference.tta.merge_detections`). With
``TEST.SLICE.DROP_CUT_BOXES`` a tile's detection that touches an inner border of its tile (the
object is likely cut there) is dropped when another tile holds that box away from its own inner
borders, i.e. sees that part of the image whole.

The same idea as the ``sahi`` library (Akyon et al., ICIP 2022, "Slicing Aided Hyper Inference"):
overlapping slices, a full-image pass, a merge of the slices' detections.
"""

from typing import Optional

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances
from torch import Tensor, nn

from ..checks import check_choice, check_that
from ..modeling.fcos import FCOS
from ..utils import unwrap_model
from .tta import merge_detections

_WHERE = "FCOSWithSlicing"
MERGE_MODES = ("nms", "voting")
# A box within this many pixels (of the original image) of a tile's side touches that side.
BORDER_MARGIN = 2.0


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Offsets of the tiles along one side: a step of ``size - round(overlap * size)`` pixels, the
    last tile moved back to end at the border (every tile is whole); one tile where ``length <=
    size``."""
    if length <= size:
        return [0]
    step = max(1, size - round(overlap * size))
    return [*range(0, length - size, step), length - size]


def tile_grid(height: int, width: int, size: int, overlap: float) -> Tensor:
    """(T, 4) XYXY integer tiles covering a ``height`` x ``width`` image, row after row; each side
    is ``size`` (or the image's, where smaller) and neighbours share at least
    ``round(overlap * size)`` pixels."""
    return torch.tensor(
        [
            [x, y, min(x + size, width), min(y + size, height)]
            for y in tile_starts(height, size, overlap)
            for x in tile_starts(width, size, overlap)
        ],
        dtype=torch.float32,
    ).reshape(-1, 4)


def uncut_boxes(
    boxes: Tensor,
    box_tiles: Tensor,
    tiles: Tensor,
    image_size: tuple[int, int],
    margin: float = BORDER_MARGIN,
) -> Tensor:
    """(N,) mask of the tile detections to keep: those that lie whole in their own tile (not
    within ``margin`` of one of its inner sides: sides on the image border do not cut), and those
    that no tile sees whole.

    Args:
        boxes: (N, 4) XYXY in image pixels; ``box_tiles`` (N,): the index in ``tiles`` of the tile
            each was detected in; ``tiles`` (T, 4) XYXY.
    """
    height, width = image_size
    tiles = tiles.to(boxes)
    inf = torch.tensor(float("inf"), device=boxes.device)
    # Per tile, how far a box may reach on each side without touching an inner border.
    low_x = torch.where(tiles[:, 0] > 0, tiles[:, 0] + margin, -inf)
    low_y = torch.where(tiles[:, 1] > 0, tiles[:, 1] + margin, -inf)
    high_x = torch.where(tiles[:, 2] < width, tiles[:, 2] - margin, inf)
    high_y = torch.where(tiles[:, 3] < height, tiles[:, 3] - margin, inf)
    whole_in = (
        (boxes[:, None, 0] > low_x)
        & (boxes[:, None, 1] > low_y)
        & (boxes[:, None, 2] < high_x)
        & (boxes[:, None, 3] < high_y)
    )  # (N, T)
    whole_in_own = whole_in[torch.arange(len(boxes), device=boxes.device), box_tiles]
    return whole_in_own | ~whole_in.any(dim=1)


class FCOSWithSlicing(nn.Module):
    """An FCOS detector run on overlapping tiles of each image: same inputs and outputs as
    ``FCOS.forward`` in inference, detections in each input's ``height`` x ``width``.

    Each input's ``image`` is taken as the original pixels, unless it has another size than the
    input's ``height`` x ``width`` and the input names its ``file_name`` (Detectron2's test loader
    resizes images to the test size): then the original is read from the file.
    """

    @configurable
    def __init__(
        self,
        model: nn.Module,
        *,
        tile_size: int,
        overlap: float = 0.2,
        full_image: bool = True,
        merge: str = "nms",
        drop_cut_boxes: bool = True,
        test_resize: Optional[T.Augmentation] = None,
        batch_size: int = 4,
        input_format: str = "BGR",
    ):
        """
        Args:
            model: an FCOS detector (possibly in DistributedDataParallel); its post-processor's
                NMS threshold and detections per image also apply to the merge.
            tile_size: ``TEST.SLICE.SIZE``, side of the square tiles in original-image pixels.
            overlap: ``TEST.SLICE.OVERLAP``, the share of a tile's side that neighbours share.
            full_image: ``TEST.SLICE.FULL_IMAGE``, also detect on the whole (resized) image.
            merge: ``TEST.SLICE.MERGE``, "nms" or "voting" (:func:`merge_detections`).
            drop_cut_boxes: ``TEST.SLICE.DROP_CUT_BOXES``, see :func:`uncut_boxes`.
            test_resize: what each tile and the full image go through before the detector, as in
                Detectron2's predictor (``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``); None:
                none.
            batch_size: ``TEST.SLICE.BATCH_SIZE``, tiles per forward pass.
            input_format: ``INPUT.FORMAT``, for images read from ``file_name``.
        """
        super().__init__()
        model = unwrap_model(model)
        check_that(
            isinstance(model, FCOS),
            "MODEL.META_ARCHITECTURE",
            "FCOS with TEST.SLICE.ENABLED",
            type(model).__name__,
            _WHERE,
        )
        check_that(
            model.core.inference_quality != "oracle",
            "MODEL.FCOS.INFERENCE_QUALITY",
            "'branch', 'none' or 'from_regression' with TEST.SLICE.ENABLED (the oracle needs "
            "ground truth in each tile)",
            model.core.inference_quality,
            _WHERE,
        )
        largest_stride = max(model.core.strides)
        check_that(
            isinstance(tile_size, int) and tile_size >= largest_stride,
            "TEST.SLICE.SIZE",
            f"an integer >= the largest stride {largest_stride} (MODEL.FCOS.FPN_STRIDES)",
            tile_size,
            f"{_WHERE} argument tile_size",
        )
        check_that(
            0 <= overlap < 1,
            "TEST.SLICE.OVERLAP",
            "in [0, 1)",
            overlap,
            f"{_WHERE} argument overlap",
        )
        check_choice(merge, MERGE_MODES, "TEST.SLICE.MERGE", f"{_WHERE} argument merge")
        check_that(
            batch_size >= 1, "TEST.SLICE.BATCH_SIZE", ">= 1", batch_size, f"{_WHERE} batch_size"
        )
        self.model = model
        self.tile_size = tile_size
        self.overlap = overlap
        self.full_image = full_image
        self.merge = merge
        self.drop_cut_boxes = drop_cut_boxes
        self.test_resize = test_resize
        self.batch_size = batch_size
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module) -> dict:
        sliced = cfg.TEST.SLICE
        return {
            "model": model,
            "tile_size": sliced.SIZE,
            "overlap": sliced.OVERLAP,
            "full_image": sliced.FULL_IMAGE,
            "merge": sliced.MERGE,
            "drop_cut_boxes": sliced.DROP_CUT_BOXES,
            "test_resize": T.ResizeShortestEdge(
                [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
            ),
            "batch_size": sliced.BATCH_SIZE,
            "input_format": cfg.INPUT.FORMAT,
        }

    @torch.no_grad()
    def forward(self, batched_inputs: list[dict]) -> list[dict[str, Instances]]:
        return [{"instances": self._inference_one_image(x)} for x in batched_inputs]

    def _original_image(self, inputs: dict) -> Tensor:
        """(3, H, W) pixels of the original image (see the class docstring)."""
        image = inputs.get("image")
        size = (inputs.get("height"), inputs.get("width"))
        if "file_name" in inputs and (image is None or tuple(image.shape[1:]) != size):
            pixels = read_image(inputs["file_name"], self.input_format)
            return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        if image is None:
            raise ValueError(f"{_WHERE} needs each input's 'image' or 'file_name'")
        return image

    def _network_input(self, pixels: Tensor) -> dict:
        """One tile (or the whole image) as the detector's input: resized to the test size, with
        the size its detections are to be returned in."""
        height, width = pixels.shape[1:]
        if self.test_resize is not None:
            array = pixels.permute(1, 2, 0).cpu().numpy()
            resize = self.test_resize.get_transform(array)
            same_size = isinstance(resize, T.ResizeTransform) and (
                (resize.new_h, resize.new_w) == (height, width)
            )
            if not same_size:
                array = resize.apply_image(array)
                pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return {"image": pixels, "height": height, "width": width}

    def _detect(self, inputs: list[dict]) -> list[Instances]:
        results = []
        for start in range(0, len(inputs), self.batch_size):
            outputs = self.model(inputs[start : start + self.batch_size])
            results.extend(output["instances"] for output in outputs)
        return results

    def _inference_one_image(self, inputs: dict) -> Instances:
        image = self._original_image(inputs)
        height, width = image.shape[1:]
        tiles = tile_grid(height, width, self.tile_size, self.overlap)
        whole = len(tiles) == 1  # one tile is the image itself: one pass
        crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in tiles.long().tolist()]
        per_tile = self._detect([self._network_input(crop) for crop in crops])
        device = per_tile[0].scores.device
        tiles = tiles.to(device)
        boxes = torch.cat(
            [d.pred_boxes.tensor + tiles[i, :2].repeat(2) for i, d in enumerate(per_tile)]
        )
        box_tiles = torch.cat(
            [
                torch.full((len(d),), i, dtype=torch.long, device=device)
                for i, d in enumerate(per_tile)
            ]
        )
        scores = torch.cat([d.scores for d in per_tile])
        classes = torch.cat([d.pred_classes for d in per_tile])
        if self.drop_cut_boxes and not whole:
            keep = uncut_boxes(boxes, box_tiles, tiles, (height, width))
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        if self.full_image and not whole:
            (full,) = self._detect([self._network_input(image)])
            boxes = torch.cat([boxes, full.pred_boxes.tensor])
            scores = torch.cat([scores, full.scores])
            classes = torch.cat([classes, full.pred_classes])
        postprocessor = self.model.core.postprocessor
        merged = merge_detections(
            boxes,
            scores,
            classes,
            (height, width),
            nms_threshold=postprocessor.nms_threshold,
            max_detections=postprocessor.post_nms_topk,
            box_voting=self.merge == "voting",
        )
        out_height, out_width = inputs.get("height", height), inputs.get("width", width)
        if (out_height, out_width) == (height, width):
            return merged
        return detector_postprocess(merged, out_height, out_width)


def build_slicing_model(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """``model`` wrapped for sliced inference where ``TEST.SLICE.ENABLED``, else ``model``."""
    return FCOSWithSlicing(cfg, model) if cfg.TEST.SLICE.ENABLED else model
