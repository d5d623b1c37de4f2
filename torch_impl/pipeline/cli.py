"""Command line: ``python -m torch_impl COMMAND ...`` (also installed as ``streamingclam``).

    make-demo-data DIR      write a small synthetic CAMELYON16 (torch_impl.pipeline.demo)
    train                   train StreamingCLAM (torch_impl.pipeline.train); torchrun for several GPUs
    evaluate                whole-slide test evaluation of a checkpoint (torch_impl.pipeline.evaluate)
    predict                 predictions for unlabelled slides, CAMELYON16 CSV (torch_impl.pipeline.predict)
    heatmap                 attention heatmaps of slides (torch_impl.pipeline.heatmap)
    demo                    all of the above on synthetic data, in minutes on a CPU

Output options, the same before the command and among its options (``streamingclam -q
train ...`` = ``streamingclam train ... -q``):

    -q, --quiet     warnings and errors only, no progress bars (a result printed on stdout,
                    such as the demo's summary, still prints)
    -v, --verbose   debug logging too (e.g. one line per training slide); the traceback of
                    an expected error too
    --debug         the traceback of an expected error too, without debug logging

Exit status (:data:`EXIT_STATUS`):

    0   done
    1   an unexpected error, i.e. a bug: Python's traceback, whatever the options
    2   an expected error: a usage error (unknown option, bad or out-of-range value), or
        an input that the command cannot use (a missing or unreadable data folder,
        checkpoint, slide, annotation or configuration file; wrong labels; no tissue).
        stderr gets ``PROG COMMAND: error: MESSAGE``, naming the file or option; a usage
        error adds a line pointing at ``--help``, and -v or --debug print the traceback
        of an input error before it.

Expected errors (:func:`is_expected_error`) are the pipeline's own
(:class:`~torch_impl.pipeline.runtime.PipelineError`: unusable slides, failed training runs;
:class:`~torch_impl.pipeline.checkpoint.CheckpointError`; the slides'
:class:`~torch_impl.slides.SlideError` and :class:`~torch_impl.slides.NoTissueError`),
``OSError`` (missing files, permissions, a full disk), and a ``ValueError`` raised by a
check in torch_impl's own code (a ``raise`` statement in this package: validation of a
setting or an input). Any other exception, a ValueError from inside numpy or torch
included, is a bug and keeps its traceback. The commands raise; this module alone turns
errors into messages and exit statuses.

This module sets up logging once (:func:`torch_impl.pipeline.logs.setup_logging`) and takes
the output options out of the command's arguments; the commands only log. Each command has
its own ``--help``. Commands are imported only when run, so ``--help`` is quick and one
command's dependencies never break another.
"""

from __future__ import annotations

import argparse
import linecache
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from .logs import NORMAL, QUIET, VERBOSE, setup_logging, split_verbosity, verbosity_options
from .options import OptionParser

__all__ = ["EXIT_STATUS", "COMMANDS", "is_expected_error", "main"]

#: The exit statuses of ``python -m torch_impl`` (module docstring).
EXIT_STATUS = {
    0: "done",
    1: "an unexpected error (a bug): its traceback is printed",
    2: "an expected error (bad option or value, missing or unusable file): one line names the option or "
    "file (-v or --debug: with its traceback)",
}

_PACKAGE = Path(__file__).resolve().parents[1]  # torch_impl/


def _make_demo_data(argv: Sequence[str], prog: str) -> int:
    from .demo import main_make_demo_data

    return main_make_demo_data(argv, prog=prog)


def _train(argv: Sequence[str], prog: str) -> int:
    from .train import main_train

    return main_train(argv, prog=prog)


def _evaluate(argv: Sequence[str], prog: str) -> int:
    from .evaluate import main_evaluate

    return main_evaluate(argv, prog=prog)


def _predict(argv: Sequence[str], prog: str) -> int:
    from .predict import main_predict

    return main_predict(argv, prog=prog)


def _heatmap(argv: Sequence[str], prog: str) -> int:
    from .heatmap import main_heatmap

    return main_heatmap(argv, prog=prog)


