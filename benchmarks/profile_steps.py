"""Where fcos-d2's time goes: ``torch.profiler`` over a few training steps and inferences.

    python benchmarks/profile_steps.py [--device cuda] [--sizes gpu] [--amp] [--steps 3]
                                       [--output benchmarks/results]

fcos-d2's R_50_1x on the benchmarks' synthetic inputs (benchmarks/run.py's sizes: ``--sizes
gpu`` is 8 images at 800x1333 for training, one for inference). Each part of a step is a profiler
range (backbone, head, target assignment + losses, post-processing, optimizer step) or, for the
backward pass, autograd's node evaluations; "other" is the rest (preprocessing, casts, ...).
Writes ``profile.json`` and ``profile.txt``: per part its device time per step (CUDA kernel time
on a GPU, CPU time on a CPU) and share of the step, the kernel launches and host-device
synchronisations per step, and the kernels that take the most time. This is where the
FCOS-specific costs on a GPU (per-level Python loops, small kernels, host syncs) show.
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.inputs import random_batch  # noqa: E402
from benchmarks.models import TestSettings, build_detector, make_optimizer  # noqa: E402
from benchmarks.run import SIZES  # noqa: E402
from benchmarks.workloads import amp_dtype, synchronize  # noqa: E402

# Profiler ranges of the forward pass and the update; backward is autograd's node evaluations.
RANGES = ("backbone", "head", "assignment+losses", "post-processing", "optimizer")
BACKWARD_NODES = "autograd::engine::evaluate_function"
# CPU-side calls that wait for the GPU.
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP_KERNELS = 25


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="quick")
    parser.add_argument("--amp", action="store_true", help="mixed precision, as run.py --amp")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps of each (default 3)")
    parser.add_argument("--boxes", type=int, default=100, help="ground-truth boxes per image")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but CUDA is not available")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def _ranged(name: str, function):
    def call(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return call


def instrument(model) -> None:
    """Profiler ranges around the parts of fcos-d2's forward pass."""
    model.backbone.forward = _ranged("backbone", model.backbone.forward)
    model.head.forward = _ranged("head", model.head.forward)
    model.core.losses = _ranged("assignment+losses", model.core.losses)
    model.core.inference = _ranged("post-processing", model.core.inference)


def _time(event, device: bool, own: bool = False) -> float:
    """Microseconds: the device (kernel) time of a profiler entry, or its CPU time."""
    if device:
        name = "self_device_time_total" if own else "device_time_total"
        legacy = "self_cuda_time_total" if own else "cuda_time_total"
        return float(getattr(event, name, getattr(event, legacy, 0.0)) or 0.0)
    return float(event.self_cpu_time_total if own else event.cpu_time_total)


def summarize(prof, label: str, steps: int, on_gpu: bool) -> dict:
    """Per part and per step: device milliseconds and share; launches, syncs, top kernels.

    Backward is the sum over autograd's node evaluations: on CUDA they run in the autograd
    engine's own thread, outside the ``backward`` range of the calling thread.
    """
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}
    if on_gpu:  # every kernel of the profiled steps
        step = sum(_time(e, True, own=True) for e in averages if _is_kernel(e))
    else:
        step = _time(by_name[label], False) if label in by_name else 0.0
    times = {part: _time(by_name[part], on_gpu) for part in RANGES if part in by_name}
    backward = [e for e in averages if e.key.startswith(BACKWARD_NODES)]
    if backward:
        times["backward"] = sum(_time(e, on_gpu) for e in backward)
    times["other"] = max(0.0, step - sum(times.values()))
    parts = {
        part: {"ms": value / steps / 1000, "share": value / step if step else None}
        for part, value in times.items()
    }
    ranges = (label, *RANGES, "backward")
    if on_gpu:
        kernels = [e for e in averages if _is_kernel(e)]
    else:
        kernels = [
            e for e in averages if e.key not in ranges and not e.key.startswith(BACKWARD_NODES)
        ]
    kernels.sort(key=lambda e: _time(e, on_gpu, own=True), reverse=True)
    return {
        "step_ms": step / steps / 1000,
        "parts": parts,
        "kernel_launches_per_step": sum(e.count for e in averages if _is_kernel(e)) / steps,
        "syncs_per_step": sum(e.count for e in averages if e.key in SYNCS) / steps,
        "top": [
            {
                "name": e.key[:120],
                "calls_per_step": e.count / steps,
                "ms_per_step": _time(e, on_gpu, own=True) / steps / 1000,
            }
            for e in kernels[:TOP_KERNELS]
        ],
    }


def _is_kernel(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def profile_runs(function, label: str, steps: int, device: torch.device) -> dict:
    for _ in range(2):  # convolution algorithms, allocator cache
        function()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(label):
                function()
        synchronize(device)
    return summarize(prof, label, steps, device.type == "cuda")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    sizes = SIZES[args.sizes]
    detector = build_detector("fcos_d2", TestSettings(), args.device, amp=args.amp)
    model = detector.model
    instrument(model)

    batch_size, height, width = sizes.train
    train_inputs = detector.training_inputs(random_batch(batch_size, height, width, args.boxes))
    optimizer = make_optimizer(model)
    dtype = amp_dtype(device) if args.amp else None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def train_step():
        model.train()
        with torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None):
            loss = detector.loss(train_inputs)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        with record_function("optimizer"):
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    inference_batch = random_batch(*sizes.inference[0], 0)
    inference_inputs = detector.inference_inputs(inference_batch)

    def inference():
        model.eval()
        with torch.no_grad():
            detector.infer(inference_inputs)

    results = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "settings": {
            "sizes": args.sizes,
            "amp": args.amp,
            "steps": args.steps,
            "boxes": args.boxes,
        },
        "train": profile_runs(train_step, "train_step", args.steps, device),
        "inference": profile_runs(inference, "inference", args.steps, device),
    }
    results["train"]["what"] = f"training step, batch {batch_size} at {height}x{width}"
    n, h, w = sizes.inference[0]
    results["inference"]["what"] = f"inference, batch {n} at {h}x{w}"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "profile.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (output / "profile.txt").write_text(text)
    print(text)
    return results


def report(results: dict) -> str:
    unit = "CUDA kernel time" if results["gpu"] else "CPU time"
    lines = [
        f"fcos-d2 profile on {results['gpu'] or results['device']}, torch {results['torch']}, "
        f"{results['settings']}; {unit} per step"
    ]
    for key in ("train", "inference"):
        part = results[key]
        lines += [
            "",
            f"{part['what']}: {part['step_ms']:.1f} ms, {part['kernel_launches_per_step']:.0f} "
            f"kernel launches, {part['syncs_per_step']:.0f} host-device syncs",
        ]
        for name, value in part["parts"].items():
            share = f" ({100 * value['share']:.0f}%)" if value["share"] is not None else ""
            lines.append(f"  {name:<18} {value['ms']:9.2f} ms{share}")
        lines.append("  top:")
        lines += [
            f"    {t['ms_per_step']:9.3f} ms  {t['calls_per_step']:6.0f}x  {t['name']}"
            for t in part["top"]
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
