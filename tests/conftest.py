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


@pytest.fixture
def tiny_cfg(cfg):
    """A small FCOS (ResNet-18 from scratch, 64-channel FPN, 2-conv towers) for quick training."""
    cfg.merge_from_file("configs/FCOS-Detection/Base-FCOS.yaml")
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FCOS.NUM_CLS_CONVS = 2
    cfg.MODEL.FCOS.NUM_BOX_CONVS = 2
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    return cfg


def synthetic_image(height=128, width=128, boxes=(), classes=(), seed=0):
    """A noisy image with each box painted brighter in the channel of its class, plus its Instances."""
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=generator) * 60 + 100
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        image[c, int(y0) : int(y1), int(x0) : int(x1)] += 80
    instances = Instances(
        (height, width),
        gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        gt_classes=torch.tensor(classes, dtype=torch.long),
    )
    return {"image": image, "instances": instances, "height": height, "width": width}
