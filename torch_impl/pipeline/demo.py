"""The whole pipeline in minutes on a laptop CPU: synthetic data -> training -> evaluation -> heatmaps.

    python -m torch_impl demo [--out demo_run] [--data DIR] [--device DEV] [-q | -v]
    python -m torch_impl make-demo-data DIR [--n-normal N ...] [--difficulty camelyon]   (step 1 alone)

1. ``make_demo_data``: 12 training and 8 test slides (2048 x 2048 px at 0.25 um/px) in the
   CAMELYON16 layout, unless ``--data`` already holds a data set.
2. Train StreamingCLAM with the paper's recipe shape, scaled down: a ResNet-34 of width 16
   (1/4 of the channels, random initialisation with data-calibrated frozen batch norms) at
   1 um/px (the synthetic slides become ~400 x 400 px crops, one tile each), head only for
   14 epochs, then the whole network for 6 epochs with a 10x smaller trunk learning rate.
3. Evaluate ``best.pt`` on the held-out test slides (AUC, accuracy, ROC curve).
4. Attention heatmaps of the test slides, with the lesion outlines where annotated.

The run folder ``OUT/train`` holds what ``train`` writes, ``train.log`` included. At the end
the demo prints its summary on stdout (:func:`format_summary`, :data:`SUMMARY_FORMAT`): the
times of the steps, the test AUC and accuracy, the attention AUC of every annotated test
slide and where the outputs are.

Everything is seeded; re-running continues or reuses the previous run (``--resume``).
The demo computes with one CPU thread: its tensors are so small that waking OpenMP worker
threads costs more than it saves, and on a busy machine (tests running beside it) two-thread
OpenMP stalls made slides up to ~100x slower in our measurements.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..models.streaming_clam import ModelConfig
from ..slides import discover, make_demo_data
from ..slides.synthetic import DIFFICULTIES
from .config import TrainConfig
from .logs import QUIET, run_log, verbosity, verbosity_options
from .options import OptionParser, option
from .predict import ComputeOptions
from .runtime import PipelineError

__all__ = [
    "SUMMARY_FORMAT",
    "DemoOptions",
    "MakeDemoDataOptions",
    "demo_config",
    "format_summary",
    "run_demo",
    "main_demo",
    "main_make_demo_data",
]

logger = logging.getLogger(__name__)

#: Working resolution of the demo, micrometres per pixel (the synthetic slides are 0.25 um/px).
DEMO_MPP = 1.0


@dataclass(frozen=True, kw_only=True)
class DemoOptions(ComputeOptions):
    """The ``demo`` command (--device from :class:`~torch_impl.pipeline.predict.ComputeOptions`);
    its fields are :func:`run_demo`'s arguments (``progress`` follows -q)."""

    out_dir: Path = option(Path("demo_run"), flag="--out", metavar="DIR")  # output: data/, train/, eval/, heatmaps/
    data_dir: Path | None = option(None, flag="--data", metavar="DIR")  # data set; none = OUT/data, made if missing


@dataclass(frozen=True, kw_only=True)
class MakeDemoDataOptions:
    """The ``make-demo-data`` command: the arguments of :func:`torch_impl.slides.make_demo_data`
    (``size`` may be one side H for H x H). Counts, size and mpp not given take the preset of
    ``--difficulty`` (:data:`torch_impl.slides.synthetic.DIFFICULTIES`), filled in here.
    Raises ValueError for counts < 0, sizes or mpp <= 0."""

    root: Path = option(positional=True, metavar="DIR")  # output folder (CAMELYON16 layout)
    n_normal: int | None = None  # training normal slides (none: the difficulty's preset, demo 6, camelyon 24)
    n_tumor: int | None = None  # training tumour slides (none: preset, demo 6, camelyon 16)
    n_test_normal: int | None = None  # test normal slides (none: preset, demo 4, camelyon 12)
    n_test_tumor: int | None = None  # test tumour slides (none: preset, demo 4, camelyon 8)
    size: tuple[int, ...] = option(
        (), metavar="PX"
    )  # level-0 size: H [W] px, multiples of 256 (none given: preset, demo 2048, camelyon 8192)
    mpp: float | None = None  # level-0 micrometres per pixel (none: preset, 0.25)
    seed: int = 0  # seeds every slide and the test labels
    difficulty: Literal["demo", "camelyon"] = "demo"  # demo: big dark lesions; camelyon: small ones, fine scale only

    def __post_init__(self) -> None:
        preset = DIFFICULTIES[self.difficulty]
        filled = {
            "n_normal": preset.n_normal,
            "n_tumor": preset.n_tumor,
            "n_test_normal": preset.n_test_normal,
            "n_test_tumor": preset.n_test_tumor,
            "mpp": preset.mpp,
        }
        for name, value in filled.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: the standard way to fill a field here
        if not self.size:
            object.__setattr__(self, "size", tuple(preset.size))
        counts = {
            "--n-normal": self.n_normal,
            "--n-tumor": self.n_tumor,
            "--n-test-normal": self.n_test_normal,
            "--n-test-tumor": self.n_test_tumor,
        }
        for flag, n in counts.items():
            if n < 0:
                raise ValueError(f"{flag} must be >= 0 slides, got {n}")
        if len(self.size) not in (1, 2) or min(self.size) < 1:
            raise ValueError(f"--size takes H or H W, positive pixels; got {' '.join(map(str, self.size))}")
        if not self.mpp > 0:
            raise ValueError(f"--mpp must be > 0 micrometres per pixel, got {self.mpp}")


