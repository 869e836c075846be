"""Faults during training: a loss turning NaN, a checkpoint write that fails, a corrupted
`last_checkpoint`, a loader process killed, two "machines" on one host, and an image with 5,000
boxes. Killed and preempted runs resuming: tests/test_resume.py."""

import errno
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
from helpers import QUICKSTART, REPO, args_for, tiny_opts

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


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    checkpointer = FCOSCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000004")
    previous = (tmp_path / "model_0000004.pth").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write checkpoint .*model_0000009.pth") as error:
        checkpointer.save("model_0000009")
    assert error.value.errno == errno.ENOSPC and "No space left on device" in str(error.value)
    assert (tmp_path / "model_0000004.pth").read_bytes() == previous
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]


@pytest.mark.parametrize(
    "pointer, message",
    [
        (b"\x00\x13garbage\xff", "is not a checkpoint name"),
        (b"", "is not a checkpoint name"),
        (b"model_0000999.pth", "names model_0000999.pth, which does not exist"),
    ],
)
def test_a_corrupted_last_checkpoint_is_named_on_resume(tmp_path, capsys, pointer, message):
    from helpers import load_script

    opts = tiny_opts(tmp_path, 3, **{"DATASETS.TEST": "()"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last_checkpoint").write_bytes(pointer)
    status = load_script("train_net.py").main(["--config-file", QUICKSTART, "--resume", *opts])
    err = capsys.readouterr().err
    assert status == 2
    assert f"train_net.py: error: --resume: {tmp_path / 'out' / 'last_checkpoint'}" in err
    assert message in err and "delete it to start from MODEL.WEIGHTS" in err


class SlowMapper:
    def __call__(self, record: dict) -> dict:
        time.sleep(0.05)
        return record


def test_a_killed_loader_process_stops_training_with_a_clear_error():
    import multiprocessing

    from detectron2.data.common import DatasetFromList

    from fcos_d2.data.resumable import IndexStream, PositionedSamples, ResumableTrainLoader

    records = [{"width": 4, "height": 4, "i": i} for i in range(8)]
    samples = PositionedSamples(DatasetFromList(records), SlowMapper(), IndexStream(8, seed=0))
    batches = iter(ResumableTrainLoader(samples, 2, num_workers=2))
    next(batches)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match="a training data loader process died") as error:
        for _ in range(100):
            next(batches)
    assert time.time() - start < 30  # an error, not a hang
    assert "DATALOADER.NUM_WORKERS (now 2)" in str(error.value)
    # The other process is gone too: it ignores SIGTERM, and would block the interpreter's exit.
    workers[1].join(timeout=20)
    assert not workers[1].is_alive() and multiprocessing.active_children() == []


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
