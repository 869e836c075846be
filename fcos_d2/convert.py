"""Convert FCOS checkpoints of other releases to fcos_d2's layout (a Detectron2 checkpoint).

    python -m fcos_d2.convert --from fcos FCOS_imprv_R_50_FPN_1x.pth fcos_imprv_r50_d2.pth
    python -m fcos_d2.convert --from adelaidet FCOS_R_50_1x.pth fcos_r50_d2.pth
    python -m fcos_d2.convert --from torchvision fcos_resnet50_fpn_coco-99b0c9b7.pth tv_d2.pth
    python -m fcos_d2.convert --from mmdet fcos_r50_caffe_fpn_gn-head_1x_coco-821213aa.pth mm_d2.pth

``--from fcos``: the original release (tianzhi0549/FCOS, maskrcnn-benchmark names, ``module.``
prefix); its FrozenBatchNorm statistics are rewritten for Detectron2's eps (see
:func:`fcos_d2.formats.fcos_release.frozen_bn_var_for_detectron2`). ``--from adelaidet``:
AdelaiDet files also load directly through ``MODEL.WEIGHTS``; converting gives our names.
``--from torchvision``: torchvision's ``fcos_resnet50_fpn`` (its 91 COCO-id outputs become
Detectron2's 80 classes). ``--from mmdet``: mmdetection 2.x / 3.x FCOS models. The key tables
are in :mod:`fcos_d2.formats`; configs that reproduce each release's model are in
``configs/FCOS-Detection/{original,torchvision,mmdet}/``.

The output is ``{"model": state_dict, "__author__": ..., "matching_heuristics": False}``: a
``.pth`` (torch.save) or, if OUT ends in ``.pkl``, Detectron2's model-zoo pickle of numpy arrays.
Training state (optimizer, scheduler, iteration, mmdetection's ``meta`` and ``message_hub``) is
dropped.

Exit status: 0 when every key was mapped and OUT was written; 1 when some key has no fcos_d2
name: they are all listed and nothing is written, unless ``--allow-unmapped`` (then OUT holds the
mapped keys and the status is 0); 2 for unusable input (missing, truncated, not a checkpoint, a
file of another layout than ``--from`` says, or without parts every FCOS has).
"""

import argparse
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from .checks import ConfigError
from .cli import run_command
from .formats import LAYOUTS, REFUSED_GLOBAL, Layout, is_ours, layouts_found, unmapped_reason

# ``--from NAME`` -> the release's key table and tensor rewrites.
SOURCES: dict[str, Layout] = LAYOUTS


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


def _placeholder(full_name: str) -> type:
    """A class named ``full_name`` that builds empty objects: it stands in for a class that
    weights-only loading refuses, so nothing of the file's own code or classes runs."""
    module, _, name = full_name.rpartition(".")

    def ignore(self, *args, **kwargs) -> None:
        pass

    return type(
        name,
        (),
        {"__module__": module, "__qualname__": name, "__init__": ignore, "__setstate__": ignore},
    )


def _load_torch_with_placeholders(path: str) -> tuple[Any, list[str]]:
    """Weights-only loading where every class it refuses is replaced by an empty placeholder
    (mmdetection 3.x checkpoints keep mmengine objects in ``message_hub``): what the file holds
    besides its weights is not read. Also returns the names of the replaced classes."""
    names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    with torch.serialization.safe_globals([_placeholder(n) for n in names]):
        return torch.load(path, map_location="cpu", weights_only=True), names


class Checkpoint(NamedTuple):
    """A checkpoint file's weights, the names of its other top-level entries, and the classes
    weights-only loading replaced by placeholders outside the weights."""

    state: dict[str, torch.Tensor]
    extras: list[str]
    placeholders: list[str]


