"""FCOS R-50-FPN 1x on COCO: the LazyConfig twin of configs/FCOS-Detection/R_50_1x.yaml (same
model, data, SGD recipe and schedule), for ``lazyconfig_train_net.py``.

Detectron2's own configs/COCO-Detection/fcos_R_50_FPN_1x.py trains its FCOS multi-scale; this one
keeps the authors' single-scale 800 px recipe.
"""

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from fcos_d2.evaluation import FasterCOCOEvaluator
from fcos_d2.modeling.fcos import channels_last_for

from .common.fcos import model
from .common.runtime import best_checkpoint as _best_checkpoint
from .common.runtime import model_ema as _model_ema
from .common.runtime import test as _test

model.backbone.bottom_up.freeze_at = 2  # MODEL.BACKBONE.FREEZE_AT: stem and res2 frozen
# MODEL.CHANNELS_LAST None: NHWC on x86-64 CPUs, NCHW on CUDA.
model.channels_last = L(channels_last_for)(setting=None, device="${...train.device}")

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations[0].short_edge_length = (800,)  # INPUT.MIN_SIZE_TRAIN
# Detectron2's COCOEvaluator, with faster-coco-eval where Detectron2 has no compiled COCOeval_opt.
dataloader.evaluator = L(FasterCOCOEvaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}/inference"
)

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x

train = get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "output/fcos/R_50_1x"
train.eval_period = 0  # evaluate once, at the end of training
train.amp.cpu_bf16 = "auto"  # SOLVER.AMP.CPU_BF16
train.model_ema = _model_ema  # MODEL_EMA.*
train.best_checkpoint = _best_checkpoint  # SOLVER.BEST_CHECKPOINT.*

test = _test  # TEST.AUG.* (top-level names starting with _ are not config keys)
