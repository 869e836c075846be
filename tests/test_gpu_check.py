"""The GPU check (scripts/gpu_check.sh): its dry run end to end, as CI runs it, and its parts.

The dry run is what keeps the check from rotting between the rare runs on a GPU machine: every
stage runs its CPU part (wheel install, the CUDA tests collected and skipped, the benchmarks'
``--device cuda`` refused and their mixed-precision code run small on the CPU, a few quickstart
iterations evaluated).
"""

import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, load_script

gpu_check = load_script("scripts/gpu_check.py")
D2_C = "_C.cpython-310-x86_64-linux-gnu.so"


def make_wheel(folder: Path, name: str, version: str, files: dict) -> Path:
    """A minimal pure-Python wheel holding ``files`` (path -> text)."""
    dist = f"{name}-{version}"
    info = f"{dist}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
        wheel.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in [*files, f"{info}/RECORD"]))
    return path


@pytest.fixture
def wheels(tmp_path) -> Path:
    """Stand-ins for the carried wheels: a detectron2 with its cp310 extension, and a helper."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(
        folder,
        "sal_detectron2",
        "0.7.2",
        {"detectron2/__init__.py": "__version__ = 'stand-in'\n", f"detectron2/{D2_C}": "binary"},
    )
    make_wheel(folder, "stand_in_helper", "1.0", {"stand_in_helper/__init__.py": ""})
    return folder


def test_wheels_install_into_a_target_for_the_gpu_python_and_lose_the_cp310_extension(
    wheels, tmp_path
):
    target = tmp_path / "site"
    files = sorted(wheels.glob("*.whl"))
    command = gpu_check.pip_install_command(sys.executable, files, target, for_gpu_python=True)
    assert "--no-index" in command and "--no-deps" in command and "--target" in command
    assert command[command.index("--python-version") + 1] == "3.12"
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert (target / "detectron2" / D2_C).is_file()
    assert gpu_check.remove_compiled_detectron2(target) == [D2_C]
    assert sorted(p.name for p in (target / "detectron2").iterdir()) == ["__init__.py"]
    assert (target / "stand_in_helper" / "__init__.py").is_file()
    assert gpu_check.remove_compiled_detectron2(target) == []


def check_for(tmp_path, **kw):
    argv = ["--dry-run", "--output", str(tmp_path / "out"), "--python", sys.executable]
    return gpu_check.Check(gpu_check.parse_args(argv + [f"--{k}={v}" for k, v in kw.items()]))


def test_a_stage_past_its_budget_is_stopped_and_the_check_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 0)
    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 1)
    check = check_for(tmp_path)
    marker = tmp_path / "child_alive"

    def sleeper(check, result, deadline):
        # The child of the command belongs to its process group: it is stopped as well.
        code = f"import pathlib, time; time.sleep(3); pathlib.Path({str(marker)!r}).touch()"
        child = shlex.join([sys.executable, "-c", code])
        check.run(["bash", "-c", f"{child} & sleep 30"], "slow", deadline)

    def failing(check, result, deadline):
        result.summary = "partial"
        raise RuntimeError("went wrong")

    start = time.monotonic()
    stopped = gpu_check.run_stage(check, "slow", 1.0, sleeper)
    assert stopped.status == "timed out" and time.monotonic() - start < 10
    assert "stopped at its budget of 1 s" in stopped.summary
    failed = gpu_check.run_stage(check, "failing", 5.0, failing)
    assert failed.status == "failed" and failed.summary == "RuntimeError: went wrong. partial"
    time.sleep(3.5)
    assert not marker.exists()
    assert "$ bash -c" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_no_stage_starts_without_time_left(tmp_path):
    check = check_for(tmp_path, budget=20)  # 15 s are kept for writing the results
    result = gpu_check.run_stage(check, "env", 100.0, lambda *a: pytest.fail("ran"))
    assert result.status == "skipped" and "no time left" in result.summary


def test_quickstart_figures_come_from_metrics_and_log(tmp_path):
    records = [
        {"iteration": 19, "total_loss": 1.5},
        {"iteration": 1549, "total_loss": 0.4, "bbox/AP": 51.8, "bbox/AP50": 79.3, "bbox/AP75": 57},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records))
    log = (
        "d2.engine.hooks INFO: Overall training speed: 1548 iterations in 0:01:10 (0.0452 s / it)\n"
        "d2.engine.hooks INFO: Total training time: 0:01:24 (0:00:14 on hooks)\n"
    )
    figures = gpu_check.quickstart_figures(tmp_path, log)
    assert figures == {
        "AP": 51.8,
        "AP50": 79.3,
        "AP75": 57,
        "last_total_loss": 0.4,
        "last_iteration": 1549,
        "training_s": 84,
        "iterations": 1548,
        "s_per_iteration": 0.0452,
    }


@pytest.mark.slow
def test_dry_run_of_the_whole_check(wheels, tmp_path):
    """``bash scripts/gpu_check.sh --dry-run``: every stage does its CPU part; the files that come
    back from a GPU machine ($OUT) are there."""
    output, out = tmp_path / "gpu_check", tmp_path / "OUT"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "FCOS_D2_GPU_CHECK_OUT": str(output),
        "FCOS_D2_GPU_WHEELS": str(wheels),
        "OUT": str(out),
    }
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    results = json.loads((output / "gpu_check.json").read_text())
    assert results["mode"] == "dry run" and results["complete"]
    stages = {s["name"]: s for s in results["stages"]}
    assert list(stages) == ["env", "tests", "bench", "quickstart", "profile"]
    assert {s["status"] for s in stages.values()} == {"dry run ok"}, results["stages"]

    install = stages["env"]["details"]["install"]
    assert install["installed"] == [
        "sal_detectron2-0.7.2.dist-info",
        "stand_in_helper-1.0.dist-info",
    ]
    assert install["removed"] == [D2_C] and install["on_pythonpath"] is False
    assert not Path(install["target"]).exists()  # deleted at the end
    assert results["machine"]["torch"] and results["machine"]["cuda_available"] is False

    tests = stages["tests"]["details"]
    assert tests["tests"] == tests["skipped"] >= 9 and tests["passed"] == 0

    bench = results["figures"]["bench"]
    assert bench["complete"] and bench["settings"]["amp"] and bench["settings"]["device"] == "cpu"
    groups = {b["group"] for b in bench["benchmarks"].values()}
    assert groups == {"inference", "inference_amp", "train", "train_memory", "postprocess"}
    assert "CUDA is not available" in stages["bench"]["details"]["cuda_refused"]

    quickstart = results["figures"]["quickstart"]
    assert quickstart["last_iteration"] == 3 and "AP" in quickstart
    assert "MODEL.DEVICE cpu" in quickstart["command"]

    profiled = results["figures"]["profile"]
    assert {"backbone", "head", "assignment+losses", "backward"} <= set(profiled["train"]["parts"])
    assert profiled["inference"]["parts"]["post-processing"]["ms"] > 0
    assert "## Profile" in (output / "gpu_check.md").read_text()

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*gpu_check.OUT_FILES, gpu_check.OUT_ARCHIVE])
    assert (out / "gpu_check.json").read_text() == (output / "gpu_check.json").read_text()
    with tarfile.open(out / gpu_check.OUT_ARCHIVE) as archive:
        members = set(archive.getnames())
    assert {"gpu_check/bench/results.json", "gpu_check/logs/tests.log"} <= members
    assert not any(m.endswith(".pth") for m in members)
    summary = (output / "gpu_check.md").read_text()
    assert "## For the README's GPU table" in summary and "| quickstart (dry run" in summary
    assert "dry run ok" in run.stdout
