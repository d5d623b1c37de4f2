"""The one logging set-up of the command line, and a run folder's ``train.log``.

    setup_logging(verbosity)    console handler on stderr; called once, by the top-level CLI
    run_log(path)               while open, the records also go to a file (a run's train.log)
    verbosity_options()         the -v/-q options every command accepts (an argparse parent)

Verbosity: ``QUIET`` (-q: warnings and errors only, no progress bars), ``NORMAL`` (progress
and one line per epoch/step), ``VERBOSE`` (-v: debug records too, e.g. one line per slide).
A command's result on stdout (the demo's summary) is printed whatever the verbosity.
Under ``torchrun`` only rank 0 speaks below WARNING (every rank would repeat it).

Library modules only create loggers (``logging.getLogger(__name__)``); they never configure
handlers, so a program that imports them keeps its own logging.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["QUIET", "NORMAL", "VERBOSE", "FORMAT", "setup_logging", "verbosity", "run_log",
           "verbosity_options", "split_verbosity"]

QUIET, NORMAL, VERBOSE = -1, 0, 1
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}

_console: logging.Handler | None = None  # the handler setup_logging installed (replaced on a second call)
_verbosity = NORMAL


def setup_logging(level: int = NORMAL) -> None:
    """Log to stderr at ``level`` (QUIET, NORMAL or VERBOSE), in :data:`FORMAT`.

    Replaces the handler of an earlier call; handlers installed by others stay. Processes of
    rank > 0 (``RANK`` set by torchrun) log warnings and errors only.
    """
    global _console, _verbosity
    if level not in _LEVELS:
        raise ValueError(f"verbosity must be QUIET ({QUIET}), NORMAL ({NORMAL}) or VERBOSE ({VERBOSE}), got {level!r}")
    _verbosity = level
    console_level = _LEVELS[level]
    if int(os.environ.get("RANK", "0") or 0) != 0:
        console_level = max(console_level, logging.WARNING)  # rank 0 speaks for all
    root = logging.getLogger()
    if _console is not None:
        root.removeHandler(_console)
    _console = logging.StreamHandler(sys.stderr)
    _console.setFormatter(logging.Formatter(FORMAT))
    _console.setLevel(console_level)
    root.addHandler(_console)
    root.setLevel(console_level)


def verbosity() -> int:
    """The verbosity of the last :func:`setup_logging` (NORMAL when it was never called)."""
    return _verbosity


@contextmanager
def run_log(path: str | os.PathLike) -> Iterator[Path]:
    """Append the log records to ``path`` while the context is open (a run folder's train.log).

    The file gets INFO and above (DEBUG too when verbose) whatever the console shows: a quiet
    console still leaves a complete record of the run. Yields the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    level = logging.DEBUG if _verbosity == VERBOSE else logging.INFO
    handler.setLevel(level)
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > level:
        root.setLevel(level)  # the console handler keeps its own level
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(before)
        handler.close()


def verbosity_options() -> argparse.ArgumentParser:
    """An argparse parent with the mutually exclusive ``-v/--verbose`` and ``-q/--quiet``."""
    parent = argparse.ArgumentParser(add_help=False)
    exclusive = parent.add_mutually_exclusive_group()
    exclusive.add_argument("-v", "--verbose", action="store_true",
                           help="debug logging too (e.g. one line per training slide)")
    exclusive.add_argument("-q", "--quiet", action="store_true",
                           help="warnings and errors only, no progress bars (results on stdout still print)")
    return parent


def split_verbosity(argv: Sequence[str], prog: str | None = None) -> tuple[int, list[str]]:
    """(verbosity, the other arguments): ``-v/--verbose`` and ``-q/--quiet`` taken out of ``argv``.

    Lets the top-level CLI accept them anywhere among a command's options. Raises
    ``SystemExit`` (argparse's usage error) when both are given.
    """
    parser = argparse.ArgumentParser(add_help=False, parents=[verbosity_options()], prog=prog)
    args, rest = parser.parse_known_args(list(argv))
    return (VERBOSE if args.verbose else QUIET if args.quiet else NORMAL), rest
