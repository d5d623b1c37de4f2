"""Fast region reads from tiled pyramidal TIFFs: only the tiles under a region, in threads.

For TIFF-family slides (the generic tiled pyramidal TIFF of CAMELYON16 and of our synthetic
data, Aperio SVS) `TiffPyramid.read` finds the tiles that a region covers, reads their bytes
with `os.pread` (no shared file position, so threads need no lock), decodes them (JPEG:
imagecodecs' libjpeg-turbo, with the file's JPEGTables and the page's colour space, YCbCr for
generic JPEG TIFFs and RGB for Aperio, into a buffer each thread reuses; other compressions:
tifffile's per-page decoder) and copies each tile's part of the region into the output.
Decoders release the GIL, so tiles decode in parallel in a `ThreadPool`.

Memory layout: the (3, h, w) result is channels first by its shape, but its memory is the
decoder's interleaved RGB, (h, w, 3) in C order: `read` returns `interleaved_chw(h, w)`, a
transposed view (strides (1, 3 w, 3)). So the one copy beyond decoding, tile -> region, moves
whole pixel rows (a memcpy per tile row) instead of splitting each pixel into three planes,
which cost as much again as a fifth of the decoding. The conversion to channel planes
happens where a copy is made anyway: `torch_impl.streaming.to_model_input` turns uint8 into
float in one pass and writes a C-contiguous result. An `out` of any strides (e.g. a window of
a C-contiguous (3, H, W) array) still works, through the slower splitting copy.

Pixels equal OpenSlide's `read_region` on the same level (both decode with libjpeg-turbo; the
tests check equality, 0 grey levels, on synthetic slides and on a real Aperio slide) except
for two deliberate differences: (1) where a level's downsample is not an integer, OpenSlide
places the region at a sub-pixel offset and interpolates, while this reader returns the
level's own pixel grid; (2) tiles missing from the file (byte count 0) come back white, where
OpenSlide returns transparent pixels that `Slide` composites onto white: the same result.

Levels are the file's tiled top-level pages sorted by decreasing width, as OpenSlide orders
them for generic TIFF and Aperio files; `Slide` checks that both agree before using this
reader. Files this reader cannot decode exactly (planar or non-RGB pages, JPEG 2000, old-style
JPEG, more than 8 bits, ...) raise `UnsupportedTiff`, and `Slide` falls back to OpenSlide.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import imagecodecs
import numpy as np
import tifffile

T = TypeVar("T")
R = TypeVar("R")

#: TIFF compressions decoded here (tifffile + imagecodecs), each checked against OpenSlide
#: by the tests: none, LZW, JPEG, Adobe deflate, deflate, zstd.
SUPPORTED_COMPRESSIONS = {1, 5, 7, 8, 32946, 50000}
_JPEG = 7
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6

#: Tasks per worker when a read is split over threads: a few per worker balances tiles of
#: unequal cost (edge tiles, background) without paying a future per tile.
_TASKS_PER_THREAD = 4


class UnsupportedTiff(ValueError):
    """The file is not a tiled pyramidal TIFF this reader decodes exactly (use OpenSlide)."""


class TileError(OSError):
    """A tile's bytes cannot be read (file truncated) or decoded (corrupt data)."""


def usable_cores() -> int:
    """Number of CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class ThreadPool:
    """`threads` worker threads, started on first use; with `threads == 1` work runs inline.

    Safe across `fork` (e.g. DataLoader workers): a child process that inherits the pool
    starts its own threads instead of waiting on the parent's, which do not exist there.
    """

    def __init__(self, threads: int | None = None) -> None:
        threads = usable_cores() if threads is None else int(threads)
        if threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for all usable cores), got {threads}")
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="slide-read")
                self._pid = os.getpid()
            return self._executor

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """[fn(item) for item in items], spread over the threads; re-raises the first error."""
        if self.threads == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        futures = [self._get().submit(fn, item) for item in items]
        wait(futures)  # all done before an error surfaces: no task still writes into the output
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the threads (idempotent); the pool restarts them if used again."""
        with self._lock:
            if self._executor is not None and self._pid == os.getpid():
                self._executor.shutdown(wait=True)
            self._executor = None

    def __getstate__(self) -> dict:
        return {"threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["threads"])


_shared_pools: dict[int, ThreadPool] = {}
_shared_lock = threading.Lock()


def shared_pool(threads: int | None = None) -> ThreadPool:
    """The process-wide `ThreadPool` of `threads` workers (default: all usable cores).

    Every slide reader of the process shares it, so opening many slides does not start
    many threads, and concurrent reads queue instead of oversubscribing the cores. Its
    tasks never wait on other tasks of the pool, so sharing cannot deadlock.
    """
    threads = usable_cores() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for all usable cores), got {threads}")
    with _shared_lock:
        if threads not in _shared_pools:
            _shared_pools[threads] = ThreadPool(threads)
        return _shared_pools[threads]


