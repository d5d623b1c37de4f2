"""Shrinking a slide level to the working resolution: PIL's box filter, and a fast exact twin.

`Slide` serves an mpp that no pyramid level matches by shrinking the next finer level by
f = mpp / level_mpp with PIL's BOX filter, given the fractional footprint as a `box`:

    output pixel j (per axis) = mean of the input pixels whose centres lie in its window
    (center_j - f/2, center_j + f/2], center_j = in0 + (j + 1/2) f

computed separably, columns first then rows, each pass rounded half up to 8 bits.

`shrink_rgbx` computes that when 1 <= f <= 2 on both axes (the usual case: with levels 2x
apart, the next finer level is less than 2x finer): every window then holds one or two input
pixels, and the rounded mean of two bytes, (a + b + 1) >> 1, is one SWAR expression on whole
RGBX pixels packed in uint32 (no carries between the bytes). The windows come from
`pil_box_windows`, which repeats PIL's own floating-point arithmetic, so they are PIL's even
where its single-precision box places them a hair off their exact position. The work runs in
bands of output rows that stay in the CPU cache, over a thread pool (NumPy releases the GIL).
Other factors use PIL itself (`shrink_pil`), per channel and band.

Bound against PIL: 1 grey level. Pillow's reference C code (and `shrink_rgbx`) rounds the
column pass, then the row pass; the installed Pillow's SIMD resampler sometimes rounds them
in the other order. Every two-pass round-half-up of a window mean m lies in {floor(m),
floor(m) + 1}, so the two differ by at most 1 (in practice they agree on large regions and
differ on a few pixels of some regions only a few pixels wide).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .tiff_reader import ThreadPool, chunks

#: Bytes of one packed (rows, width) uint32 temporary of a `shrink_rgbx` band: a band's input
#: rows and its four temporaries then stay in a 1-2 MiB L2 cache (measured on a 4096-wide
#: output: 8-10 ns per output pixel at 4-16 rows, 14 at 32, 19 at 64).
_RGBX_BAND_BYTES = 1 << 17

#: Output rows per task of `shrink_pil`: fixed, so that the pixels do not depend on the
#: number of threads; large enough that PIL's per-call set-up stays negligible.
_PIL_BAND = 256

_HIGH_BITS = np.uint32(0xFEFEFEFE)  # each byte without its lowest bit
_ONE = np.uint32(1)


def pil_box_windows(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, count): the input pixels [start_j, start_j + count_j) PIL's BOX filter averages.

    Repeats Pillow's `precompute_coeffs` (libImaging/Resample.c) for one axis: box
    coordinates in single precision, centre and window in double precision, window bounds
    truncated to int, box filter 1 on (-1/2, 1/2]. Returns two (out_size,) int64 arrays.
    """
    f0, f1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(f1 - f0)) / out_size  # (double)(in1 - in0) / outSize
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    ss = 1.0 / filterscale
    center = float(f0) + (np.arange(out_size) + 0.5) * scale  # (out_size,) float64
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    ksize = int(math.ceil(support)) * 2 + 1
    t = np.arange(ksize)[None, :]  # tap index within the window
    arg = ((t + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss
    inside = (t < xmax[:, None]) & (arg > -0.5) & (arg <= 0.5)  # (out_size, ksize)
    count = inside.sum(axis=1)
    start = xmin + np.argmax(inside, axis=1)
    return start, count


def _avg_up(a: np.ndarray, b: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Byte-wise (a + b + 1) >> 1 of packed uint32 arrays: (a | b) - (((a ^ b) & 0xFE..) >> 1)."""
    np.bitwise_xor(a, b, out=tmp)
    np.bitwise_and(tmp, _HIGH_BITS, out=tmp)
    np.right_shift(tmp, _ONE, out=tmp)
    np.bitwise_or(a, b, out=out)
    return np.subtract(out, tmp, out=out)


def shrink_rgbx(src: np.ndarray, box: tuple[float, float, float, float], out: np.ndarray, pool: ThreadPool) -> bool:
    """PIL's BOX resize of `src` to `out` (to 1 grey level) when windows have 1 or 2 pixels.

    Args:
        src: (H_in, W_in, 4) uint8 RGBX (the 4th byte is ignored), C-contiguous.
        box: (x0, y0, x1, y1) in `src` pixels, as for `PIL.Image.resize`.
        out: (3, h, w) uint8 to fill (any strides).
        pool: threads for the bands of output rows.

    Returns:
        False, touching nothing, if some window holds 0 or more than 2 pixels (factor
        outside [1, 2]); the caller then uses `shrink_pil`.
    """
    _, h, w = out.shape
    H_in, W_in = src.shape[:2]
    x_start, x_count = pil_box_windows(W_in, box[0], box[2], w)
    y_start, y_count = pil_box_windows(H_in, box[1], box[3], h)
    if not (np.isin(x_count, (1, 2)).all() and np.isin(y_count, (1, 2)).all()):
        return False
    packed = src.view(np.uint32)[..., 0]  # (H_in, W_in), one RGBX pixel per element
    x_first, x_last = x_start, x_start + x_count - 1  # a window's two pixels (or one, twice)

    def band(rows: tuple[int, int]) -> None:
        r0, r1 = rows
        lo, hi = int(y_start[r0]), int(y_start[r1 - 1] + y_count[r1 - 1])  # input rows used
        block = packed[lo:hi]
        cols = _avg_up(
            np.take(block, x_first, axis=1),
            np.take(block, x_last, axis=1),
            np.empty((hi - lo, w), np.uint32),
            np.empty((hi - lo, w), np.uint32),
        )
        first, last = y_start[r0:r1] - lo, y_start[r0:r1] + y_count[r0:r1] - 1 - lo
        rows_ = _avg_up(cols[first], cols[last], np.empty((r1 - r0, w), np.uint32), np.empty((r1 - r0, w), np.uint32))
        out[:, r0:r1] = rows_.view(np.uint8).reshape(r1 - r0, w, 4)[..., :3].transpose(2, 0, 1)

    step = max(4, _RGBX_BAND_BYTES // (4 * w))  # output rows per band
    bands = [(r, min(r + step, h)) for r in range(0, h, step)]
    pool.map(lambda run: [band(b) for b in run], chunks(bands, pool.threads * 4))
    return True


def shrink_pil(
    src: np.ndarray,
    origin: tuple[int, int],
    region: tuple[int, int, int, int],
    factors: tuple[float, float],
    out: np.ndarray,
    pool: ThreadPool,
) -> None:
    """PIL's BOX resize of a (3, H_in, W_in) uint8 level patch into `out` (3, h, w), in bands.

    Args:
        src: level pixels [iy0, iy0 + H_in) x [ix0, ix0 + W_in), `origin` = (iy0, ix0).
        region: (y, x, h, w) of the output grid; output pixel (i, j) has the footprint
            [(y+i) fy, (y+i+1) fy) x [(x+j) fx, (x+j+1) fx) in level pixels.
        factors: (fy, fx).
        out: (3, h, w) uint8 to fill.
        pool: threads for the (channel, band of output rows) tasks; PIL releases the GIL.

    Each task hands PIL its band's rows and box, computed as a read of that band alone
    would: a region of at most `_PIL_BAND` rows gets exactly what one PIL call on the whole
    patch gives; taller ones agree with it to PIL's rounding. PIL's 'L' and 'RGB' resizes
    round alike.
    """
    (iy0, ix0), (y, x, h, w), (fy, fx) = origin, region, factors
    bx0, bx1 = x * fx - ix0, (x + w) * fx - ix0  # footprint columns in `src` pixels

    def resize(task: tuple[int, int, int]) -> None:
        c, r0, r1 = task
        by0, by1 = (y + r0) * fy, (y + r1) * fy  # the band's footprint rows, level pixels
        j0, j1 = int(math.floor(by0)), int(math.ceil(by1 - 1e-9))
        band = Image.fromarray(src[c, j0 - iy0 : j1 - iy0])  # 'L', shares memory
        box = (bx0, by0 - j0, bx1, by1 - j0)
        out[c, r0:r1] = np.asarray(band.resize((w, r1 - r0), Image.Resampling.BOX, box=box))

    tasks = [(c, r, min(r + _PIL_BAND, h)) for r in range(0, h, _PIL_BAND) for c in range(3)]
    pool.map(lambda run: [resize(t) for t in run], chunks(tasks, pool.threads))
