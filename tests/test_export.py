"""Export of the whole detector / proposal network (ONNX and TorchScript) and its verification."""

import subprocess
import sys

import cv2
import pytest
import torch
from helpers import REPO, config_path, overfit, shrink, synthetic_image

from fcos_d2.export import ExportableFCOS, export_model, load_exported
from fcos_d2.export.__main__ import main, parse_args
from fcos_d2.export.verify import Comparison, compare, images_at_verify_sizes, verify_sizes

# 128 x 160: not square, and the verify sizes 97 x 120 and 166 x 208 are not multiples of 32.
HEIGHT, WIDTH = 128, 160
GT_BOXES = [[10, 15, 50, 60], [60, 30, 140, 110], [100, 70, 150, 120]]
DETECTOR = "configs/FCOS-Detection/R_50_1x.yaml"
PROPOSALS = "configs/FCOS-RPN/rpn_R_50_FPN_1x.yaml"
# name: (config, overrides); every head normalisation, and the proposal network.
VARIANTS = {
    "GN": (DETECTOR, {}),
    "BN": (DETECTOR, {"MODEL.FCOS.NORM": "BN"}),
    "no-norm": (DETECTOR, {"MODEL.FCOS.NORM": ""}),
    "proposals": (PROPOSALS, {}),
}
TRAIN_ITERATIONS = 20


def variant_cfg(variant: str):
    """The shrunk config of ``variant``, with test size HEIGHT x WIDTH."""
    from detectron2.config import get_cfg

    from fcos_d2 import add_fcos_config

    config, overrides = VARIANTS[variant]
    cfg = shrink(add_fcos_config(get_cfg()), config_path(config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = HEIGHT, WIDTH
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """The training image as a PNG, channels in INPUT.FORMAT (BGR) order, and its input dict."""
    inputs = synthetic_image(HEIGHT, WIDTH, GT_BOXES, [0, 1, 2])
    inputs["image"] = inputs["image"].round()  # what the PNG file holds
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    cv2.imwrite(str(path), inputs["image"].permute(1, 2, 0).numpy().astype("uint8"))
    return path, inputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_file):
    """Per variant, built on first use: (cfg, model, config file, weights file)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            from detectron2.modeling import build_model

            cfg = variant_cfg(variant)
            torch.manual_seed(0)
            model = build_model(cfg)
            overfit(model, [image_file[1]], TRAIN_ITERATIONS)  # real, spread-out scores
            folder = tmp_path_factory.mktemp(variant)
            config_file = folder / "config.yaml"
            config_file.write_text(cfg.dump())
            weights = folder / "model.pth"
            torch.save({"model": model.state_dict()}, weights)
            cache[variant] = cfg, model, config_file, weights
        return cache[variant]

    return get


def test_verify_sizes_keep_the_test_size_and_avoid_multiples_of_32():
    assert verify_sizes(HEIGHT, WIDTH) == [(128, 160), (97, 120), (166, 208)]
    # 0.75 x 256 = 192 = 6 x 32 -> 193; 1.3 x 320 = 416 = 13 x 32 -> 417.
    assert verify_sizes(256, 320) == [(256, 320), (193, 240), (333, 417)]


def test_compare_counts_matches_by_class_iou_and_score():
    boxes = torch.tensor([[0.0, 0, 100, 100], [50, 50, 80, 90], [10, 10, 20, 20]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    classes = torch.tensor([0, 1, 2])
    same = compare((boxes, scores, classes), (boxes.clone(), scores.clone(), classes.clone()))
    assert same == Comparison(3, 3, 3, 0.0, 0.0)

    moved = boxes.clone()
    moved[0] += torch.tensor([0.5, 0, 0.5, 0])  # IoU 99.5 / 100.5 = 0.990: still a match
    moved[1, 2] += 1.0  # IoU 30 / 31 = 0.968: no match
    rescored = scores + torch.tensor([5e-4, 0, 2e-3])  # the third is 2e-3 off: no match
    result = compare((boxes, scores, classes), (moved, rescored, classes))
    assert (result.reference, result.exported, result.matched) == (3, 3, 1)
    assert result.worst_box_diff == 0.5
    assert result.worst_score_diff == pytest.approx(5e-4, abs=1e-7)

    relabelled = compare((boxes, scores, classes), (boxes, scores, torch.tensor([0, 2, 1])))
    assert relabelled.matched == 1
    # One extra exported detection: 3 of max(3, 4) match.
    extra = compare(
        (boxes, scores, classes),
        (torch.cat([boxes, boxes[:1]]), torch.cat([scores, scores[:1]]), torch.arange(4) % 3),
    )
    assert (extra.matched, extra.total) == (3, 4)


def test_cli_puts_overrides_after_the_images_into_opts(image_file):
    args = parse_args(
        ["--config-file", "c.yaml", "--format", "onnx", "--output", "out", "--verify"]
        + [str(image_file[0]), "MODEL.WEIGHTS", "w.pth", "MODEL.FCOS.NORM", "BN"]
    )
    assert args.verify == [str(image_file[0])]
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "MODEL.FCOS.NORM", "BN"]
    with pytest.raises(SystemExit):
        parse_args(["--config-file", "c", "--format", "onnx", "--output", "o", "--verify", "x.png"])


def test_only_fcos_models_are_exportable(cfg):
    from detectron2.modeling import build_model

    shrink(cfg, config_path("configs/FCOS-RPN/faster_rcnn_R_50_FPN_1x.yaml"))
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE must be the FCOS detector"):
        ExportableFCOS(build_model(cfg))


def test_deformable_heads_are_refused_for_onnx(tmp_path):
    from detectron2.modeling import build_model

    cfg = variant_cfg("GN")
    cfg.MODEL.FCOS.USE_DEFORMABLE = True
    with pytest.raises(ValueError, match="--format must be torchscript for deformable conv"):
        export_model(build_model(cfg), "onnx", tmp_path, torch.zeros(3, 64, 64))
    assert not any(tmp_path.iterdir())


def test_verify_images_are_read_and_resized_like_detectron2(image_file):
    images = images_at_verify_sizes(image_file[0], variant_cfg("GN"))
    assert [tuple(x.shape) for x in images] == [(3, 128, 160), (3, 97, 120), (3, 166, 208)]
    assert images[0].dtype == torch.float32
    assert torch.equal(images[0], image_file[1]["image"])  # test size = file size: unchanged


def run_cli(argv: list, capsys) -> tuple[int, str]:
    """``python -m fcos_d2.export`` in this process: its exit code and what it printed."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def matched_and_total(output: str) -> tuple[int, int]:
    """From the summary line ``verify: M/T detections matched ...``."""
    summary = [line for line in output.splitlines() if line.startswith("verify: ")][-1]
    matched, total = summary.split()[1].split("/")
    return int(matched), int(total)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_file_matches_pytorch_at_three_sizes(
    variant, fmt, trained, image_file, tmp_path, capsys
):
    _, _, config_file, weights = trained(variant)
    rc, output = run_cli(
        ["--config-file", config_file, "--format", fmt, "--output", tmp_path]
        + ["--verify", image_file[0], "MODEL.WEIGHTS", weights],
        capsys,
    )
    assert rc == 0, output
    assert "PASS" in output
    # Real detections at each of the three sizes (not a vacuous comparison), all matched.
    matched, total = matched_and_total(output)
    assert matched == total >= 3 * 5, output

    # The file at a size it was not traced at: output types, and boxes clipped to the image.
    boxes, scores, classes = load_exported(next(tmp_path.glob("model.*")))(
        torch.rand(3, 97, 120) * 255
    )
    assert boxes.dtype == scores.dtype == torch.float32 and classes.dtype == torch.int64
    assert boxes.shape == (len(scores), 4) and classes.shape == scores.shape
    assert (boxes >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 97).all()
    if variant == "proposals":
        assert (classes == 0).all()
        assert len(scores) > 100  # RPN selection: no score threshold


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_nothing_of_the_traced_example_is_baked_in(fmt, trained, image_file, tmp_path):
    """Traced on a NaN image (no candidate survives the threshold: every count is 0), the file
    still detects what the model detects; and it returns empty outputs when nothing passes."""
    cfg, model, _, _ = trained("GN")
    nan_image = torch.full((3, 64, 96), float("nan"))
    with torch.no_grad():
        assert len(ExportableFCOS(model)(nan_image)[0]) == 0
    run = load_exported(export_model(model, fmt, tmp_path, nan_image))
    reference = ExportableFCOS(model)
    for image in images_at_verify_sizes(image_file[0], cfg):
        with torch.no_grad():
            result = compare(reference(image), run(image))
        assert result.matched == result.total >= 5
    boxes, scores, classes = run(torch.full((3, 50, 70), float("nan")))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)


