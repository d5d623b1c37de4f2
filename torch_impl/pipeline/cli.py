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
    -v, --verbose   debug logging too (e.g. one line per training slide)

This module sets up logging once (:func:`torch_impl.pipeline.logs.setup_logging`) and takes
these options out of the command's arguments; the commands only log. Each command has its
own ``--help``. Commands are imported only when run, so ``--help`` is quick and one
command's dependencies never break another.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .logs import NORMAL, QUIET, VERBOSE, setup_logging, split_verbosity, verbosity_options

__all__ = ["main"]

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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Dispatch to a command; returns its exit status (the ``streamingclam`` console script).

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).
        prog: the program name in usage lines (default: how it was called, see
            :func:`_program_name`).
    """
    prog = prog or _program_name()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="StreamingCLAM: exact tile-by-tile training of ResNet-34 + CLAM on whole-slide images.",
        epilog="commands:\n" + "\n".join(f"  {name:<16}{text}" for name, (_, text) in COMMANDS.items())
        + f"\n\n'{prog} COMMAND --help' describes a command's options. -q and -v mean the same before the "
        "command and among its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[verbosity_options()],
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    command_prog = f"{prog} {args.command}"
    given_after, rest = split_verbosity(args.args, prog=command_prog)
    level = VERBOSE if args.verbose else QUIET if args.quiet else NORMAL
    if level != NORMAL and given_after != NORMAL and level != given_after:
        parser.error("-q and -v exclude each other")
    setup_logging(level if level != NORMAL else given_after)
    run, _ = COMMANDS[args.command]
    return int(run(rest, command_prog) or 0)


if __name__ == "__main__":
    sys.exit(main())
