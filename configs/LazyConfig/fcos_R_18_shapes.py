"""The quickstart as a LazyConfig: the twin of configs/quickstart/FCOS_R_18_shapes.yaml (FCOS with
a ResNet-18 trained from scratch on the embedded "shapes" dataset, AdamW, mixed precision by the
bfloat16 rule of fcos_d2.precision), for ``lazyconfig_train_net.py``, which registers ``datasets``
before building anything. Needs torch >= 2.4 on CPUs (fused AdamW).
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from fcos_d2.data.augmentation import ResizeShortestEdgePerBatch
from fcos_d2.data.builtin import register_shapes
from fcos_d2.evaluation import FasterCOCOEvaluator

from .common.fcos import model
from .common.runtime import best_checkpoint as _best_checkpoint
from .common.runtime import model_ema as _model_ema
from .common.runtime import test as _test

# ResNet-18 from scratch with BatchNorm, 64-channel FPN and head, 2-conv towers.
model.backbone.bottom_up.stem.norm = "BN"
model.backbone.bottom_up.stages.depth = 18
model.backbone.bottom_up.stages.norm = "BN"
del model.backbone.bottom_up.stages.stride_in_1x1  # bottleneck blocks only
model.backbone.bottom_up.freeze_at = 0
model.backbone.out_channels = 64
model.backbone.top_block.in_channels = "${..out_channels}"
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.num_classes = 5
model.head.num_cls_convs = 2
model.head.num_box_convs = 2
model.pixel_std = [57.375, 57.120, 58.395]  # from scratch: normalize the inputs fully
model.channels_last = True

# DATASETS.SHAPES.*: the files are generated on first use.
datasets = L(register_shapes)(
    names=["shapes_train", "shapes_val"],
    root="",  # "": $FCOS_D2_DATASETS, else <repository>/datasets
    num_train=512,
    num_val=128,
    image_size=[256, 256],
    max_objects=6,
    seed=0,
)

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.augmentations = [
    L(ResizeShortestEdgePerBatch)(
        # images_per_batch: the batch per process, dataloader.train.total_batch_size / processes
        short_edge_length=(160, 192, 224, 256),
        max_size=256,
        images_per_batch=4,
    ),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.use_instance_mask = False
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=256, max_size=256),
]
dataloader.test.num_workers = 0
# Detectron2's COCOEvaluator, with faster-coco-eval where Detectron2 has no compiled COCOeval_opt.
dataloader.evaluator = L(FasterCOCOEvaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}/inference"
)

optimizer = get_config("common/optim.py").AdamW
optimizer.lr = 0.001
optimizer.weight_decay = 0.05
optimizer.fused = True  # as the YAML path's AdamW: one kernel for all tensors (torch >= 2.4)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[1350], num_updates="${...train.max_iter}"
    ),
    warmup_length=100 / 1550,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = get_config("common/train.py").train
train.max_iter = 1550
train.amp.enabled = True  # float16 AMP on CUDA, bfloat16 autocast on native-bfloat16 CPUs
train.amp.cpu_bf16 = "auto"
train.checkpointer.period = 500
train.eval_period = 0  # evaluate once, at the end of training
train.seed = 0
train.model_ema = _model_ema  # MODEL_EMA.*
train.best_checkpoint = _best_checkpoint  # SOLVER.BEST_CHECKPOINT.*
train.output_dir = "output/quickstart/FCOS_R_18_shapes_lazy"

test = _test  # TEST.AUG.* (top-level names starting with _ are not config keys)
