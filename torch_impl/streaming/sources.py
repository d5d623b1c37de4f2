"""Where the streaming engine's tiles come from: a tensor, or a lazy source read on demand.

A *lazy source* is any object with ``.shape == (C, H, W)`` and either
``.read(y, x, h, w) -> (C, h, w)`` or NumPy-style slicing ``source[:, y0:y1, x0:x1]``
(a memory map, a zarr array, a whole-slide reader, a view that returns tiles already on the
GPU). Its tiles are read on demand, a few tiles ahead by a thread pool while the current
one computes (:func:`prefetched`), host tiles pinned when a GPU is present so that their
copy to it can overlap compute, and normalised on the device (:func:`to_model_input`), so
host memory is O(tile), not O(image).

The lazy-source contract, checked when the source is wrapped and on every tile read (a
break raises :class:`LazySourceError`, naming the source and, for a tile, its region):

* ``.shape`` is (C, H, W): three positive ints, channels first;
* a read returns a NumPy array or a torch tensor (on any device) of shape (C, h, w),
  exactly the requested region, in any strides (e.g. a channels-first view of interleaved
  (h, w, C) memory, as slide readers return: it is used without a copy until
  :func:`to_model_input`, whose one conversion pass writes contiguous channel planes);
* of dtype uint8 (0-255, scaled by 1/255) or float16/32/64 with values in [0, 1]; any other
  dtype (uint16, int16, bool, bfloat16, ...) is refused, as the engine cannot know its scale;
* a source that declares ``.dtype`` (a NumPy dtype) returns tiles of that dtype.

The [0, 1] range of float tiles is checked (one min/max per tile: values outside, such as
0-255 floats, and NaN fail) for arrays and host tensors only: on a GPU tensor the min/max
would make the reading thread wait for the GPU on every tile. Device tiles are used where
they are, without a round trip through the host; a source that computes them (e.g. the
slides' device augmentation) returns uint8, which needs no range check.

A tensor input (N, C, H, W) is used as given, so it must be floating point, in the
trunk's dtype unless autocast is on.

Tiles are the engine's own memory: tensor tiles are copied out of the caller's tensor and
lazy tiles out of whatever the read returned, so a module that writes into its input
(``nn.ReLU(inplace=True)`` as the first layer) changes neither the caller's data nor the
overlapping part of the next tile. The copy is one pass over the tile's input, small next
to the first convolution.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from reference.tiling import Tile

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LazySource",
    "LazySourceError",
    "TensorSource",
    "as_source",
    "host_tensor",
    "pinned",
    "prefetched",
    "to_device",
    "to_model_input",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: What a lazy source may return, in words for error messages, and the float dtypes of it.
ACCEPTED_PIXELS = "uint8 (0-255) or float16/32/64 in [0, 1]"
_FLOAT_PIXELS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: The torch dtypes of those, by their NumPy names (tensor tiles are checked like arrays).
_TORCH_PIXELS = {
    torch.uint8: np.dtype(np.uint8),
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


class LazySourceError(ValueError):
    """A lazy source broke its contract (module docstring)."""


def to_model_input(
    pixels: torch.Tensor,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pixels (..., C, h, w) to network input: uint8 scaled to [0, 1], then (x - mean) / std.

    Floating-point pixels are taken as already in [0, 1]. ``mean``/``std`` of None skip the
    normalisation; otherwise they have one entry per channel. Runs on whatever device
    ``pixels`` is on (the streaming engine calls it per tile on the GPU).

    ``pixels`` may have any strides (e.g. channels-last memory from a slide reader); the
    result is C-contiguous (..., C, h, w): the conversion to ``dtype`` is the one pass that
    reorders memory, and the scaling and normalisation then run in place on the new tensor.
    The values do not depend on the input's strides (element-wise operations only).

    Raises:
        TypeError: pixels neither uint8 nor floating point.
        ValueError: ``mean``/``std`` do not have one entry per channel.
    """
    if pixels.dtype != torch.uint8 and not pixels.is_floating_point():
        raise TypeError(f"to_model_input takes uint8 or floating-point pixels, got {pixels.dtype}")
    normalise = mean is not None and std is not None
    if normalise:
        channels = pixels.shape[-3] if pixels.dim() >= 3 else None
        if not len(mean) == len(std) == channels:
            raise ValueError(
                f"pixels have {channels} channels but mean and std have {len(mean)} and {len(std)} "
                "entries: give one per channel, or None to skip the normalisation"
            )
    x = pixels.to(dtype, memory_format=torch.contiguous_format)
    if not x.is_contiguous():  # `to` returns a tensor of the right dtype as is where it deems its layout ambiguous
        x = x.contiguous()
    # in place only on a tensor made here: a float input of the right dtype and layout comes
    # back as itself, and must not change
    fresh = x.untyped_storage().data_ptr() != pixels.untyped_storage().data_ptr()
    if pixels.dtype == torch.uint8:
        x = x.div_(255.0)
    if normalise:
        shape = (-1, 1, 1)  # per channel, broadcast over (h, w)
        m = torch.as_tensor(mean, dtype=dtype, device=x.device).view(shape)
        s = torch.as_tensor(std, dtype=dtype, device=x.device).view(shape)
        x = x.sub_(m).div_(s) if fresh else (x - m) / s
    return x


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor of a NumPy array, sharing its memory and strides where torch can (any
    non-negative strides: a window or a transposed view is not copied); otherwise a copy:
    C-contiguous for negative strides (a flipped view), in the array's own memory order for
    a read-only array (a read-only memory map; torch has no read-only tensors)."""
    if not array.flags.writeable:
        return torch.from_numpy(np.array(array, order="K"))
    try:
        return torch.from_numpy(array)
    except ValueError:  # negative or unaligned strides
        # a copy, not ascontiguousarray: that keeps a negative stride on a size-1 axis
        return torch.from_numpy(array.copy(order="C"))


def _dense_empty_like(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """An uninitialised dense tensor of ``tensor``'s shape and dtype whose dimensions lie in
    memory in the order of ``tensor``'s strides (a channels-last view gets channels-last
    memory, without the gaps of a window), so that copying into it moves whole rows."""
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))  # outermost first
    base = torch.empty([tensor.shape[d] for d in order], dtype=tensor.dtype, pin_memory=pin_memory)
    return base.permute([order.index(d) for d in range(tensor.dim())])


def _is_dense(tensor: torch.Tensor) -> bool:
    """The tensor's elements fill its memory without gaps or overlaps (in some dimension order)."""
    dims = sorted((st, n) for n, st in zip(tensor.shape, tensor.stride(), strict=True) if n != 1)  # innermost first
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A host ``tensor`` in page-locked memory, dense, when CUDA is present (so that its copy
    to the GPU can be non-blocking and one block); a copy unless it already is. Without CUDA,
    ``tensor``. The copy keeps the order of the dimensions in memory (:func:`_dense_empty_like`),
    so a channels-last tile is copied row by row and stays channels last.

    The pinned block comes from torch's caching host allocator, which keeps it from being
    reused until every copy out of it has finished.
    """
    if not torch.cuda.is_available() or (tensor.is_pinned() and _is_dense(tensor)):
        return tensor
    return _dense_empty_like(tensor, pin_memory=True).copy_(tensor)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``: itself if already there, host tensors through pinned memory
    (:func:`pinned`) and a non-blocking copy, so that the calling thread does not wait for it.

    Only host-to-device copies are non-blocking: a non-blocking copy to the host could be
    read before it has arrived.
    """
    device = torch.device(device)
    with record_function("streaming.transfer"):
        if tensor.device.type == "cpu" and device.type == "cuda":
            tensor = pinned(tensor)
        return tensor.to(device, non_blocking=tensor.device.type == "cpu")


