"""The CUDA tier: what runs differently on a GPU (float16 AMP, the fused focal loss's float16
gradient, assignment and decoding kernels, the memory format, NCCL, export of GPU-trained
weights, TTA, mixed-precision prediction).

Every test takes ``device`` from ``helpers.devices()``: the CPU run checks the test itself, the
CUDA run (marked ``cuda``, skipped without CUDA) is what ``bash scripts/gpu_check.sh`` runs on a
GPU with ``pytest -m cuda``. Where results are compared across devices, TF32 is switched off
(fixture ``exact_float32``): PyTorch's default TF32 convolutions round inputs to 10 bits.
"""

import copy
import datetime
import itertools
import platform
import socket

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import AMPTrainer, DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import config_path, devices, fresh_cfg, overfit, shrink, synthetic_image

from fcos_d2.engine.runtime import CPUAutocastTrainer, build_step_runner
from fcos_d2.export.__main__ import main as export_main
from fcos_d2.export.model import ExportableFCOS, load_exported
from fcos_d2.export.verify import compare
from fcos_d2.inference.predictor import FCOSPredictor
from fcos_d2.inference.tta import FCOSWithTTA
from fcos_d2.modeling.head import FCOSHeadOutputs
from fcos_d2.modeling.losses import sigmoid_focal_loss_sum

HEIGHT, WIDTH = 128, 160
GT_BOXES = [[10, 15, 50, 60], [60, 30, 140, 110], [100, 70, 150, 120]]
GT_CLASSES = [0, 1, 2]


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 convolutions and matrix products on CUDA really in float32 during the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def small_cfg(device: str):
    """The shrunk detector (ResNet-18, 64-channel FPN, 2-conv towers, 3 classes) on ``device``,
    tested at HEIGHT x WIDTH."""
    cfg = shrink(fresh_cfg(), config_path("configs/FCOS-Detection/Base-FCOS.yaml"))
    cfg.MODEL.DEVICE = device
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = HEIGHT, WIDTH
    return cfg


def training_batch() -> list[dict]:
    return [
        synthetic_image(HEIGHT, WIDTH, GT_BOXES, GT_CLASSES),
        synthetic_image(HEIGHT, WIDTH, GT_BOXES[:2], GT_CLASSES[:2], seed=1),
    ]