def interleaved_chw(h: int, w: int, channels: int = 3) -> np.ndarray:
    """A new uncleared (channels, h, w) uint8 array whose memory is (h, w, channels) in C order.

    The layout `TiffPyramid.read` and `Slide.read` return (module docstring): indexing is
    channels first, as the lazy-source contract wants, while each pixel's channels stay
    adjacent in memory, as decoders write them. `.transpose(1, 2, 0)` gives the C-contiguous
    (h, w, channels) array back.
    """
    return np.empty((h, w, channels), dtype=np.uint8).transpose(2, 0, 1)


def chunks(items: Sequence[T], n: int) -> list[Sequence[T]]:
    """Split `items` into at most `n` contiguous, nearly equal, non-empty runs."""
    n = max(1, min(n, len(items)))
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


@dataclass(frozen=True)
class TiffLevel:
    """One tiled page of the pyramid: where its tiles are and how to decode them.

    Attributes:
        page: index of the page among the file's top-level pages.
        height, width: level size in pixels.
        tile_h, tile_w: tile size in pixels (edge tiles are stored at full size).
        tiles_across: tiles per tile row, ceil(width / tile_w).
        offsets, bytecounts: (n_tiles,) int64, byte range of each tile in row-major order;
            a byte count of 0 marks a tile missing from the file.
        decode: tifffile's decoder of this page: (bytes, tile index, jpegtables=...) ->
            ((1, tile_h, tile_w, 3) uint8, ...).
        jpegtables: the page's shared JPEG tables (None when each tile is a full JPEG).
        jpeg_colorspace: for JPEG pages, the colour space of the JPEG data as tifffile
            passes it to imagecodecs (RGB for Aperio's RGB JPEGs; None: the decoder's
            default, YCbCr); None for other compressions.
        is_jpeg: the page is JPEG-compressed (tiles can decode straight to RGBX).
    """

    page: int
    height: int
    width: int
    tile_h: int
    tile_w: int
    tiles_across: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    decode: Callable[..., Any]
    jpegtables: bytes | None
    jpeg_colorspace: int | None
    is_jpeg: bool


def _unsupported_reason(page: tifffile.TiffPage) -> str | None:
    """Why this reader cannot decode `page` exactly as OpenSlide would, or None if it can."""
    compression, photometric = int(page.compression), int(page.photometric)
    if compression not in SUPPORTED_COMPRESSIONS:
        return f"compression {compression} (decoded here: {sorted(SUPPORTED_COMPRESSIONS)})"
    if photometric == _PHOTOMETRIC_YCBCR and compression != _JPEG:
        return "YCbCr pixels outside JPEG"
    if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return f"photometric {photometric} (need RGB or YCbCr)"
    if page.samplesperpixel != 3 or page.extrasamples:
        return f"{page.samplesperpixel} samples per pixel (need 3, no alpha)"
    if page.bitspersample != 8 or int(page.sampleformat) != 1:
        return f"{page.bitspersample}-bit samples of format {int(page.sampleformat)} (need 8-bit unsigned)"
    if int(page.planarconfig) != 1:
        return "planar configuration separate (need contiguous RGB)"
    if page.imagedepth != 1 or page.tiledepth != 1:
        return "volumetric tiles"
    return None


_thread_buffers = threading.local()


def _decode_jpeg(data: bytes, lv: TiffLevel, rgbx: bool) -> np.ndarray:
    """(tile_h, tile_w, 3 or 4) pixels of one JPEG tile, in this thread's reusable buffer.

    Decoding into a buffer that stays allocated (and in the cache) instead of a fresh array
    per tile saves about a fifth of the decoding time (fresh arrays of this size are
    mmapped, zeroed and faulted in page by page). The caller copies the pixels out before
    this thread decodes its next tile. libjpeg-turbo writes RGBX as fast as RGB, with the
    same values in the first three bytes. A tile stored smaller than the tile size (not
    allowed by TIFF, seen in the wild) decodes into a fresh array.
    """
    shape = (lv.tile_h, lv.tile_w, 4 if rgbx else 3)
    buffers = _thread_buffers.__dict__.setdefault("by_shape", {})
    buf = buffers.get(shape)
    if buf is None:
        buf = buffers[shape] = np.empty(shape, dtype=np.uint8)
    outcolorspace = "RGBA" if rgbx else "RGB"
    try:
        return imagecodecs.jpeg8_decode(
            data, tables=lv.jpegtables, colorspace=lv.jpeg_colorspace, outcolorspace=outcolorspace, out=buf
        )
    except ValueError as e:
        if "out.shape" not in str(e):
            raise
        return imagecodecs.jpeg8_decode(
            data, tables=lv.jpegtables, colorspace=lv.jpeg_colorspace, outcolorspace=outcolorspace
        )


