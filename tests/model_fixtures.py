"""The tiny models, checkpoints and training configurations that several test modules share.

``tiny_model`` and ``save_tiny_checkpoint`` give the 2-channel-wide StreamingCLAM that
inference, evaluation and the command line are tested with (at ``MPP`` um/px on the tiny
synthetic CAMELYON16); ``cpu_options`` are the command-line options that run such a
checkpoint on the CPU; ``tiny_train_config`` is the smallest training run worth checking.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from torch_impl.models.streaming_clam import ModelConfig, StreamingCLAM, build_model
from torch_impl.pipeline.config import TrainConfig

MPP = 0.5  # working resolution of the tests: the 1024-px slides become 512 px
CONFIG = ModelConfig(width=2, tile_size=1024, hidden_dim=8, attention_dim=4, pool="max", pool_size=2)


def tiny_model() -> StreamingCLAM:
    """``build_model(CONFIG)`` from torch seed 0, in eval mode, classifier weights scaled by 0.01.

    Seeds the global torch RNG (the weights' initialisation draws from it).
    """
    torch.manual_seed(0)
    net = build_model(CONFIG)
    with torch.no_grad():  # random trunk features are huge: shrink the logits off saturation
        net.head.classifiers.weight.mul_(0.01)
    return net.eval()


def save_tiny_checkpoint(path: Path, model: StreamingCLAM) -> Path:
    """Save ``model`` (built from ``CONFIG``) as a checkpoint at ``path`` that says to read
    slides at ``MPP`` um/px (longest side at most 4096 px); returns ``path``."""
    torch.save(
        {
            "model": model.state_dict(),
            "model_config": dataclasses.asdict(CONFIG),
            "train_config": {"mpp": MPP, "max_size": 4096},
        },
        path,
    )
    return path


def cpu_options(checkpoint: Path, out: Path) -> list[str]:
    """Command-line options that run ``checkpoint`` on the CPU and write to ``out``."""
    return ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]


def tiny_train_config(data: Path, out: Path, *, width: int, **changes) -> TrainConfig:
    """Train a ``width``-wide ResNet-34 (16-dim head, no pooling) on ``data`` at 1 um/px for
    1 epoch (head only), a third of the slides for validation; ``changes`` replace fields."""
    base = TrainConfig(
        data_dir=str(data),
        out_dir=str(out),
        model=ModelConfig(width=width, hidden_dim=16, attention_dim=8, pool=None, tile_size=1024),
        mpp=1.0,
        val_fraction=0.34,
        epochs=1,
        head_only_epochs=1,
        lr=3e-3,
        progress=False,
    )
    return dataclasses.replace(base, **changes)
