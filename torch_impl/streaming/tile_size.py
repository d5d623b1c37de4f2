"""Tile sizes that fit a memory budget, estimated from the trunk's activations per input pixel."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from reference.tiling import best_tile_size

from .geometry import module_geometry

__all__ = ["suggest_tile_sizes"]


def suggest_tile_sizes(
    module: nn.Module,
    memory_bytes: int | None = None,
    in_channels: int = 3,
    bytes_per_value: int = 2,
    device: torch.device | str | None = None,
    image_size: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Forward and backward tile sizes that fit a memory budget (an estimate, in pixels).

    The activations per input pixel are read off one forward on the ``meta`` device (no
    memory used): the no-grad forward holds about two consecutive activations at a time
    (the largest layer input plus its output), the recompute + backward holds every
    activation once and its gradient (counted twice). ``memory_bytes`` defaults to 70% of
    the free memory of the CUDA device the module lives on. With ``image_size`` (H, W), each
    size is lowered to the tile that recomputes least on that image
    (:func:`reference.tiling.best_tile_size`: overhead is not monotone in the tile size).

    Returns:
        (forward_tile, backward_tile), square tile sides in pixels.
    """
    if memory_bytes is None:
        dev = torch.device(device) if device is not None else next(module.parameters()).device
        if dev.type != "cuda":
            raise ValueError("memory_bytes is required off CUDA (no free-memory query there)")
        free, _ = torch.cuda.mem_get_info(dev)
        memory_bytes = int(0.7 * free)
    side = 256
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
        for m in module.modules()
        if not list(m.children())
    ]
    try:
        meta = torch.empty(1, in_channels, side, side, device="meta")
        with torch.no_grad():
            _meta_forward(module, meta)
    finally:
        for h in hooks:
            h.remove()
    per_pixel = [s / side**2 for s in sizes] or [float(in_channels)]
    forward_bytes = 2 * max(per_pixel) * bytes_per_value
    backward_bytes = 2 * sum(per_pixel) * bytes_per_value
    tiles = int((memory_bytes / forward_bytes) ** 0.5), int((memory_bytes / backward_bytes) ** 0.5)
    if image_size is None:
        return tiles
    geometry = module_geometry(module)[0 if image_size[0] >= image_size[1] else 1]
    n = max(image_size)
    return best_tile_size(geometry, n, min(tiles[0], n)), best_tile_size(geometry, n, min(tiles[1], n))


def _meta_forward(module: nn.Module, x: torch.Tensor) -> None:
    """Run ``module`` on the meta device without touching the caller's parameters."""
    copy.deepcopy(module).to("meta")(x)
