"""Where an exported graph spends its time on onnxruntime: the model's own forward traced (how
fcos-d2 exported before issue #20) against the export's FCOSGraph.

    python benchmarks/onnx_graph.py [--size 800 1216] [--threads 2] [--repeats 9]

Builds R_50_1x with random weights and the benchmark's settings (score threshold 0: every
level keeps its top 1000 (location, class) pairs, the most decoding a trained model can cause),
exports both graphs, times them round-robin on the same noise image (wall-clock medians) and
prints onnxruntime's profile of each: milliseconds per run by operator type, and the share of
the convolutions. Both files' detections are compared with PyTorch's.
"""

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.inputs import random_batch  # noqa: E402
from benchmarks.models import TestSettings, build_fcos_d2  # noqa: E402


def export_forward(model, image, path: Path) -> None:
    """The previous export: ``model([{"image": image}])`` traced as it is."""
    from fcos_d2.export import ExportableFCOS
    from fcos_d2.export.model import (
        INPUT_NAMES,
        ONNX_OPSET,
        OUTPUT_NAMES,
        quiet_benign_tracer_warnings,
    )

    with torch.no_grad(), quiet_benign_tracer_warnings():
        torch.onnx.export(
            ExportableFCOS(model),
            (image,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                **{name: {0: "detections"} for name in OUTPUT_NAMES},
            },
        )


def profile(path: Path, image, threads: int, runs: int) -> dict[str, float]:
    """Milliseconds per run of each operator type, from onnxruntime's profiler."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"image": image.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> dict:
    from fcos_d2.export import ExportableFCOS, export_model, load_exported
    from fcos_d2.export.verify import compare

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2, help="torch's and onnxruntime's")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--top", type=int, default=12, help="operator types listed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_fcos_d2(TestSettings(score_threshold=0.0), network=True).eval()
    image = random_batch(1, *args.size, 0).images[0]
    with torch.no_grad():
        reference = ExportableFCOS(model)(image)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = {"model.forward": Path(folder) / "forward.onnx"}
        export_forward(model, image, paths["model.forward"])
        paths["FCOSGraph"] = export_model(model, "onnx", Path(folder) / "graph", image)
        runs = {name: load_exported(path, args.threads) for name, path in paths.items()}
        samples = {name: [] for name in runs}
        for name, run in runs.items():
            result = compare(reference, run(image))
            print(f"{name}: {result.matched}/{result.total} of PyTorch's detections matched")
        for repeat in range(args.repeats):
            for name in list(runs)[repeat % 2 :] + list(runs)[: repeat % 2]:
                start = time.perf_counter()
                runs[name](image)
                samples[name].append(time.perf_counter() - start)
        for name, path in paths.items():
            per_op = profile(path, image, args.threads, 3)
            total = sum(per_op.values())
            median = statistics.median(samples[name]) * 1000
            conv_share = 100 * per_op.get("Conv", 0) / total
            print(
                f"\n{name}: median {median:.0f} ms over {args.repeats} runs; profiled "
                f"{total:.0f} ms of operators, convolutions {conv_share:.1f}%"
            )
            for op, ms in list(per_op.items())[: args.top]:
                print(f"  {op:24s} {ms:8.1f} ms")
            results[name] = {"median_ms": median, "samples": samples[name], "per_op_ms": per_op}
    ratio = results["FCOSGraph"]["median_ms"] / results["model.forward"]["median_ms"]
    print(f"\nFCOSGraph / model.forward: {ratio:.3f}x")
    return results


if __name__ == "__main__":
    main()
