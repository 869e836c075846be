"""The synthetic "shapes" dataset: determinism, COCO validity, content, caching, registration.

Most tests share one split of 60 images of 256x256 (seed 0, up to 8 objects), generated once per
module. Known answers of that spec: images 25 and 50 are the empty ones (every 25th image), and
every other image has at least one object (the first object of an image is always placed).
"""

import itertools
import json
import os
import uuid

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from fcos_d2.data import (
    SHAPES_CLASSES,
    ShapesSpec,
    default_shapes_root,
    ensure_shapes_split,
    generate_shapes_split,
    register_shapes_dataset,
)
from fcos_d2.data import shapes as shapes_module

SPEC = ShapesSpec(num_images=60, image_size=(256, 256), max_objects=8, seed=0)
SMALL_SPEC = ShapesSpec(num_images=6, image_size=(128, 128), max_objects=4, seed=1)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """(COCO api, image folder) of SPEC."""
    out_dir = tmp_path_factory.mktemp("shapes")
    json_path = generate_shapes_split(SPEC, out_dir)
    return COCO(str(json_path)), out_dir / "images"


def _boxes_by_image(coco):
    return {
        image_id: [(a["bbox"], a["category_id"]) for a in coco.imgToAnns[image_id]]
        for image_id in coco.getImgIds()
    }


def _overlap(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)


def _pixels(image_dir):
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(image_dir.glob("*.png"))]


def test_same_spec_gives_identical_files_and_other_seed_differs(tmp_path):
    first = generate_shapes_split(SMALL_SPEC, tmp_path / "a")
    second = generate_shapes_split(SMALL_SPEC, tmp_path / "b")
    other = generate_shapes_split(ShapesSpec(6, (128, 128), 4, seed=2), tmp_path / "c")
    assert first.read_bytes() == second.read_bytes()
    pixels_a, pixels_b = _pixels(tmp_path / "a" / "images"), _pixels(tmp_path / "b" / "images")
    assert len(pixels_a) == 6
    assert all(np.array_equal(a, b) for a, b in zip(pixels_a, pixels_b))
    assert first.read_bytes() != other.read_bytes()
    assert not np.array_equal(pixels_a[0], _pixels(tmp_path / "c" / "images")[0])


def test_coco_json_categories_and_images(split):
    coco, image_dir = split
    categories = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in categories] == list(enumerate(SHAPES_CLASSES, start=1))
    images = coco.loadImgs(coco.getImgIds())
    assert [image["id"] for image in images] == list(range(1, 61))
    for image in images:
        pixels = cv2.imread(str(image_dir / image["file_name"]), cv2.IMREAD_UNCHANGED)
        assert pixels.shape == (256, 256, 3)
        assert (image["height"], image["width"]) == (256, 256)
    # Every class occurs, so every class gets trained.
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {1, 2, 3, 4, 5}