def _demo(argv: Sequence[str], prog: str) -> int:
    from .demo import main_demo

    return main_demo(argv, prog=prog)


#: command -> (runner(argv, prog), one-line description); prog is the command's usage name.
COMMANDS: dict[str, tuple[Callable[[Sequence[str], str], int], str]] = {
    "make-demo-data": (_make_demo_data, "write a small synthetic CAMELYON16 data set"),
    "train": (_train, "train StreamingCLAM (torchrun --nproc_per_node N -m torch_impl train ... for DDP)"),
    "evaluate": (_evaluate, "evaluate a checkpoint on whole test slides (AUC, ROC, attention)"),
    "predict": (_predict, "predict unlabelled slides: CAMELYON16 submission CSV, optional heatmaps"),
    "heatmap": (_heatmap, "draw attention heatmaps of slides"),
    "demo": (_demo, "synthetic data -> training -> evaluation -> heatmaps, in minutes on a CPU"),
}


def _program_name() -> str:
    """``streamingclam`` for the console script; ``python -m torch_impl`` for the module."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m torch_impl" if name in ("", "-c", "__main__.py", "-m") else name


def _raised_by_a_check(error: BaseException) -> bool:
    """True when the innermost frame of ``error``'s traceback is a ``raise`` statement in torch_impl.

    That is a deliberate check of a setting or an input (its message says what is wrong); an
    error raised inside numpy, torch or the standard library, even when called from here, has
    a call on its innermost line instead (or a frame outside the package).
    """
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not Path(filename).resolve().is_relative_to(_PACKAGE):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def is_expected_error(error: BaseException) -> bool:
    """Whether ``error`` is one the user fixes by changing an option or a file (module docstring)."""
    from ..slides import NoTissueError, SlideError  # the command raising it has imported them already
    from .checkpoint import CheckpointError
    from .runtime import PipelineError

    if isinstance(error, (PipelineError, CheckpointError, SlideError, NoTissueError, OSError)):
        return True
    return isinstance(error, ValueError) and _raised_by_a_check(error)


def _split_debug(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether ``--debug`` is among the command's arguments, the others); after ``--`` it is an argument."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    rest = [a for a in args[:end] if a != "--debug"] + args[end:]
    return len(rest) != len(args), rest


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Dispatch to a command; returns its exit status (the ``streamingclam`` console script).

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).
        prog: the program name in usage lines (default: how it was called, see
            :func:`_program_name`).

    Returns 0 when the command succeeds and 2 for an expected error (printed in one line,
    with its traceback under -v or --debug); a usage error exits with status 2 (SystemExit)
    and any other exception propagates with its traceback (module docstring).
    """
    prog = prog or _program_name()
    parser = OptionParser(
        prog=prog,
        description="StreamingCLAM: exact tile-by-tile training of ResNet-34 + CLAM on whole-slide images.",
        epilog="commands:\n"
        + "\n".join(f"  {name:<16}{text}" for name, (_, text) in COMMANDS.items())
        + f"\n\n'{prog} COMMAND --help' describes a command's options. -q, -v and --debug mean the same "
        "before the command and among its options.\n\nexit status:\n"
        + "\n".join(f"  {code}  {text}" for code, text in sorted(EXIT_STATUS.items())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[verbosity_options()],
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an expected error too (-v does as well, with debug logging)",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    command_prog = f"{prog} {args.command}"
    debug_after, rest = _split_debug(args.args)
    given_after, rest = split_verbosity(rest, prog=command_prog)
    level = VERBOSE if args.verbose else QUIET if args.quiet else NORMAL
    if level != NORMAL and given_after != NORMAL and level != given_after:
        parser.error("-q and -v exclude each other")
    level = level if level != NORMAL else given_after
    setup_logging(level)
    run, _ = COMMANDS[args.command]
    try:
        return int(run(rest, command_prog) or 0)
    except Exception as error:
        if not is_expected_error(error):
            raise
        if args.debug or debug_after or level == VERBOSE:
            traceback.print_exception(error, file=sys.stderr)
        print(f"{command_prog}: error: {str(error) or type(error).__name__}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
