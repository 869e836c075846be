"""Synthetic "shapes" detection dataset: the embedded default dataset of the quickstart.

Generated locally, deterministically from a seed, so the quickstart needs no download and its
numbers are reproducible. The content is chosen so a small FCOS can learn it quickly yet every
part of the detector gets work:

- five classes, each drawn in its own band of hues (+-12 degrees around 5 evenly spaced hues,
  with random saturation and brightness, and contrasting with what lies under it): a small
  network trained from scratch for a few minutes picks up the colour cue early and the shape
  (which alone defines the box) as it goes; with random colours the quickstart model reached
  only ~12 AP in the same budget;
- the longer box side is log-uniform from ~10 px to 90% of the shorter image side, so every FPN
  level (strides 8..128) gets positives; aspect ratios 1:3..3:1 (1:2..2:1 for crosses and rings);
- frequent overlaps, also between classes: 35% of the objects after the first are centred inside
  an earlier one's box. Larger objects are drawn first, and a placement that would hide more than
  30% of an earlier object is retried elsewhere (or the object dropped), so all stay recognisable;
- every 25th image (4%) has no objects: negatives at known, seed-independent positions;
- textured backgrounds (smooth colour gradient, faint lines and soft blotches) and pixel noise.

Annotations are COCO json. ``bbox`` is the tight axis-aligned box of the full shape (also where a
later object covers part of it), clipped to the image, in float [x, y, w, h] pixels where pixel
column c spans [c, c + 1). ``area`` is the full shape's pixel count inside the image (COCO's
convention of a mask area, which COCOeval uses for its small/medium/large split), not w * h.
Image and annotation ids start at 1 (COCOeval reads an annotation id of 0 as "unmatched").
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..utils import atomic_write

SHAPES_CLASSES: tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross", "ring")

# Part of the cache folder name: bump it whenever a spec would produce other pixels or
# annotations, so that caches written by an older generator are not reused.
GENERATOR_VERSION = 3
ANNOTATIONS_FILE = "annotations.json"
IMAGES_FOLDER = "images"

MIN_IMAGE_SIDE = 32
MIN_OBJECT_SIDE = 10.0  # smallest longer box side, px: still a few stride-8 locations
MAX_OBJECT_FRACTION = 0.9  # largest longer box side, as a fraction of the shorter image side
MIN_SHORT_SIDE = 4.0  # keeps the thinnest small objects a few pixels wide
EMPTY_IMAGE_PERIOD = 25
OVERLAP_PROBABILITY = 0.35
MIN_VISIBLE_FRACTION = 0.7
MAX_PLACEMENT_TRIES = 10
MAX_OUTSIDE_FRACTION = 0.25  # an object may stick out of the image by this share of its box side
MIN_COLOUR_DISTANCE = 100.0  # Euclidean RGB distance to each region the object covers
MAX_COLOUR_TRIES = 20
HUE_JITTER = 12 / 360  # half-width of each class's hue band, as a fraction of the hue circle
OUTLINE_PROBABILITY = 0.5
OUTLINE_DARKENING = 0.55
NOISE_SIGMA = 4.0

_SHIFT = 4  # cv2 fixed-point fractional bits: sub-pixel shape geometry for small objects


@dataclass(frozen=True)
class ShapesSpec:
    """Everything that decides the content of a split: equal specs give identical files."""

    num_images: int
    image_size: tuple[int, int] = (256, 256)  # (height, width)
    max_objects: int = 6
    seed: int = 0
    # Largest longer box side in pixels; 0: MAX_OBJECT_FRACTION of the shorter image side (the
    # default splits). A few dozen pixels in a large image give the many small objects that
    # sliced inference is for.
    max_object_side: float = 0.0

    def __post_init__(self) -> None:
        # Checked here so that a bad value fails where it is written, not deep in generation.
        object.__setattr__(self, "num_images", _checked_int("num_images", self.num_images, 0))
        object.__setattr__(self, "max_objects", _checked_int("max_objects", self.max_objects, 0))
        object.__setattr__(self, "seed", _checked_int("seed", self.seed, 0))
        size = self.image_size
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(_is_int(side) and side >= MIN_IMAGE_SIDE for side in size)
        ):
            raise ValueError(
                f"ShapesSpec.image_size must be (height, width) with integer sides >= "
                f"{MIN_IMAGE_SIDE}, got {size!r}"
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        side = self.max_object_side
        if (
            not isinstance(side, (int, float, np.integer, np.floating))
            or isinstance(side, bool)
            or not (side == 0 or MIN_OBJECT_SIDE <= side)
        ):
            raise ValueError(
                f"ShapesSpec.max_object_side must be 0 or a number >= {MIN_OBJECT_SIDE}, "
                f"got {side!r}"
            )
        object.__setattr__(self, "max_object_side", float(side))

    @property
    def folder_name(self) -> str:
        height, width = self.image_size
        # Specs of the default object sizes keep the folder names of earlier releases' caches.
        side = f"_side{self.max_object_side:g}" if self.max_object_side else ""
        return (
            f"shapes_{self.num_images}x{height}x{width}_obj{self.max_objects}{side}"
            f"_seed{self.seed}_v{GENERATOR_VERSION}"
        )

    @property
    def largest_object_side(self) -> float:
        """The longest box side objects are drawn with, in pixels."""
        fraction_side = MAX_OBJECT_FRACTION * min(self.image_size)
        return min(self.max_object_side, fraction_side) if self.max_object_side else fraction_side


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _checked_int(field: str, value: object, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"ShapesSpec.{field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate_shapes_split(spec: ShapesSpec, out_dir: str | Path) -> Path:
    """Write ``out_dir/images/NNNNNN.png`` and ``out_dir/annotations.json``; return the json path.

    The json is written last and atomically: it marks the split as complete, so an interrupted run
    is regenerated by :func:`ensure_shapes_split` instead of being used half-written.
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_FOLDER
    images_dir.mkdir(parents=True, exist_ok=True)
    height, width = spec.image_size
    rng = np.random.default_rng(spec.seed)
    images: list[dict] = []
    annotations: list[dict] = []
    for index in range(spec.num_images):
        image_id = index + 1
        is_empty = spec.max_objects == 0 or image_id % EMPTY_IMAGE_PERIOD == 0
        num_objects = 0 if is_empty else int(rng.integers(1, spec.max_objects + 1))
        pixels, objects = _render_image(rng, height, width, num_objects, spec.largest_object_side)
        file_name = f"{index:06d}.png"
        ok, png = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"cv2 could not encode {file_name} as PNG")
        atomic_write(images_dir / file_name, png.tobytes(), durable=False)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for class_index, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": "fcos_d2 synthetic shapes dataset",
            "generator_version": GENERATOR_VERSION,
            "spec": asdict(spec),
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    json_path = out_dir / ANNOTATIONS_FILE
    text = json.dumps(coco, separators=(",", ":")).encode("utf-8")
    atomic_write(json_path, text, durable=False)
    return json_path


