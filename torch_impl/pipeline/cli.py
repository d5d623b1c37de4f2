"""Command line: ``python -m torch_impl COMMAND ...`` (also installed as ``streamingclam``).

    make-demo-data DIR      write a small synthetic CAMELYON16 (torch_impl.slides.synthetic)
    train                   train StreamingCLAM (torch_impl.pipeline.train); torchrun for several GPUs
    evaluate                whole-slide test evaluation of a checkpoint (torch_impl.pipeline.evaluate)
    predict                 predictions for unlabelled slides, CAMELYON16 CSV (torch_impl.pipeline.predict)
    heatmap                 attention heatmaps of slides (torch_impl.pipeline.heatmap)
    demo                    all of the above on synthetic data, in minutes on a CPU

Global options go before the command: ``--verbose`` (debug logging), ``--quiet`` (warnings
only). Each command has its own ``--help``. Commands are imported only when run, so
``--help`` is quick and one command's dependencies never break another.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _make_demo_data(argv: Sequence[str]) -> int:
    from ..slides import main_make_demo_data

    return main_make_demo_data(argv)


def _train(argv: Sequence[str]) -> int:
    from .train import main_train

    return main_train(argv)


def _evaluate(argv: Sequence[str]) -> int:
    from .evaluate import main_evaluate

    return main_evaluate(argv)


def _predict(argv: Sequence[str]) -> int:
    from .predict import main_predict

    return main_predict(argv)


def _heatmap(argv: Sequence[str]) -> int:
    from .heatmap import main_heatmap

    return main_heatmap(argv)


def _demo(argv: Sequence[str]) -> int:
    from .demo import main_demo

    return main_demo(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "make-demo-data": (_make_demo_data, "write a small synthetic CAMELYON16 data set"),
    "train": (_train, "train StreamingCLAM (torchrun --nproc_per_node N -m torch_impl train ... for DDP)"),
    "evaluate": (_evaluate, "evaluate a checkpoint on whole test slides (AUC, ROC, attention)"),
    "predict": (_predict, "predict unlabelled slides: CAMELYON16 submission CSV, optional heatmaps"),
    "heatmap": (_heatmap, "draw attention heatmaps of slides"),
    "demo": (_demo, "synthetic data -> training -> evaluation -> heatmaps, in minutes on a CPU"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a command; returns its exit status (the ``streamingclam`` console script)."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_impl",
        description="StreamingCLAM: exact tile-by-tile training of ResNet-34 + CLAM on whole-slide images.",
        epilog="commands:\n" + "\n".join(f"  {name:<16}{text}" for name, (_, text) in COMMANDS.items())
        + "\n\n'python -m torch_impl COMMAND --help' describes a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    level.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run, _ = COMMANDS[args.command]
    return int(run(args.args) or 0)


if __name__ == "__main__":
    sys.exit(main())
