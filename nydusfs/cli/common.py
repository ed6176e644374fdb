"""What every command-line tool shares: the log flags and their setup, and how a daemon's
errors reach the user."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable

from nydusfs.errors import NydusError

LOG_LEVELS = ["trace", "debug", "info", "warn", "error"]


def add_log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-L", "--log-file", help="log file path ('.log' is added without extension)")
    p.add_argument("-l", "--log-level", default="info", choices=LOG_LEVELS, help="log level")


def setup_logging(level_name: str, log_file: str | None) -> None:
    level = {"trace": logging.DEBUG, "warn": logging.WARNING}.get(
        level_name, getattr(logging, level_name.upper(), logging.INFO)
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        path = log_file if os.path.splitext(log_file)[1] else log_file + ".log"
        handlers = [logging.FileHandler(path)]
    logging.basicConfig(
        level=level, handlers=handlers, format="[%(asctime)s %(levelname)s] %(message)s"
    )


def run_reporting_errors(
    prog: str, body: Callable[[], int | None], *, say_interrupted: bool = False
) -> int:
    """Run ``body`` and return its exit code (None: 0). A user error (``NydusError``,
    ``OSError``, ``ValueError``, also when trio wraps it in exception groups) prints one
    ``prog: message`` line and returns 1; Ctrl-C returns 130 (a daemon's normal way out, so
    it is said only with ``say_interrupted``); anything else propagates with its traceback."""
    try:
        return body() or 0
    except BaseException as e:
        leaf = single_error(e)
        if isinstance(leaf, NydusError | OSError | ValueError):
            print(f"{prog}: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, KeyboardInterrupt):
            if say_interrupted:
                print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        raise


def single_error(error: BaseException) -> BaseException:
    """The one error inside nested exception groups (trio wraps task errors in groups)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_large_buffers_to_the_system() -> None:
    """Daemons: have glibc serve every allocation of 1 MiB or more with its own mapping.

    glibc raises its mmap threshold each time a large block is freed, after which blob-sized
    buffers (fetched ranges, decoded chunks) come from the heap, fragment it and are not
    given back: the daemon's peak RSS over a cold read of 500 MB was 167 MB, 150 MB with a
    fixed threshold (``bench/mount.py``). Not glibc: nothing to do.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except OSError:
        pass
