"""Fixtures; helpers shared by the test modules live in ``helpers.py``."""

import os

import pytest
import torch
from helpers import config_path, fresh_cfg, shrink

# Two cores on CI: more threads only oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cfg():
    """A fresh Detectron2 config with the fcos_d2 keys, on the CPU, with random initialisation."""
    return fresh_cfg()


@pytest.fixture
def tiny_cfg(cfg):
    """A small FCOS detector for quick training."""
    return shrink(cfg, config_path("configs/FCOS-Detection/Base-FCOS.yaml"))