@pytest.mark.slow
def test_verify_fails_when_the_weights_differ(trained, image_file, tmp_path, capsys):
    cfg, model, config_file, weights = trained("GN")
    argv = ["--config-file", config_file, "--format", "onnx", "--output", tmp_path]
    assert run_cli([*argv, "MODEL.WEIGHTS", weights], capsys)[0] == 0  # export only
    # The same network with a shifted center-ness bias: the same boxes, other scores.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.ctrness.bias"] += 0.5
    other = tmp_path / "other.pth"
    torch.save({"model": state}, other)
    verify_only = [*argv, "--verify-only", "--verify", image_file[0]]
    rc, output = run_cli([*verify_only, "MODEL.WEIGHTS", other], capsys)
    assert rc == 1 and "FAIL" in output, output
    matched, total = matched_and_total(output)
    assert total > 0 and matched / total < 0.5
    # The real process exits non-zero as well; and 0 with the weights the file was made from.
    command = [sys.executable, "-m", "fcos_d2.export", *map(str, verify_only)]
    assert subprocess.run([*command, "MODEL.WEIGHTS", str(other)], cwd=REPO).returncode == 1
    rc, output = run_cli([*verify_only, "MODEL.WEIGHTS", weights], capsys)
    assert rc == 0 and matched_and_total(output)[0] == matched_and_total(output)[1] > 0
