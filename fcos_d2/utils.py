"""Small helpers with no fcos_d2 dependency: crash-safe file writes, the model inside DDP."""

import atexit
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Callable, Union

from torch import nn


def atomic_write(
    path: Union[str, Path], write: Union[bytes, Callable], durable: bool = True
) -> None:
    """Write ``path`` with ``write`` (bytes, or a function of the open binary file) so that
    readers, and a process killed mid-way, see the old file or the whole new one: a temporary file
    in the same folder, renamed. On failure (e.g. a full disk) the temporary file is removed and
    ``path`` is untouched.

    ``durable`` also syncs the data to disk before the rename (checkpoints), so that a machine
    crash cannot leave the new name pointing at lost data.
    """
    path = str(path)
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            if isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


_STOP_REGISTERED = False


def stop_daemon_processes_at_exit() -> None:
    """At this process's exit, kill its daemonic child processes that are still alive (data
    loader processes whose loader was not shut down, e.g. after an error).

    ``multiprocessing`` stops them at exit with SIGTERM and then waits for them; training's
    loader processes ignore SIGTERM (a scheduler signals every process, and the training process
    must write its checkpoint first), so that wait would never end. Registered once, after
    ``multiprocessing``'s own exit function, so it runs before it."""
    global _STOP_REGISTERED
    if not _STOP_REGISTERED:
        atexit.register(_kill_daemon_children)
        _STOP_REGISTERED = True


def _kill_daemon_children() -> None:
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    # torch's data loader reports a loader process killed by a signal from a SIGCHLD handler:
    # at exit that is what is meant, not an error.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in children:
        process.kill()
    for process in children:
        process.join(timeout=5)
