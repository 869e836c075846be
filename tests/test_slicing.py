"""Sliced inference: the tile grid, boxes mapped back to the image, one detection per object after
the merge (also for objects cut by a tile border), the real detector, the predictor, evaluation."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from helpers import QUICKSTART, synthetic_image, tiny_opts
from torch import nn

from fcos_d2.checks import ConfigError
from fcos_d2.inference import FCOSPredictor, FCOSWithSlicing, build_slicing_model
from fcos_d2.inference.slicing import tile_grid, tile_starts, uncut_boxes
from fcos_d2.modeling import FCOS
from fcos_d2.modeling.postprocess import FCOSPostProcessor


def test_tile_starts_step_by_size_minus_overlap_and_end_at_the_border():
    # 256 px tiles sharing round(0.2 * 256) = 51 px: a step of 205; the last moved back to 768.
    assert tile_starts(1024, 256, 0.2) == [0, 205, 410, 615, 768]
    assert tile_starts(1024, 256, 0.0) == [0, 256, 512, 768]
    assert tile_starts(256, 256, 0.5) == [0]
    assert tile_starts(100, 256, 0.2) == [0]  # smaller than a tile: the image itself
    assert tile_starts(300, 256, 0.0) == [0, 44]


@pytest.mark.parametrize(
    "height, width, size, overlap",
    [(1024, 1024, 256, 0.2), (700, 1300, 256, 0.25), (300, 200, 128, 0.0), (90, 500, 128, 0.5)],
)
def test_tile_grid_covers_the_image_with_the_overlap(height, width, size, overlap):
    tiles = tile_grid(height, width, size, overlap).long()
    covered = torch.zeros(height, width, dtype=torch.int32)
    for x0, y0, x1, y1 in tiles.tolist():
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (x1 - x0, y1 - y0) == (min(size, width), min(size, height))  # all whole
        covered[y0:y1, x0:x1] += 1
    assert (covered >= 1).all()
    # Neighbours along each axis share at least the overlap.
    for axis, length in ((0, width), (1, height)):
        starts = sorted(set(tiles[:, axis].tolist()))
        for a, b in zip(starts, starts[1:]):
            assert min(size, length) - (b - a) >= round(overlap * size)


def test_uncut_boxes_drop_a_cut_box_only_where_another_tile_sees_it_whole():
    # Two tiles of a 100 x 160 image: [0, 100) and [60, 160) in x, sharing x 60..100.
    tiles = torch.tensor([[0.0, 0.0, 100.0, 100.0], [60.0, 0.0, 160.0, 100.0]])
    boxes = torch.tensor(
        [
            [70.0, 10.0, 100.0, 30.0],  # tile 0, cut at its inner side x=100; whole in tile 1
            [70.0, 10.0, 90.0, 30.0],  # tile 1, whole there: kept
            [20.0, 40.0, 100.0, 60.0],  # tile 0, cut at x=100, starts before tile 1: nobody
            # sees it whole, kept
            [0.0, 0.0, 30.0, 20.0],  # tile 0, on the image border (not a cut): kept
            [60.0, 50.0, 80.0, 70.0],  # tile 1, cut at its inner side x=60; whole in tile 0
        ]
    )
    box_tiles = torch.tensor([0, 1, 0, 0, 1])
    keep = uncut_boxes(boxes, box_tiles, tiles, (100, 160))
    assert keep.tolist() == [False, True, True, True, False]


class BrightBoxFCOS(FCOS):
    """An exact detector for :func:`bright_image`: per class, the box of the pixels brighter than
    150 in that class's channel (one object per class), with score 0.9, scaled to each input's
    ``height`` x ``width`` as FCOS does; records the sizes of its inputs."""

    def __init__(self, nms_threshold=0.6, detections=100):
        nn.Module.__init__(self)
        self.core = nn.Module()  # what FCOSWithSlicing reads: strides, post-processor, quality
        self.core.strides = [8, 16, 32]
        self.core.postprocessor = FCOSPostProcessor(
            strides=[8, 16, 32], nms_threshold=nms_threshold, post_nms_topk=detections
        )
        self.core.inference_quality = "branch"
        self.input_sizes = []

    def forward(self, batched_inputs):
        self.input_sizes.append([tuple(x["image"].shape[1:]) for x in batched_inputs])
        outputs = []
        for inputs in batched_inputs:
            image = inputs["image"]
            boxes, classes = [], []
            for c in range(3):
                ys, xs = torch.nonzero(image[c] > 150, as_tuple=True)
                if len(xs):
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    classes.append(c)
            scale = torch.tensor(
                [inputs["width"] / image.shape[2], inputs["height"] / image.shape[1]]
            )
            instances = Instances(
                (inputs["height"], inputs["width"]),
                pred_boxes=Boxes(
                    torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale.repeat(2)
                ),
                scores=torch.full((len(boxes),), 0.9),
                pred_classes=torch.tensor(classes, dtype=torch.long),
            )
            outputs.append({"instances": instances})
        return outputs


def bright_image(height, width, boxes, classes):
    image = torch.full((3, height, width), 100, dtype=torch.uint8)
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        image[c, y0:y1, x0:x1] = 200
    return image


def sliced(model, **kwargs):
    settings = dict(tile_size=64, overlap=0.25, full_image=False, batch_size=3)
    return FCOSWithSlicing(model, **{**settings, **kwargs})


def test_boxes_are_mapped_back_and_an_object_in_two_tiles_gives_one_detection():
    # 64 px tiles, 16 px overlap on a 64 x 112 image: tiles at x 0 and 48.
    boxes, classes = [[52, 10, 60, 20], [80, 30, 100, 50]], [0, 1]
    model = BrightBoxFCOS()
    (out,) = sliced(model)([{"image": bright_image(64, 112, boxes, classes)}])
    instances = out["instances"]
    # Box 0 lies in the overlap: seen whole by both tiles, one detection after the merge.
    # Box 1 only in the second tile, at x 32..52 there: mapped back to 80..100.
    assert instances.image_size == (64, 112)
    found = sorted(zip(instances.pred_classes.tolist(), instances.pred_boxes.tensor.tolist()))
    assert found == [(0, [52.0, 10.0, 60.0, 20.0]), (1, [80.0, 30.0, 100.0, 50.0])]
    assert model.input_sizes == [[(64, 64), (64, 64)]]  # two tiles in one batch


def test_an_object_cut_by_a_tile_border_gives_its_whole_box_once():
    # Tiles at x 0 and 48 again; the object spans x 52..76: tile 0 sees 52..64 (cut at its inner
    # side x=64), tile 1 sees all of it.
    image = bright_image(64, 112, [[52, 10, 76, 30]], [2])
    (out,) = sliced(BrightBoxFCOS())([{"image": image}])
    assert out["instances"].pred_boxes.tensor.tolist() == [[52.0, 10.0, 76.0, 30.0]]
    # Without dropping cut boxes the fragment stays: its IoU with the whole box, 12/24, is below
    # the NMS threshold 0.6.
    (kept,) = sliced(BrightBoxFCOS(), drop_cut_boxes=False)([{"image": image}])
    assert sorted(kept["instances"].pred_boxes.tensor.tolist()) == [
        [52.0, 10.0, 64.0, 30.0],
        [52.0, 10.0, 76.0, 30.0],
    ]


def test_full_image_pass_resize_and_output_size():
    """With a test resize to 32 px, each 64 px tile and the 64 x 112 image are halved; the
    detections come back in original pixels, then in the input's requested height x width."""
    from detectron2.data import transforms as T

    model = BrightBoxFCOS()
    wrapper = sliced(model, full_image=True, test_resize=T.ResizeShortestEdge([32, 32], 1000))
    image = bright_image(64, 112, [[80, 30, 100, 50]], [1])
    (out,) = wrapper([{"image": image, "height": 128, "width": 224}])
    assert model.input_sizes == [[(32, 32), (32, 32)], [(32, 56)]]
    assert out["instances"].image_size == (128, 224)
    assert out["instances"].pred_boxes.tensor.tolist() == [[160.0, 60.0, 200.0, 100.0]]


