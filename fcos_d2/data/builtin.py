"""Datasets named by the config: the embedded "shapes" splits (``DATASETS.SHAPES.*``) and your own
(``DATASETS.COCO_JSON``, ``DATASETS.VOC_DIR``); keys added by :func:`fcos_d2.add_fcos_config`.
Without a yacs config (LazyConfig), :func:`register_shapes` takes the shapes settings as
keywords."""

from collections.abc import Sequence
from pathlib import Path
from typing import Union

from detectron2.config import CfgNode as CN
from detectron2.utils import comm

from ..checks import check_that
from .shapes import ShapesSpec, default_shapes_root, register_shapes_dataset
from .user_datasets import register_user_datasets

# Split name -> offset added to DATASETS.SHAPES.SEED, so that no two splits share images.
SHAPES_SPLITS: dict[str, int] = {"shapes_train": 0, "shapes_val": 1000, "shapes_large_val": 2000}


def register_shapes(
    names: Union[str, Sequence[str]] = tuple(SHAPES_SPLITS),
    *,
    root: str = "",
    num_train: int = 512,
    num_val: int = 128,
    image_size: Sequence[int] = (256, 256),
    max_objects: int = 6,
    seed: int = 0,
    num_large_val: int = 32,
    large_image_size: Sequence[int] = (1024, 1024),
    large_max_objects: int = 60,
    large_max_object_side: float = 64.0,
) -> list[str]:
    """Register the shapes splits ``names`` (writing their files on first use); returns them.

    Arguments mirror ``DATASETS.SHAPES.*`` (``root`` "": ``$FCOS_D2_DATASETS``, else
    ``<repository>/datasets``; the ``large_*`` ones are for ``shapes_large_val``). The local main
    process generates the files while the others wait, so that several processes never write the
    same files.
    """
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    unknown = [name for name in names if name not in SHAPES_SPLITS]
    check_that(not unknown, "shapes split names", f"in {list(SHAPES_SPLITS)}", unknown)
    large = ShapesSpec(
        num_images=num_large_val,
        image_size=tuple(large_image_size),
        max_objects=large_max_objects,
        seed=seed + SHAPES_SPLITS["shapes_large_val"],
        max_object_side=large_max_object_side,
    )
    specs = {
        name: large
        if name == "shapes_large_val"
        else ShapesSpec(
            num_images=num_train if name == "shapes_train" else num_val,
            image_size=tuple(image_size),
            max_objects=max_objects,
            seed=seed + SHAPES_SPLITS[name],
        )
        for name in names
    }
    folder = Path(root) if root else default_shapes_root()
    if comm.get_local_rank() == 0:
        for name, spec in specs.items():
            register_shapes_dataset(name, spec, folder)
    comm.synchronize()
    if comm.get_local_rank() != 0:
        for name, spec in specs.items():
            register_shapes_dataset(name, spec, folder)
    return names


def register_shapes_from_config(cfg: CN) -> None:
    """Register the shapes splits that ``cfg.DATASETS.TRAIN`` / ``TEST`` use."""
    wanted = [name for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if name in SHAPES_SPLITS]
    if not wanted:
        return
    shapes = cfg.DATASETS.SHAPES
    register_shapes(
        wanted,
        root=shapes.ROOT,
        num_train=shapes.NUM_TRAIN,
        num_val=shapes.NUM_VAL,
        image_size=shapes.IMAGE_SIZE,
        max_objects=shapes.MAX_OBJECTS,
        seed=shapes.SEED,
        num_large_val=shapes.NUM_LARGE_VAL,
        large_image_size=shapes.LARGE_IMAGE_SIZE,
        large_max_objects=shapes.LARGE_MAX_OBJECTS,
        large_max_object_side=shapes.LARGE_MAX_OBJECT_SIDE,
    )


def register_datasets_from_config(cfg: CN) -> None:
    """Register every dataset the config defines: the shapes splits it uses, then
    ``DATASETS.COCO_JSON`` and ``DATASETS.VOC_DIR`` (checked, with errors naming the entry)."""
    register_shapes_from_config(cfg)
    register_user_datasets(cfg)
