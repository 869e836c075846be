"""Convert the authors' FCOS checkpoints to fcos_d2's layout (a Detectron2 checkpoint).

    python -m fcos_d2.convert --from fcos FCOS_imprv_R_50_FPN_1x.pth fcos_imprv_r50_d2.pth
    python -m fcos_d2.convert --from adelaidet FCOS_R_50_1x.pth fcos_r50_d2.pth

``--from fcos``: the original release (tianzhi0549/FCOS, maskrcnn-benchmark names, ``module.``
prefix); its FrozenBatchNorm statistics are rewritten for Detectron2's eps (see
:func:`fcos_d2.formats.fcos_release.frozen_bn_var_for_detectron2`). ``--from adelaidet``:
AdelaiDet files also load directly through ``MODEL.WEIGHTS``; converting gives our names.

The output is ``{"model": state_dict, "__author__": ..., "matching_heuristics": False}``: a
``.pth`` (torch.save) or, if OUT ends in ``.pkl``, Detectron2's model-zoo pickle of numpy arrays.
Training state (optimizer, scheduler, iteration) is dropped.

Exit status: 0 when every key was mapped and OUT was written; 1 when some key has no fcos_d2
name: they are all listed and nothing is written, unless ``--allow-unmapped`` (then OUT holds the
mapped keys and the status is 0); 2 for unusable input (missing, truncated, not a checkpoint).
"""

import argparse
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch

from .checks import ConfigError
from .cli import run_command
from .formats import (
    REFUSED_GLOBAL,
    adelaidet_key_to_ours,
    fcos_key_to_ours,
    frozen_bn_var_for_detectron2,
    is_frozen_bn_running_var,
    strip_ddp_prefix,
    unmapped_reason,
)

SOURCES: dict[str, Callable[[str], Optional[str]]] = {
    "fcos": fcos_key_to_ours,
    "adelaidet": adelaidet_key_to_ours,
}
_AUTHOR = {
    "fcos": "tianzhi0549/FCOS (maskrcnn-benchmark), converted by fcos_d2.convert",
    "adelaidet": "aim-uofa/AdelaiDet, converted by fcos_d2.convert",
}