def demo_config(
    data_dir: str | os.PathLike, out_dir: str | os.PathLike, device: str = "auto", progress: bool = True
) -> TrainConfig:
    """The demo's training run: test AUC 1.0 on the synthetic data for training seeds 0-6 (measured)."""
    return TrainConfig(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        # a random trunk whose batch-norm affines learn (the real recipe freezes them on ImageNet weights)
        model=ModelConfig(width=16, hidden_dim=64, attention_dim=32, pool=None, tile_size=1024, freeze_bn_affine=False),
        mpp=DEMO_MPP,
        epochs=20,
        head_only_epochs=14,
        lr=1e-3,
        trunk_lr_factor=0.1,
        device=device,
        progress=progress,
    )


def _has_data(root: Path, own: bool) -> bool:
    """True when ``root`` holds training and test slides in the CAMELYON16 layout; False when
    the demo should write its synthetic slides there: ``root`` is missing or empty, or it is
    the demo's own folder (``own``: inside its output folder) holding a partial set.

    Raises:
        PipelineError: a folder the user named holds something else: the demo never writes
            into a folder it did not make (it could be a real data set with a problem).
    """
    if not root.is_dir() or not any(root.iterdir()):
        return False
    try:
        splits = {r.split for r in discover(root)}
    except (FileNotFoundError, ValueError) as e:
        if own:
            return False
        raise PipelineError(
            f"{root} is not empty but is no complete CAMELYON16-style data set ({e}); the demo writes its "
            "synthetic slides only into a new or empty folder: pass another data folder"
        ) from e
    if not {"train", "test"} <= splits:
        if own:
            return False
        raise PipelineError(
            f"{root} holds only {sorted(splits)} slides; the demo needs training and test slides: pass a "
            "complete data set or a new or empty folder"
        )
    return True