def head_output_dtypes(model) -> list:
    """Filled with the dtype of the class logits at every forward (one entry per level)."""
    seen = []
    model.head.cls_logits.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def amp_dtype(device: str) -> torch.dtype:
    """float16 on CUDA; bfloat16 on CPUs (with SOLVER.AMP.CPU_BF16 "always", any CPU)."""
    return torch.float16 if device == "cuda" else torch.bfloat16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per device, on first use: the small detector trained 20 iterations on that device (real,
    spread-out scores), its config file, weights file (saved from the device) and image file."""
    cache = {}

    def get(device: str):
        if device not in cache:
            cfg = small_cfg(device)
            torch.manual_seed(0)
            model = build_model(cfg)
            image = synthetic_image(HEIGHT, WIDTH, GT_BOXES, GT_CLASSES)
            image["image"] = image["image"].round()  # what the PNG file holds
            overfit(model, [image], 20)
            folder = tmp_path_factory.mktemp(f"trained_{device}")
            config_file = folder / "config.yaml"
            config_file.write_text(cfg.dump())
            weights = folder / "model.pth"
            torch.save({"model": model.state_dict()}, weights)  # tensors on ``device``
            image_file = folder / "image.png"
            cv2.imwrite(str(image_file), image["image"].permute(1, 2, 0).numpy().astype("uint8"))
            cache[device] = cfg, model, config_file, weights, image_file
        return cache[device]

    return get


@pytest.mark.parametrize("device", devices())
def test_fused_focal_loss_under_float16_autocast_and_grad_scaler_matches_fvcore(device):
    """Values and float16 gradients, scaled as AMP scales them, against fvcore in float64."""
    from fvcore.nn import sigmoid_focal_loss

    generator = torch.Generator().manual_seed(0)
    num_classes = 8
    logits = torch.randn(2, 500, num_classes, generator=generator) * 4
    logits[0, :4] = torch.tensor([-40.0, 40.0, 0.0, -9.0])[:, None]  # saturated, balanced, small
    labels = torch.randint(0, num_classes + 1, (2, 500), generator=generator)
    labels[0, :4] = torch.tensor([0, 0, num_classes, num_classes])
    num_pos = int((labels < num_classes).sum())  # FCOSLoss divides by the positives too

    # float32 weights, float16 activations: a float16 copy of the float32 logits.
    master = logits.half().float().to(device).requires_grad_()
    scaler = torch.amp.GradScaler(device)
    with torch.autocast(device, dtype=torch.float16):
        half = master.half()
        half.retain_grad()
        loss = sigmoid_focal_loss_sum(half, labels.to(device)) / num_pos
    scaler.scale(loss).backward()
    assert loss.dtype == torch.float32
    assert half.grad.dtype == torch.float16 and torch.isfinite(half.grad).all()
    grad = half.grad.cpu().double() / scaler.get_scale()

    reference_input = half.detach().cpu().double().requires_grad_()
    one_hot = F.one_hot(labels, num_classes + 1)[..., :num_classes].double()
    reference = sigmoid_focal_loss(reference_input, one_hot, 0.25, 2.0, "sum") / num_pos
    reference.backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    expected = reference_input.grad
    # Scaled by 2^16, every gradient from 1e-9 up is a normal float16: 11 bits, 5e-4 rounding.
    normal = expected.abs() >= 1e-9
    torch.testing.assert_close(grad[normal], expected[normal], rtol=2e-3, atol=0.0)
    # These are below float16's smallest subnormal (6e-8): cast before the loss scale multiplied
    # them, they would be 0.
    tiny = normal & (expected.abs() < 6e-8)
    assert tiny.sum() > 10 and (grad[tiny] != 0).all()
    scaler.step(torch.optim.SGD([master], lr=0.0))  # no inf or NaN found: the scale stays
    scaler.update()
    assert scaler.get_scale() == 2.0**16


@pytest.mark.parametrize("device", devices())
def test_amp_steps_of_a_small_fcos_are_finite_and_near_float32(device):
    """The step runner of the device (Detectron2's AMPTrainer on CUDA), eight steps: float16
    steps whose scaled gradients overflow are skipped (and the scale halved), as in training."""
    cfg = small_cfg(device)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = training_batch()
    with EventStorage(0), torch.no_grad():
        float32_loss = sum(model(batch).values()).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    runner = build_step_runner(
        model, itertools.repeat(batch), optimizer, amp=True, cpu_bf16="always"
    )
    assert type(runner) is (AMPTrainer if device == "cuda" else CPUAutocastTrainer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dtypes = head_output_dtypes(model)
    with EventStorage(0) as storage:
        for iteration in range(8):
            runner.iter = storage.iter = iteration
            runner.run_step()  # raises FloatingPointError on a non-finite loss
        losses = [value for value, _ in storage.history("total_loss").values()]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert set(dtypes) == {amp_dtype(device)}  # the head ran in half precision
    # Same weights, same batch: the first mixed-precision loss is the float32 one, rounded.
    assert losses[0] == pytest.approx(float32_loss, rel=0.03)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter).all(), name
    # Every weight moved, except the box scales of levels without positives (no gradient).
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert all(n.startswith("head.scales.") for n in unchanged), unchanged
    if device == "cuda":
        assert 0 < runner.grad_scaler.get_scale() < float("inf")


def random_gt(num_images: int, count: int, generator: torch.Generator) -> list[Instances]:
    instances = []
    for _ in range(num_images):
        corners = torch.rand(count, 2, 2, generator=generator) * torch.tensor([WIDTH, HEIGHT])
        boxes = torch.cat([corners.min(1).values, corners.max(1).values + 4], dim=1)
        classes = torch.randint(3, (count,), generator=generator)
        instances.append(Instances((HEIGHT, WIDTH), gt_boxes=Boxes(boxes), gt_classes=classes))
    return instances


@pytest.mark.parametrize("device", devices())
def test_assignment_losses_and_post_processing_on_the_device_equal_the_cpus(device):
    core = build_model(small_cfg("cpu")).core  # parameter-free: the same core serves both
    generator = torch.Generator().manual_seed(0)
    sizes = [(-(-HEIGHT // s), -(-WIDTH // s)) for s in core.strides]
    outputs = FCOSHeadOutputs(
        [torch.randn(2, 3, h, w, generator=generator) * 2 - 2 for h, w in sizes],
        [0.5 + 3 * torch.rand(2, 4, h, w, generator=generator) for h, w in sizes],
        [torch.randn(2, 1, h, w, generator=generator) for h, w in sizes],
    )
    gt = random_gt(2, 30, generator)
    results = {}
    for where in ("cpu", device):
        features = [torch.empty(2, 0, h, w, device=where) for h, w in sizes]
        on = FCOSHeadOutputs(*([x.to(where) for x in level] for level in outputs))
        gt_on = [x.to(where) for x in gt]
        targets = core.targets(features, gt_on)
        losses, num_pos = core.losses(features, on, gt_on)
        detections = core.inference(features, on, [(HEIGHT, WIDTH)] * 2)
        results[where] = targets, losses, num_pos, detections

    (targets, losses, num_pos, detections), ours = results["cpu"], results[device]
    assert torch.equal(ours[0].labels.cpu(), targets.labels)
    assert torch.equal(ours[0].matched_gt.cpu(), targets.matched_gt)
    torch.testing.assert_close(ours[0].reg_targets.cpu(), targets.reg_targets, rtol=1e-6, atol=1e-5)
    assert int(num_pos) == int(ours[2]) > 50
    for name, value in losses.items():
        assert ours[1][name].item() == pytest.approx(value.item(), rel=1e-5), name
    for cpu_result, device_result in zip(detections, ours[3]):
        assert device_result.pred_boxes.tensor.device.type == device
        matched = compare(
            (cpu_result.pred_boxes.tensor, cpu_result.scores, cpu_result.pred_classes),
            (device_result.pred_boxes.tensor, device_result.scores, device_result.pred_classes),
        )
        assert matched.matched == matched.total >= 50


@pytest.mark.parametrize("device", devices())
def test_the_default_memory_format_is_nchw_on_cuda_and_nhwc_on_x86_cpus(device):
    cfg = small_cfg(device)
    assert cfg.MODEL.CHANNELS_LAST is None
    model = build_model(cfg).eval()
    nhwc = (
        device == "cpu"
        and platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
    )
    assert model.channels_last is nhwc
    weight = model.head.cls_tower[0].weight
    assert weight.device.type == device
    assert weight.is_contiguous(memory_format=torch.channels_last) is nhwc
    with torch.no_grad():
        _, features, predictions = model.dense_predictions([synthetic_image(HEIGHT, WIDTH)])
    layout = torch.channels_last if nhwc else torch.contiguous_format
    assert features[0].is_contiguous(memory_format=layout)
    assert predictions.cls_logits[0].device.type == device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("device", devices())
def test_one_process_group_all_reduces_and_trains_under_ddp(device):
    """NCCL on CUDA (Gloo on the CPU) in one process: an all-reduce, and a DDP backward whose
    gradients (reduced by the backend) equal those of the plain model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        world_size=1,
        rank=0,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        assert dist.get_backend() == backend
        value = torch.full((3,), 2.0, device=device)
        dist.all_reduce(value)
        assert value.tolist() == [2.0, 2.0, 2.0]
        torch.manual_seed(0)
        model = build_model(small_cfg(device)).train()
        plain = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None)
        batch = training_batch()
        with EventStorage(0):
            sum(ddp(batch).values()).backward()
            sum(plain(batch).values()).backward()
        pairs = list(zip(model.named_parameters(), plain.parameters()))
        assert all(p.grad is not None for (_, p), _ in pairs)
        for (name, p), q in pairs:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("device", devices(slow_cpu=True))
