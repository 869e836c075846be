"""LazyConfig twins of the YAML configs build the same model and recipe; the LazyConfig entry
point trains, evaluates and evaluates again from the checkpoint."""

import json

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.solver import LRMultiplier, build_lr_scheduler
from helpers import (
    args_for,
    config_path,
    lazy_opts,
    run_python,
    shapes_root,
    synthetic_image,
    tiny_opts,
)
from omegaconf import ListConfig

from fcos_d2.config import build_cfg
from fcos_d2.data.augmentation import build_train_mapper
from fcos_d2.data.builtin import register_shapes
from fcos_d2.engine import Trainer
from fcos_d2.engine import main as yacs_main
from fcos_d2.engine.lazy import main, train_dataset_names
from fcos_d2.engine.runtime import check_model_classes
from fcos_d2.modeling.fcos import channels_last_for

TWINS = [
    ("configs/LazyConfig/fcos_R_18_shapes.py", "configs/quickstart/FCOS_R_18_shapes.yaml"),
    ("configs/LazyConfig/fcos_R_50_1x.py", "configs/FCOS-Detection/R_50_1x.yaml"),
]
# Building two R-50 detectors takes seconds.
TWIN_MODELS = [
    pytest.param(*twin, marks=[pytest.mark.slow] * ("R_50" in twin[0])) for twin in TWINS
]


def comparable(value):
    """Tuples, lists and ListConfigs of equal items compare equal."""
    if isinstance(value, (tuple, list, ListConfig)):
        return [comparable(v) for v in value]
    return value


def augmentations(mapper: DatasetMapper) -> list:
    """Each augmentation's type and settings; a resize to a range of one size is that size."""
    described = []
    for aug in mapper.augmentations.augs:
        settings = comparable(vars(aug))
        if settings.get("is_range") and len(set(settings["short_edge_length"])) == 1:
            settings.update(is_range=False, sample_style="choice")
        described.append((type(aug).__name__, settings))
    return described


