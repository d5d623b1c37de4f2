"""Decode a slide's crop once per training step, augmented: a uint8 cache on the device, in host memory, or none.

The forward and the backward pass of a streamed step read the same pixels, and neighbouring
tiles share their halos, so reading every tile from the file decodes most pixels two or
three times. A :class:`CropCache` decodes the crop once, in row bands of full width read
through the source's ``read`` (a multi-threaded reader decodes each band in parallel), into
one uint8 buffer, and answers every tile read with a slice of it:

    with CropCache.open(slide_input.source, mode="auto", device=device, augment=params) as crop:
        model(crop, mask, label)   # forward + backward

Filling. A background thread starts at :meth:`CropCache.open` and fills the buffer band by
band from the top (bands of about ``band_bytes``; for a source with ``tile_rows`` and
``tile_cols``, a :class:`~torch_impl.slides.slide.Slide` or a view of one, bands start and end
on the file's tile rows, or on its tile columns where a quarter turn makes them the crop's
rows, so every stored tile is decoded once: a band edge inside a tile row would decode that
row in both bands), the order in which the forward pass's tile plan runs, so decoding
overlaps the forward pass's compute. A read needs only the bands it covers: one not there
yet is decoded by the reading thread itself (a vertically flipped view starts at the last
bands), and each band is decoded once, by whichever thread needs it first. A device buffer
is filled through host memory of one band per decoding thread (on CUDA, copied on a side
stream). A failed band read is raised, as it was raised, by every read of a band not yet
decoded.

Tiers (``mode``):

* ``"device"``: the buffer on ``device`` if it fits ``budget_bytes`` (default: half of what
  the GPU can still give torch, free memory plus memory torch holds unused); on a CPU device
  this is host memory.
* ``"host"``: the buffer in host memory if it fits ``host_budget_bytes`` (default: half of
  the available memory). Tiles for a GPU are copied from it into pinned blocks (one memcpy
  in the reading thread) and on with non-blocking copies. The buffer itself is not pinned:
  pinning several GiB takes seconds, and torch's pinned allocator rounds a block up to a
  power of two (a 12 GiB crop would pin 16 GiB).
* ``"none"``: no buffer; every read goes to the source, as without a cache (host memory
  O(tile)).
* ``"auto"``: device if it fits, else host, else none. An explicit ``"device"`` or
  ``"host"`` that does not fit raises ValueError.

The choice and its reason are logged (DEBUG when the first tier asked for is used, INFO when
``auto`` falls back).

Augmentation. With ``augment`` (an :class:`~torch_impl.slides.augment.AugmentParams`) the
cache is the crop seen through it, exactly as :class:`~torch_impl.slides.augment.AugmentedView`
(the NumPy reference) sees it, bit for bit: ``shape`` is the augmented one, and each band of
the augmented crop is read from the original (its ``source_region``: rows, or columns when
turned) and written flipped, turned and colour-jittered into the buffer once, as it is filled
(:func:`~torch_impl.slides.band_augment.augment_into`, on the buffer's device: on a GPU the
host only decodes). Every tile read is then a plain slice of the buffer, however often the
forward and the backward pass read it. In mode ``"none"`` each tile read is augmented the same
way on ``device``, from the original region under it. The jitter goes through the slide's
colour table (:class:`~torch_impl.slides.device_jitter.ColourJitter`: on the CPU filled on
demand, on a GPU built whole), or, for a crop of fewer than
:data:`~torch_impl.slides.device_jitter.TABLE_MIN_PIXELS` pixels, by arithmetic.

Layout. The buffer is interleaved, (H, W, 3) in memory, as slide readers return their
(3, h, w) pixels (:func:`~torch_impl.slides.tiff_reader.interleaved_chw`): a band is copied in
whole pixel rows, and a tile is the (3, h, w) view ``buffer[y:y+h, x:x+w].permute(2, 0, 1)``;
the engine's uint8 -> float conversion (:func:`~torch_impl.streaming.to_model_input`) writes
contiguous channel planes. A source with planar (C-contiguous) bands is still held exactly,
through a slower copy that interleaves them.

Pixels. The buffer holds what the source's band reads return (augmented, with ``augment``).
For a source whose pixels do not depend on the region read (an ``ArrayImage``; a ``Slide`` served at a pyramid level's own
resolution) that is exactly what each tile read would return. A ``Slide`` resampled between
levels may differ by one grey level between overlapping regions (PIL's rounding, see
:mod:`torch_impl.slides.slide`); with the cache, the forward and the backward pass at least
see the same pixels.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_right
from contextlib import nullcontext

import numpy as np
import torch
from torch.profiler import record_function

from ..streaming.sources import host_tensor
from .augment import AugmentedView, AugmentParams
from .band_augment import Dihedral, augment_into
from .device_jitter import ColourJitter, use_table
from .slide import ImageSource, check_region, read_clipped

__all__ = [
    "MODES",
    "CropCache",
    "available_host_memory",
    "choose_mode",
    "free_device_memory",
]

logger = logging.getLogger(__name__)

#: The values of ``mode``.
MODES = ("auto", "device", "host", "none")

#: Share of the free device / available host memory that the default budgets allow.
DEFAULT_FRACTION = 0.5

#: Host memory per band read when filling (64 MiB: 341 rows of a 65536-pixel-wide crop).
DEFAULT_BAND_BYTES = 64 * 2**20

_GIB = 2.0**30


def free_device_memory(device: torch.device | str) -> int:
    """Bytes torch can still get on CUDA ``device``: the driver's free memory plus what torch's
    caching allocator holds but does not use (e.g. the previous step's freed tiles)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def available_host_memory() -> int:
    """Bytes of host memory available to new allocations (Linux ``MemAvailable``, which counts
    reclaimable page cache; elsewhere the free pages; 0 when neither is known)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the line reads "MemAvailable: <n> kB"
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def choose_mode(
    nbytes: int, mode: str, device: torch.device, budget_bytes: int, host_budget_bytes: int
) -> tuple[str, str]:
    """The tier that holds a crop of ``nbytes`` (module docstring), and why, in words.

    Returns ("device" | "host" | "none", reason). Raises ValueError when an explicit
    ``"device"`` or ``"host"`` does not fit its budget, or for an unknown ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"slide cache mode must be one of {', '.join(MODES)}, got {mode!r}")
    size = f"crop of {nbytes / _GIB:.2f} GiB"
    device_fit = nbytes <= budget_bytes
    host_fit = nbytes <= host_budget_bytes
    on_device = f"{size} fits the {device} budget of {budget_bytes / _GIB:.2f} GiB"
    on_host = f"fits the host budget of {host_budget_bytes / _GIB:.2f} GiB"
    if mode == "none":
        return "none", "mode none: tiles are read from the source"
    if mode == "device":
        if not device_fit:
            raise ValueError(
                f"slide cache mode 'device': the {size} does not fit the {device} budget of "
                f"{budget_bytes / _GIB:.2f} GiB; use mode 'auto' (falls back to host memory or to "
                "reading tiles from the file), a larger budget or a smaller crop (max_size)"
            )
        return "device", on_device
    if mode == "host":
        if not host_fit:
            raise ValueError(
                f"slide cache mode 'host': the {size} does not fit the host budget of "
                f"{host_budget_bytes / _GIB:.2f} GiB; use mode 'auto' (falls back to reading tiles "
                "from the file), a larger budget or a smaller crop (max_size)"
            )
        return "host", f"{size} {on_host}"
    if device_fit:
        return "device", on_device
    too_big = f"{size} exceeds the {device} budget of {budget_bytes / _GIB:.2f} GiB"
    if host_fit:
        return "host", f"{too_big} but {on_host}"
    return "none", (
        f"{too_big} and the host budget of {host_budget_bytes / _GIB:.2f} GiB: tiles are read from the source"
    )


