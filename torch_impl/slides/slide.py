"""Lazy whole-slide image reading at a chosen resolution (micrometres per pixel).

A whole-slide image (WSI) is a pyramid: level 0 is the full scan (CAMELYON16: ~0.24 um/px,
up to ~100k x 200k pixels), each further level a downsampled copy (usually 2x per level).
The streaming engine never holds a slide in memory; it asks an *image source* for one tile
at a time. Every source in this project speaks the same small protocol (`ImageSource`):

    source.shape  -> (3, H, W)      channels first, pixels at the working resolution
    source.dtype  -> np.uint8
    source.read(y, x, h, w) -> (3, h, w) uint8 array of rows [y, y+h) and columns [x, x+w);
                               any part outside [0, H) x [0, W) is white (255)

The (3, h, w) result may have any strides: `Slide.read` returns a channels-first view of
interleaved (h, w, 3) memory (`tiff_reader.interleaved_chw`), which is how decoders write
pixels; consumers index it, or hand it to the streaming engine, whose uint8 -> float copy
makes the channel planes contiguous.

`Slide` implements it for any vendor format OpenSlide reads; for TIFF-family slides (generic
tiled pyramidal TIFF, Aperio SVS) it decodes the tiles itself, in threads, with the fast
reader of `tiff_reader.py` (same pixels, several times faster), and OpenSlide stays the
fallback for everything else. `RegionView` crops any source (e.g. to the tissue bounding
box); `ArrayImage` wraps an in-memory array (tests, tutorials).

Resolution convention: `mpp` is micrometres per pixel; a larger mpp is a coarser image.
`Slide(path, mpp=0.5)` picks the pyramid level whose mpp lies within 10% of 0.5 and serves
its pixels unchanged. If no level is that close, it reads the next finer level and shrinks
by the factor f = mpp / level_mpp > 1 with PIL's box filter: target pixel (i, j) is the mean
of the level pixels whose centres lie in its footprint [i f, (i+1) f) x [j f, (j+1) f)
(separable, each pass rounded to 8 bits). Because each target pixel
depends only on its own footprint, reading a tile gives the same pixels as reading a larger
region and cutting the tile out of it (to PIL's rounding, at most 1 grey level; PIL places
the footprint in single precision, so a level pixel whose centre lies within ~1e-4 px of a
footprint edge may go to either neighbour), which the streaming engine relies on.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import openslide

from .resample import shrink_pil, shrink_rgbx
from .tiff_reader import TiffPyramid, TileError, UnsupportedTiff, interleaved_chw, shared_pool

logger = logging.getLogger(__name__)

#: Relative tolerance when matching a pyramid level to the requested mpp: a level with
#: |level_mpp / mpp - 1| <= MPP_TOLERANCE is served as is (no resampling).
MPP_TOLERANCE = 0.1

#: Micrometres per unit of the TIFF ResolutionUnit tag, as OpenSlide spells the unit.
_UM_PER_RESOLUTION_UNIT = {"centimeter": 1e4, "inch": 25400.0}

#: Largest block (level pixels per side) read at once when building a thumbnail, so that
#: a thumbnail of a single-level gigapixel slide still never loads the whole slide.
_THUMBNAIL_BLOCK = 4096

#: OpenSlide vendors whose files the fast TIFF reader may serve (levels checked at open).
_TIFF_VENDORS = {"generic-tiff", "aperio"}

#: Backends `Slide` can use: "tiff" (tifffile + imagecodecs, threaded), "openslide".
BACKENDS = ("auto", "tiff", "openslide")


class SlideError(ValueError):
    """A slide file exists but cannot be used: corrupt, truncated, unsupported, no mpp."""


@runtime_checkable
class ImageSource(Protocol):
    """What the streaming engine reads tiles from (see the module docstring)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(3, H, W): channels, rows, columns at the working resolution."""
        ...

    @property
    def dtype(self) -> np.dtype:
        """Pixel type of `read`'s result (np.uint8 for slides)."""
        ...

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(3, h, w) pixels of rows [y, y+h), columns [x, x+w); outside the image is white."""
        ...


def check_region(y: int, x: int, h: int, w: int) -> tuple[int, int, int, int]:
    """Cast a region to Python ints and reject negative sizes loudly."""
    y, x, h, w = int(y), int(x), int(h), int(w)
    if h < 0 or w < 0:
        raise ValueError(f"region size must be >= 0, got h={h}, w={w}")
    return y, x, h, w


def read_clipped(y: int, x: int, h: int, w: int, H: int, W: int, reader, white):
    """The (C, h, w) region (y, x, h, w) of an (H, W) image that pixels outside are white in.

    ``reader(y0, x0, h0, w0)`` returns the (C, h0, w0) pixels of the part inside the image
    (called once, and not at all when the region misses the image); ``white()`` makes the
    (C, h, w) white canvas for the rest. A region inside the image is ``reader``'s block
    itself (no second copy). Works alike for NumPy arrays and torch tensors.
    """
    y0, y1 = max(y, 0), min(y + h, H)  # rows of the region inside the image
    x0, x1 = max(x, 0), min(x + w, W)
    if y1 <= y0 or x1 <= x0:
        return white()
    block = reader(y0, x0, y1 - y0, x1 - x0)
    if (y0, y1, x0, x1) == (y, y + h, x, x + w):
        return block
    out = white()
    out[:, y0 - y : y1 - y, x0 - x : x1 - x] = block
    return out


class ArrayImage:
    """An in-memory (3, H, W) uint8 array behind the `ImageSource` protocol.

    Handy for tests and tutorials: `read` pads with white exactly like `Slide.read`.
    """

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"ArrayImage wants a (C, H, W) array, got shape {array.shape}")
        self._array = array

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        y, x, h, w = check_region(y, x, h, w)
        C, H, W = self._array.shape
        return read_clipped(
            y,
            x,
            h,
            w,
            H,
            W,
            lambda y0, x0, h0, w0: self._array[:, y0 : y0 + h0, x0 : x0 + w0].copy(),  # never the array itself
            lambda: np.full((C, h, w), 255, dtype=self._array.dtype),
        )


class RegionView:
    """A crop [y0, y0+h) x [x0, x0+w) of any `ImageSource`, itself an `ImageSource`.

    Coordinates of `read` are relative to the crop's top-left corner. Pixels outside the
    crop are white even if the underlying source has content there, so a view behaves
    exactly like an image of shape (3, h, w). The crop may extend past the source's border;
    those pixels come back white from the source.
    """

    def __init__(self, source: ImageSource, y0: int, x0: int, h: int, w: int) -> None:
        y0, x0, h, w = check_region(y0, x0, h, w)
        if h == 0 or w == 0:
            raise ValueError(f"RegionView needs a non-empty region, got h={h}, w={w}")
        self.source = source
        self.y0, self.x0, self.h, self.w = y0, x0, h, w

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.source.shape[0], self.h, self.w)

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    @property
    def tile_rows(self) -> tuple[int, int] | None:
        """The source's `Slide.tile_rows` in the view's rows (None if the source has none)."""
        return self._shifted_grid("tile_rows", self.y0)

    @property
    def tile_cols(self) -> tuple[int, int] | None:
        """The source's `Slide.tile_cols` in the view's columns (None if the source has none)."""
        return self._shifted_grid("tile_cols", self.x0)

    def _shifted_grid(self, name: str, offset: int) -> tuple[int, int] | None:
        """The source's (period, phase) grid ``name``, seen from ``offset`` pixels further on."""
        grid = getattr(self.source, name, None)
        if grid is None:
            return None
        period, phase = grid
        return period, (phase - offset) % period

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        y, x, h, w = check_region(y, x, h, w)
        return read_clipped(
            y,
            x,
            h,
            w,
            self.h,
            self.w,
            lambda ya, xa, ha, wa: self.source.read(self.y0 + ya, self.x0 + xa, ha, wa),
            lambda: np.full((self.shape[0], h, w), 255, dtype=self.dtype),
        )

    def __repr__(self) -> str:
        return f"RegionView({self.source!r}, y0={self.y0}, x0={self.x0}, h={self.h}, w={self.w})"