def ensure_shapes_split(spec: ShapesSpec, root: str | Path) -> tuple[Path, Path]:
    """``(json_path, image_root)`` of the split cached under ``root``; generated only if absent."""
    split_dir = Path(root) / spec.folder_name
    json_path = split_dir / ANNOTATIONS_FILE
    if not json_path.is_file():
        generate_shapes_split(spec, split_dir)
    return json_path, split_dir / IMAGES_FOLDER


def register_shapes_dataset(name: str, spec: ShapesSpec, root: str | Path) -> None:
    """Register ``name`` in Detectron2's catalogs as the (generated if needed) split of ``spec``.

    Idempotent for the same split, so scripts can call it unconditionally; a clash with another
    split under the same name raises instead of silently training on the wrong data.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_path = (Path(root) / spec.folder_name / ANNOTATIONS_FILE).resolve()
    if name in DatasetCatalog.list():
        registered_json = MetadataCatalog.get(name).get("json_file", None)
        if registered_json is not None and Path(registered_json).resolve() == json_path:
            return
        raise ValueError(
            f"dataset {name!r} is already registered with annotations {registered_json}, "
            f"not {json_path}"
        )
    json_path, image_root = ensure_shapes_split(spec, root)
    # thing_classes is also set by the COCO loader on load; setting it now lets Visualizer and
    # evaluators use the class names before the dataset is first loaded.
    register_coco_instances(
        name,
        {"thing_classes": list(SHAPES_CLASSES)},
        str(json_path.resolve()),
        str(image_root.resolve()),
    )


def default_shapes_root() -> Path:
    """``$FCOS_D2_DATASETS`` if set, else ``datasets/`` in the repository (git-ignored)."""
    from_env = os.environ.get("FCOS_D2_DATASETS")
    if from_env:
        return Path(from_env)
    return Path(__file__).resolve().parents[2] / "datasets"


# ----------------------------------------------------------------------------------------------
# Rendering


Box = tuple[float, float, float, float]  # x0, y0, x1, y1: the nominal box a shape is drawn into


def _fixed_point(points: object) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * (1 << _SHIFT)).astype(np.int32)


def _fill_polygon(mask: np.ndarray, points: list[tuple[float, float]], value: int = 1) -> None:
    cv2.fillPoly(mask, [_fixed_point(points)], value, cv2.LINE_8, _SHIFT)


def _fill_ellipse(mask: np.ndarray, box: Box, scale: float = 1.0, value: int = 1) -> None:
    x0, y0, x1, y1 = box
    center = _fixed_point(((x0 + x1) / 2, (y0 + y1) / 2))
    axes = _fixed_point((max((x1 - x0) / 2 * scale, 0.5), max((y1 - y0) / 2 * scale, 0.5)))
    cv2.ellipse(
        mask, tuple(center.tolist()), tuple(axes.tolist()), 0, 0, 360, value, -1, cv2.LINE_8, _SHIFT
    )


def _draw_rectangle(mask: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    _fill_polygon(mask, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def _draw_ellipse(mask: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    _fill_ellipse(mask, box)


def _draw_triangle(mask: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    """Base along one side of the box, apex anywhere on the opposite side: fills the box tightly."""
    x0, y0, x1, y1 = box
    t = rng.uniform(0.0, 1.0)
    side = int(rng.integers(4))
    if side == 0:  # apex on top
        corners = [(x0, y1), (x1, y1), (x0 + t * (x1 - x0), y0)]
    elif side == 1:  # apex at the bottom
        corners = [(x0, y0), (x1, y0), (x0 + t * (x1 - x0), y1)]
    elif side == 2:  # apex on the left
        corners = [(x1, y0), (x1, y1), (x0, y0 + t * (y1 - y0))]
    else:  # apex on the right
        corners = [(x0, y0), (x0, y1), (x1, y0 + t * (y1 - y0))]
    _fill_polygon(mask, corners)


def _draw_cross(mask: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    """A plus sign: full-width and full-height bars crossing near (not always at) the middle."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    bar_w, bar_h = (max(f, 2.0) for f in rng.uniform(0.25, 0.4, size=2) * (w, h))
    cx = x0 + rng.uniform(0.4, 0.6) * w
    cy = y0 + rng.uniform(0.4, 0.6) * h
    _fill_polygon(
        mask,
        [(x0, cy - bar_h / 2), (x1, cy - bar_h / 2), (x1, cy + bar_h / 2), (x0, cy + bar_h / 2)],
    )
    _fill_polygon(
        mask,
        [(cx - bar_w / 2, y0), (cx + bar_w / 2, y0), (cx + bar_w / 2, y1), (cx - bar_w / 2, y1)],
    )


