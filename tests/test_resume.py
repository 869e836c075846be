"""Exact resume and preemption: a run killed or preempted after a checkpoint and resumed with
``--resume`` ends with the weights of the run that was never interrupted (CPU, float32)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from helpers import QUICKSTART, REPO, args_for, config_path, lazy_opts, read_metrics, tiny_opts

from fcos_d2.data.resumable import (
    IndexStream,
    PositionedSamples,
    ResumableTrainLoader,
    current_sample,
)
from fcos_d2.engine import Trainer, main, setup
from fcos_d2.engine.resume import PREEMPTED_EXIT_STATUS, PreemptionHook, trim_metrics

MAX_ITER, PERIOD = 16, 4


def opts_for(tmp_path, workers: int = 0) -> list:
    return tiny_opts(
        tmp_path,
        MAX_ITER,
        **{
            "SOLVER.CHECKPOINT_PERIOD": PERIOD,
            "SOLVER.AMP.ENABLED": False,  # float32: the claim is bit-identical weights
            "DATALOADER.NUM_WORKERS": workers,
            "DATASETS.TEST": "()",
            "SEED": 7,
        },
    )


def final_weights(tmp_path) -> dict:
    return torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)["model"]


def assert_same_weights(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(ours[k], reference[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- the data stream ---------------------------------------------------------------------------


def test_index_stream_epochs_are_permutations_and_ranks_interleave():
    single = IndexStream(10, seed=3)
    draws = [single.index(p) for p in range(30)]
    assert all(sorted(draws[e * 10 : e * 10 + 10]) == list(range(10)) for e in range(3))
    assert draws[:10] != draws[10:20]  # each epoch its own order
    # Process r of 2 takes global draws r, r + 2, ... (Detectron2's TrainingSampler sharding).
    ranks = [IndexStream(10, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [ranks[p % 2].index(p // 2) for p in range(30)] == draws
    # Any position directly, in any order: no replay from the start.
    assert IndexStream(10, seed=3).index(25) == draws[25]


class RandomSize:
    """A mapper whose output depends on the image and on the global numpy generator."""

    def __call__(self, record: dict) -> dict:
        return {**record, "draw": float(np.random.rand()), "position": current_sample()[1]}


def loader(workers: int, batch_size: int = 3) -> ResumableTrainLoader:
    # Widths alternate with heights: two aspect-ratio groups that fill at different rates.
    records = [{"image_id": i, "width": 20 + 7 * (i % 3), "height": 30} for i in range(11)]
    from detectron2.data.common import DatasetFromList

    samples = PositionedSamples(DatasetFromList(records), RandomSize(), IndexStream(11, seed=5))
    return ResumableTrainLoader(samples, batch_size, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_restores_the_same_batches(workers):
    reference = loader(0)
    expected = [batch for batch, _ in zip(reference, range(12))]
    first = loader(workers)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(5)]
    state = first.state_dict()
    assert sum(len(g) for g in state["waiting"]) > 0  # an incomplete group is carried over
    resumed = loader(workers)
    resumed.load_state_dict(state)
    seen += [batch for batch, _ in zip(resumed, range(7))]
    # Same images, same random draws, same grouping, whatever the number of loader processes.
    assert seen == expected
    assert all(len({s["width"] > s["height"] for s in batch}) == 1 for batch in seen)


def test_mapping_leaves_the_callers_generators_alone():
    np.random.seed(0)
    before = np.random.rand()
    np.random.seed(0)
    next(iter(loader(0)))
    assert np.random.rand() == before


# --- training -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final weights of the runs never interrupted, by number of loader processes."""
    weights = {}
    for workers in (0, 2):
        folder = tmp_path_factory.mktemp(f"uninterrupted{workers}")
        main(args_for(opts_for(folder, workers)))
        weights[workers] = final_weights(folder)
        shutil.rmtree(folder)  # 5 checkpoints; only the final weights are compared
    return weights


