"""Datasets: the synthetic "shapes" set that the quickstart trains on without any download."""

from .shapes import (
    SHAPES_CLASSES,
    ShapesSpec,
    default_shapes_root,
    ensure_shapes_split,
    generate_shapes_split,
    register_shapes_dataset,
)

__all__ = [
    "SHAPES_CLASSES",
    "ShapesSpec",
    "default_shapes_root",
    "ensure_shapes_split",
    "generate_shapes_split",
    "register_shapes_dataset",
]
