"""Training that a kill or a preemption does not change: what a checkpoint needs for ``--resume``
to continue exactly as an uninterrupted run, and a clean stop on the scheduler's signal.

- :class:`TrainingState` adds to every checkpoint what Detectron2's trainer state lacks: each
  process's position in the training data (:mod:`fcos_d2.data.resumable`) and random generators,
  and the losses' running state (``MODEL.FCOS.LOSS_NORMALIZER_CLS: moving_fg``).
- :class:`PreemptionHook`: on SIGTERM or SIGUSR1 (what cluster schedulers send before they kill),
  every process finishes the current iteration, a checkpoint is written, and training exits with
  :data:`PREEMPTED_EXIT_STATUS`; ``--resume`` continues from there.
- :func:`trim_metrics`: ``metrics.json`` loses the records a killed run wrote after its last
  checkpoint, so that the resumed run continues it without duplicated iterations.
"""

import json
import logging
import os
import random
import signal
import threading
from typing import Any, Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..checkpoint import FCOSCheckpointer
from ..modeling.losses import FCOSLoss
from ..utils import stop_daemon_processes_at_exit

logger = logging.getLogger("fcos_d2")

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry" (with --resume).
PREEMPTED_EXIT_STATUS = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def rng_state() -> dict[str, Any]:
    """This process's random generators, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        saved, visible = state["cuda"], torch.cuda.device_count()
        if len(saved) != visible:
            # Resumed where another number of GPUs is visible: the first ones get their states.
            logger.warning(
                "the checkpoint holds the CUDA random states of %d GPUs, %d are visible: "
                "restoring %d",
                len(saved),
                visible,
                min(len(saved), visible),
            )
        for device, device_state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(device_state, device)


def fcos_losses(model: nn.Module) -> list[FCOSLoss]:
    """The FCOS losses of a model (detector or R-CNN with FCOS proposals), in a fixed order."""
    losses = []
    for module in model.modules():
        loss = getattr(getattr(module, "core", None), "loss", None)
        if isinstance(loss, FCOSLoss):
            losses.append(loss)
    return losses


class TrainingState(HookBase):
    """The checkpointed state of an exact resume. Each process's part (data position, random
    generators) is gathered by all processes at every checkpoint iteration, before the
    checkpointer writes it; on resume each process takes its own."""

    def __init__(self, data_loader, model: nn.Module, checkpoint_period: int):
        self.data_loader = data_loader
        self.model = model
        self.checkpoint_period = checkpoint_period
        self._gathered: Optional[list[dict[str, Any]]] = None

    def process_state(self) -> dict[str, Any]:
        state = {"rng": rng_state()}
        if hasattr(self.data_loader, "state_dict"):
            state["data"] = self.data_loader.state_dict()
        return state

    def gather(self) -> None:
        """Collect every process's state (all processes must call it at the same iteration)."""
        self._gathered = comm.all_gather(self.process_state())

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        periodic = self.checkpoint_period > 0 and next_iter % self.checkpoint_period == 0
        if periodic or next_iter >= self.trainer.max_iter:
            self.gather()

    def state_dict(self) -> dict[str, Any]:
        processes = self._gathered if self._gathered is not None else [self.process_state()]
        return {
            "processes": processes,
            "losses": [loss.state_dict() for loss in fcos_losses(self.model)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        processes = state["processes"]
        rank, world_size = comm.get_rank(), comm.get_world_size()
        if len(processes) != world_size:
            logger.warning(
                "the checkpoint was written by %d training processes, this run has %d: training "
                "continues, but not exactly as an uninterrupted run would",
                len(processes),
                world_size,
            )
        own = processes[rank % len(processes)]
        set_rng_state(own["rng"])
        if "data" in own and hasattr(self.data_loader, "load_state_dict"):
            self.data_loader.load_state_dict(own["data"])
        for loss, loss_state in zip(fcos_losses(self.model), state["losses"]):
            loss.load_state_dict(loss_state)


class PreemptionHook(HookBase):
    """On SIGTERM or SIGUSR1: finish the iteration, write a checkpoint, exit with
    :data:`PREEMPTED_EXIT_STATUS`. Processes agree on the iteration: each step, the stop is
    decided on whether any process got a signal. Place it after every other hook."""

    def __init__(self, checkpointer: FCOSCheckpointer, training_state: TrainingState):
        self.checkpointer = checkpointer
        self.training_state = training_state
        self._signal: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # A process forked during training (e.g. an evaluation's data loader) inherits the
            # handler: a scheduler signals every process, and the training process must get to
            # its checkpoint before its loader processes die. They end with it (at its exit,
            # stop_daemon_processes_at_exit).
            return
        self._signal = signum

    def before_train(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training outside the main thread: preemption signals not handled")
            return
        self._pid = os.getpid()
        stop_daemon_processes_at_exit()
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def after_train(self) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers training replaced (idempotent). The trainers also call it when
        training ends with an error: Detectron2 then skips the ``after_train`` of the hooks after
        one whose ``after_train`` raised, and this hook is the last."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def after_step(self) -> None:
        signals = [self._signal]
        if comm.get_world_size() > 1:
            signals = comm.all_gather(self._signal)  # a CPU (Gloo) exchange: no device sync
        received = [s for s in signals if s is not None]
        if not received:
            return
        iteration = self.trainer.iter
        self.training_state.gather()
        name = f"model_{iteration:07d}"
        if comm.is_main_process():
            self.checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        logger.warning(
            "%s received: stopped after iteration %d with checkpoint %s.pth in %s; continue "
            "with --resume (exit status %d)",
            signal.Signals(received[0]).name,
            iteration,
            name,
            self.checkpointer.save_dir,
            PREEMPTED_EXIT_STATUS,
        )
        raise SystemExit(PREEMPTED_EXIT_STATUS)


def trim_metrics(output_dir: str, start_iter: int) -> int:
    """Drop the records of ``output_dir/metrics.json`` from iteration ``start_iter`` on, in place
    (Detectron2's writer keeps the file open for appending); returns how many were dropped."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return 0
    with open(path, "r+b") as f:
        lines = f.read().splitlines(keepends=True)
        kept = 0
        for line in lines:
            try:
                if json.loads(line).get("iteration", -1) >= start_iter:
                    break
            except ValueError:  # a line cut by the kill
                break
            kept += 1
        f.seek(sum(len(line) for line in lines[:kept]))
        f.truncate()
    if len(lines) > kept:
        logger.info(
            "metrics.json: dropped %d records from iteration %d on", len(lines) - kept, start_iter
        )
    return len(lines) - kept
