"""Faults during training: a loss turning NaN, a run killed between checkpoints and resumed, two
"machines" on one host, and an image with 5,000 boxes."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import QUICKSTART, REPO, args_for, read_metrics, tiny_opts

from fcos_d2.checkpoint import FCOSCheckpointer
from fcos_d2.config import build_cfg
from fcos_d2.engine import Trainer, main, setup
from fcos_d2.modeling.core import FCOSCore

pytestmark = pytest.mark.slow


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from detectron2.utils.events import get_event_storage

    original = FCOSCore.losses

    def nan_at_iteration_6(self, *args, **kwargs):
        losses, num_pos = original(self, *args, **kwargs)
        if get_event_storage().iter == 6:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses, num_pos

    monkeypatch.setattr(FCOSCore, "losses", nan_at_iteration_6)
    opts = tiny_opts(tmp_path, 10, **{"SOLVER.CHECKPOINT_PERIOD": 3, "DATASETS.TEST": "()"})
    trainer = Trainer(setup(args_for(opts)))
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="iteration=6"):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text() == "model_0000005.pth"
    assert not (out / "model_final.pth").exists()
    model = Trainer.build_model(build_cfg(QUICKSTART, opts))
    FCOSCheckpointer(model).load(str(out / "model_0000005.pth"))
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def _start_training(opts: list) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", QUICKSTART, *opts]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_between_checkpoints_then_resume(tmp_path):
    opts = tiny_opts(tmp_path, 50, **{"SOLVER.CHECKPOINT_PERIOD": 25, "TEST.EVAL_PERIOD": 0})
    out = tmp_path / "out"
    run = _start_training(opts)
    deadline = time.time() + 1800
    # Kill once iteration 24's checkpoint is tagged, i.e. between checkpoints 24 and 49
    # (Detectron2 writes metrics.json every 20 iterations).
    while not (
        (out / "last_checkpoint").exists()
        and (out / "last_checkpoint").read_text() == "model_0000024.pth"
    ):
        assert run.poll() is None, run.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = max(m["iteration"] for m in read_metrics(out) if "total_loss" in m)
    assert 19 <= killed_at < 49 and not (out / "model_final.pth").exists()
    resumed = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_net.py"),
            "--config-file",
            QUICKSTART,
            "--resume",
            *opts,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "Loading from" in resumed.stdout + resumed.stderr
        and "model_0000024.pth" in resumed.stdout + resumed.stderr
    )
    iterations = [m["iteration"] for m in read_metrics(out) if "total_loss" in m]
    # metrics.json keeps the first run's lines and continues after iteration 24 to the last.
    assert iterations[0] == 19 and iterations[-1] == 49
    assert [i for i in iterations if i > 24] == [39, 49]
    assert "Final evaluation" in resumed.stdout
    # The checkpoint resumed from is intact and loads; no temporary file is left behind.
    model = Trainer.build_model(build_cfg(QUICKSTART, opts))
    FCOSCheckpointer(model).load(str(out / "model_0000024.pth"))
    assert not list(out.glob("*.tmp*"))


WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from detectron2.engine import launch
    from detectron2.utils import comm
    from helpers import args_for
    from fcos_d2.engine import Trainer, setup

    def work(opts, report):
        trainer = Trainer(setup(args_for(opts, num_machines=2)))
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        checksum = float(sum(p.double().sum() for p in model.parameters()))
        Path(report, f"rank{{comm.get_rank()}}.json").write_text(json.dumps({{"checksum": checksum,
            "world": comm.get_world_size()}}))

    if __name__ == "__main__":  # launch() spawns a worker process that imports this file
        opts, report = json.loads(sys.argv[1]), sys.argv[2]
        rank, url = int(sys.argv[3]), sys.argv[4]
        launch(work, 1, num_machines=2, machine_rank=rank, dist_url=url, args=(opts, report))
    """
)


def test_two_machines_on_one_host_end_with_identical_weights(tmp_path):
    opts = tiny_opts(tmp_path, 3, **{"SOLVER.CHECKPOINT_PERIOD": 100, "DATASETS.TEST": "()"})
    main(
        args_for(tiny_opts(tmp_path / "warm", 1, **{"DATASETS.TEST": "()"}))
    )  # writes the data once
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps(opts), str(tmp_path), str(r), url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in (0, 1)
    ]
    for rank in ranks:
        _, err = rank.communicate(timeout=1800)
        assert rank.returncode == 0, err[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["world"] == reports[1]["world"] == 2
    assert reports[0]["checksum"] == reports[1]["checksum"]


MEMORY = textwrap.dedent(
    """
    import json, resource, sys, torch
    sys.path.insert(0, {tests!r})
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage
    from helpers import config_path, shrink
    from fcos_d2 import add_fcos_config

    torch.set_num_threads(2)
    cfg = shrink(add_fcos_config(get_cfg()), config_path("configs/FCOS-Detection/R_50_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    size, count = 512, int(sys.argv[1])
    xy = torch.rand(count, 2) * (size - 40)
    wh = torch.rand(count, 2) * 36 + 4
    inst = Instances((size, size), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
                     gt_classes=torch.randint(0, 3, (count,)))
    batch = [{{"image": torch.rand(3, size, size) * 255, "instances": inst}}]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"growth_mb": (peak - before) / 1024, "finite": all(torch.isfinite(v).item()
                      for v in losses.values())}}))
    """
)


def test_an_image_with_5000_boxes_trains_in_bounded_memory(tmp_path):
    script = tmp_path / "memory.py"
    script.write_text(MEMORY.format(tests=str(REPO / "tests")))
    growth = {}
    for count in (10, 5000):
        done = subprocess.run(
            [sys.executable, str(script), str(count)], capture_output=True, text=True, timeout=1800
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["finite"]
        growth[count] = result["growth_mb"]
    print(f"peak RSS growth of a training step at 512x512: {growth}")
    # Target assignment works in chunks of at most MODEL.FCOS.TARGETS_MAX_PAIRS_PER_CHUNK
    # (location, box) pairs: 5,000 boxes cost well under 1 GB more than 10 boxes.
    assert growth[5000] - growth[10] < 1024, growth