def test_an_image_within_one_tile_is_detected_once(tmp_path):
    model = BrightBoxFCOS()
    image = bright_image(50, 60, [[10, 10, 20, 20]], [0])
    path = tmp_path / "image.png"
    import cv2

    cv2.imwrite(str(path), image.permute(1, 2, 0).numpy())
    # A resized image with its file: the original is read from the file.
    inputs = {"image": image[:, ::2, ::2], "height": 50, "width": 60, "file_name": str(path)}
    (out,) = sliced(model, full_image=True)([inputs])
    assert model.input_sizes == [[(50, 60)]]
    assert out["instances"].pred_boxes.tensor.tolist() == [[10.0, 10.0, 20.0, 20.0]]


def test_bad_settings_name_their_key(tiny_cfg):
    model = build_model(tiny_cfg)
    tiny_cfg.TEST.SLICE.ENABLED = True
    for key, value, message in (
        ("SIZE", 64, "TEST.SLICE.SIZE must be an integer >= the largest stride 128"),
        ("OVERLAP", 1.0, r"TEST.SLICE.OVERLAP must be in \[0, 1\), got 1.0"),
        ("OVERLAP", -0.1, r"TEST.SLICE.OVERLAP must be in \[0, 1\)"),
        ("MERGE", "wbf", "TEST.SLICE.MERGE must be one of"),
        ("BATCH_SIZE", 0, "TEST.SLICE.BATCH_SIZE must be >= 1"),
    ):
        cfg = tiny_cfg.clone()
        cfg.TEST.SLICE[key] = value
        with pytest.raises(ConfigError, match=message):
            build_slicing_model(cfg, model)
    assert build_slicing_model(tiny_cfg, model).tile_size == 512
    tiny_cfg.TEST.SLICE.ENABLED = False
    assert build_slicing_model(tiny_cfg, model) is model


