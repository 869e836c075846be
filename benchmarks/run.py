"""Speed and memory of fcos-d2 against Detectron2's FCOS and RetinaNet and torchvision's FCOS.

    python benchmarks/run.py [--device cpu|cuda] [--threads 2] [--repeats 5] [--quick]
                             [--sizes full|quick|gpu] [--amp] [--only inference,train,...]
                             [--output benchmarks/results]

All models are built in one process on the same synthetic inputs and timed round-robin (one run
of each model per repetition), so that drift affects all of them alike; the medians are printed
with their ratio to Detectron2's FCOS, next to the targets (issue #9 on CPUs, #17 on GPUs). Peak
memory is measured in a fresh process per model (see benchmarks/memory.py). On CUDA every timing
is between two ``torch.cuda.synchronize()`` and peak memory is ``torch.cuda.max_memory_allocated``.
The ``onnx`` group times fcos-d2's exported files on onnxruntime's CPU provider against its
PyTorch inference (benchmarks/deploy.py; targets of issue #20). Writes ``results.json`` and
``results.md`` to ``--output``.

``--sizes gpu`` is what users run on GPUs: inference of one 800x1333 image, training steps of 8
images at 800x1333. ``inference_amp`` is inference in mixed precision (float16 on CUDA, bfloat16
on CPUs): fcos-d2 with its ``TEST.AMP.ENABLED``, the peers under ``torch.autocast``. ``--amp``
runs the training steps (and their memory) in mixed precision as Detectron2's ``AMPTrainer``:
autocast and, in float16, a gradient scaler.

Post-processing settings: every detector gets the same score threshold, 1000 candidates per
level, NMS at 0.6 and 100 detections. The threshold defaults to 0.0 for whole-model inference:
with random weights, class probabilities sit at the 0.01 prior, and the implementations do not
threshold the same score (fcos-d2 the class probability, as the authors; Detectron2 and
torchvision sqrt(class x center-ness), ~0.07 here), so at 0.05 fcos-d2 would keep no candidate
and the others all of them. At 0.0 every implementation keeps exactly its top 1000 per level, the
most post-processing a trained model can cause. The post-processing-only benchmark uses made-up
head outputs in which the same 1000+ (location, class) pairs per level pass 0.05 under either
definition (benchmarks/inputs.py), and the real default threshold 0.05.
"""

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository (and fcos_d2) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import deploy, memory, report  # noqa: E402
from benchmarks.inputs import (  # noqa: E402
    candidate_dense_outputs,
    random_batch,
    random_dense_outputs,
)
from benchmarks.models import (  # noqa: E402
    DETECTORS,
    FCOS_VARIANTS,
    REFERENCE,
    REPO,
    TestSettings,
    build_detector,
)
from benchmarks.workloads import (  # noqa: E402
    amp_dtype,
    assign_loss_workload,
    candidates_per_level,
    inference_workload,
    postprocess_workload,
    time_interleaved,
    training_workload,
)

GROUPS = (
    "inference",
    "inference_amp",
    "train",
    "train_memory",
    "assign_loss",
    "assign_loss_memory",
    "postprocess",
    "onnx",
)
# What runs without --only: on CPUs the figures of the README's CPU table and the exported files
# on onnxruntime's CPU provider; on CUDA the README's GPU table, with mixed-precision inference.
DEFAULT_GROUPS = {
    "cpu": tuple(g for g in GROUPS if g != "inference_amp"),
    "cuda": tuple(g for g in GROUPS if g != "onnx"),
}
POSTPROCESS_THRESHOLD = 0.05


@dataclass(frozen=True)
class Sizes:
    """(batch, height, width) of each benchmark, and the box counts."""

    inference: tuple = ((1, 800, 1216), (4, 512, 640))
    train: tuple = (2, 512, 640)
    train_boxes: tuple = (4, 100)
    train_memory_boxes: int = 100
    assign: tuple = (2, 512, 640)
    assign_boxes: tuple = (10, 100, 1000, 5000)
    postprocess: tuple = (1, 800, 1216)
    candidates: int = 1000
    onnx_r50: tuple = (800, 1216)
    onnx_quickstart: int = 256
    # Images the int8 files are calibrated on: noise for the random R-50 (only its time is
    # compared), shapes train images for the quickstart (the export command's default).
    onnx_calibration: tuple = (8, 64)


