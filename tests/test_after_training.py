"""After training: predictions as COCO results, videos, the best checkpoint, the validation loss,
images without boxes, and the Python predictor on a machine without a GPU."""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from helpers import (
    CATEGORIES,
    QUICKSTART,
    SIZE,
    args_for,
    drop_closed_log_handlers,
    load_script,
    read_metrics,
    tiny_opts,
    write_coco,
)
from pycocotools.coco import COCO

from fcos_d2.cli import run_command
from fcos_d2.config import build_cfg
from fcos_d2.engine import Trainer, main, setup
from fcos_d2.inference import FCOSPredictor
from fcos_d2.inference.results import unique_names


def split(tmp_path: Path, name: str) -> str:
    """The registered name of a split of ``tmp_path``'s dataset (names are global in a process)."""
    return f"mine_{tmp_path.name}_{name}"


def tiny_dataset_opts(tmp_path: Path, **extra) -> list:
    """A tiny COCO dataset with category ids 3 and 7 (train and val), the tiny model on it."""
    if not (tmp_path / "data" / "train.json").exists():
        write_coco(tmp_path / "data", "train", 8, seed=0)
        write_coco(tmp_path / "data", "val", 4, seed=1)
    data = tmp_path / "data"
    train, val = split(tmp_path, "train"), split(tmp_path, "val")
    entries = (
        f"(('{train}', '{data}/train.json', '{data}/images'), "
        f"('{val}', '{data}/val.json', '{data}/images'))"
    )
    return tiny_opts(
        tmp_path,
        extra.pop("max_iter", 2),
        **{
            "DATASETS.COCO_JSON": entries,
            "DATASETS.TRAIN": f"('{train}',)",
            "DATASETS.TEST": f"('{val}',)",
            "MODEL.FCOS.NUM_CLASSES": len(CATEGORIES),
            "INPUT.MIN_SIZE_TRAIN": (SIZE,),
            "INPUT.MAX_SIZE_TRAIN": SIZE,
            "INPUT.MIN_SIZE_TEST": SIZE,
            "INPUT.MAX_SIZE_TEST": SIZE,
            "SOLVER.AMP.ENABLED": False,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Weights of the tiny model after a few iterations on the tiny dataset, and its options."""
    folder = tmp_path_factory.mktemp("trained")
    opts = tiny_dataset_opts(folder, max_iter=4, **{"SOLVER.CHECKPOINT_PERIOD": 100})
    main(args_for(opts))
    return (
        folder,
        opts + ["MODEL.WEIGHTS", str(folder / "out" / "model_final.pth")],
        split(folder, "val"),
    )


def run_demo(capsys, *arguments: str) -> tuple[int, str, str]:
    drop_closed_log_handlers()
    demo = load_script("demo.py")
    status = run_command("demo.py", lambda: demo.main(["--config-file", QUICKSTART, *arguments]))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.slow
def test_demo_json_is_coco_results_with_the_datasets_ids(trained, tmp_path, capsys):
    folder, opts, val = trained
    out = tmp_path / "preds.json"
    status, stdout, _ = run_demo(
        capsys, "--dataset", val, "--json", str(out), "--confidence-threshold", "0.0", *opts
    )
    assert status == 0 and f"to {out}" in stdout
    records = json.loads(out.read_text())
    ground_truth = COCO(str(folder / "data" / "val.json"))
    loaded = ground_truth.loadRes(str(out))  # pycocotools accepts it as results
    assert len(loaded.getAnnIds()) == len(records) > 0
    assert {r["image_id"] for r in records} == set(ground_truth.getImgIds())
    assert {r["category_id"] for r in records} <= set(CATEGORIES)  # 3 and 7, not 0 and 1
    # The same detections as the predictor's, as absolute XYWH boxes.
    image = ground_truth.loadImgs([1])[0]
    cfg = build_cfg(QUICKSTART, opts + ["MODEL.FCOS.INFERENCE_TH_TEST", "0.0"])
    instances = FCOSPredictor(cfg)(str(folder / "data" / "images" / image["file_name"]))
    expected = BoxMode.convert(
        instances["instances"].pred_boxes.tensor.numpy(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS
    )
    ours = np.array([r["bbox"] for r in records if r["image_id"] == 1])
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    assert all(r["file_name"].endswith(image["file_name"]) for r in records if r["image_id"] == 1)


@pytest.mark.slow
def test_demo_batches_give_the_same_detections(trained, tmp_path, capsys):
    _, opts, val = trained
    results = {}
    for batch in ("1", "3"):
        out = tmp_path / f"b{batch}.json"
        common = ["--dataset", val, "--json", str(out), "--batch-size", batch]
        assert run_demo(capsys, *common, "--confidence-threshold", "0.05", *opts)[0] == 0
        results[batch] = json.loads(out.read_text())
    assert len(results["1"]) == len(results["3"])
    for one, three in zip(results["1"], results["3"]):
        assert one["image_id"] == three["image_id"] and one["category_id"] == three["category_id"]
        assert one["bbox"] == pytest.approx(three["bbox"], abs=1e-2)
        assert one["score"] == pytest.approx(three["score"], abs=1e-4)


def test_output_names_never_collide():
    paths = [Path("a/img.png"), Path("b/img.png"), Path("a/img.jpg"), Path("a/img_2.png")]
    assert unique_names(paths) == ["img.png", "img_2.png", "img_3.png", "img_2_2.png"]


@pytest.mark.slow
def test_demo_draws_every_image_once_and_names_unreadable_files(trained, tmp_path, capsys):
    _, opts, _ = trained
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "img.png"), np.full((40, 50, 3), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "img.jpg"), np.full((40, 50, 3), 90, np.uint8))
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    status, stdout, stderr = run_demo(
        capsys, "--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output",
        str(tmp_path / "vis"), *opts,
    )  # fmt: skip
    assert status == 1  # one unreadable file
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == [
        "img.png", "img_2.png", "img_3.png"
    ]  # fmt: skip
    (line,) = [x for x in stderr.splitlines() if "broken.png" in x]
    assert line.startswith("demo.py: skipped an input: ") and "is not a readable image" in line
    assert "wrote 3 annotated images" in stdout


def write_video(path: Path, frames: int) -> None:
    images = sorted((path.parent / "frames").glob("*.jpg"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (SIZE, SIZE))
    for index in range(frames):
        writer.write(cv2.imread(str(images[index % len(images)])))
    writer.release()


@pytest.mark.slow
def test_demo_on_a_video_writes_every_frame_and_its_detections(trained, tmp_path, capsys):
    from helpers import draw_records

    _, opts, _ = trained
    draw_records(tmp_path / "frames", 3, seed=2)
    video = tmp_path / "clip.mp4"
    write_video(video, 6)
    out, preds = tmp_path / "det.mp4", tmp_path / "det.json"
    status, stdout, _ = run_demo(
        capsys, "--video-input", str(video), "--output", str(out), "--json", str(preds),
        "--confidence-threshold", "0.0", *opts,
    )  # fmt: skip
    assert status == 0 and "6 frames in" in stdout and "frames per second" in stdout
    written = cv2.VideoCapture(str(out))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    assert written.get(cv2.CAP_PROP_FRAME_WIDTH) == SIZE
    records = json.loads(preds.read_text())
    assert {r["frame"] for r in records} == set(range(6)) == {r["image_id"] for r in records}
    # Bad input: one line naming the file.
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    status, _, stderr = run_demo(
        capsys, "--video-input", str(tmp_path / "broken.mp4"), "--json", str(preds), *opts
    )
    assert status == 2
    assert f"demo.py: error: --video-input: {tmp_path / 'broken.mp4'} is not a readable video" in (
        stderr
    )


def test_webcam_without_a_camera_is_named(tmp_path, capsys):
    if cv2.VideoCapture(0).isOpened():
        pytest.skip("this machine has a camera: the test would film it")
    no_data = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    status, _, stderr = run_demo(capsys, "--webcam", "--json", str(tmp_path / "p.json"), *no_data)
    assert status == 2 and "--webcam: no camera could be opened at index 0" in stderr


@pytest.mark.slow
def test_best_checkpoint_by_validation_loss_keeps_the_evaluated_weights(tmp_path):
    from fcos_d2.inference import build_annotated_test_loader
    from fcos_d2.inference.validation import validation_losses

    opts = tiny_dataset_opts(
        tmp_path,
        max_iter=6,
        **{
            "TEST.EVAL_PERIOD": 3,  # evaluations after iterations 2 and 5 (the final one)
            "TEST.VAL_LOSS": True,
            "SOLVER.CHECKPOINT_PERIOD": 3,
            "SOLVER.BEST_CHECKPOINT.METRIC": "validation/total_loss",
            "SOLVER.BEST_CHECKPOINT.MODE": "min",
        },
    )
    results = main(args_for(opts))
    out = tmp_path / "out"
    assert set(results["validation"]) == {
        "loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "total_loss"
    }  # fmt: skip
    assert "validation/total_loss" in read_metrics(out)[-1]  # metrics.json (and TensorBoard)
    # The validation loss of each evaluated state, recomputed from its checkpoint.
    cfg = setup(args_for(opts))
    model = Trainer.build_model(cfg)
    losses = {}
    for name in ("model_0000002.pth", "model_final.pth"):
        state = torch.load(out / name, weights_only=True)
        model.load_state_dict(state["model"])
        loader = build_annotated_test_loader(cfg, cfg.DATASETS.TEST[0])
        losses[name] = validation_losses(model, loader)["total_loss"]
    assert losses["model_final.pth"] == pytest.approx(results["validation"]["total_loss"])
    best_name = min(losses, key=losses.get)
    best = torch.load(out / "model_best.pth", weights_only=True)
    assert best["iteration"] == {"model_0000002.pth": 2, "model_final.pth": 6}[best_name]
    assert best["metric"]["validation/total_loss"] == pytest.approx(losses[best_name], rel=1e-5)
    expected = torch.load(out / best_name, weights_only=True)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in best["model"].items())
    assert (out / "last_checkpoint").read_text() == "model_final.pth"  # not model_best
    # Each checkpoint keeps the best score of the evaluations before it, for --resume:
    # model_final.pth is written after iteration 5, before the final evaluation.
    final = torch.load(out / "model_final.pth", weights_only=True)
    kept = final["trainer"]["hooks"]["BestCheckpoint"]["best"]
    assert kept == pytest.approx(losses["model_0000002.pth"], rel=1e-5)


@pytest.mark.parametrize(
    "metric, message",
    [
        ("bbox/AP5", "a COCO box metric"),
        ("AP50", "'<task>/<name>'"),
        ("validation/total_loss", "needs TEST.VAL_LOSS True"),
        ("shapes_val/bbox/AP5", "a COCO box metric"),  # with the dataset, as with several
        ("a/shapes_val/bbox/AP", "'<task>/<name>'"),
    ],
)
def test_a_best_checkpoint_metric_no_evaluation_computes_is_named(tmp_path, metric, message):
    opts = tiny_opts(tmp_path, 2, **{"SOLVER.BEST_CHECKPOINT.METRIC": metric})
    with pytest.raises(ValueError, match=f"SOLVER.BEST_CHECKPOINT.METRIC must be .*{message}"):
        Trainer(setup(args_for(opts)))


@pytest.mark.slow
def test_a_metric_of_another_task_is_named_at_the_first_evaluation(tmp_path):
    opts = tiny_dataset_opts(tmp_path, **{"SOLVER.BEST_CHECKPOINT.METRIC": "segm/AP"})
    with pytest.raises(
        ValueError, match=r"'segm/AP' is not among the evaluation results: .*bbox/AP"
    ):
        main(args_for(opts))


@pytest.mark.slow
def test_images_without_boxes_train_when_not_filtered(tmp_path):
    """DATALOADER.FILTER_EMPTY_ANNOTATIONS False keeps background-only images in training."""
    from detectron2.data import get_detection_dataset_dicts

    opts = tiny_dataset_opts(tmp_path, max_iter=3, **{"DATASETS.TEST": "()"})
    train_json = tmp_path / "data" / "train.json"
    data = json.loads(train_json.read_text())
    empty = {image["id"] for image in data["images"][:4]}  # half the images: background only
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in empty]
    train_json.write_text(json.dumps(data))
    kept = opts + ["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"]
    cfg = setup(args_for(kept))
    train = split(tmp_path, "train")
    assert len(get_detection_dataset_dicts([train], filter_empty=False)) == 8
    assert len(get_detection_dataset_dicts([train], filter_empty=True)) == 4
    main(args_for(kept))
    losses = [m for m in read_metrics(tmp_path / "out") if "total_loss" in m]
    assert losses and all(math.isfinite(m["total_loss"]) for m in losses)
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False


def test_the_predictor_falls_back_to_the_cpu_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from detectron2.config import get_cfg

    from fcos_d2 import add_fcos_config

    cfg = add_fcos_config(get_cfg())
    cfg.merge_from_file(QUICKSTART)  # MODEL.DEVICE "cuda", as Detectron2's default
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    assert cfg.MODEL.DEVICE == "cuda"
    predictor = FCOSPredictor(cfg)
    assert predictor.cfg.MODEL.DEVICE == "cpu"
    out = predictor(np.zeros((64, 80, 3), np.uint8))["instances"]
    assert out.image_size == (64, 80)


def test_with_several_test_datasets_the_metric_names_its_dataset():
    """Detectron2 nests the results of several test datasets by name: 'shapes_val/bbox/AP'.
    A missing metric is named with the key that set it (LazyConfig's here)."""
    from types import SimpleNamespace

    from fcos_d2.engine.best_checkpoint import BestCheckpoint, check_metric

    check_metric("shapes_val/bbox/AP", "max", val_loss=False)
    saved = []
    checkpointer = SimpleNamespace(save_weights=lambda name, **extra: saved.append(extra))
    hook = BestCheckpoint(checkpointer, "b/bbox/AP", "max", 2, key="train.best_checkpoint.metric")
    results = {"a/bbox/AP": (30.0, 1), "b/bbox/AP": (40.0, 1)}
    hook.trainer = SimpleNamespace(storage=SimpleNamespace(latest=lambda: results))
    hook._check()
    assert saved == [{"iteration": 1, "metric": {"b/bbox/AP": 40.0}}]
    hook.metric = "bbox/AP"
    with pytest.raises(ValueError, match=r"train.best_checkpoint.metric 'bbox/AP' is not .*b/bbox"):
        hook._check()