def test_real_detector_on_one_tile_equals_the_detector(tiny_cfg):
    """An image no larger than a tile: one pass, the detector's own detections."""
    model = build_model(tiny_cfg).eval()
    model.core.postprocessor = model.core.postprocessor.replace(score_threshold=0.0)
    inputs = synthetic_image(96, 128, boxes=[(10, 20, 60, 70)], classes=[1], seed=3)
    inputs = {"image": inputs["image"].round().to(torch.uint8), "height": 96, "width": 128}
    with torch.no_grad():
        (expected,) = model([inputs])
    tiny_cfg.TEST.SLICE.SIZE = 128
    tiny_cfg.INPUT.MIN_SIZE_TEST, tiny_cfg.INPUT.MAX_SIZE_TEST = 96, 1000  # no resize
    (merged,) = FCOSWithSlicing(tiny_cfg, model)([inputs])
    expected, merged = expected["instances"], merged["instances"]
    assert len(expected) > 10
    assert torch.equal(merged.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(merged.scores, expected.scores)


def test_predictor_slices_large_images(tiny_cfg, tmp_path):
    """FCOSPredictor with TEST.SLICE.ENABLED runs the wrapper on the original pixels: on a 96 x
    300 image with 128 px tiles (no full-image pass), its detections are those of the wrapper
    given the image directly."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    tiny_cfg.MODEL.WEIGHTS = str(weights)
    tiny_cfg.MODEL.FCOS.INFERENCE_TH_TEST = 0.0
    tiny_cfg.INPUT.MIN_SIZE_TEST, tiny_cfg.INPUT.MAX_SIZE_TEST = 64, 1000
    tiny_cfg.TEST.SLICE.ENABLED = True
    tiny_cfg.TEST.SLICE.SIZE = 128
    tiny_cfg.TEST.SLICE.FULL_IMAGE = False
    predictor = FCOSPredictor(tiny_cfg)
    image = np.random.default_rng(0).integers(0, 255, (96, 300, 3), dtype=np.uint8)
    result = predictor(image)["instances"]
    direct = predictor.sliced(
        [{"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "height": 96, "width": 300}]
    )[0]["instances"]
    assert result.image_size == (96, 300) and len(result) > 0
    assert torch.equal(result.pred_boxes.tensor, direct.pred_boxes.tensor)
    # Tiles of 96 x 128 resized to the test size 64 (short side): boxes reach beyond x = 128.
    assert result.pred_boxes.tensor[:, 2].max() > 128


def test_evaluation_runs_each_image_in_tiles(tmp_path, monkeypatch):
    """train_net.py's evaluation (Trainer.test) with TEST.SLICE.ENABLED: each 256 x 256 image of
    shapes_large_val goes through the detector as 3 x 3 tiles of 128 px (step 128 - 26), none as a
    whole; a tile size below the largest stride fails when the model is built, before training."""
    from fcos_d2.config import build_cfg
    from fcos_d2.data.builtin import register_datasets_from_config
    from fcos_d2.engine.trainer import Trainer

    opts = {
        "DATASETS.TEST": "('shapes_large_val',)",
        "DATASETS.SHAPES.NUM_LARGE_VAL": 2,
        "DATASETS.SHAPES.LARGE_IMAGE_SIZE": [256, 256],
        "DATASETS.SHAPES.LARGE_MAX_OBJECTS": 10,
        "DATASETS.SHAPES.LARGE_MAX_OBJECT_SIDE": 24.0,
        "TEST.SLICE.ENABLED": True,
        "TEST.SLICE.SIZE": 128,
        "TEST.SLICE.FULL_IMAGE": False,
    }
    cfg = build_cfg(QUICKSTART, tiny_opts(tmp_path, 1, **opts))
    register_datasets_from_config(cfg)
    model = Trainer.build_model(cfg)
    passes = []
    detect = FCOSWithSlicing._detect
    monkeypatch.setattr(
        FCOSWithSlicing,
        "_detect",
        lambda self, inputs: (
            passes.append([x["image"].shape[1:] for x in inputs]) or detect(self, inputs)
        ),
    )
    results = Trainer.test(cfg, model)
    assert set(results["bbox"]) >= {"AP", "APs"}
    # Tiles of 128 px, resized to the test size 128: seen at their own pixels.
    assert passes == [[(128, 128)] * 9] * 2
    cfg.TEST.SLICE.SIZE = 64
    with pytest.raises(ConfigError, match="TEST.SLICE.SIZE must be an integer >= the largest"):
        Trainer.build_model(cfg)