class TensorSource:
    """Tiles of an (N, C, H, W) floating-point tensor, used as given (no normalisation).

    Args:
        x: the input.
        dtype: the trunk's floating dtype, which ``x`` must have unless autocast is on for
            ``device_type`` (the trunk's device); None accepts any floating dtype.
        device_type: where the trunk computes (default: ``x``'s device).
    """

    lazy = False

    def __init__(self, x: torch.Tensor, dtype: torch.dtype | None = None, device_type: str | None = None):
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        want = dtype if dtype is not None else "the trunk's dtype"
        if not x.is_floating_point():
            raise TypeError(
                f"x is {x.dtype}: a tensor input is used as given, so it must be floating point ({want}); "
                f"turn pixels into network input with torch_impl.streaming.to_model_input(x, dtype={want}), "
                "or pass a lazy (C, H, W) source"
            )
        if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(device_type or x.device.type):
            raise TypeError(
                f"x is {x.dtype} but the trunk computes in {dtype}: pass x.to({dtype}), or run under torch.autocast"
            )
        self.x = x
        self.spatial = tuple(x.shape[-2:])

    def read(self, tile: Tile) -> torch.Tensor:
        """(N, C, h, w) view of the tile's input region (the engine copies it before a module sees it)."""
        return self.x[(..., *tile.input_slices)]