FULL = Sizes()
QUICK = Sizes(
    inference=((1, 128, 192), (2, 64, 96)),
    train=(2, 128, 160),
    train_memory_boxes=20,
    assign=(2, 128, 160),
    assign_boxes=(10, 100, 400),
    postprocess=(1, 128, 192),
    candidates=200,
    onnx_r50=(128, 192),
    onnx_quickstart=64,
    onnx_calibration=(2, 2),
)
# Issue #17: the sizes users train and test at on GPUs. Target assignment and post-processing take
# dense outputs of the padded 800x1344 input (their level sizes need sides divisible by 32).
GPU = Sizes(
    inference=((1, 800, 1333),),
    train=(8, 800, 1333),
    train_boxes=(4, 100),
    train_memory_boxes=100,
    assign=(8, 800, 1344),
    assign_boxes=(10, 100, 1000, 5000),
    postprocess=(1, 800, 1344),
    candidates=1000,
)
SIZES = {"full": FULL, "quick": QUICK, "gpu": GPU}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; 2 quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script works")
    parser.add_argument(
        "--sizes",
        choices=sorted(SIZES),
        default=None,
        help="benchmark sizes: full (CPU, the default), quick (as --quick), gpu (800x1333)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="training steps in mixed precision (float16 + gradient scaler on CUDA)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(GROUPS)} (default: all but inference_amp on "
        "CPUs, all on CUDA)",
    )
    parser.add_argument(
        "--detectors",
        default=",".join(DETECTORS),
        help=f"comma-separated subset of {','.join(DETECTORS)} (ratios need {REFERENCE})",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.0,
        help="whole-model inference score threshold for every detector (default 0.0, see above)",
    )
    parser.add_argument(
        "--fcos-d2-opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="config overrides for fcos-d2 only, e.g. MODEL.FCOS.CHECKPOINT_TOWERS True",
    )
    parser.add_argument(
        "--quickstart-weights",
        default=str(REPO / deploy.QUICKSTART_WEIGHTS),
        help="trained quickstart model for the onnx group (default: make quickstart's; random "
        "weights if the file does not exist)",
    )
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.quick and args.sizes not in (None, "quick"):
        parser.error(f"--quick and --sizes {args.sizes} contradict each other")
    args.sizes = "quick" if args.quick else (args.sizes or "full")
    args.quick = args.sizes == "quick"
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    args.only = _choices(args.only or ",".join(DEFAULT_GROUPS[device_type]), GROUPS, "--only")
    args.detectors = _choices(args.detectors, DETECTORS, "--detectors")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats and --threads must be >= 1, got {args.repeats}, {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but CUDA is not available")
    return args


def _choices(value: str, allowed: tuple, option: str) -> list[str]:
    chosen = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{option} must be a comma-separated subset of {allowed}, got {value!r}")
    return [x for x in allowed if x in chosen]


class Runner:
    """Builds each detector once, runs the selected benchmarks, collects their results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.sizes = SIZES[args.sizes]
        self.amp_dtype = amp_dtype(self.device)
        self.train_precision = f"{str(self.amp_dtype)[6:]} AMP" if args.amp else "float32"
        # On CUDA the first runs also pick convolution algorithms and grow the allocator's cache.
        self.warmup = 2 if self.device.type == "cuda" else 1
        self.settings = TestSettings(
            score_threshold=args.score_threshold, fcos_d2_opts=tuple(args.fcos_d2_opts)
        )
        self.detectors = {}  # (name, with network) -> Detector
        self.fresh = None
        self.benchmarks: dict[str, dict] = {}

    def detector(self, name: str, network: bool = True, amp: bool = False):
        """The detector, built once; without ``network`` (for benchmarks that give the head
        outputs) any built detector will do, else one with a :class:`ShapesOnlyBackbone`.
        ``amp``: fcos-d2 with ``TEST.AMP.ENABLED`` (a second model, with the same weights)."""
        amp = amp and name == "fcos_d2"
        for key in ((name, network, amp), (name, True, amp)):
            if key in self.detectors:
                return self.detectors[key]
        detector = build_detector(name, self.settings, self.args.device, network, amp=amp)
        self.detectors[(name, network, amp)] = detector
        return detector

    def selected(self, names=DETECTORS) -> list[str]:
        return [d for d in self.args.detectors if d in names]

    def record(self, key: str, group: str, title: str, unit: str, results: dict, **extra):
        report.add_ratios(results)
        self.benchmarks[key] = {"group": group, "title": title, "unit": unit, **extra}
        self.benchmarks[key]["results"] = results
        cells = ", ".join(
            f"{name} {report._cell(row, unit)}" for name, row in results.items() if row
        )
        print(f"  {title}: {cells}", flush=True)

    def timed(
        self, key, group, title, workloads, outputs_name=None, repeats=None, warmup=None, **extra
    ):
        repeats = self.args.repeats if repeats is None else repeats
        warmup = self.warmup if warmup is None else warmup
        measured = time_interleaved(workloads, repeats, self.device, warmup)
        results = {}
        for name, result in measured.items():
            results[name] = report.summarize(result["samples"], result["cpu_samples"])
            if outputs_name:
                results[name][outputs_name] = result["output"]
        self.record(key, group, title, "s", results, repeats=repeats, **extra)

    def run_inference(self):
        for batch_size, height, width in self.sizes.inference:
            batch = random_batch(batch_size, height, width, 0)
            workloads = {n: inference_workload(self.detector(n), batch) for n in self.selected()}
            self.timed(
                f"inference_b{batch_size}_{height}x{width}",
                "inference",
                f"inference, batch {batch_size} at {height}x{width}",
                workloads,
                "detections",
                batch=batch_size,
                size=[height, width],
                score_threshold=self.settings.score_threshold,
            )

    def run_inference_amp(self):
        """fcos-d2 with its own switch (backbone and head autocast, decoding in float32); the
        peers, which have none, under ``torch.autocast`` as their users would run them."""
        dtype = str(self.amp_dtype)[6:]
        for batch_size, height, width in self.sizes.inference:
            batch = random_batch(batch_size, height, width, 0)
            workloads = {
                n: inference_workload(self.detector(n, amp=True), batch)
                if n == "fcos_d2"
                else inference_workload(self.detector(n), batch, autocast=self.amp_dtype)
                for n in self.selected()
            }
            self.timed(
                f"inference_amp_b{batch_size}_{height}x{width}",
                "inference_amp",
                f"inference in {dtype} (TEST.AMP.ENABLED / autocast), batch {batch_size} at "
                f"{height}x{width}",
                workloads,
                "detections",
                batch=batch_size,
                size=[height, width],
                precision=dtype,
                score_threshold=self.settings.score_threshold,
            )

    def run_train(self):
        batch_size, height, width = self.sizes.train
        precision = "" if self.train_precision == "float32" else f" ({self.train_precision})"
        for index, boxes in enumerate(self.sizes.train_boxes):
            batch = random_batch(batch_size, height, width, boxes)
            workloads = {
                n: training_workload(self.detector(n), batch, self.args.amp)
                for n in self.selected()
            }
            self.timed(
                f"train_step_{boxes}_boxes",
                "train",
                f"training step{precision}, batch {batch_size} at {height}x{width}, "
                f"{boxes} boxes/image",
                workloads,
                # The first box count warmed up the same models on the same image sizes.
                warmup=self.warmup if index == 0 else 0,
                batch=batch_size,
                size=[height, width],
                boxes=boxes,
                precision=self.train_precision,
            )

    def memory_results(self, function, names, spec) -> dict:
        """``function`` run for each detector in a fresh process; the median is the growth."""
        results = {}
        for name in names:
            measured = self.fresh(
                function, name, self.settings, self.args.device, self.args.threads, spec
            )
            results[name] = {"median": measured["growth_mib"], **measured}
        return results

    def run_train_memory(self):
        batch_size, height, width = self.sizes.train
        boxes = self.sizes.train_memory_boxes
        spec = {"batch": batch_size, "size": (height, width), "boxes": boxes, "amp": self.args.amp}
        results = self.memory_results(memory.training_memory, self.selected(), spec)
        precision = "" if self.train_precision == "float32" else f" ({self.train_precision})"
        self.record(
            f"train_memory_{boxes}_boxes",
            "train_memory",
            f"training step{precision} peak memory growth, batch {batch_size} at "
            f"{height}x{width}, {boxes} boxes/image",
            "MiB",
            results,
            batch=batch_size,
            size=[height, width],
            boxes=boxes,
            precision=self.train_precision,
            measured_by=(
                "torch.cuda.max_memory_allocated"
                if self.device.type == "cuda"
                else "peak RSS (getrusage)"
            ),
        )

    def run_assign_loss(self):
        batch_size, height, width = self.sizes.assign
        outputs = random_dense_outputs(batch_size, height, width, device=self.device)
        for boxes in self.sizes.assign_boxes:
            batch = random_batch(batch_size, height, width, boxes)
            workloads = {
                n: assign_loss_workload(self.detector(n, network=False), outputs, batch)
                for n in self.selected(FCOS_VARIANTS)
            }
            self.timed(
                f"assign_loss_{boxes}_boxes",
                "assign_loss",
                f"target assignment + loss (fwd+bwd), batch {batch_size} at {height}x{width}, "
                f"{boxes} boxes/image",
                workloads,
                # Detectron2's and torchvision's matching take seconds per run from 1,000 boxes
                # on, where fcos-d2 is over 10x faster: three runs are enough to show it.
                repeats=self.args.repeats if boxes < 1000 else min(self.args.repeats, 3),
                batch=batch_size,
                size=[height, width],
                boxes=boxes,
            )

    def run_assign_loss_memory(self):
        batch_size, height, width = self.sizes.assign
        for boxes in self.sizes.assign_boxes:
            spec = {"batch": batch_size, "size": (height, width), "boxes": boxes}
            results = self.memory_results(
                memory.assign_loss_memory, self.selected(FCOS_VARIANTS), spec
            )
            self.record(
                f"assign_loss_memory_{boxes}_boxes",
                "assign_loss_memory",
                f"target assignment + loss peak memory growth, batch {batch_size} at "
                f"{height}x{width}, {boxes} boxes/image",
                "MiB",
                results,
                batch=batch_size,
                size=[height, width],
                boxes=boxes,
            )

    def run_postprocess(self):
        batch_size, height, width = self.sizes.postprocess
        outputs = candidate_dense_outputs(
            batch_size, height, width, 2 * self.sizes.candidates, device=self.device
        )
        settings = TestSettings(
            score_threshold=POSTPROCESS_THRESHOLD, topk_candidates=self.sizes.candidates
        )
        workloads = {
            n: postprocess_workload(
                self.detector(n, network=False), outputs, (height, width), settings
            )
            for n in self.selected(FCOS_VARIANTS)
        }
        self.timed(
            f"postprocess_{self.sizes.candidates}_candidates",
            "postprocess",
            f"post-processing only, batch {batch_size} at {height}x{width}, "
            f"top {self.sizes.candidates} of {2 * self.sizes.candidates} passing per level",
            workloads,
            "detections",
            batch=batch_size,
            size=[height, width],
            candidates_per_level=candidates_per_level(height, width, self.sizes.candidates),
            score_threshold=POSTPROCESS_THRESHOLD,
        )

    def run_onnx(self):
        """PyTorch, the float32 ONNX file and its int8 quantization on onnxruntime's CPU
        provider (``--threads`` intra-op threads, like torch), round-robin on the same image."""
        from fcos_d2.export.verify import FLOAT32, INT8, compare

        if self.device.type != "cpu":
            print("  (skipped: onnxruntime's CPU provider is compared on --device cpu)")
            return
        r50_calibration, quickstart_calibration = self.sizes.onnx_calibration
        cases = [
            deploy.r50_case(self.sizes.onnx_r50, self.settings, r50_calibration),
            deploy.quickstart_case(
                self.sizes.onnx_quickstart,
                self.args.quickstart_weights,
                quickstart_calibration,
                self.settings.score_threshold,
            ),
        ]
        for case in cases:
            with deploy.temporary_folder() as folder:
                deployed = deploy.deploy(case, Path(folder), self.args.threads)
                measured = time_interleaved(deployed.workloads, self.args.repeats, self.device)
                sizes = {k: path.stat().st_size / 2**20 for k, path in deployed.files.items()}
            results = {}
            reference = measured["pytorch"]["output"]
            for name, result in measured.items():
                row = report.summarize(result["samples"], result["cpu_samples"])
                row["detections"] = len(result["output"][1])
                if name != "pytorch":
                    tolerance = INT8 if name.endswith("int8") else FLOAT32
                    comparison = compare(reference, result["output"], tolerance)
                    row["matched"] = [comparison.matched, comparison.total]
                    row["tolerance"] = tolerance.describe()
                    row["file_mib"] = sizes[name]
                results[name] = row
            report.add_ratios(results, reference="pytorch")
            float32 = results["onnxruntime"]["median"]
            results["onnxruntime_int8"]["ratio_to_float32"] = (
                results["onnxruntime_int8"]["median"] / float32
            )
            self.benchmarks[f"onnx_{case.key}"] = {
                "group": "onnx",
                "title": case.title,
                "unit": "s",
                "weights": case.weights,
                "calibration_images": len(case.calibration),
                "onnxruntime_threads": self.args.threads,
                "seconds_to_export": deployed.seconds_to_export,
                "seconds_to_quantize": deployed.seconds_to_quantize,
                "repeats": self.args.repeats,
                "results": results,
            }
            cells = ", ".join(f"{name} {report.onnx_cell(row)}" for name, row in results.items())
            print(f"  {case.title}: {cells}", flush=True)

    def run(self, after_group=None) -> dict:
        """Runs the selected groups in order; ``after_group(benchmarks)`` after each."""
        if "train_memory" in self.args.only or "assign_loss_memory" in self.args.only:
            self.fresh = memory.FreshProcesses()  # starts its server before anything is timed
        for group in GROUPS:
            if group in self.args.only:
                print(f"{group}:", flush=True)
                group_start = time.perf_counter()
                getattr(self, f"run_{group}")()
                print(f"  ({time.perf_counter() - group_start:.0f} s)", flush=True)
                if after_group is not None:
                    after_group(self.benchmarks)
        return self.benchmarks


def main(argv=None) -> dict:
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    try:
        device = torch.device(args.device)
        results = {
            "machine": report.machine_description(device),
            "settings": {
                "device": args.device,
                "threads": args.threads,
                "repeats": args.repeats,
                "quick": args.quick,
                "sizes": args.sizes,
                "amp": args.amp,
                "only": args.only,
                "score_threshold": args.score_threshold,
                "fcos_d2_opts": args.fcos_d2_opts,
                "postprocess_score_threshold": POSTPROCESS_THRESHOLD,
            },
            "reference": REFERENCE,
            "detectors": {d: report.LABELS[d] for d in args.detectors},
            "complete": False,
        }
        print(report.describe_machine(results["machine"]), flush=True)
        start = time.perf_counter()

        def save(benchmarks: dict, complete: bool) -> None:
            """Written after every group, so that an interrupted run keeps what it measured."""
            results["benchmarks"] = copy.deepcopy(benchmarks)
            results["targets"] = report.evaluate_targets(results["benchmarks"], device.type)
            results["elapsed_s"] = time.perf_counter() - start
            results["complete"] = complete
            write(results, output, args.detectors)

        benchmarks = Runner(args).run(lambda b: save(b, complete=False))
        save(benchmarks, complete=True)
    finally:
        torch.set_num_threads(previous_threads)
    print("\n" + report.markdown_table(results["benchmarks"], args.detectors))
    if report.onnx_table(results["benchmarks"]):
        print("\n" + report.onnx_table(results["benchmarks"]))
    for target in results["targets"]:
        state = "met" if target["met"] else "NOT met"
        print(f"target {target['benchmark']}: {target['what']}: {target['value']:.2f}x, {state}")
    print(f"\nwrote {output / 'results.json'} and {output / 'results.md'}")
    return results


def write(results: dict, output: Path, detectors: list[str]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1))
    state = "" if results["complete"] else " INCOMPLETE (interrupted or still running)."
    text = (
        f"{report.describe_machine(results['machine'])}\n\n{report.legend(detectors)}\n\n"
        f"Medians; in brackets the ratio to {report.SHORT_LABELS[REFERENCE]}. "
        f"Settings: {results['settings']}. Took {results['elapsed_s']:.0f} s.{state}\n\n"
        f"{report.markdown_table(results['benchmarks'], detectors)}\n\n"
        "Process CPU time (all threads), less disturbed than wall time by other processes on a "
        "shared machine:\n\n"
        f"{report.markdown_table(results['benchmarks'], detectors, cpu=True)}\n"
    )
    onnx = report.onnx_table(results["benchmarks"])
    if onnx:
        text += (
            "\nExported files (onnxruntime CPU provider, graph optimizations on, as many "
            "intra-op threads as torch's); in brackets the ratio to PyTorch; matched: "
            "detections of the file that match PyTorch's (float32: the export's --verify "
            "criterion; int8: its own):\n\n"
            f"{onnx}\n\nProcess CPU time:\n\n{report.onnx_table(results['benchmarks'], cpu=True)}\n"
        )
    (output / "results.md").write_text(text)


if __name__ == "__main__":
    main()
