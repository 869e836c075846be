"""Mixed precision only where it is fast (the CPU bfloat16 rule), inference autocast, NHWC."""

import logging

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from helpers import args_for, synthetic_image, tiny_opts

from fcos_d2 import precision
from fcos_d2.d2_compat import step_runner
from fcos_d2.engine import Trainer, setup
from fcos_d2.engine.runtime import CPUAutocastTrainer
from fcos_d2.precision import autocast_dtype


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bfloat16; each test gets a fresh log."""
    monkeypatch.setattr(precision, "_reported", set())

    def pretend(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)

    return pretend


def test_bfloat16_only_where_the_cpu_computes_it(native_bf16, caplog):
    assert autocast_dtype("cuda") is torch.float16
    native_bf16(True)
    assert autocast_dtype("cpu", "auto") is torch.bfloat16
    assert autocast_dtype("cpu", "never") is None
    native_bf16(False)
    with caplog.at_level(logging.WARNING, logger="fcos_d2.precision"):
        assert autocast_dtype("cpu", "auto", "SOLVER.AMP.ENABLED") is None
        assert autocast_dtype("cpu", "auto", "SOLVER.AMP.ENABLED") is None
    # One line, once, saying why.
    (record,) = caplog.records
    assert "no native bfloat16" in record.getMessage() and "float32" in record.getMessage()
    assert autocast_dtype("cpu", "always") is torch.bfloat16
    with pytest.raises(ValueError, match="SOLVER.AMP.CPU_BF16 must be one of"):
        autocast_dtype("cpu", "sometimes")


@pytest.mark.parametrize("native, expected", [(True, CPUAutocastTrainer), (False, SimpleTrainer)])
def test_trainer_uses_bfloat16_autocast_only_on_native_cpus(
    tmp_path, native_bf16, native, expected
):
    native_bf16(native)
    opts = tiny_opts(tmp_path, 2, **{"SOLVER.AMP.ENABLED": True, "DATASETS.TEST": "()"})
    trainer = Trainer(setup(args_for(opts)))
    assert type(step_runner(trainer)) is expected
    assert trainer.cfg.SOLVER.AMP.ENABLED  # the saved config says what was asked for


def test_mixed_precision_inference_switch(tiny_cfg, native_bf16):
    native_bf16(False)
    tiny_cfg.MODEL.FCOS.INFERENCE_TH_TEST = 0.0
    batch = [synthetic_image(boxes=[[10, 15, 60, 70]], classes=[1])]
    outputs = {}
    for name, enabled, cpu_bf16 in (
        ("fp32", False, "auto"),
        ("auto", True, "auto"),
        ("bf16", True, "always"),
    ):
        tiny_cfg.TEST.AMP.ENABLED = enabled
        tiny_cfg.SOLVER.AMP.CPU_BF16 = cpu_bf16
        torch.manual_seed(0)
        model = build_model(tiny_cfg).eval()
        dtypes = []
        model.head.cls_logits.register_forward_hook(
            lambda m, i, o, seen=dtypes: seen.append(o.dtype)
        )
        with torch.no_grad():
            outputs[name] = model(batch)[0]["instances"]
        assert dtypes == [torch.bfloat16 if name == "bf16" else torch.float32] * 5, name
    # "auto" on a CPU without native bfloat16 stays in float32: the very same detections.
    assert torch.equal(outputs["auto"].scores, outputs["fp32"].scores)
    # bfloat16 keeps 8 bits of mantissa: scores of the top detections move by well under 0.05.
    assert outputs["bf16"].scores.dtype == torch.float32
    assert (outputs["bf16"].scores[:10] - outputs["fp32"].scores[:10]).abs().max() < 0.05


def test_channels_last_changes_memory_format_not_outputs(tiny_cfg):
    tiny_cfg.MODEL.FCOS.INFERENCE_TH_TEST = 0.0
    batch = [synthetic_image(boxes=[[10, 15, 60, 70]], classes=[1])]
    results = {}
    for channels_last in (False, True):
        tiny_cfg.MODEL.CHANNELS_LAST = channels_last
        torch.manual_seed(0)
        model = build_model(tiny_cfg).eval()
        conv = model.head.cls_tower[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        with torch.no_grad():
            results[channels_last] = model(batch)[0]["instances"]
    # Same weights, other memory layout: equal up to the order of float sums.
    torch.testing.assert_close(results[True].scores, results[False].scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        results[True].pred_boxes.tensor, results[False].pred_boxes.tensor, rtol=1e-4, atol=1e-3
    )


def test_channels_last_default_is_nhwc_on_x86_cpus_only(monkeypatch):
    from fcos_d2.checks import ConfigError
    from fcos_d2.modeling import fcos

    for machine, expected in (("x86_64", True), ("AMD64", True), ("arm64", False)):
        monkeypatch.setattr(fcos.platform, "machine", lambda m=machine: m)
        assert fcos.channels_last_for(None, "cpu") is expected, machine
        assert fcos.channels_last_for(None, "cuda") is False
        assert fcos.channels_last_for(None, "cuda:1") is False
        assert fcos.channels_last_for(True, "cuda") is True
        assert fcos.channels_last_for(False, "cpu") is False
    monkeypatch.setattr(fcos.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(fcos.torch.backends.mkldnn, "is_available", lambda: False)
    assert fcos.channels_last_for(None, "cpu") is False
    with pytest.raises(ConfigError, match="MODEL.CHANNELS_LAST must be one of .*'yes'"):
        fcos.channels_last_for("yes", "cpu")