def _describe(source: Any) -> str:
    """How error messages name a source: its repr when short (an array's repr prints pixels)."""
    if isinstance(source, np.ndarray):
        return f"{type(source).__name__}(shape={source.shape}, dtype={source.dtype})"
    text = repr(source)
    return text if len(text) <= 100 else f"{type(source).__name__}(shape={getattr(source, 'shape', None)})"


def _accepted(dtype: np.dtype) -> bool:
    return dtype == np.uint8 or dtype in _FLOAT_PIXELS


class LazySource:
    """Tiles read on demand from an object with ``.shape == (C, H, W)``, checked against the
    contract (module docstring) when wrapped and on every read."""

    lazy = True

    def __init__(self, source: Any):
        self.source, self.name = source, _describe(source)
        shape = tuple(getattr(source, "shape", ()))
        if len(shape) != 3 or not all(isinstance(n, Integral) and n > 0 for n in shape):
            raise LazySourceError(f"a lazy input needs .shape == (C, H, W), got {shape!r} from {self.name}")
        if shape[0] > 4 and shape[2] <= 4:
            raise LazySourceError(
                f"{self.name} has shape {shape}, which looks like (H, W, C); a lazy source is channels "
                f"first: (C, H, W) = {(shape[2], shape[0], shape[1])}"
            )
        if not (hasattr(source, "read") or hasattr(source, "__getitem__")):
            raise LazySourceError(f"{self.name} has neither .read(y, x, h, w) nor slicing")
        self.channels, self.spatial = int(shape[0]), (int(shape[1]), int(shape[2]))
        self.dtype = self._declared_dtype()

    def _declared_dtype(self) -> np.dtype | None:
        declared = getattr(self.source, "dtype", None)
        if declared is None:
            return None
        try:
            dtype = np.dtype(declared)
        except TypeError:
            raise LazySourceError(f"{self.name} declares .dtype {declared!r}, which is not a NumPy dtype") from None
        if not _accepted(dtype):
            raise LazySourceError(
                f"{self.name} declares .dtype {dtype}; a lazy source returns {ACCEPTED_PIXELS}: convert its "
                "pixels (e.g. scale uint16 to uint8, or to float in [0, 1])"
            )
        return dtype

    def read(self, tile: Tile) -> torch.Tensor:
        """(1, C, h, w) tensor of the tile's input region: where the source returned it (a
        device tensor stays on its device), host tiles pinned when a GPU is present."""
        rows, cols = tile.input_slices
        region = (rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)  # (y, x, h, w)
        with record_function("streaming.read"):
            if hasattr(self.source, "read"):
                pixels = self.source.read(*region)
            else:
                pixels = self.source[:, rows, cols]
        pixels = self._checked(pixels, region)
        tensor = (pixels if isinstance(pixels, torch.Tensor) else host_tensor(pixels))[None]  # (1, C, h, w)
        if tensor.device.type == "cpu":
            tensor = pinned(tensor)  # lets the copy to the GPU overlap compute
        return tensor

    def _checked(self, pixels: Any, region: tuple[int, int, int, int]) -> np.ndarray | torch.Tensor:
        """One read's ``pixels``, as a tensor or an array (its strides kept); LazySourceError if
        they break the contract. The [0, 1] range of floats is checked on the host only (module docstring)."""
        where = f"{self.name}, region (y, x, h, w) = {region}"
        want = (self.channels, *region[2:])
        if pixels is None:
            raise LazySourceError(f"{where}: returned None instead of an array (C, h, w) = {want}")
        if isinstance(pixels, torch.Tensor):
            # the engine copies before use (to_model_input or StreamingTrunk._prepare)
            tile, dtype, dtype_name = pixels, _TORCH_PIXELS.get(pixels.dtype), str(pixels.dtype)
        else:
            tile = np.asarray(pixels)  # may still be the source's memory: the engine copies before use
            dtype, dtype_name = tile.dtype, str(tile.dtype)
        shape = tuple(tile.shape)
        if shape != want:
            hint = ""
            if shape == (*want[1:], want[0]):
                hint = "; (h, w, C) layout? Return channels first: array.transpose(2, 0, 1)"
            elif len(shape) == 3 and shape[1:] == want[1:]:
                hint = f"; returned {shape[0]} channels, the source declares {want[0]}"
            raise LazySourceError(f"{where}: returned an array of shape {shape}, expected (C, h, w) = {want}{hint}")
        if self.dtype is not None and dtype != self.dtype:
            raise LazySourceError(f"{where}: returned dtype {dtype_name} but declares .dtype {self.dtype}")
        if dtype is None or not _accepted(dtype):
            raise LazySourceError(
                f"{where}: returned dtype {dtype_name}; a lazy source returns {ACCEPTED_PIXELS}: convert "
                "its pixels (e.g. scale uint16 to uint8, or to float in [0, 1])"
            )
        on_host = not isinstance(tile, torch.Tensor) or tile.device.type == "cpu"
        if dtype != np.uint8 and on_host:
            low, high = float(tile.min()), float(tile.max())
            if not (low >= 0 and high <= 1):  # also False for NaN
                raise LazySourceError(
                    f"{where}: float pixels must lie in [0, 1], got values in [{low:g}, {high:g}] "
                    "(0-255 values: return uint8, or divide by 255)"
                )
        return tile


