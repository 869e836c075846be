"""Checkpoint layouts of other FCOS releases and how their keys map onto fcos_d2's ``FCOS``.

Pure key tables and tensor rewrites, with no model or checkpointer behind them: the model uses
:mod:`.adelaidet` to accept AdelaiDet files in ``load_state_dict``, ``python -m fcos_d2.convert``
uses every module here. Facts (key names, statistics conventions) come from the releases'
repositories, not their code.

- :mod:`.adelaidet`: aim-uofa/AdelaiDet (Detectron2 names, the head under ``proposal_generator``).
- :mod:`.fcos_release`: tianzhi0549/FCOS, the original maskrcnn-benchmark release.
"""

from .adelaidet import adelaidet_key_to_ours, load_adelaidet_keys
from .fcos_release import fcos_key_to_ours, frozen_bn_var_for_detectron2, is_frozen_bn_running_var
from .rules import REFUSED_GLOBAL, strip_ddp_prefix, unmapped_reason

__all__ = [
    "REFUSED_GLOBAL",
    "adelaidet_key_to_ours",
    "fcos_key_to_ours",
    "frozen_bn_var_for_detectron2",
    "is_frozen_bn_running_var",
    "load_adelaidet_keys",
    "strip_ddp_prefix",
    "unmapped_reason",
]
