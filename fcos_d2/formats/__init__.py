"""Checkpoint layouts of other FCOS releases and how their keys map onto fcos_d2's ``FCOS``.

Pure key tables and tensor rewrites, with no model or checkpointer behind them: the model uses
:mod:`.adelaidet` to accept AdelaiDet files in ``load_state_dict``, ``python -m fcos_d2.convert``
uses every module here. Facts (key names, statistics conventions) come from the releases'
repositories, not their code.

- :mod:`.adelaidet`: aim-uofa/AdelaiDet (Detectron2 names, the head under ``proposal_generator``).
- :mod:`.fcos_release`: tianzhi0549/FCOS, the original maskrcnn-benchmark release.
- :mod:`.torchvision`: torchvision's ``fcos_resnet50_fpn`` (COCO_V1 weights).
- :mod:`.mmdet`: open-mmlab/mmdetection 2.x / 3.x ``FCOSHead`` models.
"""

from .adelaidet import ADELAIDET_LAYOUT, adelaidet_key_to_ours, load_adelaidet_keys
from .fcos_release import (
    FCOS_LAYOUT,
    fcos_key_to_ours,
    frozen_bn_var_for_detectron2,
    is_frozen_bn_running_var,
)
from .mmdet import MMDET_LAYOUT, mmdet_key_to_ours
from .rules import REFUSED_GLOBAL, Layout, is_ours, layouts_found, strip_ddp_prefix, unmapped_reason
from .torchvision import COCO_THING_IDS, TORCHVISION_LAYOUT, torchvision_key_to_ours

# Every layout ``python -m fcos_d2.convert --from NAME`` reads, by NAME.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (FCOS_LAYOUT, ADELAIDET_LAYOUT, TORCHVISION_LAYOUT, MMDET_LAYOUT)
}

__all__ = [
    "COCO_THING_IDS",
    "LAYOUTS",
    "REFUSED_GLOBAL",
    "Layout",
    "adelaidet_key_to_ours",
    "fcos_key_to_ours",
    "frozen_bn_var_for_detectron2",
    "is_frozen_bn_running_var",
    "is_ours",
    "layouts_found",
    "load_adelaidet_keys",
    "mmdet_key_to_ours",
    "strip_ddp_prefix",
    "torchvision_key_to_ours",
    "unmapped_reason",
]
