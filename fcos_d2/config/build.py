"""A ready yacs config for every fcos_d2 command: Detectron2's defaults, fcos_d2's keys, a YAML
file and ``KEY VALUE`` overrides, with errors that name the file or the override."""

import logging
import os
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode, get_cfg

from ..checks import ConfigError
from .defaults import add_fcos_config

logger = logging.getLogger("fcos_d2")
_warned: set = set()


def available_device(device: str, key: str = "MODEL.DEVICE") -> str:
    """``device`` (set by ``key``), or "cpu" where it names CUDA and CUDA is unavailable
    (Detectron2's default ``MODEL.DEVICE`` is "cuda"); says so once per process and key."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        if key not in _warned:
            _warned.add(key)
            logger.warning("%s=%s but CUDA is not available: using the CPU", key, device)
        return "cpu"
    return device


def build_cfg(config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """Detectron2 defaults + fcos_d2 keys, merged with a YAML file and ``KEY VALUE`` overrides,
    ``MODEL.DEVICE`` falling back to the CPU without CUDA. Not frozen.

    yacs' errors (unknown key, wrong type, odd number of overrides) become :class:`ConfigError`
    naming the file or the command line.
    """
    cfg = add_fcos_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError) as error:
            raise ConfigError(
                f"in {config_file} (or its _BASE_ files): {_yacs_message(error)}"
            ) from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as error:
        raise ConfigError(f"in the command-line overrides: {_yacs_message(error)}") from None
    cfg.MODEL.DEVICE = available_device(cfg.MODEL.DEVICE)
    return cfg


def check_start_weights(weights: str, output_dir: str, resume: bool, key: str) -> None:
    """Before anything starts (and before pages of config are logged): the weights a run starts
    from (``key``) must exist where they are a local file; with ``resume`` and a
    ``last_checkpoint`` in ``output_dir`` they are not used, as in Detectron2."""
    if resume and os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        return
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"{key}: checkpoint file {weights} does not exist")


def _yacs_message(error: Exception) -> str:
    # KeyError's str() quotes its message; the others are plain.
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)
