"""Training and evaluation: the yacs trainer (:mod:`.trainer`, ``train_net.py``), the LazyConfig
trainer (:mod:`.lazy`, ``lazyconfig_train_net.py``) and what they share (:mod:`.runtime`,
:mod:`.ema`)."""

from .trainer import Trainer, main, setup

__all__ = ["Trainer", "main", "setup"]