def _draw_ring(mask: np.ndarray, box: Box, rng: np.random.Generator) -> None:
    _fill_ellipse(mask, box)
    _fill_ellipse(mask, box, scale=1.0 - rng.uniform(0.3, 0.5), value=0)


_DRAWERS: tuple[Callable[[np.ndarray, Box, np.random.Generator], None], ...] = (
    _draw_rectangle,
    _draw_ellipse,
    _draw_triangle,
    _draw_cross,
    _draw_ring,
)
_MAX_ASPECT = (3.0, 3.0, 3.0, 2.0, 2.0)  # per class; crosses and rings lose their look when thin


def _sample_size(
    rng: np.random.Generator, max_aspect: float, max_side: float
) -> tuple[float, float]:
    """(w, h) with a log-uniform longer side and a log-uniform aspect ratio."""
    long_side = math.exp(rng.uniform(math.log(MIN_OBJECT_SIDE), math.log(max_side)))
    aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))  # w / h
    short_side = max(long_side / max(aspect, 1.0 / aspect), min(long_side, MIN_SHORT_SIDE))
    return (long_side, short_side) if aspect >= 1.0 else (short_side, long_side)


def _sample_box(
    rng: np.random.Generator, w: float, h: float, height: int, width: int, placed: list[Box]
) -> Box:
    """Mostly inside the image; with OVERLAP_PROBABILITY centred inside an earlier object's box."""
    x_low, x_high = -MAX_OUTSIDE_FRACTION * w, width - (1 - MAX_OUTSIDE_FRACTION) * w
    y_low, y_high = -MAX_OUTSIDE_FRACTION * h, height - (1 - MAX_OUTSIDE_FRACTION) * h
    if placed and rng.random() < OVERLAP_PROBABILITY:
        bx0, by0, bx1, by1 = placed[int(rng.integers(len(placed)))]
        x0 = rng.uniform(bx0, bx1) - w / 2
        y0 = rng.uniform(by0, by1) - h / 2
    else:
        x0, y0 = rng.uniform(x_low, x_high), rng.uniform(y_low, y_high)
    # Clipping moves the box inwards only, so it still contains the centre sampled above.
    x0, y0 = float(np.clip(x0, x_low, x_high)), float(np.clip(y0, y_low, y_high))
    return x0, y0, x0 + w, y0 + h


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) with exclusive x1, y1 of the set pixels, or None if there are none."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _class_colour(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """RGB in [0, 255] from the class's hue band, with random saturation and brightness."""
    hue = (class_index / len(SHAPES_CLASSES) + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.65, 1.0))
    return np.asarray(rgb, dtype=np.float32) * 255


