"""Peak memory of one workload, each measured in a fresh process.

On the CPU the figure is the growth of the process's peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``) over the run: measured before the run (model, optimizer and
inputs built) and after it. A fresh process per measurement makes the peak the workload's own:
in a process that already ran other models, freed memory kept by the allocator would be reused
and hide part of the growth. On CUDA it is ``torch.cuda.max_memory_allocated`` during the run
minus what was allocated before it.

The processes are forked from a server that has only imported the libraries (multiprocessing's
"forkserver"), so that each starts in a second rather than re-importing PyTorch and Detectron2.
The server starts with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): by
default glibc raises the threshold as large blocks are freed and then keeps freed tensors in its
heap, so that the peak RSS also counted what the allocator happened to retain (the same model
measured 840 and 904 MiB in two runs). With the fixed threshold every tensor above 128 KiB goes
back to the system when freed, and the peak follows live memory, as on CUDA (identical figures
across runs here).
"""

import multiprocessing
import os
import resource
from concurrent.futures import ProcessPoolExecutor

import torch

from .inputs import random_batch, random_dense_outputs
from .models import TestSettings, build_detector
from .workloads import assign_loss_workload, synchronize, training_workload

PRELOAD = ["torch", "torchvision", "detectron2.modeling", "fcos_d2.engine", "benchmarks.workloads"]
MIB = 1024 * 1024
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _measure(make_workload, device: torch.device, warmup=None) -> dict:
    """Peak growth over one run of ``make_workload()``, after ``warmup`` (lazy initialisation:
    TorchScript compilation, thread pools) if given."""
    if warmup is not None:
        warmup()
    workload = make_workload()
    args = workload.setup() if workload.setup else ()
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = _peak_bytes(device)
    workload.run(*args)
    synchronize(device)
    peak = _peak_bytes(device)
    return {
        "growth_mib": (peak - before) / MIB,
        "peak_mib": peak / MIB,
        "malloc_mmap_threshold": os.environ.get(MMAP_THRESHOLD),
    }


def training_memory(name: str, settings: TestSettings, device: str, threads: int, spec) -> dict:
    """Growth of peak memory over the first training step (activations, gradients, momentum);
    under mixed precision where ``spec["amp"]``."""
    torch.set_num_threads(threads)
    detector = build_detector(name, settings, device)
    batch = random_batch(spec["batch"], *spec["size"], spec["boxes"])
    amp = spec.get("amp", False)
    return _measure(lambda: training_workload(detector, batch, amp), torch.device(device))


def assign_loss_memory(name: str, settings: TestSettings, device: str, threads: int, spec) -> dict:
    """Growth of peak memory over target assignment + loss (forward and backward), after two
    runs on a 64x64 image to leave out one-time costs (~15 MiB)."""
    torch.set_num_threads(threads)
    detector = build_detector(name, settings, device, network=False)

    def workload(batch_size, height, width, boxes):
        batch = random_batch(batch_size, height, width, boxes)
        outputs = random_dense_outputs(batch_size, height, width, device=device)
        return assign_loss_workload(detector, outputs, batch)

    def warmup():
        for _ in range(2):
            workload(1, 64, 64, 2)()

    return _measure(
        lambda: workload(spec["batch"], *spec["size"], spec["boxes"]), torch.device(device), warmup
    )


class FreshProcesses:
    """Runs each call in its own process forked from a server with the libraries imported."""

    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        # glibc reads the variable when a process starts: set it for the server only.
        previous = os.environ.get(MMAP_THRESHOLD)
        os.environ[MMAP_THRESHOLD] = str(128 * 1024)
        try:
            self(os.getpid)  # starts the server before anything is timed
        finally:
            if previous is None:
                del os.environ[MMAP_THRESHOLD]
            else:
                os.environ[MMAP_THRESHOLD] = previous

    def __call__(self, function, *args) -> dict:
        with ProcessPoolExecutor(1, mp_context=self.context, max_tasks_per_child=1) as pool:
            return pool.submit(function, *args).result()