def test_export_and_verify_weights_trained_on_the_device(device, fmt, trained, tmp_path, capsys):
    """``python -m fcos_d2.export --verify`` on a checkpoint saved from the device; the file then
    detects what the model detects on the device."""
    cfg, model, config_file, weights, image_file = trained(device)
    argv = ["--config-file", config_file, "--format", fmt, "--output", tmp_path]
    argv += ["--verify", image_file, "MODEL.WEIGHTS", weights, "MODEL.DEVICE", device]
    assert export_main([str(a) for a in argv]) == 0
    output = capsys.readouterr().out
    assert "PASS" in output, output
    summary = [line for line in output.splitlines() if line.startswith("verify: ")][-1]
    matched, total = map(int, summary.split()[1].split("/"))
    assert matched == total >= 15, output  # three sizes, five or more detections each

    image = torch.as_tensor(cv2.imread(str(image_file)).transpose(2, 0, 1).astype("float32"))
    exported = load_exported(next(tmp_path.glob("model.*")))(image)
    with torch.no_grad():
        on_device = ExportableFCOS(model)(image.to(device))
    result = compare(on_device, exported)
    assert result.total >= 5 and result.matched >= 0.95 * result.total


def tta_cfg(cfg, min_sizes, flip: bool):
    cfg = cfg.clone()
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = min_sizes, 1000, flip
    return cfg


