import os

import pytest
import torch

# Two cores on CI: more threads only oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cfg():
    """A fresh Detectron2 config with the FCOS keys, on the CPU, with random initialisation."""
    from detectron2.config import get_cfg

    from fcos_d2 import add_fcos_config

    config = get_cfg()
    add_fcos_config(config)
    config.MODEL.DEVICE = "cpu"
    config.MODEL.WEIGHTS = ""
    return config
