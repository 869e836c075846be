#!/usr/bin/env python
"""Train and evaluate FCOS with Detectron2, exactly like Detectron2's own tools/train_net.py.

python train_net.py --config-file configs/quickstart/FCOS_R_18_shapes.yaml
python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
python train_net.py --config-file CFG --num-gpus 2      # 2 processes (GPUs, or CPUs via Gloo)
python train_net.py --config-file CFG --num-machines 2 --machine-rank 0 --dist-url tcp://HOST:PORT
"""

import fcos_d2  # noqa: F401  (first: it quiets fvcore's import-time warnings)

# isort: split
import sys
from typing import Optional

from detectron2.evaluation import print_csv_format

from fcos_d2.cli import training_command
from fcos_d2.config import build_cfg, check_start_weights
from fcos_d2.engine import main as train_and_evaluate


def print_results(results: dict) -> None:
    # Trainer.test gives {task: metrics} for one test set, {dataset: {task: metrics}} for more.
    one_dataset = all(not isinstance(v, dict) for task in results.values() for v in task.values())
    for dataset, tasks in ({"": results} if one_dataset else results).items():
        print(f"Final evaluation {dataset}:".replace(" :", ":"), flush=True)
        print_csv_format(tasks)


def check_config(args) -> None:
    """The config's errors (missing file, unknown key, wrong type, missing weights) before any
    process starts."""
    cfg = build_cfg(args.config_file, args.opts)
    check_start_weights(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, args.resume, "MODEL.WEIGHTS")


def main(argv: Optional[list[str]] = None) -> int:
    return training_command(
        "train_net.py",
        train_and_evaluate,
        check_config=check_config,
        report=print_results,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
