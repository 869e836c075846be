"""The keys fcos_d2's LazyConfig trainer (``lazyconfig_train_net.py``) reads beyond Detectron2's
common ``train.py``, with their defaults: declared, so that overrides of them are checked like any
other key. Each is the twin of a yacs key."""

# MODEL_EMA.*: the moving average of the weights (fcos_d2/engine/ema.py); set as train.model_ema.
model_ema = dict(enabled=False, decay=0.999)

# SOLVER.BEST_CHECKPOINT.*: model_best.pth, the best weights by one evaluation metric (e.g.
# "bbox/AP50"; "" keeps none; fcos_d2/engine/best_checkpoint.py); set as train.best_checkpoint.
best_checkpoint = dict(metric="", mode="max")

# TEST.AUG.*: evaluation with test-time augmentation (fcos_d2/inference/tta.py) as `bbox_TTA`,
# with --eval-only and after training; a top-level `test` entry.
test = dict(
    aug=dict(
        enabled=False,
        min_sizes=[400, 500, 600, 700, 800, 900, 1000, 1100, 1200],
        max_size=4000,
        flip=True,
        box_voting=False,
    ),
    # TEST.VAL_LOSS: the training losses on the test set at each evaluation ("validation/...").
    val_loss=False,
)