class CheckpointError(ConfigError):
    """Input that is not a usable checkpoint; the message names the file."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Detectron2 model-zoo ``.pkl`` files hold dicts of numpy arrays: allow nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: str, unsafe: bool) -> Any:
    with open(path, "rb") as f:
        if unsafe:
            return pickle.load(f, encoding="latin1")
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def _load_torch(path: str, unsafe: bool) -> Any:
    return torch.load(path, map_location="cpu", weights_only=not unsafe)


def read_checkpoint(path: str, unsafe: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of a checkpoint file and the names of the other top-level entries.

    Loads with ``torch.load(weights_only=True)`` (``.pkl``: an unpickler that allows only numpy
    arrays); ``unsafe=True`` unpickles fully, which can run code from the file.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    loader = _load_pickle if path.endswith(".pkl") else _load_torch
    try:
        loaded = loader(path, unsafe)
    except Exception as e:  # torch.load / pickle raise many types for bad files
        message = str(e)
        refused = REFUSED_GLOBAL.search(message)
        if refused and not unsafe:
            raise CheckpointError(
                f"{path}: cannot be read without full unpickling (it refers to "
                f"{refused[1] or refused[2]}, which weights_only loading does not allow). "
                "Unpickling can run code stored in the file: only if you trust it, rerun with "
                "--unsafe-load"
            ) from e
        reason = f"{type(e).__name__}: {message.strip().splitlines()[0] if message else ''}"
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not a PyTorch / Detectron2 "
            f"checkpoint file?): {reason}"
        ) from e
    return _state_dict_of(loaded, path)


def _state_dict_of(loaded: Any, path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{path}: expected a dict of tensors (or one under 'model'), "
            f"got {type(loaded).__name__}"
        )
    if "blobs" in loaded and "model" not in loaded:
        raise CheckpointError(
            f"{path}: a Caffe2 / Detectron1 file ('blobs'): Detectron2 loads these itself "
            "(MODEL.WEIGHTS, with name-matching heuristics); there is nothing to convert"
        )
    extras: list[str] = []
    state = loaded
    if isinstance(loaded.get("model"), dict):
        state = loaded["model"]
        extras = sorted(str(k) for k in loaded if k != "model")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value))  # a contiguous copy; keeps 0-d arrays 0-d
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: expected a "
                "state dict (optionally under 'model')"
            )
        tensors[key] = value
    if not tensors:
        raise CheckpointError(f"{path}: the state dict is empty")
    return tensors, extras


def convert_state_dict(
    state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]], int]:
    """(our state dict, [(unmapped key, reason)], number of FrozenBN variances adjusted)."""
    to_ours = SOURCES[source]
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[tuple[str, str]] = []
    adjusted = 0
    for key, value in state.items():
        ours = to_ours(key)
        if ours is None:
            unmapped.append((key, unmapped_reason(key)))
            continue
        if ours in converted:
            unmapped.append((key, f"maps to {ours}, as {origin[ours]} already does"))
            continue
        if source == "fcos" and is_frozen_bn_running_var(strip_ddp_prefix(key)):
            value = frozen_bn_var_for_detectron2(value)
            adjusted += 1
        converted[ours] = value
        origin[ours] = key
    return converted, unmapped, adjusted


def write_checkpoint(state: dict[str, torch.Tensor], path: str, author: str) -> None:
    """Detectron2's checkpoint formats: model-zoo pickle for ``.pkl``, torch.save otherwise."""
    checkpoint: dict[str, Any] = {"__author__": author, "matching_heuristics": False}
    if path.endswith(".pkl"):
        checkpoint["model"] = {k: v.detach().cpu().numpy() for k, v in state.items()}
        with open(path, "wb") as f:
            pickle.dump(checkpoint, f)
    else:
        checkpoint["model"] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        torch.save(checkpoint, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fcos_d2.convert",
        description="Convert an FCOS checkpoint of the authors' releases to fcos_d2's layout.",
        epilog="Exit status: 0 written; 1 unmapped keys (listed; nothing written unless "
        "--allow-unmapped); 2 unusable input.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=sorted(SOURCES),
        help="fcos: tianzhi0549/FCOS (maskrcnn-benchmark); adelaidet: aim-uofa/AdelaiDet",
    )
    parser.add_argument("input", metavar="IN", help="checkpoint to convert (.pth or .pkl)")
    parser.add_argument("output", metavar="OUT", help="converted checkpoint (.pth, or .pkl)")
    parser.add_argument(
        "--allow-unmapped",
        action="store_true",
        help="write the mapped keys even if some keys have no fcos_d2 name",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="unpickle IN fully (can run code from the file) when weights_only loading refuses it",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; bad input is reported as one line with exit status 2."""
    return run_command("python -m fcos_d2.convert", lambda: convert(argv))


def convert(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ConfigError(f"OUT must differ from IN ({args.input})")
    state, extras = read_checkpoint(args.input, unsafe=args.unsafe_load)
    converted, unmapped, adjusted = convert_state_dict(state, args.source)
    if extras:
        print(f"dropped top-level entries (not weights): {', '.join(extras)}")
    print(f"mapped {len(converted)} of {len(state)} keys from {args.input} (--from {args.source})")
    if adjusted:
        print(f"FrozenBN running_var of {adjusted} layers rewritten for Detectron2's eps (1e-5)")
    if unmapped:
        print(f"{len(unmapped)} keys have no fcos_d2 name:")
        for key, reason in unmapped:
            print(f"  UNMAPPED {key}  ({reason})")
    if not converted:
        other = next(s for s in SOURCES if s != args.source)
        hint = " (try --from " + other + ")" if any(SOURCES[other](k) for k in state) else ""
        print(f"error: no key of {args.input} matches the --from {args.source} layout{hint}")
        return 1
    if unmapped and not args.allow_unmapped:
        print(f"nothing written: rerun with --allow-unmapped to write {args.output} without them")
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"the folder of OUT does not exist ({out_dir})")
    write_checkpoint(converted, args.output, _AUTHOR[args.source])
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
