"""Datasets named by the config: the embedded "shapes" splits (``DATASETS.SHAPES.*``) and your own
(``DATASETS.COCO_JSON``, ``DATASETS.VOC_DIR``); keys added by :func:`fcos_d2.add_fcos_config`."""

from pathlib import Path

from detectron2.config import CfgNode as CN
from detectron2.utils import comm

from .shapes import ShapesSpec, default_shapes_root, register_shapes_dataset
from .user_datasets import register_user_datasets

# Split name -> offset added to DATASETS.SHAPES.SEED, so that train and val never share images.
SHAPES_SPLITS: dict[str, int] = {"shapes_train": 0, "shapes_val": 1000}


def shapes_spec(cfg: CN, split: str) -> ShapesSpec:
    shapes = cfg.DATASETS.SHAPES
    return ShapesSpec(
        num_images=shapes.NUM_TRAIN if split == "shapes_train" else shapes.NUM_VAL,
        image_size=tuple(shapes.IMAGE_SIZE),
        max_objects=shapes.MAX_OBJECTS,
        seed=shapes.SEED + SHAPES_SPLITS[split],
    )


def register_shapes_from_config(cfg: CN) -> None:
    """Register the shapes splits that ``cfg.DATASETS`` uses, writing their files on first use.

    The local main process generates the files while the others wait, so that several processes
    never write the same files.
    """
    wanted = [name for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if name in SHAPES_SPLITS]
    if not wanted:
        return
    root = Path(cfg.DATASETS.SHAPES.ROOT) if cfg.DATASETS.SHAPES.ROOT else default_shapes_root()
    names = list(dict.fromkeys(wanted))
    if comm.get_local_rank() == 0:
        for name in names:
            register_shapes_dataset(name, shapes_spec(cfg, name), root)
    comm.synchronize()
    if comm.get_local_rank() != 0:
        for name in names:
            register_shapes_dataset(name, shapes_spec(cfg, name), root)


def register_datasets_from_config(cfg: CN) -> None:
    """Register every dataset the config defines: the shapes splits it uses, then
    ``DATASETS.COCO_JSON`` and ``DATASETS.VOC_DIR`` (checked, with errors naming the entry)."""
    register_shapes_from_config(cfg)
    register_user_datasets(cfg)
