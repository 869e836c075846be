#!/usr/bin/env python
"""Train and evaluate FCOS with Detectron2, exactly like Detectron2's own tools/train_net.py.

python train_net.py --config-file configs/quickstart/FCOS_R_18_shapes.yaml
python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
python train_net.py --config-file CFG --num-gpus 2      # 2 processes (GPUs, or CPUs via Gloo)
python train_net.py --config-file CFG --num-machines 2 --machine-rank 0 --dist-url tcp://HOST:PORT
"""

import sys

from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import print_csv_format
from detectron2.utils import comm

from fcos_d2.checks import ConfigError, exit_on_config_error
from fcos_d2.engine import build_cfg, main


def run(args) -> None:
    try:
        results = main(args)
    except ConfigError as error:
        # In a worker process: say why once, then stop without a traceback.
        if comm.is_main_process():
            print(f"train_net.py: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    if comm.is_main_process() and results:
        # Trainer.test gives {task: metrics} for one test set, {dataset: {task: metrics}} for more.
        one_dataset = all(
            not isinstance(v, dict) for task in results.values() for v in task.values()
        )
        for dataset, tasks in ({"": results} if one_dataset else results).items():
            print(f"Final evaluation {dataset}:".replace(" :", ":"), flush=True)
            print_csv_format(tasks)


def cli() -> int:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    # The config's own errors (missing file, unknown key, wrong type) before processes start.
    build_cfg(args.config_file, args.opts)
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_config_error("train_net.py", cli))