class SignalAt(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_preempted_run_checkpoints_exits_75_and_resumes_exactly(tmp_path, uninterrupted):
    opts = opts_for(tmp_path)
    trainer = Trainer(setup(args_for(opts)))
    trainer.register_hooks([SignalAt(5)])  # after the preemption hook: seen one step later
    trainer.resume_or_load(resume=False)
    with pytest.raises(SystemExit) as stop:
        trainer.train()
    assert stop.value.code == PREEMPTED_EXIT_STATUS
    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text() == "model_0000006.pth"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    main(args_for(opts, resume=True))
    assert_same_weights(final_weights(tmp_path), uninterrupted[0])
    iterations = [m["iteration"] for m in read_metrics(out) if "total_loss" in m]
    assert iterations == sorted(set(iterations))  # metrics.json continues, no duplicates


def start_training(opts: list, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train_net.py"), "--config-file", QUICKSTART, *flags, *opts],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def wait_for_checkpoint(run: subprocess.Popen, out, name: str) -> None:
    deadline = time.time() + 300
    while not (
        (out / "last_checkpoint").exists() and (out / "last_checkpoint").read_text() == name
    ):
        assert run.poll() is None, run.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_after_a_checkpoint_then_resume_gives_the_uninterrupted_weights(
    tmp_path, uninterrupted, workers
):
    opts = opts_for(tmp_path, workers)
    out = tmp_path / "out"
    run = start_training(opts)
    wait_for_checkpoint(run, out, "model_0000003.pth")
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (out / "model_final.pth").exists()
    main(args_for(opts, resume=True))
    assert_same_weights(final_weights(tmp_path), uninterrupted[workers])


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_and_resume_exactly(tmp_path):
    """Gloo on the CPU: SIGTERM to the launching process reaches both training processes, which
    stop after the same iteration; resumed, they end with the weights of an uninterrupted run."""
    reference_opts = opts_for(tmp_path / "reference")
    done = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), "--config-file", QUICKSTART,
         "--num-gpus", "2", *reference_opts],
        capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reference = final_weights(tmp_path / "reference")
    shutil.rmtree(tmp_path / "reference")  # its checkpoints: 0.7 GB
    opts = opts_for(tmp_path)
    out = tmp_path / "out"
    run = start_training(opts, "--num-gpus", "2")
    wait_for_checkpoint(run, out, "model_0000003.pth")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    # The main process's console and log.txt say where training stopped.
    for log in stdout, (out / "log.txt").read_text():
        stopped = [line for line in log.splitlines() if "SIGTERM received: stopped after" in line]
        assert len(stopped) == 1, stdout[-3000:] + stderr[-3000:]
    assert not (out / "model_final.pth").exists()
    resumed = start_training(opts, "--num-gpus", "2", "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert_same_weights(final_weights(tmp_path), reference)


@pytest.mark.slow
def test_lazy_config_trainer_preempted_then_resumed_exactly(tmp_path):
    from fcos_d2.engine.lazy import main as lazy_main

    config = config_path("configs/LazyConfig/fcos_R_18_shapes.py")

    def opts(folder):
        return lazy_opts(folder, MAX_ITER) + [
            f"train.checkpointer.period={PERIOD}",
            "train.amp.enabled=False",
            "train.seed=7",
            "train.eval_period=0",
        ]

    lazy_main(args_for(opts(tmp_path / "reference"), config_file=config))
    reference = final_weights(tmp_path / "reference")
    shutil.rmtree(tmp_path / "reference")  # its checkpoints: 0.7 GB
    out = tmp_path / "out"

    def signal_after_the_first_checkpoint():
        while not (out / "last_checkpoint").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # the training (main) thread handles it

    threading.Thread(target=signal_after_the_first_checkpoint, daemon=True).start()
    with pytest.raises(SystemExit) as stop:
        lazy_main(args_for(opts(tmp_path), config_file=config))
    assert stop.value.code == PREEMPTED_EXIT_STATUS
    assert not (out / "model_final.pth").exists()
    lazy_main(args_for(opts(tmp_path), config_file=config, resume=True))
    assert_same_weights(final_weights(tmp_path), reference)
    iterations = [m["iteration"] for m in read_metrics(out) if "total_loss" in m]
    assert iterations == sorted(set(iterations))


def test_trim_metrics_keeps_the_records_before_the_resumed_iteration(tmp_path):
    lines = ['{"iteration": 19, "a": 1}', '{"iteration": 39, "a": 2}', '{"iteration": 4']
    (tmp_path / "metrics.json").write_text("\n".join(lines))
    with open(tmp_path / "metrics.json", "a") as writer:  # opened before, as Detectron2's is
        assert trim_metrics(str(tmp_path), 25) == 2
        writer.write('{"iteration": 39, "a": 3}\n')
    assert (tmp_path / "metrics.json").read_text() == lines[
        0
    ] + "\n" + '{"iteration": 39, "a": 3}\n'


def test_a_process_forked_during_training_outlives_sigterm_and_ends_with_training():
    """A scheduler signals every process: one forked during training (an evaluation's data
    loader) must not die before the training process has written its checkpoint; it ends at the
    training process's exit."""
    import multiprocessing

    from fcos_d2 import utils

    previous = signal.getsignal(signal.SIGTERM)
    hook = PreemptionHook(checkpointer=None, training_state=None)
    hook.before_train()
    try:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.daemon = True
        child.start()
        os.kill(child.pid, signal.SIGTERM)
        child.join(2)
        assert child.is_alive()  # ignored there
        os.kill(os.getpid(), signal.SIGTERM)  # the training process takes note
        assert hook._signal == signal.SIGTERM
        utils._kill_daemon_children()  # what runs at exit
        assert not child.is_alive()
    finally:
        hook.restore()
    assert signal.getsignal(signal.SIGTERM) is previous
    hook.restore()  # idempotent
    assert signal.getsignal(signal.SIGTERM) is previous


CRASH_WITH_LOADER_PROCESSES = """
import time
from detectron2.data.common import DatasetFromList
from fcos_d2.data.resumable import IndexStream, PositionedSamples, ResumableTrainLoader

class Slow:
    def __call__(self, record):
        time.sleep(0.01)
        return record

records = [{"width": 4, "height": 4, "i": i} for i in range(8)]
samples = PositionedSamples(DatasetFromList(records), Slow(), IndexStream(8, seed=0))
batches = iter(ResumableTrainLoader(samples, 2, num_workers=2))
next(batches)
raise FloatingPointError("loss became NaN")  # training stops with an error, loader still live
"""


def test_training_that_stops_with_an_error_exits_despite_its_loader_processes():
    """The loader processes ignore SIGTERM, which multiprocessing sends them at exit before it
    waits for them: the process must still end (it hung before)."""
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CRASH_WITH_LOADER_PROCESSES],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1 and "FloatingPointError: loss became NaN" in done.stderr
    assert "Exception ignored" not in done.stderr  # the loader processes end quietly
    assert time.time() - start < 60