class CropCache:
    """A lazy (3, H, W) uint8 source held whole, once decoded (module docstring).

    Itself a lazy source: ``shape``, ``dtype`` and ``read(y, x, h, w)``, which returns a
    (3, h, w) uint8 tensor of the (augmented) crop: a view of the buffer (no copy,
    channels interleaved in memory; do not write into it) on the buffer's device for regions
    inside the crop, a white-padded copy for regions crossing its border; in mode ``"none"``
    the source's own pixels (host), or, augmented, a new tile on ``device``. ``read`` is
    thread-safe. Make one with :meth:`open`; free it with :meth:`close` or ``with``.

    Attributes:
        mode: ``"device"``, ``"host"`` or ``"none"``, the tier chosen.
        reason: why, in words (also logged).
        nbytes: bytes of the buffer (0 in mode ``"none"``).
        augment: the augmentation the crop is seen through (module docstring); the identity
            without one.
        jitter: the slide's colour jitter, on the device it runs on; None without one, and
            once closed.
    """

    def __init__(
        self,
        source: ImageSource,
        mode: str,
        reason: str,
        device: torch.device,
        band_rows: int,
        augment: AugmentParams | None = None,
    ):
        self.source, self.mode, self.reason = source, mode, reason
        self.augment = augment if augment is not None else AugmentParams()
        self._frame = AugmentedView(source, self.augment)  # the augmented frame's shape and regions
        self._geometry = Dihedral.of(self.augment)
        C, H, W = (int(n) for n in self._frame.shape)
        if not self.augment.is_identity and C != 3:
            raise ValueError(f"CropCache augments RGB pixels, but {source!r} has {C} channels")
        self._shape = (C, H, W)
        self._device = device
        self._buffer: torch.Tensor | None = None  # (H, W, C): interleaved (module docstring)
        period, phase = self._row_grid()
        band_rows = -(-band_rows // period) * period  # whole tile rows
        starts = ([0] if phase else []) + list(range(phase, H, band_rows))  # tile-row edges from `phase` on
        self._starts = starts
        self._bands = [(r, min(r1, H)) for r, r1 in zip(starts, [*starts[1:], H], strict=True)]
        self._locks = [threading.Lock() for _ in self._bands]  # held while the band is decoded
        self._loaded = [False] * len(self._bands)
        self._error: BaseException | None = None  # the first failed band read
        self._closing = threading.Event()
        self._filler: threading.Thread | None = None
        self._stream: torch.cuda.Stream | None = None  # band copies to a GPU
        if mode != "none":
            self._buffer = torch.empty((H, W, C), dtype=torch.uint8, device=device if mode == "device" else "cpu")
        work_device = self._buffer.device if self._buffer is not None else device  # where pixels are augmented
        if any(self.augment.hsv_shift):  # through the slide's colour table unless the crop is small
            self.jitter = ColourJitter(self.augment.hsv_shift, work_device, table=use_table(H * W))
        else:
            self.jitter = None
        if self._buffer is not None:
            if self._buffer.device.type == "cuda":
                self._stream = torch.cuda.Stream(self._buffer.device)
                self._stream.wait_stream(torch.cuda.current_stream(self._buffer.device))  # after the allocation
            self._filler = threading.Thread(target=self._fill, name="crop-cache-fill", daemon=True)
            self._filler.start()

    def _row_grid(self) -> tuple[int, int]:
        """(period, phase): the file's tile edges along the rows of the (augmented) crop, at rows
        y = phase (mod period): the source's ``tile_rows``, or its ``tile_cols`` when a quarter
        turn makes the original's columns the crop's rows, counted from the far end when that
        axis is flipped. (1, 0) when the source does not say."""
        g = self._geometry
        _, H0, W0 = (int(n) for n in self.source.shape)
        grid = getattr(self.source, "tile_cols" if g.transpose else "tile_rows", None)
        if not grid:
            return 1, 0
        period, phase = grid
        length, reversed_ = (W0, g.flip_cols) if g.transpose else (H0, g.flip_rows)
        return period, (length - phase) % period if reversed_ else phase

    @classmethod
    def open(
        cls,
        source: ImageSource,
        mode: str = "auto",
        device: torch.device | str = "cpu",
        budget_bytes: int | None = None,
        host_budget_bytes: int | None = None,
        band_bytes: int = DEFAULT_BAND_BYTES,
        augment: AugmentParams | None = None,
    ) -> CropCache:
        """Choose the tier for ``source`` and start filling it (module docstring).

        Args:
            source: lazy (3, H, W) uint8 source with ``.read(y, x, h, w)``, e.g. the
                ``RegionView`` of a :class:`~torch_impl.slides.inputs.SlideInput`.
            mode: ``"auto"``, ``"device"``, ``"host"`` or ``"none"``.
            device: where the model computes (a CUDA device, or the CPU).
            budget_bytes: most bytes the buffer may take on ``device`` (default: half of
                :func:`free_device_memory` on CUDA, the host budget on the CPU).
            host_budget_bytes: most bytes it may take in host memory (default: half of
                :func:`available_host_memory`).
            band_bytes: host bytes per band read while filling (at least one row; rounded up
                to whole tile rows of a source with ``tile_rows``, or whole tile columns,
                ``tile_cols``, when a quarter turn makes them the crop's rows).
            augment: the flips, quarter turns and colour jitter the crop is seen through
                (module docstring); None for none.

        Raises:
            ValueError: unknown mode, a non-uint8 source, augmenting a source that is not
                RGB, or an explicit tier that does not fit.
        """
        C, H, W = (int(n) for n in source.shape)
        if np.dtype(source.dtype) != np.uint8:
            raise ValueError(f"CropCache holds uint8 pixels, but {source!r} has dtype {source.dtype}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        host = host_budget_bytes if host_budget_bytes is not None else int(DEFAULT_FRACTION * available_host_memory())
        if budget_bytes is None:
            budget_bytes = int(DEFAULT_FRACTION * free_device_memory(device)) if device.type == "cuda" else host
        chosen, reason = choose_mode(C * H * W, mode, device, budget_bytes, host)
        _, width = Dihedral.of(augment).shape(H, W) if augment is not None else (H, W)  # of the augmented crop
        cache = cls(source, chosen, reason, device, max(1, band_bytes // (C * width)), augment)
        fell_back = mode == "auto" and chosen != "device"
        (logger.info if fell_back else logger.debug)("slide cache %s for %s: %s", chosen, source, reason)
        return cache

    # ------------------------------------------------------------------ the source interface
    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def device(self) -> torch.device | None:
        """Where the buffer is (None in mode ``"none"``)."""
        return None if self._buffer is None else self._buffer.device

    def read(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        """(3, h, w) uint8 pixels of rows [y, y+h), columns [x, x+w); white outside the crop."""
        y, x, h, w = check_region(y, x, h, w)
        if self.mode == "none":
            if self.augment.is_identity:
                with record_function("slides.decode"):
                    return host_tensor(np.asarray(self.source.read(y, x, h, w)))
            C, H, W = self._shape
            white = lambda: torch.full((C, h, w), 255, dtype=torch.uint8, device=self._device)  # noqa: E731
            return read_clipped(y, x, h, w, H, W, self._augmented_tile, white)
        buffer = self._buffer
        if buffer is None:
            raise RuntimeError(f"{self!r} is closed: read it inside its `with` block")
        C, H, W = self._shape

        def inside(y0: int, x0: int, h0: int, w0: int) -> torch.Tensor:
            self._wait(y0, y0 + h0)  # rows decoded (by the filler, or here)
            return buffer[y0 : y0 + h0, x0 : x0 + w0].permute(2, 0, 1)  # a (3, h0, w0) view: no copy

        return read_clipped(
            y, x, h, w, H, W, inside, lambda: torch.full((C, h, w), 255, dtype=torch.uint8, device=buffer.device)
        )

    def fill(self) -> CropCache:
        """Wait until the whole crop is decoded (reads do not need this); returns ``self``."""
        if self.mode != "none":
            self._wait(0, self._shape[1])
        return self

    # ------------------------------------------------------------------ filling
    def _wait(self, y0: int, y1: int) -> None:
        """Return once rows [y0, y1) are in the buffer, decoding the bands not yet there."""
        for k in range(bisect_right(self._starts, y0) - 1, bisect_right(self._starts, y1 - 1)):
            self._ensure(k)

    def _ensure(self, k: int) -> None:
        """Band ``k`` in the buffer: decoded by whichever thread needs it first (the filler, or a
        read that got ahead of it, e.g. the first tile of a vertically flipped view needs the
        last bands); the others wait for it. After a failed band read, raises that error."""
        if self._loaded[k]:
            return
        # the range also covers waiting for a band that another thread is decoding
        with record_function("slides.decode"), self._locks[k]:
            if self._loaded[k]:
                return
            if self._error is not None:
                raise self._error
            if self._closing.is_set():
                raise RuntimeError(f"{self!r} was closed while it was being read")
            r0, r1 = self._bands[k]
            buffer = self._buffer  # held here: close() may drop the attribute meanwhile
            if buffer is None:
                raise RuntimeError(f"{self!r} was closed while it was being read")
            try:
                _, _, W = self._shape
                block = self._read_original(r0, 0, r1 - r0, W)  # (3, ., .) the original under the band
                with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
                    if self.augment.is_identity:
                        buffer[r0:r1].copy_(block.permute(1, 2, 0))  # whole rows from an interleaved band
                    else:
                        with record_function("slides.augment"):  # on the buffer's device, once per crop pixel
                            augment_into(block, self._geometry, self.jitter, buffer[r0:r1])
                    if self._stream is not None:
                        self._stream.synchronize()  # on the GPU before any reader slices it
            except BaseException as error:
                self._error = error
                raise
            self._loaded[k] = True

    def _fill(self) -> None:
        """The filler thread: every band from the top (the forward pass's order), until closed."""
        start = time.perf_counter()
        for k in range(len(self._bands)):
            if self._closing.is_set():
                return
            try:
                self._ensure(k)
            except BaseException:  # noqa: BLE001 - stored in self._error; the reads that need the band raise it
                return
        _, H, W = self._shape
        seconds = time.perf_counter() - start
        logger.debug(
            "slide cache filled %d x %d px in %.2f s (%.0f Mpx/s)", H, W, seconds, H * W / max(seconds, 1e-9) / 1e6
        )

    def _augmented_tile(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        """Mode none, augmenting: (3, h, w) on ``device`` for a region inside the crop, from the
        original region under it."""
        block = self._read_original(y, x, h, w)
        # a reading thread's current GPU may be another one: make this crop's the current one
        on_device = torch.cuda.device(self._device) if self._device.type == "cuda" else nullcontext()
        with on_device, record_function("slides.augment"):
            out = torch.empty((h, w, 3), dtype=torch.uint8, device=self._device)
            return augment_into(block, self._geometry, self.jitter, out).permute(2, 0, 1)

    def _read_original(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        """(3, h', w') uint8 host tensor (the source's strides) of the original under the
        region (y, x, h, w) of the crop (its ``source_region``), checked."""
        region = self._frame.source_region(y, x, h, w)
        want = (self._shape[0], region[2], region[3])
        with record_function("slides.decode"):
            band = self.source.read(*region)
        if isinstance(band, torch.Tensor):
            band_shape, band_dtype = tuple(band.shape), band.dtype
            ok = band.dtype == torch.uint8
        else:
            band = np.asarray(band)
            band_shape, band_dtype, ok = band.shape, band.dtype, band.dtype == np.uint8
            if ok:
                band = host_tensor(band)
        if band_shape != want or not ok:
            raise ValueError(
                f"{self.source!r}.read{region} returned {band_dtype} of shape {band_shape}, "
                f"expected uint8 of shape {want}"
            )
        return band

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop filling and free the buffer and the colour table (idempotent). Later reads raise
        RuntimeError."""
        self._closing.set()
        if self._filler is not None:
            self._filler.join()
        self._buffer = None
        self.jitter = None  # and its 64 MiB table

    def __enter__(self) -> CropCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        C, H, W = self._shape
        return f"CropCache({self.mode}, shape=({C}, {H}, {W}), source={self.source!r})"
