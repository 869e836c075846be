"""fcos_d2's yacs config: the keys it adds (:func:`add_fcos_config`), the AdelaiDet keys it
accepts (:func:`check_authors_keys`) and a ready config for commands (:func:`build_cfg`); LazyConfig
files with checked overrides (:func:`load_lazy_config`)."""

from .authors import check_authors_keys
from .build import available_device, build_cfg, check_start_weights
from .defaults import add_fcos_config
from .lazy import load_lazy_config

__all__ = [
    "add_fcos_config",
    "available_device",
    "build_cfg",
    "check_start_weights",
    "check_authors_keys",
    "load_lazy_config",
]
