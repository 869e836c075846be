"""Multi-scale training with one size per batch (MIN_SIZE_TRAIN_SAMPLING "choice_per_batch")."""

import numpy as np
import pytest
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.data import transforms as T
from helpers import QUICKSTART, shapes_root

from fcos_d2.checks import ConfigError
from fcos_d2.config import build_cfg
from fcos_d2.data.augmentation import ResizeShortestEdgePerBatch, build_train_mapper
from fcos_d2.data.builtin import register_datasets_from_config

SIZES = (160, 192, 224, 256)


def test_consecutive_images_share_a_size_per_batch():
    np.random.seed(0)
    resize = ResizeShortestEdgePerBatch(SIZES, max_size=256, images_per_batch=4)
    square = np.zeros((200, 200, 3), np.uint8)
    shapes = [resize.get_transform(square) for _ in range(40)]
    heights = [t.new_h for t in shapes]
    assert [t.new_w for t in shapes] == heights
    batches = [heights[i : i + 4] for i in range(0, 40, 4)]
    assert all(len(set(b)) == 1 for b in batches)
    assert set(heights) <= set(SIZES) and len(set(heights)) > 1
    # The longer side is capped at max_size as by Detectron2's ResizeShortestEdge.
    wide = resize.get_transform(np.zeros((100, 400, 3), np.uint8))
    assert (wide.new_h, wide.new_w) == (64, 256)


def _cfg(sampling: str, tmp_path):
    return build_cfg(
        QUICKSTART,
        [
            "MODEL.DEVICE", "cpu",
            "DATASETS.SHAPES.ROOT", str(shapes_root()),
            "DATASETS.SHAPES.NUM_TRAIN", "16",
            "DATASETS.SHAPES.NUM_VAL", "8",
            "DATASETS.SHAPES.IMAGE_SIZE", "[128, 128]",
            "INPUT.MIN_SIZE_TRAIN", "(64, 96, 128)",
            "INPUT.MAX_SIZE_TRAIN", "128",
            "INPUT.MIN_SIZE_TRAIN_SAMPLING", sampling,
            "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(tmp_path),
        ],
    )  # fmt: skip


def test_the_training_loader_gives_one_size_per_batch(tmp_path):
    cfg = _cfg("choice_per_batch", tmp_path)
    register_datasets_from_config(cfg)
    mapper = build_train_mapper(cfg)
    assert isinstance(mapper.augmentations.augs[0], ResizeShortestEdgePerBatch)
    assert isinstance(mapper.augmentations.augs[1], T.RandomFlip)
    loader = iter(build_detection_train_loader(cfg, mapper=mapper))
    sizes = []
    for _ in range(12):
        batch = next(loader)
        assert len(batch) == cfg.SOLVER.IMS_PER_BATCH
        assert len({d["image"].shape for d in batch}) == 1
        sizes.append(batch[0]["image"].shape[-1])
    assert len(set(sizes)) > 1 and set(sizes) <= {64, 96, 128}


def test_detectron2_samplings_keep_detectron2s_mapper(tmp_path):
    mapper = build_train_mapper(_cfg("choice", tmp_path))
    assert type(mapper) is DatasetMapper
    assert type(mapper.augmentations.augs[0]) is T.ResizeShortestEdge


def test_an_unknown_sampling_is_named(tmp_path):
    with pytest.raises(ConfigError, match="INPUT.MIN_SIZE_TRAIN_SAMPLING.*'per_image'"):
        build_train_mapper(_cfg("per_image", tmp_path))