def read_checkpoint(path: str, unsafe: bool = False) -> Checkpoint:
    """The state dict of a checkpoint file and what else it holds.

    Loads with ``torch.load(weights_only=True)`` (``.pkl``: an unpickler that allows only numpy
    arrays); objects of other classes outside the weights (training state, configs) are replaced
    by placeholders and dropped; weights that need them are refused. ``unsafe=True`` unpickles
    fully, which can run code from the file.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    loader = _load_pickle if path.endswith(".pkl") else _load_torch
    placeholders: list[str] = []
    try:
        loaded = loader(path, unsafe)
    except Exception as e:  # torch.load / pickle raise many types for bad files
        message = str(e)
        refused = REFUSED_GLOBAL.search(message)
        if refused and not unsafe:
            loaded, placeholders = _read_around_refused(path, loader, refused[1] or refused[2], e)
        else:
            reason = f"{type(e).__name__}: {message.strip().splitlines()[0] if message else ''}"
            raise CheckpointError(
                f"{path}: not a readable checkpoint (truncated, or not a PyTorch / Detectron2 "
                f"checkpoint file?): {reason}"
            ) from e
    state, extras = _state_dict_of(loaded, path, placeholders)
    return Checkpoint(state, extras, placeholders)


def _read_around_refused(path: str, loader, refused: str, error: Exception):
    def refuse() -> CheckpointError:
        return CheckpointError(
            f"{path}: cannot be read without full unpickling (it refers to {refused}, which "
            "weights_only loading does not allow). Unpickling can run code stored in the file: "
            "only if you trust it, rerun with --unsafe-load"
        )

    if loader is not _load_torch:
        raise refuse() from error
    try:
        return _load_torch_with_placeholders(path)
    except Exception:  # still refused: placeholders cannot stand in for what it needs
        raise refuse() from error


def _state_dict_of(
    loaded: Any, path: str, placeholders: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], list[str]]:
    def needs(what: str) -> CheckpointError:
        # What weights-only loading replaced is in the weights: they need full unpickling.
        return CheckpointError(
            f"{path}: {what} is an object of a class that weights_only loading does not allow "
            f"({', '.join(placeholders)}): only if you trust the file (unpickling can run code "
            "stored in it), rerun with --unsafe-load"
        )

    if not isinstance(loaded, dict):
        if placeholders:
            raise needs("the whole file")
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
    # Detectron2 keeps the weights under "model", mmcv / mmengine (mmdetection) under
    # "state_dict"; torchvision's files are the state dict itself.
    for container in ("model", "state_dict"):
        if isinstance(loaded.get(container), dict):
            state = loaded[container]
            extras = sorted(str(k) for k in loaded if k != container)
            break
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value))  # a contiguous copy; keeps 0-d arrays 0-d
        if placeholders and type(value).__name__ in {n.rpartition(".")[2] for n in placeholders}:
            raise needs(f"entry {key!r}")
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: expected a "
                "state dict (optionally under 'model' or 'state_dict')"
            )
        tensors[key] = value
    if not tensors:
        raise CheckpointError(f"{path}: the state dict is empty")
    return tensors, extras


class Conversion(NamedTuple):
    """Our state dict, [(unmapped key, reason)], [(key dropped on purpose, reason)], the number
    of tensors the layout's rewrite changed, and the keys added as implicit zeros."""

    state: dict[str, torch.Tensor]
    unmapped: list[tuple[str, str]]
    dropped: list[tuple[str, str]]
    rewritten: int
    implicit: list[str]


def convert_state_dict(state: dict[str, torch.Tensor], source: str) -> Conversion:
    """``state`` (in the layout of ``--from source``) in fcos_d2's names and conventions."""
    layout = SOURCES[source]
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    rewritten = 0
    for key, value in state.items():
        reason = layout.dropped(key)
        if reason is not None:
            dropped.append((key, reason))
            continue
        ours = layout.key_to_ours(key)
        if ours is None:
            unmapped.append((key, layout.why_unmapped(key) or unmapped_reason(key)))
            continue
        if ours in converted:
            unmapped.append((key, f"maps to {ours}, as {origin[ours]} already does"))
            continue
        new_value = layout.rewrite(key, value)
        rewritten += new_value is not value
        converted[ours] = new_value
        origin[ours] = key
    implicit = layout.implicit(converted)
    converted.update(implicit)
    return Conversion(converted, unmapped, dropped, rewritten, sorted(implicit))


