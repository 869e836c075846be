"""What every command-line entry point shares: one way to report bad input, the launcher of the
two training scripts, and the split of image lists from config overrides.

Every command reports a :class:`~fcos_d2.checks.ConfigError` (a bad config key or value, a missing
or unreadable file, a bad argument) as one line, ``PROGRAM: error: MESSAGE``, and exits with
status 2, as argparse does for bad arguments; no traceback.
"""

import contextlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from .checks import ConfigError
from .config import add_fcos_config

USAGE_ERROR = 2


def report_error(program: str, error: ConfigError) -> int:
    """Print ``program: error: message`` to stderr; the exit status for it."""
    print(f"{program}: error: {error}", file=sys.stderr, flush=True)
    return USAGE_ERROR


def run_command(program: str, main: Callable[[], int]) -> int:
    """Run a command's ``main``; a :class:`ConfigError` is reported as one line with status 2."""
    try:
        return main()
    except ConfigError as error:
        return report_error(program, error)


def _worker(program: str, main: Callable[[Any], Any], report: Optional[Callable], args) -> None:
    try:
        results = main(args)
    except ConfigError as error:
        if comm.get_world_size() == 1:
            raise  # launch ran main in this process: run_command reports it
        # In each worker process: say why once (the main process), then stop without a traceback.
        if comm.is_main_process():
            report_error(program, error)
        sys.exit(USAGE_ERROR)
    if comm.is_main_process() and results and report is not None:
        report(results)


def training_command(
    program: str,
    main: Callable[[Any], Any],
    check_config: Callable[[Any], Any],
    report: Optional[Callable[[Any], None]] = None,
    argv: Optional[list[str]] = None,
) -> int:
    """The body of ``train_net.py`` and ``lazyconfig_train_net.py``: Detectron2's arguments,
    ``check_config(args)`` before any process starts (its errors are reported once, not by every
    worker), then ``main(args)`` in each process that Detectron2's ``launch`` starts;
    ``report(results)`` in the main process. ``argv``: the arguments (default: the command line).
    """

    def body() -> int:
        args = default_argument_parser().parse_args(argv)
        print("Command Line Args:", args)
        check_config(args)
        # One process: launch runs training in this process, which handles the signals itself.
        spawns = args.num_gpus * args.num_machines > 1
        with signals_forwarded_to_workers() if spawns else contextlib.nullcontext():
            try:
                launch(
                    _worker,
                    args.num_gpus,
                    num_machines=args.num_machines,
                    machine_rank=args.machine_rank,
                    dist_url=args.dist_url,
                    args=(program, main, report, args),
                )
            except ProcessExitedException as error:
                if error.exit_code is None or error.exit_code <= 0:
                    raise  # killed by a signal: torch's report says which process and how
                # A worker that stopped on purpose (a reported error, a preemption): its status.
                return error.exit_code
        return 0

    return run_command(program, body)


@contextlib.contextmanager
def signals_forwarded_to_workers() -> Iterator[None]:
    """While active, SIGTERM and SIGUSR1 sent to this (launching) process reach the training
    processes it started, which stop cleanly on them (fcos_d2.engine.resume): a scheduler may
    signal only the process it started. Only where ``launch`` starts processes: in one process,
    training itself handles them (and outside training they keep their default meaning)."""
    sent = (signal.SIGTERM, signal.SIGUSR1)

    def forward(signum: int, frame) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in sent}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@lru_cache(maxsize=1)
def _top_level_keys() -> frozenset:
    return frozenset(add_fcos_config(get_cfg()).keys())


def looks_like_config_key(item: str) -> bool:
    """``SECTION.KEY`` or a top-level key such as ``OUTPUT_DIR``, by the config's own sections."""
    first = item.split(".")[0]
    return first in _top_level_keys() and item == item.upper()


def split_config_overrides(items: list[str], opts: list[str]) -> tuple[list[str], list[str]]:
    """``--input a.jpg MODEL.WEIGHTS w.pth`` means one image and one override: argparse's
    ``nargs="+"`` would swallow the override, so the items end at the first config key that is
    not an existing path; the rest goes before ``opts``. A mistyped image name stays an image,
    and is then reported as missing."""
    for index, item in enumerate(items):
        if looks_like_config_key(item) and not Path(item).exists():
            return items[:index], items[index:] + opts
    return items, opts
