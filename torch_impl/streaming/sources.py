"""Where the streaming engine's tiles come from: a tensor, or a lazy source read on demand.

A *lazy source* is any object with ``.shape == (C, H, W)`` and either
``.read(y, x, h, w) -> array (C, h, w)`` or NumPy-style slicing ``source[:, y0:y1, x0:x1]``
(a memory map, a zarr array, a whole-slide reader). Its tiles are read on demand, the next
one in a background thread while the current one computes (:func:`prefetched`), pinned
when a GPU is present so that the copy to it can overlap compute, and normalised on the
device (:func:`to_model_input`), so host memory is O(tile), not O(image).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from reference.tiling import Tile

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LazySource", "TensorSource", "as_source", "prefetched", "to_model_input"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(
    pixels: torch.Tensor,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pixels (..., C, h, w) to network input: uint8 scaled to [0, 1], then (x - mean) / std.

    Floating-point pixels are taken as already in [0, 1]. ``mean``/``std`` of None skip the
    normalisation. Runs on whatever device ``pixels`` is on (the streaming engine calls it per
    tile on the GPU).
    """
    x = pixels.to(dtype)
    if pixels.dtype == torch.uint8:
        x = x / 255.0
    if mean is not None and std is not None:
        shape = (-1, 1, 1)  # per channel, broadcast over (h, w)
        x = (x - torch.as_tensor(mean, dtype=dtype, device=x.device).view(shape)) / torch.as_tensor(
            std, dtype=dtype, device=x.device
        ).view(shape)
    return x


class TensorSource:
    """Tiles of an (N, C, H, W) tensor: views, used as given (no normalisation)."""

    lazy = False

    def __init__(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        self.x = x
        self.spatial = tuple(x.shape[-2:])

    def read(self, tile: Tile) -> torch.Tensor:
        """(N, C, h, w) view of the tile's input region."""
        return self.x[(..., *tile.input_slices)]


class LazySource:
    """Tiles read on demand from an object with ``.shape == (C, H, W)``."""

    lazy = True

    def __init__(self, source: Any):
        shape = tuple(getattr(source, "shape", ()))
        if len(shape) != 3:
            raise ValueError(
                f"a lazy input needs .shape == (C, H, W), got {shape!r} from {type(source).__name__}"
            )
        if not (hasattr(source, "read") or hasattr(source, "__getitem__")):
            raise ValueError(f"{type(source).__name__} has neither .read(y, x, h, w) nor slicing")
        self.source = source
        self.spatial = shape[1:]

    def read(self, tile: Tile) -> torch.Tensor:
        """(1, C, h, w) host tensor of the tile's input region, pinned when a GPU is present."""
        rows, cols = tile.input_slices
        if hasattr(self.source, "read"):
            region = self.source.read(rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)
        else:
            region = self.source[:, rows, cols]
        region = torch.from_numpy(np.ascontiguousarray(region))[None]  # (1, C, h, w)
        if torch.cuda.is_available():
            region = region.pin_memory()  # lets the copy to the GPU overlap compute
        return region


def as_source(x: torch.Tensor | Any) -> TensorSource | LazySource:
    """A tensor (N, C, H, W) becomes a :class:`TensorSource`, anything else a :class:`LazySource`."""
    return TensorSource(x) if isinstance(x, torch.Tensor) else LazySource(x)


def prefetched(source: TensorSource | LazySource, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, torch.Tensor]]:
    """Yield (tile, pixels) in order; a lazy source reads the next tile in the background."""
    if not source.lazy:
        for tile in tiles:
            yield tile, source.read(tile)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(source.read, tiles[0])
        for i, tile in enumerate(tiles):
            pixels = pending.result()
            if i + 1 < len(tiles):
                pending = pool.submit(source.read, tiles[i + 1])
            yield tile, pixels