def run_demo(
    out_dir: str | os.PathLike = "demo_run",
    data_dir: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo; returns the summary that :func:`format_summary` prints.

    The arguments are the fields of :class:`DemoOptions` (the ``demo`` command's options):
    ``out_dir`` receives ``data/`` (unless ``data_dir`` is given), ``train/`` (the run
    folder, with ``train.log``), ``eval/`` (predictions, metrics, ROC) and ``heatmaps/``;
    the synthetic data set is written to ``data_dir`` only if it holds no slides yet.
    ``progress``: tqdm progress bars (on a terminal).

    Returns:
        {"auc", "auc_ci95" ([low, high] or None), "accuracy", "n_test_slides", "n_tumor",
        "data_dir", "train_dir", "checkpoint", "eval_dir", "heatmap_dir", "heatmaps" (PNG
        paths), "attention_auc" ({slide id: AUC or None} of the annotated test slides),
        "seconds", "seconds_per_step" ({"data", "train", "evaluate", "heatmaps"})}; AUCs and
        accuracy are None where undefined, times are seconds rounded to 0.1.
    """
    from .evaluate import evaluate_run  # the evaluation and heatmap steps are separate modules
    from .heatmap import write_heatmap
    from .predict import load_prediction
    from .train import train

    start = time.perf_counter()
    out = Path(out_dir)
    data = Path(data_dir) if data_dir is not None else out / "data"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        if _has_data(data, own=data_dir is None):
            logger.info("demo: using the slides in %s", data)
        else:
            logger.info("demo: writing the synthetic data set to %s", data)
            make_demo_data(data)
        made = time.perf_counter()

        config = demo_config(data, out / "train", device=device, progress=progress)
        resume = (out / "train" / "last.pt").is_file()
        with run_log(out / "train" / "train.log"):
            train(config, resume=resume)
        trained = time.perf_counter()
        checkpoint = out / "train" / "best.pt"

        metrics = evaluate_run(checkpoint, data, out / "eval", mpp=config.mpp, device=device)
        evaluated = time.perf_counter()

        heatmaps = []
        for record in [r for r in discover(data) if r.split == "test"]:
            saved = out / "eval" / "attention" / f"{record.slide_id}.npy"
            if saved.is_file():  # evaluate saved every slide it did not skip: drawn without re-running the model
                heatmaps.append(
                    write_heatmap(load_prediction(saved), out / "heatmaps", annotation=record.annotation_path)
                )
        done = time.perf_counter()
    finally:
        torch.set_num_threads(threads)

    return {
        "auc": metrics.get("auc"),
        "auc_ci95": metrics.get("auc_ci95"),
        "accuracy": metrics.get("accuracy"),
        "n_test_slides": metrics.get("n_slides"),
        "n_tumor": metrics.get("n_tumor"),
        "data_dir": str(data),
        "train_dir": str(out / "train"),
        "checkpoint": str(checkpoint),
        "eval_dir": str(out / "eval"),
        "heatmap_dir": str(out / "heatmaps"),
        "heatmaps": [h["png"] for h in heatmaps],
        "attention_auc": {h["slide_id"]: h.get("attention_auc") for h in heatmaps if "attention_auc" in h},
        "seconds": round(done - start, 1),
        "seconds_per_step": {
            "data": round(made - start, 1),
            "train": round(trained - made, 1),
            "evaluate": round(evaluated - trained, 1),
            "heatmaps": round(done - evaluated, 1),
        },
    }


#: The demo's summary, one template per line (``str.format`` fields from :func:`format_summary`).
#: The README shows a real instance; tests/test_cli.py checks that it still has this form.
SUMMARY_FORMAT = (
    "demo finished in {seconds:.0f} s (data {data:.0f} s, training {train:.0f} s, evaluation {evaluate:.0f} s, "
    "heatmaps {heatmaps:.0f} s)",
    "test AUC {auc} (95% CI {ci}), accuracy {accuracy} on {n_test_slides} slides ({n_tumor} tumour)",
    "attention AUC, lesion vs other tissue: {attention}",
    "run folder: {train_dir} (config.json, splits.csv, metrics.csv, train.log, last.pt, best.pt)",
    "evaluation: {eval_dir} (predictions.csv, metrics.json, roc.png, attention/)",
    "heatmaps: {heatmap_dir} (<slide>_heatmap.png, <slide>_attention.tif, <slide>_attention.geojson)",
)


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary of :func:`run_demo` as the lines of :data:`SUMMARY_FORMAT` (no final newline).

    Numbers have three decimals ("undefined" where an AUC is); the attention line lists
    "slide_id AUC" for every annotated test slide, in slide order ("none" if there is none).
    """
    ci = summary.get("auc_ci95")
    attention = ", ".join(f"{slide} {_number(auc)}" for slide, auc in sorted(summary["attention_auc"].items()))
    fields = {
        **summary["seconds_per_step"],
        "seconds": summary["seconds"],
        "auc": _number(summary["auc"]),
        "ci": "undefined" if not ci else f"{_number(ci[0])}-{_number(ci[1])}",
        "accuracy": _number(summary["accuracy"]),
        "n_test_slides": summary["n_test_slides"],
        "n_tumor": summary["n_tumor"],
        "attention": attention or "none",
        "train_dir": summary["train_dir"],
        "eval_dir": summary["eval_dir"],
        "heatmap_dir": summary["heatmap_dir"],
    }
    return "\n".join(line.format(**fields) for line in SUMMARY_FORMAT)


def main_demo(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: ``python -m torch_impl demo [--out DIR] [--data DIR] [--device DEV] [-q | -v]`` (:class:`DemoOptions`).

    Prints the summary (:func:`format_summary`) on stdout; returns 0. The pipeline's errors
    propagate (:func:`torch_impl.pipeline.cli.main` reports the expected ones in one line).
    """
    parser = OptionParser(
        DemoOptions,
        prog=prog or "python -m torch_impl demo",
        description="Synthetic data -> StreamingCLAM training -> test evaluation -> attention heatmaps, "
        "in a few minutes on a CPU; prints a summary at the end.",
        parents=[verbosity_options()],
    )
    args = parser.parse_args(argv)
    quiet = args.quiet or verbosity() == QUIET
    summary = run_demo(**dataclasses.asdict(parser.options(args)), progress=not quiet)
    print(format_summary(summary), flush=True)
    return 0


def main_make_demo_data(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: ``python -m torch_impl make-demo-data DIR [options]`` (:class:`MakeDemoDataOptions`). Returns 0."""
    parser = OptionParser(
        MakeDemoDataOptions,
        prog=prog or "python -m torch_impl make-demo-data",
        description="Write a small synthetic CAMELYON16 (pyramidal TIFFs, ASAP XML, "
        "reference CSV) for demos and tests.",
        parents=[verbosity_options()],
    )
    opts = parser.parse(argv)
    make_demo_data(**{**dataclasses.asdict(opts), "size": (opts.size[0], opts.size[-1])})
    return 0
