"""The GPU check: fcos-d2 run where its users train, in one call, with what it saw written down.

    bash scripts/gpu_check.sh [--dry-run] [--stages env,tests,...] [--budget 450]

Five stages, each in processes of its own with its own time budget; a stage that overruns is
stopped, recorded as timed out, and the next one runs. The whole check stays within ``--budget``
seconds (450 by default: 7.5 minutes on one H200).

1. ``env``: installs the wheels carried along (``.gpu_wheels/``, made where there is internet by
   ``scripts/gpu_wheels.sh``) with ``pip install --no-index --no-deps --target`` into a fresh
   folder that goes on PYTHONPATH, so that nothing of the machine's own packages changes; deletes
   detectron2's cp310 ``_C`` extension there; records the GPU model, driver, CUDA, torch and the
   other versions, and the date.
2. ``tests``: the CUDA test tier, ``pytest -m cuda``.
3. ``bench``: ``benchmarks/run.py --device cuda --sizes gpu --amp``: inference of one 800x1333
   image in float32 and in float16 (``TEST.AMP.ENABLED``), training steps of 8 images at 800x1333
   in float16 AMP, their peak memory (``torch.cuda.max_memory_allocated``), post-processing;
   against Detectron2's FCOS and RetinaNet and torchvision's FCOS, with the targets judged.
4. ``quickstart``: ``train_net.py`` on the quickstart config with ``MODEL.DEVICE cuda`` (float16
   AMP): wall time, training time and box AP.
5. ``profile``: ``benchmarks/profile_steps.py``: where a float16 training step and an inference of
   fcos-d2 spend their GPU time (backbone, head, assignment + losses, post-processing, backward,
   optimizer), kernel launches and host syncs per step, the top kernels: for later work.

Dry run (``--dry-run``, and on any machine without CUDA): every stage does what a CPU can and says
what it skipped: the wheels are installed for Python 3.12 into a temporary folder and checked;
the CUDA tests are collected and must all skip; ``benchmarks/run.py --device cuda`` must refuse
cleanly and a tiny CPU run of the same benchmarks (mixed precision included) must complete; the
quickstart command trains a few iterations of a shrunk quickstart on the CPU and is evaluated;
the profile is taken on the CPU at tiny sizes.
CI runs the dry run (tests/test_gpu_check.py), so the check cannot rot between GPU runs.

Writes to ``$FCOS_D2_GPU_CHECK_OUT`` (default ``output/gpu_check``): ``gpu_check.json``,
``gpu_check.md``, ``gpu_check.log`` (every command and its output), ``logs/``, ``bench/``
(``results.json``, ``results.md``), ``cuda_tests.xml``; and, when ``$OUT`` is set (what comes back
from the GPU machine: 8 files at most), the first three and ``gpu_check_files.tar.gz`` of the
rest, after every stage, so that a check stopped from outside still returns what it measured.
Exit status 0 when every stage passed (dry run: did what it should), else 1.

Only the standard library is imported here (and ``benchmarks/provenance.py``, which imports
nothing else): the wheels must be installed before anything imports detectron2.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.provenance import git_commit  # noqa: E402  (standard library only)

STAGES = ("env", "tests", "bench", "quickstart", "profile")
# Seconds per stage on one H200 (generous: expected about 15, 60, 100, 90 and 20) and on a CPU.
# The profile comes last: it is for later work and must never squeeze the figures of the issue.
BUDGETS_S = {"env": 90, "tests": 150, "bench": 200, "quickstart": 200, "profile": 60}
DRY_RUN_BUDGETS_S = {"env": 120, "tests": 240, "bench": 300, "quickstart": 300, "profile": 120}
TOTAL_BUDGET_S = 450  # the device machine lends 10 minutes a command; the kit must end in 8
DRY_RUN_TOTAL_BUDGET_S = 1200
STOP_GRACE_S = 10  # between SIGTERM and SIGKILL of a stage that overran
RESERVE_S = 15  # kept back from the total for writing the results
GPU_PYTHON = "3.12"  # the GPU machine's Python, whose wheels gpu_wheels.sh fetches
GPU_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
QUICKSTART_CONFIG = "configs/quickstart/FCOS_R_18_shapes.yaml"
# The benchmarks of the GPU run; assign_loss (seconds per run for the peers at 5,000 boxes) and
# assign_loss_memory (a fresh process per detector and box count) would not fit the budget.
BENCH_GROUPS = "inference,inference_amp,train,train_memory,postprocess"
BENCH_REPEATS = 10
TEST_TIMEOUT_S = 90  # per CUDA test, where pytest-timeout is installed (as on the GPU machine)
MIN_STAGE_S = 10  # a stage with less time left is skipped
# A few iterations of the quickstart, shrunk (the tests' tiny_opts): the dry run's command.
TINY_QUICKSTART = {
    "DATASETS.SHAPES.NUM_TRAIN": "16",
    "DATASETS.SHAPES.NUM_VAL": "8",
    "DATASETS.SHAPES.IMAGE_SIZE": "[128, 128]",
    "INPUT.MIN_SIZE_TRAIN": "(128,)",
    "INPUT.MAX_SIZE_TRAIN": "128",
    "INPUT.MIN_SIZE_TEST": "128",
    "INPUT.MAX_SIZE_TEST": "128",
    "SOLVER.MAX_ITER": "4",
    "SOLVER.WARMUP_ITERS": "1",
    "SOLVER.STEPS": "(3,)",
    "TEST.EVAL_PERIOD": "0",
    "DATALOADER.NUM_WORKERS": "0",
}
OUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log")
OUT_ARCHIVE = "gpu_check_files.tar.gz"
MIB = 1024 * 1024
OK_STATUSES = ("passed", "dry run ok")
OUT_LOG_LIMIT = 8 * MIB  # each file that comes back may have 16 MiB


@dataclass
class StageResult:
    name: str
    status: str = "not run"  # passed, failed, timed out, skipped, dry run ok, not run
    seconds: float = 0.0
    budget_s: float = 0.0
    summary: str = ""
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


class StageTimeout(Exception):
    """A command of the stage ran past the stage's budget and was stopped."""


