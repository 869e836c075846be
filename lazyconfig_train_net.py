#!/usr/bin/env python
"""Train and evaluate FCOS from a LazyConfig file, like Detectron2's tools/lazyconfig_train_net.py.

python lazyconfig_train_net.py --config-file configs/LazyConfig/fcos_R_18_shapes.py
python lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=W.pth
python lazyconfig_train_net.py --config-file CFG --num-gpus 2 train.max_iter=1000
"""

import fcos_d2  # noqa: F401  (first: it quiets fvcore's import-time warnings)

# isort: split
import sys
from typing import Optional

from fcos_d2.cli import training_command
from fcos_d2.config import check_start_weights, load_lazy_config
from fcos_d2.engine.lazy import main as train_and_evaluate


def check_config(args) -> None:
    """The config's errors (missing file, bad override, missing weights) before any process
    starts."""
    cfg = load_lazy_config(args.config_file, args.opts)
    weights, output_dir = cfg.train.init_checkpoint, cfg.train.output_dir
    check_start_weights(weights, output_dir, args.resume, "train.init_checkpoint")


def main(argv: Optional[list[str]] = None) -> int:
    return training_command(
        "lazyconfig_train_net.py",
        train_and_evaluate,
        check_config=check_config,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
