"""A data-dependent start for a randomly initialised trunk: frozen batch-norm statistics
that standardise each batch norm's input over a few training crops (LSUV-style)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..models.streaming_clam import StreamingCLAM
from ..slides import SlideRecord
from ..streaming import to_model_input
from .config import TrainConfig
from .predict import open_slide
from .runtime import BadSlideError, PipelineError

__all__ = ["calibrate_batchnorm", "calibration_batch"]

logger = logging.getLogger(__name__)


def calibrate_batchnorm(module: torch.nn.Module, batch: torch.Tensor) -> int:
    """Data-dependent start for a randomly initialised trunk: set each batch norm's statistics
    so that its input is standardised over ``batch``.

    A random ResNet whose batch norms are frozen at (mean 0, var 1) is not normalised at all:
    activations grow through the 16 residual blocks (feature magnitudes ~100 at the output),
    the head's softmax saturates and training crawls. In one forward pass over ``batch``
    (N, 3, h, w), a pre-hook on every ``nn.BatchNorm2d`` sets ``running_mean`` and
    ``running_var`` to the per-channel mean and (biased) variance of its input before it is
    applied, so every later layer already sees normalised inputs (the idea of LSUV
    initialisation, Mishkin & Matas 2016, applied to the frozen statistics).

    Returns the number of batch norms set. Affine weights and biases are left alone.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def hook(bn: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].double()  # (N, C, h, w)
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp_min(bn.eps))

    handles = [bn.register_forward_pre_hook(hook) for bn in norms]
    try:
        with torch.no_grad():
            module(batch)
    finally:
        for h in handles:
            h.remove()
    return len(norms)


def calibration_batch(
    model: StreamingCLAM,
    records: Sequence[SlideRecord],
    config: TrainConfig,
    device: torch.device,
    n_slides: int = 8,
    size: int = 256,
) -> torch.Tensor:
    """(N, 3, size, size) network input: the central ``size`` x ``size`` crop of the tissue of
    up to ``n_slides`` training slides (alternating classes, sorted ids), normalised like tiles."""
    by_label: dict[int, list[SlideRecord]] = {}
    for r in sorted(records, key=lambda r: r.slide_id):
        by_label.setdefault(r.label, []).append(r)
    longest = max((len(v) for v in by_label.values()), default=0)
    picked = [v[i] for i in range(longest) for v in by_label.values() if i < len(v)][:n_slides]  # round robin
    crops = []
    for record in picked:
        try:
            slide = open_slide(record.path, config.mpp, record.slide_id, max_size=config.max_size)
        except BadSlideError as e:
            logger.warning("batch-norm calibration: skipping %s", e)
            continue
        try:
            _, h, w = slide.source.shape
            crops.append(slide.source.read((h - size) // 2, (w - size) // 2, size, size))  # (3, size, size) uint8
        finally:
            slide.close()
    if not crops:
        raise PipelineError("batch-norm calibration: no training slide could be read")
    pixels = torch.from_numpy(np.stack(crops)).to(device)  # (N, 3, size, size) uint8
    dtype = next(model.trunk.module.parameters()).dtype
    return to_model_input(pixels, model.trunk.mean, model.trunk.std, dtype=dtype)