def _contrasting_colour(
    rng: np.random.Generator,
    canvas: np.ndarray,
    owner: np.ndarray,
    covered: np.ndarray,
    class_index: int,
) -> np.ndarray:
    """A class colour far from the mean colour of each region (background, objects) it covers."""
    labels = owner[covered] + 1  # 0: background
    pixels = canvas[covered]
    counts = np.bincount(labels)
    regions = np.flatnonzero(counts >= 0.1 * labels.size)
    means = np.stack(
        [np.bincount(labels, weights=pixels[:, c])[regions] / counts[regions] for c in range(3)],
        axis=1,
    )
    best, best_distance = None, -1.0
    for _ in range(MAX_COLOUR_TRIES):
        colour = _class_colour(rng, class_index)
        distance = float(np.linalg.norm(means - colour, axis=1).min())
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= MIN_COLOUR_DISTANCE:
            break
    return best


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradient with a few faint lines and soft blotches (float32 RGB)."""
    # Muted (greyish) colours, so that the saturated objects stand out from the background.
    base = rng.uniform(70.0, 190.0) + rng.uniform(-25.0, 25.0, size=3)
    grid = (base + rng.uniform(-35.0, 35.0, size=(3, 3, 3))).astype(np.float32)
    canvas = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 4))):
        p0 = tuple(int(v) for v in rng.uniform((0, 0), (width, height)))
        p1 = tuple(int(v) for v in rng.uniform((0, 0), (width, height)))
        colour = tuple(float(v) for v in base + rng.uniform(-30.0, 30.0, size=3))
        cv2.line(canvas, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(0.05, 0.25) * min(height, width)
        blotch = np.zeros((height, width), np.float32)
        center = tuple(int(v) for v in rng.uniform((0, 0), (width, height)))
        cv2.circle(blotch, center, int(radius), 1.0, -1)
        alpha = cv2.GaussianBlur(blotch, (0, 0), radius / 2)[..., None] * rng.uniform(0.15, 0.3)
        tint = base + rng.uniform(-60.0, 60.0, size=3)
        canvas = canvas * (1 - alpha) + tint.astype(np.float32) * alpha
    return np.clip(canvas, 0.0, 255.0)


def _render_image(
    rng: np.random.Generator, height: int, width: int, num_objects: int, max_side: float
) -> tuple[np.ndarray, list[tuple[int, list[float], float]]]:
    """One uint8 RGB image and its objects (longer side up to ``max_side`` px) as (class index,
    COCO bbox, pixel area)."""
    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)  # which object shows at each pixel; -1: none
    plans = []
    for _ in range(num_objects):
        class_index = int(rng.integers(len(SHAPES_CLASSES)))
        plans.append((class_index, *_sample_size(rng, _MAX_ASPECT[class_index], max_side)))
    plans.sort(key=lambda plan: -max(plan[1], plan[2]))  # large first: small ones stay on top

    placed: list[Box] = []
    full_areas: list[int] = []
    visible_areas: list[int] = []
    objects: list[tuple[int, list[float], float]] = []
    for class_index, w, h in plans:
        for _ in range(MAX_PLACEMENT_TRIES):
            box = _sample_box(rng, w, h, height, width, placed)
            mask = np.zeros((height, width), np.uint8)
            _DRAWERS[class_index](mask, box, rng)
            covered = mask.astype(bool)
            tight = _tight_box(covered)
            if tight is None or tight[2] - tight[0] < 2 or tight[3] - tight[1] < 2:
                continue
            hidden = np.bincount(owner[covered] + 1, minlength=len(placed) + 1)[1:]
            visible_after = np.asarray(visible_areas) - hidden
            if np.any(visible_after < MIN_VISIBLE_FRACTION * np.asarray(full_areas)):
                continue
            break
        else:
            continue  # no placement keeps the earlier objects recognisable: drop this one
        colour = _contrasting_colour(rng, canvas, owner, covered, class_index)
        canvas[covered] = colour
        if rng.random() < OUTLINE_PROBABILITY:
            outline = covered & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
            canvas[outline] = colour * OUTLINE_DARKENING
        owner[covered] = len(placed)
        area = int(covered.sum())
        visible_areas = [*visible_after.tolist(), area]
        full_areas.append(area)
        placed.append(tuple(float(v) for v in tight))
        x0, y0, x1, y1 = tight
        objects.append(
            (class_index, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], float(area))
        )

    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * NOISE_SIGMA
    return np.clip(np.rint(canvas + noise), 0, 255).astype(np.uint8), objects