class Check:
    """The run: where it writes, the environment of its commands, the time left."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry_run = args.dry_run
        self.python = args.python
        self.output = Path(args.output).resolve()
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "logs").mkdir(exist_ok=True)
        self.log_path = self.output / "gpu_check.log"
        self.log_path.write_text("")
        self.out = Path(args.out).resolve() if args.out else None
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.env = dict(os.environ)
        self.env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        if self.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU's part, everywhere
        self.pythonpath = [str(REPO)]
        self.cleanup: list[Path] = []  # folders deleted when the check ends
        self.results: dict = {
            "kit": "fcos-d2 GPU check (scripts/gpu_check.sh)",
            "mode": "dry run" if self.dry_run else "gpu",
            "dry_run_reason": args.dry_run_reason,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget,
            "machine": {},
            "stages": [],
            "figures": {},
            "complete": False,
        }

    # Running commands ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)
        with self.log_path.open("a") as log:
            log.write(text + "\n")

    def stage_env(self) -> dict:
        env = dict(self.env)
        paths = self.pythonpath + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def run(
        self, command: list[str], stage: str, deadline: float, check: bool = False
    ) -> subprocess.CompletedProcess:
        """``command`` in the repository, output to the stage's log and the check's log; stopped
        (its whole process group) at ``deadline``, raising :class:`StageTimeout`."""
        log_path = self.output / "logs" / f"{stage}.log"
        header = f"$ {shlex.join(command)}\n"
        with log_path.open("a") as log:
            log.write(header)
        start = len(log_path.read_bytes())
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.stage_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(process)
                returncode = None
        output = log_path.read_bytes()[start:].decode(errors="replace")
        with self.log_path.open("a") as log:
            log.write(f"[{stage}] {header}{output}")
            if returncode is None:
                log.write(f"[{stage}] stopped: past the stage's budget\n")
        if returncode is None:
            raise StageTimeout(f"stopped after {time.monotonic() - self.start:.0f} s of the check")
        result = subprocess.CompletedProcess(command, returncode, output, "")
        if check and returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited with {returncode}:\n{tail(output)}")
        return result

    def python_json(self, code: str, stage: str, deadline: float):
        """The JSON that ``code``, run by the checked Python, prints on its last line of stdout
        (warnings on stderr share the log: the last line that parses is taken)."""
        result = self.run([self.python, "-c", code], stage, deadline, check=True)
        for line in reversed(result.stdout.strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        raise RuntimeError(f"no JSON in the output of {code[:60]!r}:\n{tail(result.stdout)}")

    # Results ---------------------------------------------------------------------------------

    def save(self, complete: bool = False) -> None:
        """gpu_check.{json,md} now, and their copy in $OUT: an interrupted check keeps them."""
        self.results["complete"] = complete
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.output / "gpu_check.json").write_text(json.dumps(self.results, indent=1) + "\n")
        (self.output / "gpu_check.md").write_text(markdown(self.results))
        if self.out is not None:
            copy_back(self.output, self.out)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (pytest's, the benchmarks' forked children too), then
    SIGKILL if it is still there after :data:`STOP_GRACE_S`."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def copy_back(output: Path, out: Path) -> None:
    """The summary files and an archive of the rest into ``out`` ($OUT: 8 files at most come
    back, 16 MiB each, no deeper than two folders)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:
        source = output / name
        if not source.is_file():
            continue
        data = source.read_bytes()
        if len(data) > OUT_LOG_LIMIT:  # keep the end, where failures are
            data = b"[... cut: the whole log is in the archive]\n" + data[-OUT_LOG_LIMIT:]
        (out / name).write_bytes(data)
    with tarfile.open(out / OUT_ARCHIVE, "w:gz") as archive:
        for path in sorted(output.rglob("*")):
            relative = path.relative_to(output)
            if path.is_file() and keep_in_archive(relative):
                archive.add(path, arcname=str(Path("gpu_check") / relative))


