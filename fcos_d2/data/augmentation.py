"""Training-time multi-scale resizing with one size per batch.

Detectron2's ``ResizeShortestEdge`` in "choice" mode draws a size per image, and a batch is padded
to its largest image: with four sizes and four images per batch, about 70% of the batches cost as
much as if every image had the largest size. Drawing one size per batch (as YOLO-style detectors
do) keeps the cheaper steps cheap. ``INPUT.MIN_SIZE_TRAIN_SAMPLING: "choice_per_batch"`` (ours)
selects it.
"""

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.utils import comm
from PIL import Image

from ..checks import check_choice, check_that
from .resumable import block_rng, current_sample

SAMPLING_STYLES = ("choice", "range", "choice_per_batch")


class ResizeShortestEdgePerBatch(T.ResizeShortestEdge):
    """``ResizeShortestEdge`` that draws its shorter side from ``short_edge_length`` once every
    ``images_per_batch`` images.

    In fcos_d2's training loader (:mod:`fcos_d2.data.resumable`) the size is drawn per block of
    ``images_per_batch`` consecutive positions, seeded by the block: the images of one batch
    share a size with any number of loader processes, whenever batches are consecutive positions
    (one aspect-ratio group, as for the square shapes images). In Detectron2's loader it is drawn
    every ``images_per_batch`` mapper calls of each loader process. Otherwise sizes mix within
    batches, which is still correct, as Detectron2's "choice" is, only not cheaper.
    """

    def __init__(
        self, short_edge_length, max_size: int, images_per_batch: int, interp=Image.BILINEAR
    ):
        super().__init__(short_edge_length, max_size, sample_style="choice", interp=interp)
        check_that(
            images_per_batch >= 1,
            "images_per_batch",
            ">= 1",
            images_per_batch,
            "ResizeShortestEdgePerBatch",
        )
        self.images_per_batch = images_per_batch
        self._images_seen = 0
        self._size = int(self.short_edge_length[0])

    def get_transform(self, image: np.ndarray) -> T.Transform:
        sample = current_sample()
        if sample is not None:
            rng = block_rng(sample[1] // self.images_per_batch)
            self._size = int(rng.choice(self.short_edge_length))
        elif self._images_seen % self.images_per_batch == 0:
            self._size = int(np.random.choice(self.short_edge_length))
        self._images_seen += 1
        if self._size == 0:  # as ResizeShortestEdge: size 0 keeps the image
            return T.NoOpTransform()
        height, width = image.shape[:2]
        new_h, new_w = T.ResizeShortestEdge.get_output_shape(
            height, width, self._size, self.max_size
        )
        return T.ResizeTransform(height, width, new_h, new_w, self.interp)


def build_train_mapper(cfg: CfgNode) -> DatasetMapper:
    """Detectron2's training ``DatasetMapper``, whose resize draws one size per batch (per
    process) with ``INPUT.MIN_SIZE_TRAIN_SAMPLING: "choice_per_batch"``."""
    sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    check_choice(sampling, SAMPLING_STYLES, "INPUT.MIN_SIZE_TRAIN_SAMPLING")
    if sampling != "choice_per_batch":
        return DatasetMapper(cfg, is_train=True)
    choice_cfg = cfg.clone()
    choice_cfg.defrost()
    choice_cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    mapper_args = DatasetMapper.from_config(choice_cfg, is_train=True)
    images_per_batch = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
    mapper_args["augmentations"] = [
        ResizeShortestEdgePerBatch(aug.short_edge_length, aug.max_size, images_per_batch)
        if isinstance(aug, T.ResizeShortestEdge)
        else aug
        for aug in mapper_args["augmentations"]
    ]
    return DatasetMapper(**mapper_args)
