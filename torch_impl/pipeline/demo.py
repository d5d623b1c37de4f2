"""The whole pipeline in minutes on a laptop CPU: synthetic data -> training -> evaluation -> heatmaps.

    python -m torch_impl demo [--out demo_run] [--data DIR]

1. ``make_demo_data``: 12 training and 8 test slides (2048 x 2048 px at 0.25 um/px) in the
   CAMELYON16 layout, unless ``--data`` already holds a data set.
2. Train StreamingCLAM with the paper's recipe shape, scaled down: a ResNet-34 of width 16
   (1/4 of the channels, random initialisation with data-calibrated frozen batch norms) at
   1 um/px (the synthetic slides become ~400 x 400 px crops, one tile each), head only for
   14 epochs, then the whole network for 6 epochs with a 10x smaller trunk learning rate.
3. Evaluate ``best.pt`` on the held-out test slides (AUC, accuracy, ROC curve).
4. Attention heatmaps of the test slides, with the lesion outlines where annotated.

Everything is seeded; re-running continues or reuses the previous run (``--resume``).
The demo computes with one CPU thread: its tensors are so small that waking OpenMP worker
threads costs more than it saves, and on a busy machine (tests running beside it) two-thread
OpenMP stalls made slides up to ~100x slower in our measurements.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from ..slides import discover, make_demo_data
from ..models.streaming_clam import ModelConfig

__all__ = ["demo_config", "run_demo", "main_demo"]

logger = logging.getLogger(__name__)

#: Working resolution of the demo, micrometres per pixel (the synthetic slides are 0.25 um/px).
DEMO_MPP = 1.0


def demo_config(data_dir: str | os.PathLike, out_dir: str | os.PathLike, device: str = "auto",
                progress: bool = True) -> TrainConfig:
    """The demo's training run: test AUC 1.0 on the synthetic data for training seeds 0-6 (measured)."""
    return TrainConfig(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        model=ModelConfig(width=16, hidden_dim=64, attention_dim=32, pool=None, tile_size=1024),
        mpp=DEMO_MPP,
        epochs=20,
        head_only_epochs=14,
        lr=1e-3,
        trunk_lr_factor=0.1,
        device=device,
        progress=progress,
    )


def _has_data(root: Path) -> bool:
    """True when ``root`` holds training and test slides in the CAMELYON16 layout."""
    if not root.is_dir():
        return False
    try:
        splits = {r.split for r in discover(root)}
    except (FileNotFoundError, ValueError):
        return False
    return {"train", "test"} <= splits


def run_demo(out_dir: str | os.PathLike = "demo_run", data_dir: str | os.PathLike | None = None,
             device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Run the demo; returns {"auc", "accuracy", "train_dir", "eval_dir", "heatmaps", "seconds", ...}.

    Args:
        out_dir: receives ``data/`` (unless ``data_dir`` is given), ``train/`` (the run
            folder), ``eval/`` (predictions, metrics, ROC) and ``heatmaps/``.
        data_dir: an existing CAMELYON16-style data set, or where to write the synthetic one
            (default ``<out_dir>/data``; written only if it holds no slides yet).
        device: "auto", "cpu", "cuda", ...
        progress: tqdm progress bars (on a terminal).
    """
    from .evaluate import evaluate_run  # the evaluation and heatmap steps are separate modules
    from .heatmap import write_heatmap
    from .train import train

    start = time.perf_counter()
    out = Path(out_dir)
    data = Path(data_dir) if data_dir is not None else out / "data"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    try:
        if _has_data(data):
            logger.info("demo: using the slides in %s", data)
        else:
            logger.info("demo: writing the synthetic data set to %s", data)
            make_demo_data(data)
        made = time.perf_counter()

        config = demo_config(data, out / "train", device=device, progress=progress)
        resume = (out / "train" / "last.pt").is_file()
        train(config, resume=resume)
        trained = time.perf_counter()
        checkpoint = out / "train" / "best.pt"

        run_on = None if device == "auto" else device  # evaluate/heatmap: None = first GPU, else CPU
        metrics = evaluate_run(checkpoint, data, out / "eval", mpp=config.mpp, device=run_on)
        evaluated = time.perf_counter()

        heatmaps = []
        for record in [r for r in discover(data) if r.split == "test"]:
            saved = out / "eval" / "attention" / f"{record.slide_id}.npy"  # drawn without re-running the model
            heatmaps.append(write_heatmap(checkpoint, record.path, out / "heatmaps",
                                          annotation=record.annotation_path, mpp=config.mpp, device=run_on,
                                          attention=saved if saved.is_file() else None))
        done = time.perf_counter()
    finally:
        torch.set_num_threads(threads)

    summary = {
        "auc": metrics.get("auc"),
        "accuracy": metrics.get("accuracy"),
        "n_test_slides": metrics.get("n_slides"),
        "data_dir": str(data),
        "train_dir": str(out / "train"),
        "checkpoint": str(checkpoint),
        "eval_dir": str(out / "eval"),
        "heatmaps": [h["png"] for h in heatmaps],
        "attention_auc": {h["slide_id"]: h.get("attention_auc") for h in heatmaps if "attention_auc" in h},
        "seconds": round(done - start, 1),
        "seconds_per_step": {"data": round(made - start, 1), "train": round(trained - made, 1),
                             "evaluate": round(evaluated - trained, 1), "heatmaps": round(done - evaluated, 1)},
    }
    auc = "undefined" if summary["auc"] is None else f"{summary['auc']:.3f}"
    acc = "undefined" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
    logger.info("demo finished in %.0f s (data %.0f s, training %.0f s, evaluation %.0f s, heatmaps %.0f s)",
                summary["seconds"], *summary["seconds_per_step"].values())
    logger.info("test AUC %s, accuracy %s on %s slides", auc, acc, summary["n_test_slides"])
    logger.info("run folder (config, metrics.csv, checkpoints): %s", summary["train_dir"])
    logger.info("evaluation (predictions.csv, metrics.json, roc.png): %s", summary["eval_dir"])
    logger.info("heatmaps: %s", out / "heatmaps")
    return summary


def main_demo(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m torch_impl demo [--out DIR] [--data DIR] [--device DEV] [--quiet]``."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_impl demo",
        description="Synthetic data -> StreamingCLAM training -> test evaluation -> attention heatmaps, "
                    "in a few minutes on a CPU.",
    )
    parser.add_argument("--out", default="demo_run", help="output folder (default: demo_run)")
    parser.add_argument("--data", default=None, help="data set folder (default: OUT/data, synthesised if empty)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(args.out, args.data, device=args.device, progress=not args.quiet)
    return 0