def keep_in_archive(relative: Path) -> bool:
    """Logs, results and metrics; not weights, datasets or installed packages."""
    if relative.parts[0] in ("site", "shapes") or relative.suffix in (".pth", ".pkl", ".png"):
        return False
    return relative.suffix in (".json", ".md", ".log", ".txt", ".xml", ".yaml")


# Stage 1: the wheels and what the machine has --------------------------------------------------

VERSIONS_CODE = r"""
import importlib, json, os, platform, sys
import torch
info = {
    "python": platform.python_version(),
    "python_executable": sys.executable,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "cpu_count": os.cpu_count(),
}
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    info.update(
        gpu=torch.cuda.get_device_name(0),
        gpu_count=torch.cuda.device_count(),
        gpu_memory_gib=round(properties.total_memory / 2**30, 1),
        gpu_capability=f"{properties.major}.{properties.minor}",
        cudnn=torch.backends.cudnn.version(),
    )
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as error:
        info["nccl"] = f"unknown ({type(error).__name__})"
for name in ("torchvision", "numpy", "detectron2", "fvcore", "iopath", "pycocotools", "yacs",
             "omegaconf", "hydra", "onnx", "onnxruntime", "cv2", "PIL", "setuptools", "fcos_d2"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "?")
        info[name + "_path"] = os.path.dirname(module.__file__)
    except Exception as error:
        info[name] = f"NOT IMPORTABLE: {type(error).__name__}: {error}"
try:
    import pkg_resources  # noqa: F401  (detectron2.model_zoo needs it; setuptools >= 82 lacks it)
    info["pkg_resources"] = True
except Exception:
    info["pkg_resources"] = False
print(json.dumps(info))
"""


def gpu_wheels_folder() -> Path:
    return Path(os.environ.get("FCOS_D2_GPU_WHEELS", REPO / ".gpu_wheels"))


def pip_install_command(
    python: str, wheels: list[Path], target: Path, for_gpu_python: bool
) -> list[str]:
    """``pip install`` of exactly ``wheels`` into ``target``: no index, no dependencies, so nothing
    the machine has is touched. ``for_gpu_python``: for the GPU machine's CPython 3.12 (a dry run
    on another Python checks that the wheels install there)."""
    command = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    command += [
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--target",
        str(target),
    ]
    if for_gpu_python:
        command += ["--python-version", GPU_PYTHON, "--implementation", "cp"]
        command += ["--only-binary=:all:"] + [f"--platform={p}" for p in GPU_PLATFORMS]
    return command + [str(w) for w in wheels]


def remove_compiled_detectron2(target: Path) -> list[str]:
    """Deletes sal-detectron2's ``_C`` extension (built for CPython 3.10): detectron2 falls back
    to its pure-Python code without it. Returns the names deleted."""
    removed = []
    for path in sorted((target / "detectron2").glob("_C.*.so")):
        path.unlink()
        removed.append(path.name)
    return removed


def importable(check: Check, module: str, stage: str, deadline: float) -> bool:
    """Whether the checked Python (with the PYTHONPATH of the stages) finds ``module``."""
    code = f"import importlib.util as u, json; print(json.dumps(bool(u.find_spec({module!r}))))"
    return check.python_json(code, stage, deadline)