@pytest.mark.parametrize("lazy_file, yaml_file", TWIN_MODELS)
def test_lazy_config_builds_the_yaml_model(lazy_file, yaml_file):
    lazy_cfg = LazyConfig.load(config_path(lazy_file))
    lazy_cfg.train.device = "cpu"
    lazy = instantiate(lazy_cfg.model)
    yaml = build_model(build_cfg(config_path(yaml_file), ["MODEL.DEVICE", "cpu"]))
    assert lazy.channels_last == yaml.channels_last
    assert sum(p.numel() for p in lazy.parameters()) == sum(p.numel() for p in yaml.parameters())
    shapes = [(k, v.shape) for k, v in lazy.state_dict().items()]
    assert shapes == [(k, v.shape) for k, v in yaml.state_dict().items()]
    # Same module types (FrozenBN vs BN, GN, ...) and the same frozen stages.
    assert [type(m) for m in lazy.modules()] == [type(m) for m in yaml.modules()]
    frozen = [(n, p.requires_grad) for n, p in lazy.named_parameters()]
    assert frozen == [(n, p.requires_grad) for n, p in yaml.named_parameters()]
    # Same training and inference settings of the (parameter-free) core.
    assert lazy.head_in_features == yaml.head_in_features
    for attr in ("strides", "num_classes", "inference_quality"):
        assert getattr(lazy.core, attr) == getattr(yaml.core, attr), attr
    for part in ("target_assigner", "loss", "postprocessor"):
        assert vars(getattr(lazy.core, part)) == vars(getattr(yaml.core, part)), part
    # Same weights give the same outputs: the modules are also wired alike.
    lazy.load_state_dict(yaml.state_dict())
    lazy.eval()
    yaml.eval()
    assert torch.equal(lazy.pixel_mean, yaml.pixel_mean) and torch.equal(
        lazy.pixel_std, yaml.pixel_std
    )
    inputs = [synthetic_image(64, 96, boxes=[(8, 8, 40, 50)], classes=[0])]
    with torch.no_grad():
        _, lazy_features, lazy_out = lazy.dense_predictions(inputs)
        _, yaml_features, yaml_out = yaml.dense_predictions(inputs)
    for a, b in zip(
        lazy_features + [t for ts in lazy_out for t in ts],
        yaml_features + [t for ts in yaml_out for t in ts],
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lazy_file, yaml_file", TWINS)
def test_lazy_config_has_the_yaml_training_recipe(lazy_file, yaml_file):
    lazy = LazyConfig.load(config_path(lazy_file))
    cfg = build_cfg(config_path(yaml_file), ["MODEL.DEVICE", "cpu"])
    # Data: datasets, augmentations, batch size, workers.
    assert comparable(lazy.dataloader.train.dataset.names) == comparable(cfg.DATASETS.TRAIN[0])
    assert comparable(lazy.dataloader.test.dataset.names) == comparable(cfg.DATASETS.TEST[0])
    assert lazy.dataloader.evaluator.dataset_name == cfg.DATASETS.TEST[0]
    for is_train, loader in ((True, lazy.dataloader.train), (False, lazy.dataloader.test)):
        yaml_mapper = build_train_mapper(cfg) if is_train else DatasetMapper(cfg, is_train)
        lazy_mapper = instantiate(loader.mapper)
        assert augmentations(lazy_mapper) == augmentations(yaml_mapper)
        for attr in ("is_train", "image_format", "use_instance_mask", "recompute_boxes"):
            assert getattr(lazy_mapper, attr) == getattr(yaml_mapper, attr), attr
        assert loader.num_workers == cfg.DATALOADER.NUM_WORKERS
    assert lazy.dataloader.train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH
    # Optimizer: same type and parameter groups.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.BatchNorm2d(4)
    )
    lazy.optimizer.params.model = model
    lazy_optimizer = instantiate(lazy.optimizer)
    yaml_optimizer = Trainer.build_optimizer(cfg, model)
    assert type(lazy_optimizer) is type(yaml_optimizer)

    def settings(group: dict) -> dict:
        # Detectron2's YAML path asks SGD for its multi-tensor kernel (foreach): same update.
        return {k: v for k, v in group.items() if k not in ("params", "foreach")}

    assert settings(lazy_optimizer.defaults) == settings(yaml_optimizer.defaults)
    assert len(lazy_optimizer.param_groups) == len(yaml_optimizer.param_groups)
    for a, b in zip(lazy_optimizer.param_groups, yaml_optimizer.param_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert settings(a) == settings(b)
    # Schedule: the same learning rate at every iteration (sampled for long schedules).
    max_iter = lazy.train.max_iter
    assert max_iter == cfg.SOLVER.MAX_ITER
    lazy_schedule = LRMultiplier(lazy_optimizer, instantiate(lazy.lr_multiplier), max_iter)
    yaml_schedule = build_lr_scheduler(cfg, yaml_optimizer)
    milestones = [m + d for m in (*cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) for d in (-1, 0, 1)]
    for it in sorted({*range(0, max_iter, max(1, max_iter // 2000)), *milestones, max_iter - 1}):
        lazy_schedule.last_epoch = yaml_schedule.last_epoch = it
        assert lazy_schedule.get_lr() == pytest.approx(yaml_schedule.get_lr(), rel=1e-9), it
    # The rest of the job.
    assert lazy.train.init_checkpoint == cfg.MODEL.WEIGHTS
    assert lazy.train.checkpointer.period == cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == cfg.TEST.EVAL_PERIOD
    assert lazy.train.amp.enabled == cfg.SOLVER.AMP.ENABLED
    assert lazy.train.amp.get("cpu_bf16", "auto") == cfg.SOLVER.AMP.CPU_BF16
    lazy.train.device = cfg.MODEL.DEVICE
    lazy_channels_last = lazy.model.get("channels_last", False)
    if not isinstance(lazy_channels_last, bool):  # a LazyCall of channels_last_for
        lazy_channels_last = instantiate(lazy_channels_last)
    assert lazy_channels_last == channels_last_for(cfg.MODEL.CHANNELS_LAST, cfg.MODEL.DEVICE)
    assert lazy.train.get("seed", -1) == cfg.SEED
    assert lazy.train.get("model_ema", {}).get("enabled", False) == cfg.MODEL_EMA.ENABLED


@pytest.mark.slow
def test_lazy_config_trains_evaluates_and_reloads(tmp_path):
    config = config_path("configs/LazyConfig/fcos_R_18_shapes.py")
    results = main(args_for(lazy_opts(tmp_path, max_iter=3), config_file=config))
    assert set(results) == {"bbox"}
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])
    out = tmp_path / "out"
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 2
    assert (out / "model_final.pth").exists()
    assert (out / "inference" / "coco_instances_results.json").exists()
    # The entry-point script evaluates the checkpoint to the same numbers.
    opts = lazy_opts(tmp_path, max_iter=3) + [f"train.init_checkpoint={out / 'model_final.pth'}"]
    done = run_python("lazyconfig_train_net.py", "--config-file", config, "--eval-only", *opts)
    assert done.returncode == 0, done.stderr[-3000:]
    values = [line for line in done.stdout.splitlines() if "copypaste: " in line][-1]
    ap = float(values.split("copypaste: ")[1].split(",")[0])
    assert ap == pytest.approx(results["bbox"]["AP"], abs=1e-3)
    # TTA and the oracle center-ness: the same numbers from both trainers on the same weights.
    weights = str(out / "model_final.pth")
    lazy_eval = lazy_opts(tmp_path, max_iter=3) + [f"train.init_checkpoint={weights}"]
    yacs_eval = tiny_opts(tmp_path, 3, **{"MODEL.WEIGHTS": weights})
    tta = ["test.aug.enabled=True", "test.aug.min_sizes=[96,128]", "test.aug.max_size=200"]
    yacs_tta = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(96,128)"]
    yacs_tta += ["TEST.AUG.MAX_SIZE", "200"]
    lazy_results = main(args_for(lazy_eval + tta, config_file=config, eval_only=True))
    yacs_results = yacs_main(args_for(yacs_eval + yacs_tta, eval_only=True))
    assert set(lazy_results) == set(yacs_results) == {"bbox", "bbox_TTA"}
    for task in ("bbox", "bbox_TTA"):
        assert lazy_results[task]["AP"] == pytest.approx(yacs_results[task]["AP"], abs=1e-6)
    assert read_detections(out / "inference_TTA") != read_detections(out / "inference")
    # The oracle scores with ground-truth center-ness: the same detections from both trainers,
    # other scores than the model's own (AP alone cannot tell after 3 iterations).
    plain = sorted(d["score"] for d in read_detections(out / "inference"))
    main(
        args_for(
            lazy_eval + ["model.core.inference_quality=oracle"], config_file=config, eval_only=True
        )
    )
    oracle_lazy = sorted(d["score"] for d in read_detections(out / "inference"))
    yacs_main(args_for(yacs_eval + ["MODEL.FCOS.INFERENCE_QUALITY", "oracle"], eval_only=True))
    oracle_yacs = sorted(d["score"] for d in read_detections(out / "inference" / "shapes_val"))
    assert oracle_lazy == pytest.approx(oracle_yacs, abs=1e-6)
    assert oracle_lazy != pytest.approx(plain, abs=1e-3)


def read_detections(folder):
    return json.loads((folder / "coco_instances_results.json").read_text())


@pytest.mark.slow
def test_lazy_training_with_a_moving_average_keeps_it(tmp_path):
    config = config_path("configs/LazyConfig/fcos_R_18_shapes.py")
    ema = ["train.model_ema.enabled=True", "train.model_ema.decay=0.9"]
    main(args_for(lazy_opts(tmp_path, max_iter=3) + ema, config_file=config))
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert final["ema"]["num_updates"] == 3 and final["ema"]["decay"] == 0.9
    assert all(torch.equal(v, final["ema"]["state"][k]) for k, v in final["model"].items())


def test_lazy_class_count_must_match_the_training_data():
    cfg = LazyConfig.load(config_path("configs/LazyConfig/fcos_R_18_shapes.py"))
    shrunk = dict(root=str(shapes_root()), num_train=16, num_val=8, image_size=[128, 128])
    assert register_shapes(["shapes_train"], **shrunk) == ["shapes_train"]
    cfg.model.head.num_classes = 4
    with pytest.raises(
        ValueError, match="model.head.num_classes=4 but dataset 'shapes_train' has 5"
    ):
        check_model_classes(
            instantiate(cfg.model), train_dataset_names(cfg), "model.head.num_classes"
        )
    with pytest.raises(ValueError, match=r"shapes split names must be in .*got \['shapes_test'\]"):
        register_shapes("shapes_test")
