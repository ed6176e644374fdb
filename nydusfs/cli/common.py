"""What every command-line tool shares: the log flags and their setup."""

from __future__ import annotations

import argparse
import logging
import os
import sys

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