def install_wheels(check: Check, deadline: float) -> dict:
    """Installs the carried wheels into a fresh folder; on the GPU, that folder goes first on
    PYTHONPATH for every later command."""
    folder = gpu_wheels_folder()
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return {"wheels": [], "folder": str(folder)}
    target = Path(tempfile.mkdtemp(prefix="fcos_d2_gpu_site_"))
    # Where this Python is not the GPU's (a dry run here), install for the GPU's Python instead.
    this_python = check.python_json(
        "import json, platform; print(json.dumps(platform.python_version()))", "env", deadline
    )
    for_gpu_python = not this_python.startswith(GPU_PYTHON + ".")
    command = pip_install_command(check.python, wheels, target, for_gpu_python)
    start = time.monotonic()
    check.run(command, "env", deadline, check=True)
    removed = remove_compiled_detectron2(target)
    installed = sorted(p.name for p in target.iterdir() if p.name.endswith(".dist-info"))
    if not (target / "detectron2" / "__init__.py").is_file():
        raise RuntimeError(f"the wheels in {folder} hold no detectron2: run scripts/gpu_wheels.sh")
    # Used where installed for this very Python: always on the GPU machine; in a dry run only
    # where this Python has no detectron2 of its own (a CPU copy of the GPU machine's Python).
    usable = not for_gpu_python
    usable = usable and not (check.dry_run and importable(check, "detectron2", "env", deadline))
    if usable:
        check.pythonpath.insert(0, str(target))
    check.cleanup.append(target)
    return {
        "folder": str(folder),
        "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in wheels],
        "target": str(target),
        "installed": installed,
        "removed": removed,
        "install_s": round(time.monotonic() - start, 1),
        "for_python": GPU_PYTHON if for_gpu_python else this_python,
        "on_pythonpath": usable,
    }


