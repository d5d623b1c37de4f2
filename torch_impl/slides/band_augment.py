"""One slide's augmentation written into interleaved pixel rows: how a crop cache stores the augmented crop.

:func:`augment_into` takes a block of the *original* image, (3, h, w) uint8, and writes the
same block *augmented* (:class:`~torch_impl.slides.augment.AugmentParams`: flips, quarter
turns, colour jitter) into ``out``, (h', w', 3) uint8 rows of interleaved memory: a band of
a :class:`~torch_impl.slides.crop_cache.CropCache`'s buffer, or one tile. Written this way
once per crop pixel, as the cache is filled, every tile read later is a plain slice of the
buffer: it needs neither a flip nor a turn (a turned tile is several times slower to convert
to network input than an unturned one), nor the jitter again.

Geometry. The eight flips and turns are each one :class:`Dihedral`: flip the original's rows
and/or columns, then transpose or not. (``AugmentedView`` composes the same map from
``flip_v``, ``flip_h`` and ``k`` quarter turns; :meth:`Dihedral.of` reads it off by applying
those steps to a 2 x 3 probe.)

Two ways to write, the same bytes (``tests/test_band_augment.py``, against ``AugmentedView``):

* on the CPU (little-endian machines), by *colour codes*: each pixel's three bytes read as
  one little-endian word (r + 256 g + 65536 b: four bytes from the pixel's first, the fourth,
  the next pixel's red, masked off; no channel is split out), the flips and the transpose
  applied to the (h, w) int32 codes (a quarter of the memory traffic of moving bytes one
  channel at a time), the jitter as one gather in the slide's colour table
  (:meth:`~torch_impl.slides.device_jitter.ColourJitter.entries`), and the words' first
  three bytes copied into ``out``. In chunks of about :data:`CHUNK_PIXELS` output pixels, so
  that the temporaries stay in the CPU's cache;
* anywhere else (a GPU; or a jitter without a table, for small crops), by torch operations on
  the device: the block moved there, jittered
  (:class:`~torch_impl.slides.device_jitter.ColourJitter`), flipped and transposed, copied into ``out``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..streaming.sources import host_tensor, to_device
from .augment import AugmentParams, _apply_step, _steps
from .device_jitter import ColourJitter

__all__ = ["CHUNK_PIXELS", "Dihedral", "augment_into"]

#: Output pixels per chunk of the CPU path: its int32 temporaries (codes, turned codes,
#: table entries: 1 MiB each) stay in a core's cache.
CHUNK_PIXELS = 2**18

_LITTLE_ENDIAN = sys.byteorder == "little"
_LOW_24_BITS = 0xFFFFFF


@dataclass(frozen=True)
class Dihedral:
    """A flip and turn of the pixel grid: ``augmented = transpose^t(flip(original))``.

    Attributes:
        flip_rows: reverse the original's rows (upside down).
        flip_cols: reverse the original's columns (mirror).
        transpose: then swap rows and columns (an odd number of quarter turns).
    """

    flip_rows: bool = False
    flip_cols: bool = False
    transpose: bool = False

    @classmethod
    def of(cls, params: AugmentParams) -> Dihedral:
        """The grid map of ``params`` (its colour jitter aside), as ``AugmentedView`` applies it."""
        probe = np.arange(6).reshape(2, 3)  # probe[r, c] = 3 r + c
        for step in _steps(params):
            probe = _apply_step(step, probe)
        transpose = probe.shape == (3, 2)
        corner = int((probe.T if transpose else probe)[0, 0])  # the original pixel that lands top left, unturned
        return cls(flip_rows=corner >= 3, flip_cols=corner % 3 == 2, transpose=transpose)

    @property
    def is_identity(self) -> bool:
        return not (self.flip_rows or self.flip_cols or self.transpose)

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """(h', w') of an augmented block whose original is h x w."""
        return (w, h) if self.transpose else (h, w)


def augment_into(
    block: np.ndarray | torch.Tensor, geometry: Dihedral, jitter: ColourJitter | None, out: torch.Tensor
) -> torch.Tensor:
    """Write the augmented ``block`` into ``out`` and return ``out`` (module docstring).

    Args:
        block: (3, h, w) uint8 pixels of the original image, any strides (a reader's view of
            interleaved memory, a planar array), on the host or on ``out``'s device.
        geometry: the flips and turn.
        jitter: the slide's colour jitter, or None for none. Without a table
            (``table=False``: small crops) the torch path computes it by arithmetic.
        out: (h', w', 3) uint8, C-contiguous, h' x w' = ``geometry.shape(h, w)``.

    Raises:
        ValueError: shapes or dtypes that do not fit.
    """
    if tuple(block.shape[:1]) != (3,) or len(block.shape) != 3:
        raise ValueError(f"augment_into takes a (3, h, w) block, got shape {tuple(block.shape)}")
    h, w = (int(n) for n in block.shape[1:])
    want = (*geometry.shape(h, w), 3)
    if tuple(out.shape) != want or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"out must be a C-contiguous uint8 tensor of shape {want}, got {out.dtype} {tuple(out.shape)}")
    on_host = not isinstance(block, torch.Tensor) or block.device.type == "cpu"
    by_table = jitter is None or (jitter.use_table and jitter.device.type == "cpu")
    if out.device.type == "cpu" and on_host and _LITTLE_ENDIAN and by_table:
        return augment_by_codes(block, geometry, jitter, out)
    return augment_by_torch(block, geometry, jitter, out)


# ----------------------------------------------------------------------------- the CPU path
def augment_by_codes(
    block: np.ndarray | torch.Tensor, geometry: Dihedral, jitter: ColourJitter | None, out: torch.Tensor
) -> torch.Tensor:
    """:func:`augment_into` on the CPU by colour codes (module docstring); a little-endian
    machine, ``block`` and ``out`` on the host."""
    if geometry.is_identity and jitter is None:  # one copy, whatever the block's strides
        return out.copy_(host_tensor(np.asarray(block)).permute(1, 2, 0))
    pixels = _interleaved(block)  # (h, w, 3)
    if jitter is None and not geometry.transpose and not geometry.flip_cols:
        # upside down only: whole pixel rows in reverse order
        np.copyto(out.numpy(), pixels[::-1] if geometry.flip_rows else pixels)
        return out
    out_h, out_w = out.shape[:2]
    # chunks of whole output rows; turned, square blocks (a row of the output is a column of the
    # original: reading a few columns down a tall original would touch a new cache line per pixel)
    cols = int(math.isqrt(CHUNK_PIXELS)) if geometry.transpose else out_w
    rows = max(1, CHUNK_PIXELS // max(min(cols, out_w), 1))
    for i0 in range(0, out_h, rows):
        i1 = min(i0 + rows, out_h)
        for j0 in range(0, out_w, max(cols, 1)):
            j1 = min(j0 + cols, out_w)
            part = _original_part(pixels, geometry, i0, i1, j0, j1)
            codes = _codes(part, geometry.flip_rows, geometry.flip_cols)
            if geometry.transpose:
                codes = codes.T.contiguous()  # torch's transposing copy: ~3x faster than NumPy's here
            words = jitter.entries(codes.view(-1)) if jitter is not None else codes.view(-1)  # (i1 - i0) (j1 - j0)
            out[i0:i1, j0:j1].copy_(words.view(torch.uint8).view(i1 - i0, j1 - j0, 4)[..., :3])
    return out


def _interleaved(block: np.ndarray | torch.Tensor) -> np.ndarray:
    """(3, h, w) -> (h, w, 3) uint8 whose pixels' channels are adjacent: a view of interleaved
    memory as it is (a reader's output), else an interleaved copy (planar arrays)."""
    a = block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
    if a.dtype != np.uint8:
        raise ValueError(f"augment_into takes uint8 pixels, got {a.dtype}")
    pixels = a.transpose(1, 2, 0)
    h, w = pixels.shape[:2]
    if pixels.strides[1:] != (3, 1) or (h > 1 and pixels.strides[0] < 3 * w):
        # C order: also rows that overlap or repeat (a broadcast row, stride 0), where a word
        # could reach past the block's memory (`_codes`)
        pixels = pixels.copy()
    return pixels


def _original_part(pixels: np.ndarray, geometry: Dihedral, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
    """The (., ., 3) view of the original that rows [i0, i1) x columns [j0, j1) of the augmented
    block come from: the same rows and columns of the original, or, turned, the same columns and
    rows; each counted from the end when flipped."""
    h, w = pixels.shape[:2]
    rows, cols = ((j0, j1), (i0, i1)) if geometry.transpose else ((i0, i1), (j0, j1))
    r0, r1 = (h - rows[1], h - rows[0]) if geometry.flip_rows else rows
    c0, c1 = (w - cols[1], w - cols[0]) if geometry.flip_cols else cols
    return pixels[r0:r1, c0:c1]


class _Words:
    """An ``__array_interface__`` holder: lets NumPy read 4-byte words at 3-byte steps."""

    def __init__(self, interface: dict, base: np.ndarray) -> None:
        self.__array_interface__ = interface
        self.base = base  # keeps the memory alive


def _codes(pixels: np.ndarray, flip_rows: bool = False, flip_cols: bool = False) -> torch.Tensor:
    """(h, w, 3) uint8 with adjacent channels and pixels and rows that do not overlap (strides
    (>= 3 w, 3, 1), as `_interleaved` makes them) -> (h, w) int32
    colour codes r + 256 g + 65536 b (``device_jitter``'s), read as masked 4-byte words and
    written flipped as asked (a C-contiguous tensor: the flips cost nothing extra).

    A word's fourth byte is the next pixel's red: in the block's memory for every pixel but the
    last one (with rows apart by at least a row's bytes, the byte after a row's last pixel lies
    at or before the next row's last byte), which is done alone."""
    h, w = pixels.shape[:2]
    codes = np.empty((h, w), dtype=np.uint32)
    if h * w:
        target = codes[::-1] if flip_rows else codes  # written through a flipped view
        target = target[:, ::-1] if flip_cols else target
        interface = dict(pixels.__array_interface__, shape=(h, w), typestr="<u4", strides=(pixels.strides[0], 3))
        interface.pop("descr", None)
        words = np.asarray(_Words(interface, pixels))  # word (i, j) = pixel (i, j)'s bytes + the next byte
        # the block's last pixel may end its memory: its word would read one byte past it
        np.bitwise_and(words[:-1], _LOW_24_BITS, out=target[:-1])
        np.bitwise_and(words[-1, :-1], _LOW_24_BITS, out=target[-1, :-1])
        r, g, b = (int(v) for v in pixels[-1, -1])
        target[-1, -1] = r | g << 8 | b << 16
    return torch.from_numpy(codes.view(np.int32))


# ----------------------------------------------------------------------------- the torch path
def augment_by_torch(
    block: np.ndarray | torch.Tensor, geometry: Dihedral, jitter: ColourJitter | None, out: torch.Tensor
) -> torch.Tensor:
    """:func:`augment_into` by torch operations on ``out``'s device (module docstring)."""
    if not isinstance(block, torch.Tensor):
        block = host_tensor(np.asarray(block))  # a reader's interleaved view: no copy
    if block.dtype != torch.uint8:
        raise ValueError(f"augment_into takes uint8 pixels, got {block.dtype}")
    pixels = to_device(block, out.device)
    if jitter is not None:
        pixels = jitter(pixels)  # pointwise: the same before or after the flips and the turn
    flips = [d for d, f in ((-2, geometry.flip_rows), (-1, geometry.flip_cols)) if f]
    if flips:
        pixels = torch.flip(pixels, dims=flips)
    if geometry.transpose:
        pixels = pixels.transpose(-2, -1)
    out.copy_(pixels.permute(1, 2, 0))
    return out
