"""Slide augmentation on the device: the view of :mod:`torch_impl.slides.augment`, tile by tile in torch.

:class:`DeviceAugmentedView` answers a tile read exactly as
:class:`~torch_impl.slides.augment.AugmentedView` does (the same ``source_region`` maps the
augmented region back to the original), but transforms the small original block with the
crop cache's writer, :func:`~torch_impl.slides.band_augment.augment_into`, into a new tile on
the device: on a GPU moved there first, then jittered (a
:class:`~torch_impl.slides.device_jitter.ColourJitter`, through the slide's colour table or by
arithmetic: see ``colour_table``), flipped and turned by torch operations; on the CPU by colour
codes (or by torch operations for a jitter without table). The jitter is pointwise, so it
commutes with the flips and turns, and per tile equals whole image. The tile comes back as a
(3, h, w) view of interleaved memory, as a reader's. On a GPU the host only decodes (or nothing, when the block comes from a
:class:`~torch_impl.slides.crop_cache.CropCache` on the device); on the CPU the result equals
``AugmentedView.read`` bit for bit, either way (``tests/test_device_view.py``).

Training opens its crop with :func:`augmented_crop`, a
:class:`~torch_impl.slides.crop_cache.CropCache` that holds the crop *augmented*: each band is
flipped, turned and colour-jittered once, as the cache is filled, and every tile read is a plain
slice of it. A step reads its tiles (with halos, forward and backward) 2.3-4.2 times the crop's
area, so this transforms each pixel once instead of that often, turned tiles cost no more to
convert to network input than unturned ones, and on the host it runs in the cache's filling
thread, beside the trunk's compute. Without a buffer (mode ``"none"``) each tile is augmented as
it is read. The tiles are the same bytes either way, and the same as this view's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from ..streaming.sources import host_tensor, to_device
from .augment import AugmentedView, AugmentParams
from .band_augment import Dihedral, augment_into
from .crop_cache import CropCache
from .device_jitter import TABLE_MIN_PIXELS, ColourJitter, use_table
from .slide import ImageSource, check_region, read_clipped

__all__ = ["TABLE_MIN_PIXELS", "DeviceAugmentedView", "augmented_crop"]


class DeviceAugmentedView(AugmentedView):
    """An :class:`~torch_impl.slides.augment.AugmentedView` whose ``read`` computes on ``device``.

    Args:
        source: lazy (3, H, W) uint8 source with ``.read(y, x, h, w)`` returning a NumPy array
            or a tensor (a :class:`~torch_impl.slides.crop_cache.CropCache` returns slices of
            its buffer, already on the device when it holds the crop there).
        params: the augmentation (or ``flip_v``, ``flip_h``, ``rot90_k``, ``hsv_shift`` keywords).
        device: where the transform runs and the tiles end up (a CUDA device without an index
            means the current one, fixed when the view is made: reads run in the engine's
            reading threads, whose current device may differ).
        colour_table: how the colour jitter is computed (the same bytes every way): True,
            through a table of the slide's jittered colours (each colour computed once);
            False, by arithmetic on every pixel read; None (default): the table for views of
            at least :data:`TABLE_MIN_PIXELS` pixels.

    ``shape``, ``dtype``, ``source_region`` and ``feature_mask`` are ``AugmentedView``'s;
    ``read`` returns a (3, h, w) uint8 tensor on ``device`` (possibly a view of a device
    cache's buffer when the transform is the identity; do not write into it).
    """

    def __init__(
        self,
        source: ImageSource,
        params: AugmentParams | None = None,
        device: torch.device | str = "cpu",
        colour_table: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, params, **kwargs)
        if np.dtype(source.dtype) != np.uint8:
            raise TypeError(
                f"DeviceAugmentedView needs a uint8 source (the colour jitter works on 0-255 RGB), "
                f"but {source!r} has dtype {source.dtype}"
            )
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._geometry = Dihedral.of(self.params)
        self.jitter: ColourJitter | None = None  # the colour jitter, None without one
        if any(self.params.hsv_shift):
            _, H, W = self.shape
            self.jitter = ColourJitter(self.params.hsv_shift, device, use_table(H * W, colour_table))

    def read(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        """(3, h, w) uint8 on ``device``: rows [y, y+h), columns [x, x+w) of the augmented image; white outside."""
        y, x, h, w = check_region(y, x, h, w)
        C, H, W = self.shape
        with (
            torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext(),
            record_function("slides.augment"),
        ):
            return read_clipped(
                y,
                x,
                h,
                w,
                H,
                W,
                self._read_inside,
                lambda: torch.full((C, h, w), 255, dtype=torch.uint8, device=self.device),
            )

    def _read_inside(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        """(3, h, w) on the device for a region inside the augmented image: the original block,
        augmented by the crop cache's own writer (``band_augment.augment_into``) into a new tile."""
        block = self.source.read(*self.source_region(y, x, h, w))  # (3, ., .) original frame
        if not isinstance(block, torch.Tensor):
            block = host_tensor(np.asarray(block))  # shares a reader's interleaved view: no copy
        if self.params.is_identity:
            return to_device(block, self.device)
        out = torch.empty((h, w, 3), dtype=torch.uint8, device=self.device)
        return augment_into(block, self._geometry, self.jitter, out).permute(2, 0, 1)  # (3, h, w), interleaved

    def __repr__(self) -> str:
        return f"DeviceAugmentedView({self.source!r}, {self.params}, device={self.device})"


@contextmanager
def augmented_crop(
    source: ImageSource,
    params: AugmentParams,
    device: torch.device | str = "cpu",
    mode: str = "auto",
    **cache_options: Any,
) -> Iterator[CropCache]:
    """``source`` decoded once and seen through ``params``, as training reads a crop (module docstring).

    Opens and yields a :class:`~torch_impl.slides.crop_cache.CropCache` of ``source`` seen
    through ``params`` (``mode``, ``device`` and ``cache_options``: :meth:`CropCache.open`'s):
    its reads equal ``AugmentedView(source, params).read`` bit for bit on the CPU, in every
    mode. The cache is closed on leaving the block.

    Raises:
        ValueError: as :meth:`CropCache.open` does.
    """
    with CropCache.open(source, mode, device, augment=params, **cache_options) as crop:
        yield crop
