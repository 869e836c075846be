"""The main job: train, evaluate, resume, multi-process training on CPUs, predict."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor, launch
from detectron2.utils import comm
from helpers import QUICKSTART, REPO, args_for, read_metrics, run_python, tiny_opts

from fcos_d2.config import build_cfg
from fcos_d2.d2_compat import step_runner
from fcos_d2.engine import Trainer, main, setup


@pytest.mark.slow
def test_short_training_then_coco_evaluation(tmp_path):
    results = main(args_for(tiny_opts(tmp_path, max_iter=12, **{"SOLVER.CHECKPOINT_PERIOD": 100})))
    assert set(results) == {"bbox"}
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(results["bbox"])
    assert all(math.isfinite(v) or math.isnan(v) for v in results["bbox"].values())
    metrics = [m for m in read_metrics(tmp_path / "out") if "total_loss" in m]
    assert metrics[-1]["iteration"] == 11
    for m in metrics:
        for key in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "fcos/num_pos_per_worker"):
            assert math.isfinite(m[key]), (key, m)
    assert (tmp_path / "out" / "model_final.pth").exists()
    assert list((tmp_path / "out").glob("events.out.tfevents.*"))  # TensorBoard
    # Eval-only on the final weights reproduces the numbers.
    weights = str(tmp_path / "out" / "model_final.pth")
    again = main(args_for(tiny_opts(tmp_path, 12, **{"MODEL.WEIGHTS": weights}), eval_only=True))
    assert again["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], nan_ok=True)


@pytest.mark.slow
def test_stop_and_resume_continue_at_the_right_iteration(tmp_path):
    opts = tiny_opts(tmp_path, max_iter=8, **{"SOLVER.CHECKPOINT_PERIOD": 4, "TEST.EVAL_PERIOD": 0})
    main(args_for(opts))
    out = tmp_path / "out"
    uninterrupted = {m["iteration"]: m["lr"] for m in read_metrics(out) if "lr" in m}
    # Simulate a run stopped right after the checkpoint of iteration 3 (the 4th iteration).
    for name in ("model_0000007.pth", "model_final.pth", "metrics.json"):
        (out / name).unlink()
    (out / "last_checkpoint").write_text("model_0000003.pth")
    cfg = setup(args_for(opts, resume=True))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    assert trainer.scheduler.last_epoch == 4
    assert trainer.optimizer.state_dict()["state"], "optimizer state (momentum) was not restored"
    trainer.train()
    resumed = {m["iteration"]: m["lr"] for m in read_metrics(out) if "lr" in m}
    assert min(resumed) >= 4 and max(resumed) == 7
    for iteration, lr in resumed.items():
        assert lr == pytest.approx(uninterrupted[iteration])
    assert (out / "model_final.pth").exists()


def _two_process_worker(opts: list, report_dir: str) -> None:
    cfg = setup(args_for(opts, num_gpus=2))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.history("fcos/num_pos_per_worker").values()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    report = {
        "num_pos": [v for v, _ in history],
        "checksum": checksum,
        "ddp": type(trainer.model).__name__,
    }
    Path(report_dir, f"rank{comm.get_rank()}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_two_cpu_processes_train_and_agree(tmp_path):
    opts = tiny_opts(
        tmp_path, max_iter=3, **{"SOLVER.CHECKPOINT_PERIOD": 100, "DATASETS.TEST": "()"}
    )
    launch(_two_process_worker, 2, dist_url="auto", args=(opts, str(tmp_path)))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["ddp"] == "DistributedDataParallel"
    # The positive count is all-reduced: every rank logs the same value at every iteration.
    assert len(reports[0]["num_pos"]) == 3
    assert reports[0]["num_pos"] == reports[1]["num_pos"]
    # Gradients are averaged across ranks, so the weights stay identical.
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=1e-9)


@pytest.mark.slow
def test_train_net_script_with_two_cpu_processes(tmp_path):
    opts = tiny_opts(tmp_path, max_iter=2, **{"SOLVER.CHECKPOINT_PERIOD": 100})
    done = run_python(
        "train_net.py", "--config-file", QUICKSTART, "--num-gpus", "2", "--dist-url", "auto", *opts
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Final evaluation" in done.stdout
    assert [m["iteration"] for m in read_metrics(tmp_path / "out") if "total_loss" in m][-1] == 1


@pytest.mark.slow
def test_default_predictor_and_demo(tmp_path):
    opts = tiny_opts(
        tmp_path, max_iter=2, **{"SOLVER.CHECKPOINT_PERIOD": 100, "DATASETS.TEST": "()"}
    )
    main(args_for(opts))
    cfg = build_cfg(QUICKSTART, opts + ["MODEL.WEIGHTS", str(tmp_path / "out/model_final.pth")])
    instances = DefaultPredictor(cfg)(np.zeros((100, 140, 3), dtype=np.uint8))["instances"]
    assert instances.image_size == (100, 140)
    assert {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    import cv2

    cv2.imwrite(str(image_dir / "a.png"), np.full((64, 80, 3), 128, dtype=np.uint8))
    (image_dir / "broken.png").write_bytes(b"not an image")
    demo = [
        sys.executable,
        "demo.py",
        "--config-file",
        QUICKSTART,
        "--input",
        str(image_dir),
        "--output",
        str(tmp_path / "vis"),
        *opts,
        "MODEL.WEIGHTS",
        str(tmp_path / "out/model_final.pth"),
    ]
    done = subprocess.run(demo, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1  # one unreadable file
    assert "demo.py: skipped an input: " in done.stderr and "broken.png" in done.stderr
    assert (tmp_path / "vis" / "a.png").exists()
    missing = subprocess.run(
        demo[:5] + [str(tmp_path / "nope.jpg")] + demo[6:],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0 and "nope.jpg" in missing.stderr


@pytest.mark.slow
def test_cpu_amp_trains_in_bfloat16_with_float32_weights(tmp_path):
    from fcos_d2.engine.runtime import CPUAutocastTrainer

    opts = tiny_opts(
        tmp_path,
        max_iter=3,
        # "always": bfloat16 also where the CPU only emulates it (test_precision.py covers "auto").
        **{
            "SOLVER.AMP.ENABLED": True,
            "SOLVER.AMP.CPU_BF16": "always",
            "DATASETS.TEST": "()",
            "SOLVER.CHECKPOINT_PERIOD": 100,
        },
    )
    cfg = setup(args_for(opts))
    trainer = Trainer(cfg)
    assert isinstance(step_runner(trainer), CPUAutocastTrainer)
    assert trainer.cfg.SOLVER.AMP.ENABLED
    seen = []
    hook = trainer.model.head.cls_logits.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    (last,) = [m for m in read_metrics(tmp_path / "out") if "total_loss" in m]  # written at the end
    assert last["iteration"] == 2 and math.isfinite(last["total_loss"])


def test_num_classes_must_match_the_training_data(tmp_path):
    opts = tiny_opts(tmp_path, max_iter=3, **{"MODEL.FCOS.NUM_CLASSES": 4, "DATASETS.TEST": "()"})
    with pytest.raises(ValueError, match="NUM_CLASSES=4 but dataset 'shapes_train' has 5 classes"):
        Trainer(setup(args_for(opts)))