def nvidia_smi(check: Check, deadline: float) -> Optional[dict]:
    """GPU name, driver, memory and compute capability as ``nvidia-smi`` reports them."""
    places = [shutil.which("nvidia-smi"), "/usr/local/nvidia/bin/nvidia-smi"]
    program = next((p for p in places if p and os.access(p, os.X_OK)), None)
    if program is None:
        return None
    query = "name,driver_version,memory.total,compute_cap"
    command = [program, f"--query-gpu={query}", "--format=csv,noheader"]
    try:  # what nvidia-smi says is recorded, never a reason to stop the check
        result = check.run(command, "env", min(deadline, time.monotonic() + 30))
        fields = [x.strip() for x in result.stdout.strip().splitlines()[-1].split(",")]
        if result.returncode != 0 or len(fields) < 4:
            return {"error": tail(result.stdout, 3)}
    except (StageTimeout, IndexError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    keys = ("name", "driver", "memory", "compute_capability")
    return dict(zip(keys, fields))


def env_stage(check: Check, result: StageResult, deadline: float) -> None:
    install = install_wheels(check, deadline)
    result.details["install"] = install
    versions = check.python_json(VERSIONS_CODE, "env", deadline)
    smi = nvidia_smi(check, deadline)
    machine = {
        "date": check.results["date"],
        "fcos_d2_commit": git_commit(REPO, unknown="unknown (no git here)"),
        **versions,
    }
    if smi:
        machine["nvidia_smi"] = smi
        machine["driver"] = smi.get("driver")
    check.results["machine"] = machine
    missing = [
        name
        for name in ("detectron2", "fvcore", "pycocotools", "fcos_d2")
        if str(versions.get(name, "")).startswith("NOT IMPORTABLE")
    ]
    if install["wheels"]:
        how = f"{len(install['wheels'])} wheels installed in {install['install_s']} s"
        if install["removed"]:
            how += f", detectron2's {', '.join(install['removed'])} deleted"
        how += (
            "; on PYTHONPATH"
            if install["on_pythonpath"]
            else f" (for Python {install['for_python']}: checked, not used by this dry run)"
        )
    else:
        how = (
            f"no wheels in {install['folder']} (make them with scripts/gpu_wheels.sh where there "
            "is internet, and carry that folder): the machine's own packages are used"
        )
    gpu = versions.get("gpu", "no GPU")
    result.summary = (
        f"{how}; {gpu}, driver {machine.get('driver', '-')}, torch {versions['torch']}, "
        f"numpy {versions.get('numpy')}, detectron2 {versions.get('detectron2')}, Python "
        f"{versions['python']}"
    )
    if missing:
        raise RuntimeError(
            f"not importable: {', '.join(missing)} ({how}); "
            + "; ".join(f"{n}: {versions[n]}" for n in missing)
        )
    if not check.dry_run and not versions["cuda_available"]:
        raise RuntimeError("torch sees no CUDA device")


# Stage 2: the CUDA tests -----------------------------------------------------------------------


def junit_counts(path: Path) -> dict:
    """Counts and the failures (name and first line of the message) of a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed, skip_reasons = [], set()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            for element in case.findall(kind):
                message = (element.get("message") or element.text or "").strip().splitlines()
                failed.append({"test": name, "kind": kind, "message": (message or [""])[0][:300]})
        for element in case.findall("skipped"):
            skip_reasons.add((element.get("message") or "").strip()[:200])
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": sorted(skip_reasons)}


def tests_stage(check: Check, result: StageResult, deadline: float) -> None:
    xml = check.output / "cuda_tests.xml"
    xml.unlink(missing_ok=True)
    command = [check.python, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider"]
    command += [f"--junitxml={xml}", "tests"]
    if importable(check, "pytest_timeout", "tests", deadline):  # a hung test then fails alone
        command += [f"--timeout={TEST_TIMEOUT_S}"]
    run = check.run(command, "tests", deadline)
    if not xml.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {run.returncode}):\n{tail(run.stdout)}")
    counts = junit_counts(xml)
    result.details.update(counts, returncode=run.returncode)
    result.summary = (
        f"{counts['tests']} CUDA tests: {counts['passed']} passed, {counts['failures']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped"
    )
    if counts["tests"] == 0:
        raise RuntimeError("no test is marked cuda")
    if check.dry_run:
        if counts["skipped"] != counts["tests"]:
            raise RuntimeError(f"without CUDA every cuda test must skip: {result.summary}")
        if not all("CUDA" in reason for reason in counts["skip_reasons"]):
            raise RuntimeError(f"skipped for other reasons than CUDA: {counts['skip_reasons']}")
        result.summary += " (no CUDA here: collected and skipped, as they should)"
        return
    if run.returncode != 0 or counts["failures"] or counts["errors"] or counts["skipped"]:
        names = "; ".join(f"{f['test']}: {f['message']}" for f in counts["failed"][:5])
        raise RuntimeError(f"{result.summary}. {names}")


# Stage 3: the benchmarks -----------------------------------------------------------------------


def bench_stage(check: Check, result: StageResult, deadline: float) -> None:
    output = check.output / "bench"
    shutil.rmtree(output, ignore_errors=True)
    script = [check.python, "benchmarks/run.py"]
    if check.dry_run:
        refused = check.run([*script, "--device", "cuda", "--sizes", "gpu"], "bench", deadline)
        if refused.returncode != 2 or "CUDA is not available" not in refused.stdout:
            raise RuntimeError(
                "benchmarks/run.py --device cuda without CUDA should exit 2 saying CUDA is not "
                f"available; it exited {refused.returncode}:\n{tail(refused.stdout)}"
            )
        result.details["cuda_refused"] = tail(refused.stdout, 1)
        command = [*script, "--device", "cpu", "--sizes", "quick", "--amp", "--repeats", "1"]
    else:
        command = [*script, "--device", "cuda", "--sizes", "gpu", "--amp"]
        command += ["--repeats", str(BENCH_REPEATS)]
    command += ["--only", BENCH_GROUPS, "--output", str(output)]
    try:
        run = check.run(command, "bench", deadline)
    finally:
        # Written after every group: what was measured before a stop is kept.
        results_file = output / "results.json"
        if results_file.is_file():
            bench = json.loads(results_file.read_text())
            check.results["figures"]["bench"] = bench
            result.details["table"] = (output / "results.md").read_text()
            result.details["targets"] = bench.get("targets", [])
    if run.returncode != 0:
        raise RuntimeError(f"benchmarks/run.py exited {run.returncode}:\n{tail(run.stdout)}")
    bench = check.results["figures"]["bench"]
    targets = bench.get("targets", [])
    met = sum(t["met"] for t in targets)
    result.summary = (
        f"{len(bench['benchmarks'])} benchmarks in {bench['elapsed_s']:.0f} s; targets met: "
        f"{met} of {len(targets)}"
    )
    if check.dry_run:
        result.summary += " (dry run: --device cuda refused; tiny CPU run of the same benchmarks)"


# Stage 4: the quickstart -----------------------------------------------------------------------


def quickstart_figures(output_dir: Path, log: str) -> dict:
    """Box AP from the last evaluation in metrics.json; training time and speed from the log."""
    figures: dict = {}
    metrics = output_dir / "metrics.json"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "bbox/AP" in record:
                figures.update(
                    {k.split("/")[1]: record[k] for k in record if k.startswith("bbox/AP")}
                )
            if "total_loss" in record:
                figures["last_total_loss"] = record["total_loss"]
                figures["last_iteration"] = record.get("iteration")
    match = re.search(r"Total training time: (\d+):(\d\d):(\d\d)", log)
    if match:
        hours, minutes, seconds = map(int, match.groups())
        figures["training_s"] = hours * 3600 + minutes * 60 + seconds
    match = re.search(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)", log)
    if match:
        figures["iterations"] = int(match.group(1))
        figures["s_per_iteration"] = float(match.group(2))
    return figures


def quickstart_stage(check: Check, result: StageResult, deadline: float) -> None:
    output_dir = check.output / "quickstart"
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [check.python, "train_net.py", "--config-file", QUICKSTART_CONFIG]
    if check.dry_run:
        opts = {**TINY_QUICKSTART, "DATASETS.SHAPES.ROOT": str(check.output / "shapes")}
        command += ["MODEL.DEVICE", "cpu", *[v for kv in opts.items() for v in kv]]
    else:
        command += ["MODEL.DEVICE", "cuda"]
    command += ["OUTPUT_DIR", str(output_dir)]
    start = time.monotonic()
    run = check.run(command, "quickstart", deadline)
    wall = time.monotonic() - start
    figures = {"wall_s": round(wall, 1), **quickstart_figures(output_dir, run.stdout)}
    figures["command"] = shlex.join(command[1:])
    check.results["figures"]["quickstart"] = figures
    result.details.update(figures)
    if run.returncode != 0:
        raise RuntimeError(f"train_net.py exited {run.returncode}:\n{tail(run.stdout)}")
    if "AP" not in figures:
        raise RuntimeError(f"no box AP in {output_dir / 'metrics.json'}:\n{tail(run.stdout)}")
    result.summary = (
        f"whole command {wall:.0f} s, training {figures.get('training_s', '?')} s "
        f"({figures.get('s_per_iteration', '?')} s/it), box AP {_fmt(figures['AP'])} "
        f"(AP50 {_fmt(figures.get('AP50'))}, AP75 {_fmt(figures.get('AP75'))})"
    )
    if check.dry_run:
        result.summary += " (dry run: 4 iterations of a shrunk quickstart on the CPU)"


# Stage 5: the profile -------------------------------------------------------------------------


def profile_stage(check: Check, result: StageResult, deadline: float) -> None:
    output = check.output / "profile"
    shutil.rmtree(output, ignore_errors=True)
    command = [check.python, "benchmarks/profile_steps.py", "--amp", "--output", str(output)]
    if check.dry_run:
        command += ["--device", "cpu", "--sizes", "quick", "--steps", "1"]
    else:
        command += ["--device", "cuda", "--sizes", "gpu", "--steps", "3"]
    run = check.run(command, "profile", deadline)
    if run.returncode != 0:
        raise RuntimeError(
            f"benchmarks/profile_steps.py exited {run.returncode}:\n{tail(run.stdout)}"
        )
    profiled = json.loads((output / "profile.json").read_text())
    check.results["figures"]["profile"] = profiled
    result.details["text"] = (output / "profile.txt").read_text()
    train = profiled["train"]
    shares = ", ".join(
        f"{name} {100 * part['share']:.0f}%"
        for name, part in train["parts"].items()
        if part["share"] is not None
    )
    result.summary = (
        f"fcos-d2 training step {train['step_ms']:.1f} ms ({shares}); "
        f"{train['kernel_launches_per_step']:.0f} kernel launches and "
        f"{train['syncs_per_step']:.0f} host-device syncs per step; inference "
        f"{profiled['inference']['step_ms']:.1f} ms"
    )
    if check.dry_run:
        result.summary += " (dry run: CPU time at tiny sizes)"


STAGE_FUNCTIONS: dict[str, Callable[[Check, StageResult, float], None]] = {
    "env": env_stage,
    "tests": tests_stage,
    "bench": bench_stage,
    "quickstart": quickstart_stage,
    "profile": profile_stage,
}


def run_stage(check: Check, name: str, budget_s: float, function=None) -> StageResult:
    """One stage within ``budget_s`` and what is left of the whole check's budget."""
    function = function or STAGE_FUNCTIONS[name]
    left = check.deadline - RESERVE_S - time.monotonic()
    result = StageResult(name, budget_s=round(min(budget_s, left), 1))
    if result.budget_s < MIN_STAGE_S:
        result.status = "skipped"
        result.summary = f"no time left of the check's {check.args.budget} s"
        return result
    check.say(f"==> [{name}] (budget {result.budget_s:.0f} s)")
    start = time.monotonic()
    try:
        function(check, result, start + result.budget_s)
        result.status = "dry run ok" if check.dry_run else "passed"
    except StageTimeout as error:
        result.status = "timed out"
        result.summary = f"stopped at its budget of {result.budget_s:.0f} s ({error}). " + (
            result.summary
        )
    except Exception as error:  # every failure is recorded; the next stage still runs
        result.status = "failed"
        partial = f". {result.summary}" if result.summary else ""
        result.summary = f"{type(error).__name__}: {error}".strip() + partial
    result.seconds = round(time.monotonic() - start, 1)
    check.say(f"    {result.status} in {result.seconds:.0f} s: {result.summary}")
    return result


# The Markdown ----------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


DETECTORS = ("fcos_d2", "d2_fcos", "d2_retinanet", "tv_fcos")


def _cell(row: Optional[dict], unit: str) -> str:
    if not row or row.get("median") is None:
        return "-"
    value = f"{row['median'] * 1000:.1f} ms" if unit == "s" else f"{row['median']:.0f} MiB"
    return value + (f" ({row['ratio']:.2f}x)" if row.get("ratio") is not None else "")


def readme_rows(results: dict) -> str:
    """The README's GPU table filled in from this run, in its columns (paste-ready)."""
    machine = results.get("machine", {})
    bench = results.get("figures", {}).get("bench", {})
    quickstart = results.get("figures", {}).get("quickstart", {})
    run = (
        f"{machine.get('gpu', 'no GPU')}, driver {machine.get('driver', '-')}, torch "
        f"{machine.get('torch', '-')} (CUDA {machine.get('torch_cuda', '-')}, cuDNN "
        f"{machine.get('cudnn', '-')}), {results.get('date', '-')[:10]}, fcos-d2 "
        f"{machine.get('fcos_d2_commit', '-')}"
    )
    lines = [
        "| | fcos-d2 | D2 FCOS | D2 RetinaNet | torchvision FCOS | target |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| GPU, driver, torch, date of the run | {run} | | | | |",
    ]
    for bench_row in bench.get("benchmarks", {}).values():
        cells = [_cell(bench_row["results"].get(d), bench_row["unit"]) for d in DETECTORS]
        targets = "; ".join(
            f"{t['what']}: {t['value']:.2f}x, {'met' if t['met'] else 'NOT met'}"
            for t in bench_row.get("targets", [])
        )
        lines.append(f"| {bench_row['title']} | {' | '.join(cells)} | {targets} |")
    if quickstart:
        how = "float16 AMP" if results["mode"] == "gpu" else "dry run: 4 iterations on the CPU"
        wall, training = _fmt(quickstart.get("wall_s"), 0), _fmt(quickstart.get("training_s"), 0)
        lines.append(
            f"| quickstart ({how}): wall time, box AP | whole command {wall} s (training "
            f"{training} s), AP {_fmt(quickstart.get('AP'))} (AP50 {_fmt(quickstart.get('AP50'))}"
            f", AP75 {_fmt(quickstart.get('AP75'))}) | | | | |"
        )
    return "\n".join(lines)


def markdown(results: dict) -> str:
    machine = results.get("machine", {})
    title = "GPU check" if results["mode"] == "gpu" else "GPU check, dry run (no CUDA used)"
    lines = [f"# fcos-d2 {title}, {results['date']}", ""]
    if results.get("dry_run_reason"):
        lines += [f"Dry run: {results['dry_run_reason']}.", ""]
    if machine:
        smi = machine.get("nvidia_smi") or {}
        lines += [
            f"- GPU: {machine.get('gpu', 'none')}"
            + (
                f", {smi.get('memory')}, compute capability {smi.get('compute_capability')}"
                if smi
                else ""
            ),
            f"- driver: {machine.get('driver', '-')}",
            f"- torch {machine.get('torch')} (CUDA {machine.get('torch_cuda')}, cuDNN "
            f"{machine.get('cudnn', '-')}, NCCL {machine.get('nccl', '-')}), torchvision "
            f"{machine.get('torchvision')}, numpy {machine.get('numpy')}, detectron2 "
            f"{machine.get('detectron2')}, onnxruntime {machine.get('onnxruntime')}, Python "
            f"{machine.get('python')}, {machine.get('cpu_count')} CPUs",
            f"- fcos-d2 {machine.get('fcos_d2_commit')}",
            "",
        ]
    lines += ["| stage | status | seconds (budget) | summary |", "| --- | --- | --- | --- |"]
    for stage in results["stages"]:
        summary = stage["summary"].replace("\n", " ").replace("|", "\\|")
        lines.append(
            f"| {stage['name']} | {stage['status']} | {stage['seconds']:.0f} "
            f"({stage['budget_s']:.0f}) | {summary[:600]} |"
        )
    lines += [
        "",
        f"Total {results.get('elapsed_s', 0):.0f} s of a {results['budget_s']} s budget"
        + ("." if results.get("complete") else "; INCOMPLETE (interrupted or running)."),
    ]
    for stage in results["stages"]:
        if stage["name"] == "tests" and stage["details"].get("failed"):
            lines += ["", "## Failed CUDA tests", ""]
            lines += [f"- {f['test']}: {f['message']}" for f in stage["details"]["failed"]]
        if stage["name"] == "bench" and stage["details"].get("table"):
            lines += ["", "## Benchmarks (benchmarks/run.py)", "", stage["details"]["table"]]
        if stage["name"] == "profile" and stage["details"].get("text"):
            text = stage["details"]["text"]
            lines += [
                "",
                "## Profile (benchmarks/profile_steps.py)",
                "",
                "```",
                text.rstrip(),
                "```",
            ]
    lines += ["", "## For the README's GPU table", "", readme_rows(results), ""]
    return "\n".join(lines)


# Main ------------------------------------------------------------------------------------------


def cuda_available(python: str) -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    try:
        result = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip().endswith("True")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:-1]),
    )
    parser.add_argument("--dry-run", action="store_true", help="the CPU's part only")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole check")
    parser.add_argument(
        "--output",
        default=os.environ.get("FCOS_D2_GPU_CHECK_OUT") or str(REPO / "output" / "gpu_check"),
        help="folder for figures and logs (default: $FCOS_D2_GPU_CHECK_OUT or output/gpu_check)",
    )
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or None, help="where to copy the summary ($OUT)"
    )
    parser.add_argument("--python", default=sys.executable, help="the Python to check")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stages must be a comma-separated subset of {STAGES}, got {args.stages!r}")
    args.stages = [s for s in STAGES if s in stages]
    args.dry_run_reason = "asked for (--dry-run)" if args.dry_run else None
    if not args.dry_run and not cuda_available(args.python):
        args.dry_run, args.dry_run_reason = True, "torch sees no CUDA device on this machine"
    if args.budget is None:
        args.budget = DRY_RUN_TOTAL_BUDGET_S if args.dry_run else TOTAL_BUDGET_S
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args)
    mode = f"DRY RUN ({args.dry_run_reason})" if args.dry_run else "GPU"
    check.say(f"fcos-d2 GPU check, {mode}: stages {', '.join(args.stages)}; {args.budget:.0f} s")
    budgets = DRY_RUN_BUDGETS_S if args.dry_run else BUDGETS_S
    env_ok = True
    for name in args.stages:
        if env_ok:
            result = run_stage(check, name, budgets[name])
        else:  # without the packages every later stage fails the same way
            result = StageResult(name, status="skipped", summary="the env stage did not pass")
        env_ok = env_ok and (name != "env" or result.ok)
        check.results["stages"].append(asdict(result))
        check.save()
    check.save(complete=True)
    for folder in check.cleanup:
        shutil.rmtree(folder, ignore_errors=True)
    ok = all(s["status"] in OK_STATUSES for s in check.results["stages"])
    check.say("")
    check.say(markdown(check.results))
    check.say(f"wrote {check.output}" + (f" and {check.out}" if check.out else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
