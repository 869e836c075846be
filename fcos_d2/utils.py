"""Small helpers with no fcos_d2 dependency: crash-safe file writes, the model inside DDP."""

import os
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
