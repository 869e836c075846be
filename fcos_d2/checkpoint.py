"""fcos_d2's checkpointer: Detectron2's ``DetectionCheckpointer`` whose writes survive a crash and
whose load errors name the file. The layouts of other releases live in :mod:`fcos_d2.formats`."""

import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .checks import ConfigError
from .d2_compat import WeightsOnlyTorchLoad
from .formats import LAYOUTS, REFUSED_GLOBAL, layouts_found
from .utils import atomic_write

# What torch.load / pickle raise for unreadable files.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError)
# Classes whose objects mark an mmdetection 3.x training file (mmengine's logs and schedulers).
_MMENGINE_CLASSES = ("mmengine.", "mmcv.")


def _convert_first(path: str, found: str, source: str) -> ConfigError:
    return ConfigError(
        f"MODEL.WEIGHTS: {path} {found}, which fcos_d2 does not load directly: convert it first "
        f"with `python -m fcos_d2.convert --from {source} IN OUT` and set MODEL.WEIGHTS to OUT"
    )


class FCOSCheckpointer(WeightsOnlyTorchLoad, DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` whose files survive a crash and whose load errors
    name the file.

    fvcore writes ``model_XXXX.pth`` and then ``last_checkpoint`` in place: a process killed while
    writing leaves a truncated file that ``--resume`` then fails on. Here both are written to a
    temporary file and renamed, so the file ``last_checkpoint`` names is always complete.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        # fvcore's Checkpointer.save, with the write made atomic.
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        self._write(name, data)
        self.tag_last_checkpoint(f"{name}.pth")

    def save_weights(self, name: str, **extra) -> None:
        """``name.pth`` with the model's weights (and ``extra``) only, as ``model_final.pth``
        holds them for ``MODEL.WEIGHTS``; ``last_checkpoint`` keeps naming the training state."""
        if self.save_dir and self.save_to_disk:
            self._write(name, {"model": self.model.state_dict(), **extra})

    def _write(self, name: str, data: dict) -> None:
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", save_file)
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
        except OSError as error:  # e.g. a full disk: name the file, say what is still there
            raise OSError(
                error.errno,
                f"could not write checkpoint {save_file} ({error.strerror or error}); the "
                "previous checkpoints and last_checkpoint are unchanged",
            ) from error

    def get_checkpoint_file(self) -> str:
        """The checkpoint ``last_checkpoint`` names, checked: a pointer that is not a file name or
        names a missing file is a :class:`ConfigError` naming it, not a failure to load later."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            return ""  # removed by another process meanwhile: start afresh, as fvcore does
        name = content.decode("utf-8", errors="replace").strip()
        fix = (
            f"delete it to start from MODEL.WEIGHTS, or write into it the file name of a "
            f"checkpoint in {self.save_dir} (e.g. model_0004999.pth)"
        )
        if not name or not name.isprintable() or os.sep in name or len(name) > 255:
            raise ConfigError(
                f"--resume: {tag} is not a checkpoint name (it holds {content[:60]!r}): {fix}"
            )
        path = os.path.join(self.save_dir, name)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume: {tag} names {name}, which does not exist: {fix}")
        return path

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(tag, last_filename_basename.encode())

    def _torch_load(self, f: str):
        # mmdetection's files keep the weights under "state_dict" beside other entries, which
        # fvcore would report as "Unsupported type" (3.x files also hold mmengine objects that
        # weights-only loading refuses): name the conversion that reads them instead.
        try:
            loaded = super()._torch_load(f)
        except pickle.UnpicklingError as error:
            refused = REFUSED_GLOBAL.search(str(error))
            name = refused and (refused[1] or refused[2])
            if name and name.startswith(_MMENGINE_CLASSES):
                found = f"stores {name} objects (an mmdetection 3.x training file)"
                raise _convert_first(f, found, "mmdet") from None
            raise
        weights = loaded.get("state_dict") if isinstance(loaded, dict) else None
        if isinstance(weights, dict) and "model" not in loaded:
            layouts = layouts_found(list(weights), LAYOUTS.values())
            if layouts:
                found = f"keeps its weights under 'state_dict' in {layouts[0].title} layout"
                raise _convert_first(f, found, layouts[0].name)
        return loaded

    def load(self, path: str, checkpointables=None):
        local = path and "://" not in path
        if local and not os.path.isfile(path):
            raise ConfigError(f"MODEL.WEIGHTS: checkpoint file {path} does not exist")
        if path and path.endswith(".pkl"):
            self.logger.warning(
                "%s: Detectron2 reads .pkl (model zoo) files with full unpickling, which can run "
                "code stored in the file: load only files you trust",
                path,
            )
        try:
            return super().load(path, checkpointables)
        except _LOAD_ERRORS as error:
            if isinstance(error, ConfigError) or not local:
                raise
            refused = REFUSED_GLOBAL.search(str(error))
            if refused:
                raise ConfigError(
                    f"MODEL.WEIGHTS: {path} stores a Python object ({refused[1] or refused[2]}) "
                    "that torch.load(weights_only=True) refuses to unpickle, since unpickling can "
                    "run code. If you trust the file, re-save its weights: torch.save("
                    "{'model': torch.load(path, weights_only=False)['model']}, new_path)"
                ) from None
            raise ConfigError(
                f"MODEL.WEIGHTS: {path} is not a readable checkpoint (truncated or corrupt?): "
                f"{type(error).__name__}: {error}"
            ) from None
