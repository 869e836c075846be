#!/usr/bin/env python
"""Train and evaluate FCOS from a LazyConfig file, like Detectron2's tools/lazyconfig_train_net.py.

python lazyconfig_train_net.py --config-file configs/LazyConfig/fcos_R_18_shapes.py
python lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=W.pth
python lazyconfig_train_net.py --config-file CFG --num-gpus 2 train.max_iter=1000
"""

import sys
from typing import Optional

from fcos_d2.cli import training_command
from fcos_d2.config import load_lazy_config
from fcos_d2.engine.lazy import main as train_and_evaluate


def main(argv: Optional[list[str]] = None) -> int:
    return training_command(
        "lazyconfig_train_net.py",
        train_and_evaluate,
        # The config's errors (missing file, bad override) before processes start.
        check_config=lambda args: load_lazy_config(args.config_file, args.opts),
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
