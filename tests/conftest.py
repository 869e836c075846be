"""Fixtures; helpers shared by the test modules live in ``helpers.py``.

Disk: the training tests write checkpoints of 133 MB each, gigabytes over the whole suite. A
passing test's ``tmp_path`` is deleted when it ends (``tmp_path_retention_policy`` in
pyproject.toml) and what a module's fixtures wrote when the module ends, so the suite needs about
as much disk as its largest module; failed tests keep theirs for a look. The summary prints the
most the suite held at once."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import config_path, fresh_cfg, shrink

# Two cores on CI: more threads only oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cfg():
    """A fresh Detectron2 config with the fcos_d2 keys, on the CPU, with random initialisation."""
    return fresh_cfg()


@pytest.fixture
def tiny_cfg(cfg):
    """A small FCOS detector for quick training."""
    return shrink(cfg, config_path("configs/FCOS-Detection/Base-FCOS.yaml"))


# The base temporary folder, and the most it held after a test body (bytes, test id).
_most_held = {"bytes": 0, "test": "", "base": None}


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # deleted meanwhile by a process the test started
                pass
    return total


@pytest.fixture(scope="module", autouse=True)
def module_files_deleted_at_its_end(request, tmp_path_factory):
    """Deletes the folders made under pytest's base temporary folder while this module ran (its
    module fixtures'; passing tests' own are already gone), unless one of its tests failed."""
    base = _most_held["base"] = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for folder in set(base.iterdir()) - before:
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Measures pytest's temporary folder right after each test body, before any clean-up."""
    yield
    if _most_held["base"] is not None:
        held = folder_bytes(_most_held["base"])
        if held > _most_held["bytes"]:
            _most_held.update(bytes=held, test=item.nodeid)


def pytest_report_header(config):
    folder = tempfile.gettempdir()
    return f"temporary files under {folder}: {shutil.disk_usage(folder).free / 2**30:.1f} GiB free"


def pytest_terminal_summary(terminalreporter):
    if _most_held["test"]:
        terminalreporter.write_line(
            f"temporary files: at most {_most_held['bytes'] / 2**20:.0f} MiB at once "
            f"(after {_most_held['test']})"
        )
