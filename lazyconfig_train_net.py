#!/usr/bin/env python
"""Train and evaluate FCOS from a LazyConfig file, like Detectron2's tools/lazyconfig_train_net.py.

python lazyconfig_train_net.py --config-file configs/LazyConfig/fcos_R_18_shapes.py
python lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=W.pth
python lazyconfig_train_net.py --config-file CFG --num-gpus 2 train.max_iter=1000
"""

from detectron2.engine import default_argument_parser, launch

from fcos_d2.lazy_engine import main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