def _mpp_from_properties(props: dict[str, str]) -> tuple[float, float] | None:
    """Level-0 (mpp_y, mpp_x) from OpenSlide properties, or None if the file does not say.

    First `openslide.mpp-x/y` (OpenSlide's own, vendor-aware value); then the TIFF tags
    XResolution/YResolution (pixels per unit) with ResolutionUnit (centimeter or inch):
    mpp = um_per_unit / pixels_per_unit.
    """
    try:
        return float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"])
    except (KeyError, ValueError):
        pass
    unit = props.get("tiff.ResolutionUnit", "").strip().lower()
    if unit not in _UM_PER_RESOLUTION_UNIT:
        return None
    try:
        x_res = float(props["tiff.XResolution"])
        y_res = float(props.get("tiff.YResolution", x_res))
    except (KeyError, ValueError):
        return None
    if x_res <= 0 or y_res <= 0:
        return None
    um = _UM_PER_RESOLUTION_UNIT[unit]
    return um / y_res, um / x_res


class Slide:
    """A whole-slide image served lazily at `mpp` micrometres per pixel (`ImageSource`).

    Args:
        path: slide file in any format OpenSlide reads (generic tiled TIFF, .svs, .ndpi,
            .mrxs, ...).
        mpp: working resolution in micrometres per pixel (0.5 = "20x"). A level within
            `tolerance` of it is used unchanged; otherwise the next finer level is shrunk
            with an area filter. Coarser than the finest level only: no upsampling.
        mpp_level0: level-0 resolution in um/px, for files that do not record it (it then
            overrides the file's value). One number, or (mpp_y, mpp_x).
        tolerance: relative mpp tolerance for using a level as is (default 10%).
        backend: who decodes pixels. "auto" (default): the fast TIFF reader
            (`tiff_reader.TiffPyramid`) for generic tiled TIFF and Aperio SVS files whose
            levels it decodes exactly, else OpenSlide. "tiff": the fast reader or a
            SlideError saying why not. "openslide": always OpenSlide.
        threads: threads that decode tiles and resample, per read; default all usable
            cores. 1 runs everything in the calling thread. Slides asking for the same
            number share one process-wide pool. Reads are thread-safe.

    Raises:
        FileNotFoundError: `path` does not exist.
        SlideError: unsupported, corrupt or truncated file (checked at open by reading the
            last tile of every level; a bad tile met later raises it too), or no recorded
            resolution and no `mpp_level0`.
        ValueError: `mpp` is finer than the slide's finest level.

    Attributes:
        path: the file.
        level: pyramid level the pixels come from.
        level_mpp: that level's um/px (mean of the x and y axes).
        mpp: um/px of the pixels `read` returns: `level_mpp` when a level matched, else the
            requested `mpp`.
        mpp_level0: (mpp_y, mpp_x) of level 0.
        resample: (f_y, f_x), level pixels per returned pixel; (1.0, 1.0) when a level matched.
        backend: "tiff" or "openslide", the decoder in use.
        threads: threads per read.

    The object holds an OpenSlide handle (metadata; thread-safe for reads) and, with the
    "tiff" backend, a file descriptor. Pickling stores only the
    constructor arguments and reopens the file, so a Slide can go to DataLoader workers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mpp: float = 0.5,
        mpp_level0: float | tuple[float, float] | None = None,
        tolerance: float = MPP_TOLERANCE,
        backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        self._args = (path, mpp, mpp_level0, tolerance, backend, threads)
        self.path = Path(path)
        self._osr = None
        self._tiff: TiffPyramid | None = None
        if mpp <= 0:
            raise ValueError(f"mpp must be > 0 micrometres per pixel, got {mpp}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._pool = shared_pool(threads)  # process-wide, shared with other slides
        self.threads = self._pool.threads
        if not self.path.is_file():
            raise FileNotFoundError(f"slide file not found: {self.path}")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError(
                f"{self.path}: not a slide format OpenSlide recognises (corrupt file, or not a whole-slide image): {e}"
            ) from e
        except (openslide.OpenSlideError, OSError) as e:
            raise SlideError(f"{self.path}: OpenSlide cannot open it: {e}") from e
        try:
            self._init_geometry(float(mpp), mpp_level0, float(tolerance))
            self._init_backend(backend)
            self._check_integrity()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up
    def _init_geometry(self, mpp: float, mpp_level0: float | tuple[float, float] | None, tolerance: float) -> None:
        """Pick the level and resampling factor that serve `mpp`; compute `shape`."""
        osr = self._osr
        if mpp_level0 is not None:
            mpp0 = (
                (float(mpp_level0), float(mpp_level0))
                if np.isscalar(mpp_level0)
                else (float(mpp_level0[0]), float(mpp_level0[1]))
            )
        else:
            mpp0 = _mpp_from_properties(dict(osr.properties))
            if mpp0 is None:
                raise SlideError(
                    f"{self.path}: the file records no resolution (no openslide.mpp-x/y, "
                    f"no TIFF XResolution with ResolutionUnit centimeter/inch); pass "
                    f"mpp_level0=<micrometres per pixel of level 0> to Slide()"
                )
        if min(mpp0) <= 0:
            raise SlideError(f"{self.path}: level-0 resolution {mpp0} um/px is not positive")
        self.mpp_level0 = mpp0
        self._downsamples = [float(d) for d in osr.level_downsamples]
        self._level_dims = [(int(w), int(h)) for w, h in osr.level_dimensions]  # (W, H)
        level_mpps = [0.5 * (mpp0[0] + mpp0[1]) * d for d in self._downsamples]

        close = [i for i, m in enumerate(level_mpps) if abs(m / mpp - 1.0) <= tolerance]
        if close:
            level = min(close, key=lambda i: abs(level_mpps[i] / mpp - 1.0))
            self.resample = (1.0, 1.0)
            self.mpp = level_mpps[level]
        else:
            finer = [i for i, m in enumerate(level_mpps) if m < mpp]
            if not finer:
                raise ValueError(
                    f"{self.path}: requested {mpp} um/px is finer than the finest level "
                    f"({level_mpps[0]:.4g} um/px) and would need upsampling; pass "
                    f"mpp >= {level_mpps[0] * (1 - tolerance):.4g}"
                )
            level = max(finer, key=lambda i: level_mpps[i])  # the next finer level
            d = self._downsamples[level]
            self.resample = (mpp / (mpp0[0] * d), mpp / (mpp0[1] * d))
            self.mpp = mpp
        self.level = level
        self.level_mpp = level_mpps[level]
        level_w, level_h = self._level_dims[level]
        # floor: every returned pixel's footprint lies fully inside the level.
        self._shape = (
            3,
            int(math.floor(level_h / self.resample[0] + 1e-9)),
            int(math.floor(level_w / self.resample[1] + 1e-9)),
        )
        logger.debug(
            "%s: level %d (%.4g um/px), resample %s -> shape %s",
            self.path.name,
            level,
            self.level_mpp,
            self.resample,
            self._shape,
        )

    def _init_backend(self, backend: str) -> None:
        """Open the fast TIFF reader when `backend` allows it and the file suits it."""
        self.backend = "openslide"
        if backend == "openslide":
            return
        vendor = self._osr.properties.get("openslide.vendor", "")
        try:
            if vendor not in _TIFF_VENDORS:
                raise UnsupportedTiff(f"{self.path}: OpenSlide vendor {vendor!r}, not one of {sorted(_TIFF_VENDORS)}")
            tiff = TiffPyramid(self.path, threads=self.threads)
            if tiff.level_dimensions != self._level_dims:
                tiff.close()
                raise UnsupportedTiff(
                    f"{self.path}: tiled pages {tiff.level_dimensions} are not OpenSlide's levels {self._level_dims}"
                )
        except UnsupportedTiff as e:
            if backend == "tiff":
                raise SlideError(f"the fast TIFF reader cannot serve this slide: {e}") from e
            logger.debug("%s: OpenSlide backend (%s)", self.path.name, e)
            return
        self._tiff, self.backend = tiff, "tiff"
        logger.debug("%s: fast TIFF backend, %d thread(s)", self.path.name, self.threads)

    def _check_integrity(self) -> None:
        """Decode the bottom-right tile of every level, so truncated files fail at open.

        Writers put tiles (and strips) in row-major order, so a file cut short loses its
        last tiles first; a read past the end of the file raises in OpenSlide.
        """
        props = self._osr.properties
        for level, (lw, lh) in enumerate(self._level_dims):
            tw = int(props.get(f"openslide.level[{level}].tile-width", 256))
            th = int(props.get(f"openslide.level[{level}].tile-height", 256))
            h, w = min(th, lh), min(tw, lw)
            try:
                self._read_level(level, lh - h, lw - w, h, w)
            except SlideError as e:
                raise SlideError(
                    f"{self.path}: the last tile of level {level} cannot be read (truncated "
                    f"or corrupt file?): {e.__cause__ or e}"
                ) from e

    # ------------------------------------------------------------------ protocol
    @property
    def shape(self) -> tuple[int, int, int]:
        """(3, H, W) at the working resolution `mpp`."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def level_count(self) -> int:
        """Number of pyramid levels in the file."""
        return len(self._level_dims)

    @property
    def tile_rows(self) -> tuple[int, int] | None:
        """(period, phase): the file's tiles start at the rows y = phase (mod period) of `read`,
        so reads in bands from such a row to such a row decode every stored tile once (what
        `CropCache` fills by); None when they do not line up with whole rows (resampled reads)
        or the file does not say. Here phase is 0 and period the tile height of the level."""
        return self._tile_grid("h")

    @property
    def tile_cols(self) -> tuple[int, int] | None:
        """(period, phase) of the file's tile columns in the columns of `read`, as `tile_rows`
        for rows (a quarter-turned crop is filled in bands of columns)."""
        return self._tile_grid("w")

    def _tile_grid(self, axis: str) -> tuple[int, int] | None:
        """`tile_rows` (axis "h") or `tile_cols` (axis "w")."""
        if self.resample != (1.0, 1.0):
            return None
        if self._tiff is not None:
            level = self._tiff.levels[self.level]
            return (level.tile_h if axis == "h" else level.tile_w), 0
        name = "tile-height" if axis == "h" else "tile-width"
        size = self._osr.properties.get(f"openslide.level[{self.level}].{name}") if self._osr else None
        return (int(size), 0) if size else None

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Rows [y, y+h), columns [x, x+w) at the working resolution, as (3, h, w) uint8 RGB.

        Pixels outside [0, H) x [0, W) are white (255); alpha is composited onto white.
        Only the level pixels under the region are decoded. The result is a view of
        interleaved (h, w, 3) memory (`interleaved_chw`, module docstring).
        """
        y, x, h, w = check_region(y, x, h, w)
        out = interleaved_chw(h, w)  # the one buffer of this read
        _, H, W = self._shape
        y0, y1, x0, x1 = max(y, 0), min(y + h, H), max(x, 0), min(x + w, W)
        if (y0, y1, x0, x1) != (y, y + h, x, x + w):
            out.fill(255)  # part of the region lies outside the image
        if y1 > y0 and x1 > x0:
            inner = out[:, y0 - y : y1 - y, x0 - x : x1 - x]
            if self.resample == (1.0, 1.0):
                self._read_level(self.level, y0, x0, y1 - y0, x1 - x0, out=inner)
            else:
                self._read_scaled(self.level, y0, x0, y1 - y0, x1 - x0, *self.resample, out=inner)
        return out

    # ------------------------------------------------------------------ reading
    def _read_level(
        self,
        level: int,
        y: int,
        x: int,
        h: int,
        w: int,
        out: np.ndarray | None = None,
        layout: str = "chw",
    ) -> np.ndarray:
        """(3, h, w) uint8 RGB of a region given in `level`'s own pixel grid (into `out`, any
        strides; new ones are `interleaved_chw`); (h, w, 4) RGBX with `layout="rgbx"` (see
        `TiffPyramid.read`).

        Fast backend: `TiffPyramid.read` (the level's exact pixel grid). OpenSlide takes
        the location in level-0 pixels: we pass round(level px * downsample). For levels
        whose downsample is an integer (dimensions exact divisions of level 0, as in
        CAMELYON16 and in our synthetic slides) this is exact; otherwise OpenSlide positions
        the read at a sub-pixel offset (< 1 level pixel) and interpolates.
        """
        if self._osr is None:
            raise ValueError(f"{self.path}: the slide is closed")
        if self._tiff is not None:
            try:
                return self._tiff.read(level, y, x, h, w, out=out, layout=layout)
            except TileError as e:
                raise SlideError(f"{self.path}: reading level {level} at y={y}, x={x}, h={h}, w={w} failed: {e}") from e
        d = self._downsamples[level]
        try:
            rgba = self._osr.read_region((int(round(x * d)), int(round(y * d))), level, (int(w), int(h)))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: reading level {level} at y={y}, x={x}, h={h}, w={w} failed: {e}") from e
        a = np.asarray(rgba)  # (h, w, 4) RGBA, not premultiplied
        rgb, alpha = a[..., :3], a[..., 3:]
        if alpha.min() < 255:
            # Transparent pixels (outside the scanned area) become white: rgb*a + 255*(1-a).
            rgb = (rgb.astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16)) + 127) // 255
        if layout == "rgbx":
            if out is None:
                out = np.empty((h, w, 4), dtype=np.uint8)
            out[..., :3] = rgb
        else:
            if out is None:
                out = interleaved_chw(h, w)
            out.transpose(1, 2, 0)[...] = rgb  # whole pixel rows when `out` is interleaved
        return out

    def _read_scaled(
        self,
        level: int,
        y: int,
        x: int,
        h: int,
        w: int,
        fy: float,
        fx: float,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """(3, h, w) uint8 of an output grid that shrinks `level` by (fy, fx) (into `out`; a new
        one is `interleaved_chw`).

        Output pixel (i, j) averages the level pixels whose centres lie in [i fy, (i+1) fy)
        x [j fx, (j+1) fx) (PIL's BOX filter; module docstring). We decode the integer level
        rectangle that covers the footprint of the region and shrink it with the exact
        fractional box: for factors in [1, 2] with `resample.shrink_rgbx` (PIL's windows,
        within 1 grey level of PIL, several times faster), otherwise with PIL itself in
        bands of rows. Both run on the slide's threads.
        """
        if out is None:
            out = interleaved_chw(h, w)
        lw, lh = self._level_dims[level]
        by0, by1 = y * fy, (y + h) * fy  # footprint in level pixels (fractional)
        bx0, bx1 = x * fx, (x + w) * fx
        iy0, ix0 = int(math.floor(by0)), int(math.floor(bx0))
        iy1, ix1 = int(math.ceil(by1 - 1e-9)), int(math.ceil(bx1 - 1e-9))
        ih, iw = min(iy1, lh) - iy0, min(ix1, lw) - ix0  # inside the level
        # The footprint may overhang the level's last row/column by a fraction of a pixel
        # (thumbnails, non-integer downsamples): repeat the edge there.
        pad = (max(iy1 - lh, 0), max(ix1 - lw, 0))
        if 1.0 <= fy <= 2.0 and 1.0 <= fx <= 2.0:
            patch = self._read_level(level, iy0, ix0, ih, iw, layout="rgbx")  # (ih, iw, 4)
            if any(pad):
                patch = np.pad(patch, ((0, pad[0]), (0, pad[1]), (0, 0)), "edge")
            box = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
            if shrink_rgbx(patch, box, out, self._pool):
                return out
            patch = np.ascontiguousarray(patch[..., :3].transpose(2, 0, 1))  # rare edge case
        else:
            # PIL shrinks channel by channel: contiguous planes (3, ih, iw)
            patch = self._read_level(level, iy0, ix0, ih, iw, out=np.empty((3, ih, iw), dtype=np.uint8))
            if any(pad):
                patch = np.pad(patch, ((0, 0), (0, pad[0]), (0, pad[1])), "edge")
        shrink_pil(patch, (iy0, ix0), (y, x, h, w), (fy, fx), out, self._pool)
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole working-resolution image shrunk to fit `max_size`: (H', W', 3) uint8.

        H' = max(1, round(H s)), W' = max(1, round(W s)) with s = max_size / max(H, W). The
        thumbnail covers exactly [0, H) x [0, W): thumbnail pixel (i, j) is the area mean of
        working pixels [i H/H', (i+1) H/H') x [j W/W', (j+1) W/W'). So the scale from
        thumbnail to working pixels is (H / H', W / W'). Pixels are computed from the
        coarsest level that is still at least as fine as the thumbnail, block by block.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        _, H, W = self._shape
        s = max_size / max(H, W)
        th, tw = max(1, round(H * s)), max(1, round(W * s))
        # level-0 pixels per thumbnail pixel, per axis
        d_read = self._downsamples[self.level]
        g0 = (H / th * self.resample[0] * d_read, W / tw * self.resample[1] * d_read)
        usable = [i for i, d in enumerate(self._downsamples) if d <= min(g0) * (1 + 1e-6)]
        level = max(usable, key=lambda i: self._downsamples[i]) if usable else 0
        gy, gx = g0[0] / self._downsamples[level], g0[1] / self._downsamples[level]
        out = np.empty((th, tw, 3), dtype=np.uint8)
        by, bx = max(1, int(_THUMBNAIL_BLOCK // gy)), max(1, int(_THUMBNAIL_BLOCK // gx))
        for i in range(0, th, by):
            for j in range(0, tw, bx):
                hh, ww = min(by, th - i), min(bx, tw - j)
                out[i : i + hh, j : j + ww] = self._read_scaled(level, i, j, hh, ww, gy, gx).transpose(1, 2, 0)
        return out

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the OpenSlide handle and the TIFF reader's file (idempotent)."""
        osr, tiff = getattr(self, "_osr", None), getattr(self, "_tiff", None)
        self._osr = self._tiff = None
        if tiff is not None:
            tiff.close()
        if osr is not None:
            osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["args"])

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, mpp={self.mpp:.4g}, level={self.level}, "
            f"shape={self._shape}, backend={self.backend!r})"
        )