def test_boxes_are_valid(split):
    coco, _ = split
    annotations = coco.dataset["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    for a in annotations:
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256
        assert w >= 2 and h >= 2
        assert a["iscrowd"] == 0
        # area is the shape's pixel count: positive, at most the box area.
        assert 0 < a["area"] <= w * h


def test_box_sizes_span_small_to_large(split):
    coco, _ = split
    longer_sides = [max(a["bbox"][2:]) for a in coco.dataset["annotations"]]
    assert min(longer_sides) < 24
    assert max(longer_sides) > 128
    aspects = [a["bbox"][2] / a["bbox"][3] for a in coco.dataset["annotations"]]
    assert min(aspects) < 0.5 and max(aspects) > 2


def test_overlaps_are_frequent_and_across_classes(split):
    coco, _ = split
    with_overlap = 0
    cross_class_overlaps = 0
    for boxes in _boxes_by_image(coco).values():
        pairs = [(a, b) for a, b in itertools.combinations(boxes, 2) if _overlap(a[0], b[0])]
        with_overlap += bool(pairs)
        cross_class_overlaps += sum(a[1] != b[1] for a, b in pairs)
    assert with_overlap >= 0.4 * 60
    assert cross_class_overlaps >= 1


def test_every_25th_image_is_empty(split):
    coco, _ = split
    empty = sorted(image_id for image_id, boxes in _boxes_by_image(coco).items() if not boxes)
    assert empty == [25, 50]


def test_ensure_generates_once(tmp_path):
    json_path, image_root = ensure_shapes_split(SMALL_SPEC, tmp_path)
    assert json_path == tmp_path / SMALL_SPEC.folder_name / "annotations.json"
    assert SMALL_SPEC.folder_name.startswith("shapes_6x128x128_obj4_seed1")
    assert len(list(image_root.glob("*.png"))) == 6
    mtime = json_path.stat().st_mtime_ns
    assert ensure_shapes_split(SMALL_SPEC, tmp_path) == (json_path, image_root)
    assert json_path.stat().st_mtime_ns == mtime


def test_interrupted_generation_is_not_taken_as_complete(tmp_path, monkeypatch):
    render = shapes_module._render_image
    calls = []

    def render_then_fail(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*args)

    monkeypatch.setattr(shapes_module, "_render_image", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_split(SMALL_SPEC, tmp_path)
    split_dir = tmp_path / SMALL_SPEC.folder_name
    assert not (split_dir / "annotations.json").exists()
    assert [p.name for p in split_dir.rglob(".*")] == []  # no temporary files left behind
    monkeypatch.undo()
    json_path, _ = ensure_shapes_split(SMALL_SPEC, tmp_path)
    assert len(json.loads(json_path.read_text())["images"]) == 6


@pytest.fixture
def dataset_name():
    name = f"shapes_test_{uuid.uuid4().hex}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_loads_dicts_and_is_idempotent(tmp_path, dataset_name):
    register_shapes_dataset(dataset_name, SMALL_SPEC, tmp_path)
    assert MetadataCatalog.get(dataset_name).thing_classes == list(SHAPES_CLASSES)
    dicts = DatasetCatalog.get(dataset_name)
    assert len(dicts) == 6
    annotations = [a for d in dicts for a in d["annotations"]]
    assert annotations and all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in annotations)
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert {a["category_id"] for a in annotations} <= set(range(5))  # contiguous after loading
    register_shapes_dataset(dataset_name, SMALL_SPEC, tmp_path)  # same split: no-op
    with pytest.raises(ValueError, match=dataset_name):
        register_shapes_dataset(dataset_name, ShapesSpec(6, (128, 128), 4, seed=2), tmp_path)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FCOS_D2_DATASETS", str(tmp_path))
    assert default_shapes_root() == tmp_path
    monkeypatch.delenv("FCOS_D2_DATASETS")
    root = default_shapes_root()
    assert root.name == "datasets" and (root.parent / "fcos_d2" / "data" / "shapes.py").is_file()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_images": -1}, "num_images"),
        ({"num_images": 2, "image_size": (31, 256)}, "image_size"),
        ({"num_images": 2, "image_size": (256,)}, "image_size"),
        ({"num_images": 2, "max_objects": -1}, "max_objects"),
        ({"num_images": 2, "seed": -3}, "seed"),
        ({"num_images": 2.5}, "num_images"),
        ({"num_images": 2, "max_object_side": 5}, "max_object_side"),
        ({"num_images": 2, "max_object_side": True}, "max_object_side"),
    ],
)
def test_bad_spec_raises(kwargs, field):
    with pytest.raises(ValueError) as error:
        ShapesSpec(**kwargs)
    assert f"ShapesSpec.{field}" in str(error.value) and repr(kwargs[field]) in str(error.value)


def test_large_image_variant_draws_small_objects_and_keeps_default_names(tmp_path):
    """``max_object_side`` caps the objects' longer side (up to the rasterised pixel); specs
    without it keep the folder names of the caches written before it existed."""
    assert ShapesSpec(128, seed=1000).folder_name == "shapes_128x256x256_obj6_seed1000_v3"
    spec = ShapesSpec(3, (320, 400), max_objects=30, seed=4, max_object_side=24)
    assert spec.folder_name == "shapes_3x320x400_obj30_side24_seed4_v3"
    coco = COCO(str(generate_shapes_split(spec, tmp_path)))
    sides = [max(a["bbox"][2:]) for a in coco.dataset["annotations"]]
    assert len(sides) >= 20 and max(sides) <= 25 and min(sides) >= 4
    assert {(i["height"], i["width"]) for i in coco.dataset["images"]} == {(320, 400)}


def test_register_shapes_large_val(tmp_path):
    from fcos_d2.data.builtin import register_shapes

    name = "shapes_large_val"
    if name in DatasetCatalog.list():  # registered by another test with other files
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    try:
        register_shapes(
            name,
            root=str(tmp_path),
            num_large_val=2,
            large_image_size=(200, 300),
            large_max_objects=10,
            large_max_object_side=20,
            seed=7,
        )
        records = DatasetCatalog.get(name)
        assert [(r["height"], r["width"]) for r in records] == [(200, 300)] * 2
        assert (tmp_path / "shapes_2x200x300_obj10_side20_seed2007_v3").is_dir()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
