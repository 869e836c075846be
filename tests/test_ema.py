"""The moving average of the weights (MODEL_EMA): closed-form updates, swapping, checkpoints."""

import pytest
import torch
from helpers import args_for, tiny_opts
from torch import nn

from fcos_d2.checks import ConfigError
from fcos_d2.engine import Trainer, main, setup
from fcos_d2.engine.ema import ModelEMA


def _model(weight: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(weight)
    return model


def test_updates_follow_the_warmed_up_decay():
    model = _model(0.0)
    ema = ModelEMA(model, decay=0.5)
    model[0].weight.data.fill_(1.0)
    model[1].num_batches_tracked.fill_(7)
    # decay_t = min(0.5, (1 + t) / (10 + t)): 0.1 at t = 0, 2/11 at t = 1, ... 0.5 from t = 8.
    ema.update()
    assert ema.state["0.weight"].item() == pytest.approx(0.9)
    ema.update()
    assert ema.state["0.weight"].item() == pytest.approx(0.9 * 2 / 11 + 9 / 11)
    for _ in range(6):
        ema.update()
    before = ema.state["0.weight"].item()
    model[0].weight.data.fill_(3.0)
    ema.update()  # t = 8: decay 0.5
    assert ema.state["0.weight"].item() == pytest.approx(0.5 * before + 0.5 * 3.0)
    assert ema.state["1.num_batches_tracked"].item() == 7  # integers are copied, not averaged
    assert ema.state["1.running_var"].item() == pytest.approx(1.0)  # buffers are averaged too
    assert ema.num_updates == 9


def test_applied_swaps_in_and_back_then_copy_makes_it_permanent():
    model = _model(2.0)
    ema = ModelEMA(model, decay=0.9)
    model[0].weight.data.fill_(4.0)
    with ema.applied():
        assert model[0].weight.item() == 2.0
    assert model[0].weight.item() == 4.0
    ema.copy_to_model()
    assert model[0].weight.item() == 2.0
    with ema.applied():
        assert model[0].weight.item() == 2.0
    assert model[0].weight.item() == 2.0


def test_state_dict_round_trip_and_bad_values():
    model = _model(1.0)
    ema = ModelEMA(model, decay=0.9)
    ema.update()
    restored = ModelEMA(_model(5.0), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1
    assert restored.state["0.weight"].item() == 1.0
    with pytest.raises(ConfigError, match=r"average of this .*without \['0.weight'"):
        restored.load_state_dict({"state": {}, "num_updates": 3})
    extra = {**ema.state_dict()["state"], "head.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"average of this .*with \['head.weight'\]"):
        restored.load_state_dict({"state": extra, "num_updates": 3})
    for decay in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"MODEL_EMA.DECAY must be in \[0, 1\)"):
            ModelEMA(model, decay)


@pytest.mark.slow
def test_training_saves_the_average_and_resume_continues_it(tmp_path):
    ema_opts = {"MODEL_EMA.ENABLED": True, "MODEL_EMA.DECAY": 0.9, "TEST.EVAL_PERIOD": 3}
    opts = tiny_opts(tmp_path, max_iter=6, **{"SOLVER.CHECKPOINT_PERIOD": 3, **ema_opts})
    main(args_for(opts))
    out = tmp_path / "out"
    final = torch.load(out / "model_final.pth", weights_only=True)
    middle = torch.load(out / "model_0000002.pth", weights_only=True)
    # Checkpoints keep the raw weights as "model" and the average as "ema"; the final model is
    # the average.
    assert middle["ema"]["num_updates"] == 3 and final["ema"]["num_updates"] == 6
    weight = "head.cls_logits.weight"
    assert not torch.equal(middle["model"][weight], middle["ema"]["state"][weight])
    assert all(torch.equal(v, final["ema"]["state"][k]) for k, v in final["model"].items())

    # Resumed from iteration 3: the average continues from the checkpoint's.
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000002.pth")
    trainer = Trainer(setup(args_for(opts, resume=True)))
    trainer.resume_or_load(resume=True)
    assert trainer.ema.num_updates == 3
    assert torch.equal(trainer.ema.state[weight], middle["ema"]["state"][weight])
    trainer.train()
    assert trainer.ema.num_updates == 6 and trainer.ema.final
    resumed = torch.load(out / "model_final.pth", weights_only=True)
    assert torch.equal(resumed["model"][weight], trainer.ema.state[weight])