def test_one_process_training_keeps_the_signals_default_meaning_outside_training(tmp_path):
    """train_net.py with one process runs training in the launching process: no forwarding
    handler there (it would swallow SIGTERM before and after training)."""
    from fcos_d2.cli import training_command

    seen = []
    status = training_command(
        "train_net.py",
        lambda args: seen.append(signal.getsignal(signal.SIGTERM)),
        lambda args: None,
        argv=["--config-file", QUICKSTART],
    )
    assert status == 0 and seen == [signal.SIG_DFL]


def test_training_that_fails_restores_the_signal_handlers(tmp_path):
    """An error during training (here in a hook's after_train too, which makes Detectron2 skip
    the later hooks' after_train) leaves no preemption handler installed."""

    class Failing(HookBase):
        def after_step(self):
            raise RuntimeError("failed at a step")

        def after_train(self):
            raise RuntimeError("failed after training")

    previous = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(setup(args_for(opts_for(tmp_path))))
    trainer.register_hooks([Failing()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="failed"):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_resuming_where_fewer_gpus_are_visible_restores_their_random_states(monkeypatch):
    """A checkpoint written with 2 GPUs visible, resumed with 1: that one's state, a warning."""
    from fcos_d2.engine import resume

    restored, warned = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    monkeypatch.setattr(resume.logger, "warning", lambda *args: warned.append(args))
    state = resume.rng_state()
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]
    resume.set_rng_state(state)
    assert len(restored) == 1 and restored[0][0] is state["cuda"][0] and restored[0][1] == 0
    assert len(warned) == 1 and warned[0][1:] == (2, 1, 1)