def as_source(
    x: torch.Tensor | Any, dtype: torch.dtype | None = None, device_type: str | None = None
) -> TensorSource | LazySource:
    """A tensor (N, C, H, W) becomes a :class:`TensorSource` (``dtype``, ``device_type``: see
    there), anything else a :class:`LazySource`."""
    return TensorSource(x, dtype, device_type) if isinstance(x, torch.Tensor) else LazySource(x)


def prefetched(
    source: TensorSource | LazySource, tiles: Sequence[Tile], depth: int = 2, threads: int = 1
) -> Iterator[tuple[Tile, torch.Tensor]]:
    """Yield (tile, pixels) in the order of ``tiles``; a lazy source is read ahead.

    While the caller computes on one tile, the next ``depth`` tiles are being read by a pool
    of ``threads`` threads (a queue of ``depth`` pending reads, refilled as tiles are taken),
    so host memory holds at most ``depth + 1`` tiles. ``depth`` 0 reads each tile when it is
    needed, in the caller's thread. With ``threads > 1`` reads run concurrently, so the
    source's ``read`` must be thread-safe (OpenSlide's is; a reader that seeks a shared file
    handle is not). Tensor sources are sliced in the caller's thread.
    """
    if not source.lazy or depth == 0:
        for tile in tiles:
            yield tile, source.read(tile)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tile-reader")
    upcoming = iter(tiles)
    pending = deque((tile, pool.submit(source.read, tile)) for tile in islice(upcoming, depth))
    try:
        while pending:
            tile, future = pending.popleft()
            pixels = future.result()
            for following in islice(upcoming, 1):
                pending.append((following, pool.submit(source.read, following)))
            yield tile, pixels
    finally:  # also when the caller stops early or raises: drop the reads not yet started
        pool.shutdown(wait=True, cancel_futures=True)