class TiffPyramid:
    """The levels of a tiled pyramidal TIFF, read region by region (module docstring).

    Args:
        path: a generic tiled TIFF or Aperio SVS file.
        threads: threads that decode the tiles of one read in parallel (the process-wide
            `shared_pool` of that size); default all usable cores.

    Raises:
        UnsupportedTiff: not a TIFF, no tiled page, or a tiled page this reader cannot
            decode (see `_unsupported_reason`); the caller should use OpenSlide.

    Attributes:
        path: the file.
        levels: `TiffLevel` per pyramid level, largest first.
        level_dimensions: [(width, height)] per level, as OpenSlide reports them.

    `read` is thread-safe: file access is `os.pread` on one descriptor, and the decoders
    keep no state between calls.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.pool = shared_pool(threads)
        try:
            tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError) as e:
            raise UnsupportedTiff(f"{self.path}: tifffile cannot parse it: {e}") from e
        try:
            self.levels = self._find_levels(tif)
        finally:
            tif.close()  # the decoders and tile tables need no open file
        self.level_dimensions = [(lv.width, lv.height) for lv in self.levels]
        self._fd = os.open(self.path, os.O_RDONLY)

    def _find_levels(self, tif: tifffile.TiffFile) -> list[TiffLevel]:
        tiled = [(i, p) for i, p in enumerate(tif.pages) if p.is_tiled]
        if not tiled:
            raise UnsupportedTiff(f"{self.path}: no tiled page")
        levels = []
        for i, page in sorted(tiled, key=lambda ip: -ip[1].imagewidth):  # OpenSlide's order
            reason = _unsupported_reason(page)
            if reason is not None:
                raise UnsupportedTiff(f"{self.path}: page {i}: {reason}")
            th, tw = int(page.tilelength), int(page.tilewidth)
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            across = math.ceil(page.imagewidth / tw)
            if len(offsets) != across * math.ceil(page.imagelength / th) or len(counts) != len(offsets):
                raise UnsupportedTiff(
                    f"{self.path}: page {i}: {len(offsets)} tile offsets for "
                    f"a {page.imagelength} x {page.imagewidth} image of {th} x {tw} tiles"
                )
            is_jpeg = int(page.compression) == _JPEG
            # JPEG data of an RGB page without a JFIF marker is RGB, not YCbCr (Aperio);
            # the rule tifffile's own decoder applies.
            rgb_jpeg = is_jpeg and int(page.photometric) == _PHOTOMETRIC_RGB and not page.is_jfif
            colorspace = _PHOTOMETRIC_RGB if rgb_jpeg else None
            levels.append(
                TiffLevel(
                    page=i,
                    height=int(page.imagelength),
                    width=int(page.imagewidth),
                    tile_h=th,
                    tile_w=tw,
                    tiles_across=across,
                    offsets=offsets,
                    bytecounts=counts,
                    decode=page.decode,  # built now, in one thread; the closure is reentrant
                    jpegtables=page.jpegtables,
                    jpeg_colorspace=colorspace,
                    is_jpeg=is_jpeg,
                )
            )
        return levels

    # ------------------------------------------------------------------ reading
    def read(
        self,
        level: int,
        y: int,
        x: int,
        h: int,
        w: int,
        out: np.ndarray | None = None,
        layout: str = "chw",
    ) -> np.ndarray:
        """Rows [y, y+h), columns [x, x+w) of `level` as uint8 RGB.

        Pixels outside the level, and tiles missing from the file, are white (255).

        Args:
            layout: "chw": (3, h, w), channels first (what `Slide.read` returns), by default
                in interleaved memory (`interleaved_chw`: the fast layout, module
                docstring); "rgbx": (h, w, 4), pixels packed in 4 bytes, the 4th unspecified
                (what the exact fast resampler eats; JPEG tiles decode straight into it).
            out: optional array of that shape (any strides, e.g. a window of a larger
                array) to fill instead of allocating one; it is returned. A "chw" `out`
                whose channels are not adjacent in memory (C-contiguous planes) is filled
                correctly, by a slower copy that splits each pixel.

        Raises:
            TileError: a tile's bytes are missing (truncated file) or undecodable; the
                message names the file, level and tile.
        """
        if self._fd is None:
            raise ValueError(f"{self.path}: the TIFF reader is closed")
        lv = self.levels[level]
        if layout not in ("chw", "rgbx"):
            raise ValueError(f"layout must be 'chw' or 'rgbx', got {layout!r}")
        shape = (3, h, w) if layout == "chw" else (h, w, 4)
        if out is None:
            out = interleaved_chw(h, w) if layout == "chw" else np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"out must be a {shape} uint8 array, got {out.shape} {out.dtype}")
        y0, y1, x0, x1 = max(y, 0), min(y + h, lv.height), max(x, 0), min(x + w, lv.width)
        if y1 <= y0 or x1 <= x0:
            out.fill(255)
            return out
        if (y0, y1, x0, x1) != (y, y + h, x, x + w):
            out.fill(255)  # the part outside the level; the inside is overwritten below
        tiles = [
            (ty, tx)
            for ty in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1)
            for tx in range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1)
        ]
        pixels = out.transpose(1, 2, 0) if layout == "chw" else out  # (h, w, 3 or 4), a view
        inner = pixels[y0 - y : y1 - y, x0 - x : x1 - x]  # the in-level part

        def paste(run: Iterable[tuple[int, int]]) -> None:
            for ty, tx in run:
                self._paste_tile(level, lv, ty, tx, y0, x0, y1, x1, inner)

        self.pool.map(paste, chunks(tiles, self.pool.threads * _TASKS_PER_THREAD))
        return out

    def _paste_tile(
        self, level: int, lv: TiffLevel, ty: int, tx: int, y0: int, x0: int, y1: int, x1: int, inner: np.ndarray
    ) -> None:
        """Decode tile (ty, tx) and copy its part of [y0, y1) x [x0, x1) into `inner`, the
        (y1 - y0, x1 - x0, 3 or 4) view of the output (4: RGBX, the 4th byte unspecified)."""
        ty0, tx0 = ty * lv.tile_h, tx * lv.tile_w  # tile origin in level pixels
        a, b = max(y0, ty0), min(y1, ty0 + lv.tile_h)  # rows of the region in this tile
        c, d = max(x0, tx0), min(x1, tx0 + lv.tile_w)
        dst = inner[a - y0 : b - y0, c - x0 : d - x0]
        tile = self._decode_tile(level, lv, ty, tx, rgbx=dst.shape[2] == 4)  # (th', tw', 3 or 4) or None
        if tile is None:
            dst.fill(255)
            return
        if tile.shape[0] < b - ty0 or tile.shape[1] < d - tx0:
            raise TileError(
                f"{self.path}: level {level} tile (row {ty}, column {tx}) decodes "
                f"to {tile.shape[:2]}, smaller than the {lv.tile_h} x {lv.tile_w} "
                f"tile the region needs (corrupt file?)"
            )
        part = tile[a - ty0 : b - ty0, c - tx0 : d - tx0]
        if part.shape[2] == dst.shape[2]:
            dst[...] = part  # the one copy: whole pixel rows when `dst` is interleaved
        else:  # an RGB decoder (not JPEG) into RGBX: byte-strided, slower but rare
            dst[..., :3] = part

    def _decode_tile(self, level: int, lv: TiffLevel, ty: int, tx: int, rgbx: bool = False) -> np.ndarray | None:
        """(tile_h, tile_w, 3) uint8 pixels of tile (ty, tx), or (tile_h, tile_w, 4) RGBX
        when `rgbx` and the page is JPEG; None if the file lacks the tile. JPEG tiles come
        back in a buffer of this thread that the next decode overwrites."""
        index = ty * lv.tiles_across + tx
        offset, nbytes = int(lv.offsets[index]), int(lv.bytecounts[index])
        where = f"{self.path}: level {level} tile (row {ty}, column {tx})"
        if nbytes == 0:
            return None
        try:
            data = os.pread(self._fd, nbytes, offset)
        except OSError as e:
            raise TileError(f"{where}: reading {nbytes} bytes at offset {offset} failed: {e}") from e
        if len(data) < nbytes:
            raise TileError(
                f"{where}: the file ends {len(data)} bytes into this tile's "
                f"{nbytes} bytes at offset {offset} (truncated file?)"
            )
        try:
            if lv.is_jpeg:
                return _decode_jpeg(data, lv, rgbx)
            pixels, _, _ = lv.decode(data, index, jpegtables=lv.jpegtables)
        except Exception as e:  # imagecodecs raises its own error class per codec
            raise TileError(
                f"{where}: cannot decode its {nbytes} bytes (corrupt file?): {type(e).__name__}: {e}"
            ) from e
        if pixels is None:
            return None
        return pixels.reshape(pixels.shape[-3:])  # (1, th, tw, 3) -> (th, tw, 3)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the file (idempotent); the shared threads stay for other readers."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> TiffPyramid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TiffPyramid({str(self.path)!r}, levels={self.level_dimensions})"