@pytest.mark.parametrize("device", devices(slow_cpu=True))
def test_tta_on_the_device(device, trained):
    """At the test size alone it reproduces the detector; at three sizes, flipped too, it gives
    on the device what it gives on the CPU."""
    cfg, model, _, _, image_file = trained(device)
    inputs = {"image": torch.as_tensor(cv2.imread(str(image_file)).transpose(2, 0, 1))}
    inputs.update(height=HEIGHT, width=WIDTH)
    with torch.no_grad():
        (expected,) = model([inputs])
    (single,) = FCOSWithTTA(tta_cfg(cfg, (HEIGHT,), flip=False), model)([inputs])
    expected, single = expected["instances"], single["instances"]
    assert len(expected) >= 5 and len(single) == len(expected)
    torch.testing.assert_close(single.pred_boxes.tensor, expected.pred_boxes.tensor)
    torch.testing.assert_close(single.scores, expected.scores)
    assert torch.equal(single.pred_classes, expected.pred_classes)

    augmented = tta_cfg(cfg, (96, HEIGHT, 160), flip=True)
    (on_device,) = FCOSWithTTA(augmented, model)([inputs])
    (on_cpu,) = FCOSWithTTA(augmented, copy.deepcopy(model).to("cpu"))([inputs])
    on_device, on_cpu = on_device["instances"], on_cpu["instances"]
    assert on_device.pred_boxes.tensor.device.type == device and len(on_device) >= 5
    result = compare(
        (on_cpu.pred_boxes.tensor, on_cpu.scores, on_cpu.pred_classes),
        (on_device.pred_boxes.tensor, on_device.scores, on_device.pred_classes),
    )
    assert result.matched >= 0.95 * result.total


@pytest.mark.parametrize("device", devices(slow_cpu=True))
def test_default_predictor_with_mixed_precision_inference(device, trained):
    """``TEST.AMP.ENABLED``: the backbone and head in float16 (CUDA) or bfloat16 (CPU), float32
    detections close to float32 inference's; FCOSPredictor gives the same from the file."""
    cfg, _, _, weights, image_file = trained(device)
    image = cv2.imread(str(image_file))
    outputs = {}
    for amp in (False, True):
        predictor_cfg = cfg.clone()
        predictor_cfg.MODEL.WEIGHTS = str(weights)
        predictor_cfg.TEST.AMP.ENABLED = amp
        predictor_cfg.SOLVER.AMP.CPU_BF16 = "always"
        predictor = DefaultPredictor(predictor_cfg)
        dtypes = head_output_dtypes(predictor.model)
        outputs[amp] = predictor(image)["instances"]
        assert dtypes == [amp_dtype(device) if amp else torch.float32] * 5
        assert outputs[amp].scores.dtype == torch.float32
        assert outputs[amp].pred_boxes.tensor.device.type == device
    from_file = FCOSPredictor(predictor_cfg)(image_file)["instances"]
    torch.testing.assert_close(from_file.scores, outputs[True].scores)

    # The five best float32 detections are there in mixed precision: same class, IoU >= 0.9.
    full, mixed = outputs[False], outputs[True]
    assert len(full) >= 5
    top = full[:5]
    from detectron2.structures import pairwise_iou

    ious = pairwise_iou(top.pred_boxes, mixed.pred_boxes)
    same_class = top.pred_classes[:, None] == mixed.pred_classes[None, :]
    close_score = (top.scores[:, None] - mixed.scores[None, :]).abs() <= 0.05
    assert ((ious >= 0.9) & same_class & close_score).any(dim=1).all()
