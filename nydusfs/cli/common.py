"""What every command-line tool shares: the log flags and their setup, and how a daemon's
errors reach the user."""

from __future__ import annotations

import argparse
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