def check_layout(state: dict[str, torch.Tensor], source: str, path: str) -> None:
    """A file of another layout than ``--from source`` is named, with the ``--from`` that fits."""
    layout = SOURCES[source]
    found = layouts_found(state, SOURCES.values())
    if layout in found:
        return
    if found:
        other = found[0]
        raise CheckpointError(
            f"{path}: has {other.title} layout (keys {_examples(state, other)}), not that of "
            f"--from {source}: convert it with --from {other.name}"
        )
    if is_ours(state):
        raise CheckpointError(
            f"{path}: is already in fcos_d2's layout (keys head.cls_logits.*, head.cls_tower.*): "
            "there is nothing to convert, set MODEL.WEIGHTS to it"
        )


def _examples(state: dict[str, torch.Tensor], layout: Layout) -> str:
    keys = [k for k in state if layout.matches(k)]
    return ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")


def check_complete(conversion: Conversion, source: str, path: str) -> None:
    """Every part an FCOS detector has must have come from the file."""
    missing = [k for k in SOURCES[source].required if k not in conversion.state]
    if not missing:
        return
    found = [key for key, _ in conversion.unmapped[:3]]
    instead = f"; unmapped keys found: {', '.join(found)}" if found else ""
    raise CheckpointError(
        f"{path}: not a whole FCOS detector of --from {source}: nothing maps to "
        f"{', '.join(missing)} (a truncated or partial file, or another architecture?){instead}"
    )


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
        description="Convert an FCOS checkpoint of another release to fcos_d2's layout.",
        epilog="Exit status: 0 written; 1 unmapped keys (listed; nothing written unless "
        "--allow-unmapped); 2 unusable input.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=sorted(SOURCES),
        help="fcos: tianzhi0549/FCOS (maskrcnn-benchmark); adelaidet: aim-uofa/AdelaiDet; "
        "torchvision: torchvision's fcos_resnet50_fpn; mmdet: mmdetection 2.x / 3.x FCOS",
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
    checkpoint = read_checkpoint(args.input, unsafe=args.unsafe_load)
    state = checkpoint.state
    check_layout(state, args.source, args.input)
    result = convert_state_dict(state, args.source)
    layout = SOURCES[args.source]
    if checkpoint.extras:
        print(f"dropped top-level entries (not weights): {', '.join(checkpoint.extras)}")
    if checkpoint.placeholders:
        print(
            "not read (objects outside the weights that weights_only loading does not allow): "
            + ", ".join(checkpoint.placeholders)
        )
    print(
        f"mapped {len(result.state) - len(result.implicit)} of {len(state)} keys from "
        f"{args.input} (--from {args.source})"
    )
    if result.dropped:
        reasons = sorted({reason for _, reason in result.dropped})
        print(f"left out {len(result.dropped)} keys on purpose: {'; '.join(reasons)}")
    if result.rewritten:
        print(layout.rewrite_note.format(result.rewritten))
    if result.implicit:
        print(f"added {len(result.implicit)} zero biases the file leaves out (convs without bias)")
    if not result.state:
        names = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"{args.input}: no key matches the --from {args.source} layout (its keys: {names}"
            f"{', ...' if len(state) > 3 else ''}); the layouts --from reads: "
            f"{', '.join(sorted(SOURCES))}"
        )
    check_complete(result, args.source, args.input)
    if result.unmapped:
        print(f"{len(result.unmapped)} keys have no fcos_d2 name:")
        for key, reason in result.unmapped:
            print(f"  UNMAPPED {key}  ({reason})")
    if result.unmapped and not args.allow_unmapped:
        print(f"nothing written: rerun with --allow-unmapped to write {args.output} without them")
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"the folder of OUT does not exist ({out_dir})")
    write_checkpoint(result.state, args.output, layout.author)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
