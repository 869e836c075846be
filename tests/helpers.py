"""Shared test helpers: small configs, synthetic images, a one-batch trainer, tiny job options."""

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart" / "FCOS_R_18_shapes.yaml")
CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA is not available: bash scripts/gpu_check.sh runs these on a GPU"


def devices(slow_cpu: bool = False) -> list:
    """``device`` parameters: "cpu" (marked slow if ``slow_cpu``) and "cuda", marked ``cuda`` and
    skipped without CUDA; the same test code runs on both, so that the CPU run checks the test."""
    cuda = pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]
    )
    return [pytest.param("cpu", marks=pytest.mark.slow) if slow_cpu else "cpu", cuda]


def run_python(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python *args`` (a repository script or ``-m module``) on the CPU, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def load_script(name: str):
    """A repository script (``train_net.py``, ``demo.py``...) as a module, to call its ``main``
    in the test process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(name).stem, REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drop_closed_log_handlers() -> None:
    """Detectron2 sets up its loggers once per process, on the sys.stdout of that moment: under
    pytest's capsys, a stream closed since. Drop those handlers before capturing again."""
    import logging

    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.handlers = [
                h for h in logger.handlers if not getattr(getattr(h, "stream", None), "closed", 0)
            ]


_SHAPES_ROOT: Optional[Path] = None


def fresh_cfg():
    """A Detectron2 config with the fcos_d2 keys, on the CPU, with random initialisation."""
    from detectron2.config import get_cfg

    from fcos_d2 import add_fcos_config

    config = add_fcos_config(get_cfg())
    config.MODEL.DEVICE = "cpu"
    config.MODEL.WEIGHTS = ""
    return config


def read_metrics(output_dir: Path) -> list:
    """The records of a training run's ``metrics.json``."""
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


def config_path(relative: str) -> str:
    """Absolute path of a file of the repository, so tests run from any working directory."""
    return str(REPO / relative)


def shrink(cfg, config_file: str):
    """``config_file`` with a ResNet-18 from scratch, 64-channel FPN, 2-conv towers, 3 classes."""
    cfg.merge_from_file(str(config_file))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FCOS.NUM_CLS_CONVS = 2
    cfg.MODEL.FCOS.NUM_BOX_CONVS = 2
    cfg.MODEL.FCOS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    return cfg


def overfit(model, batch, iterations: int):
    """Train ``model`` on one fixed batch with AdamW (lr 1e-3), then return its detections on it
    (``instances``; ``proposals`` for a ``ProposalNetwork``)."""
    from detectron2.utils.events import EventStorage

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    with EventStorage():
        for _ in range(iterations):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        output = model(batch)[0]
    return output["instances"] if "instances" in output else output["proposals"]


def synthetic_image(height=128, width=128, boxes=(), classes=(), seed=0):
    """A noisy image, each box painted brighter in the channel of its class, and its Instances."""
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


def shapes_root() -> Path:
    """One dataset folder per test process: a registered name must keep naming the same files."""
    global _SHAPES_ROOT
    if _SHAPES_ROOT is None:
        _SHAPES_ROOT = Path(tempfile.mkdtemp(prefix="fcos_d2_shapes_"))
        atexit.register(shutil.rmtree, _SHAPES_ROOT, ignore_errors=True)
    return _SHAPES_ROOT


def tiny_opts(tmp_path: Path, max_iter: int, **extra) -> list:
    """Quickstart config shrunk to seconds: 128x128 images, 16 train / 8 val, narrow FPN."""
    opts = {
        "OUTPUT_DIR": str(tmp_path / "out"),
        "DATASETS.SHAPES.ROOT": str(shapes_root()),
        "DATASETS.SHAPES.NUM_TRAIN": 16,
        "DATASETS.SHAPES.NUM_VAL": 8,
        "DATASETS.SHAPES.IMAGE_SIZE": [128, 128],
        "INPUT.MIN_SIZE_TRAIN": (128,),
        "INPUT.MAX_SIZE_TRAIN": 128,
        "INPUT.MIN_SIZE_TEST": 128,
        "INPUT.MAX_SIZE_TEST": 128,
        "MODEL.FPN.OUT_CHANNELS": 64,
        "SOLVER.IMS_PER_BATCH": 4,
        "SOLVER.MAX_ITER": max_iter,
        "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.STEPS": (max_iter - 2,) if max_iter > 2 else (),
        "DATALOADER.NUM_WORKERS": 0,
        "MODEL.DEVICE": "cpu",
        **extra,
    }
    return [str(v) if not isinstance(v, str) else v for kv in opts.items() for v in kv]


def lazy_opts(tmp_path, max_iter: int) -> list:
    """The quickstart LazyConfig shrunk as tests/helpers.py ``tiny_opts`` shrinks the YAML one."""
    return [
        f"train.output_dir={tmp_path / 'out'}",
        "train.device=cpu",
        f"train.max_iter={max_iter}",
        "train.checkpointer.period=100",
        f"datasets.root={shapes_root()}",
        "datasets.num_train=16",
        "datasets.num_val=8",
        "datasets.image_size=[128,128]",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        f"lr_multiplier.scheduler.milestones=[{max_iter - 1}]",
        f"lr_multiplier.warmup_length={1 / max_iter}",
    ]


def args_for(opts: list, **kw) -> argparse.Namespace:
    """``train_net.py``'s parsed arguments for the quickstart config with ``opts`` overrides."""
    defaults = dict(
        config_file=QUICKSTART,
        resume=False,
        eval_only=False,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
        opts=opts,
    )
    return argparse.Namespace(**{**defaults, **kw})


# A tiny dataset of one's own, as users bring one.
SIZE = 96
# Category ids as a COCO subset would have them: not contiguous, not starting at 1.
CATEGORIES = {3: "square", 7: "disc"}


def draw_records(folder: Path, count: int, seed: int) -> list:
    """``count`` 96x96 JPEG images with one or two objects each (squares: class 3, discs: 7);
    returns (file name, [(category id, [x0, y0, x1, y1])])."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        image = np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)
        objects = []
        for k in range(1 + index % 2):
            side = int(rng.integers(20, 40))
            x0, y0 = int(rng.integers(0, SIZE - side)), int(rng.integers(0, SIZE - side))
            category = (3, 7)[(index + k) % 2]
            if category == 3:
                cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), (0, 200, 0), -1)
            else:
                cv2.circle(image, (x0 + side // 2, y0 + side // 2), side // 2, (0, 0, 220), -1)
            objects.append((category, [x0, y0, x0 + side, y0 + side]))
        name = f"img{index:03d}.jpg"
        cv2.imwrite(str(folder / name), image)
        records.append((name, objects))
    return records


def write_coco(root: Path, split: str, count: int, seed: int) -> Path:
    records = draw_records(root / "images", count, seed)
    data = {
        "images": [
            {"id": i + 1, "file_name": n, "width": SIZE, "height": SIZE}
            for i, (n, _) in enumerate(records)
        ],
        "annotations": [],
        "categories": [{"id": k, "name": v} for k, v in CATEGORIES.items()],
    }
    for image_id, (_, objects) in enumerate(records, start=1):
        for category, (x0, y0, x1, y1) in objects:
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    json_file = root / f"{split}.json"
    json_file.write_text(json.dumps(data))
    return json_file
