"""StreamingTrunk: run a convolutional trunk tile by tile, with exact gradients through autograd.

``y = StreamingTrunk(module, tile_size)(x)`` returns what ``module(x)`` returns, computed
tile by tile without a gradient tape, so only one tile's activations are ever alive. ``y``
is the output of a custom autograd function whose inputs are ``x`` and the trunk's
trainable parameters, so a plain ``loss.backward()`` on anything computed from ``y`` calls
the streamed backward:

    for every tile of the (backward) tile plan:
        recompute module(tile) with a tape
        backpropagate grad_y restricted to the tile's owned outputs
        add the tile's parameter and input gradients to the totals

which is exact by linearity (see :mod:`reference.streaming`; the tile plans come from
:mod:`reference.tiling`, the halo from :mod:`torch_impl.geometry`).

Under ``torch.autocast`` (bf16/fp16) the recompute runs with the same autocast state as the
forward; each tile's parameter gradient comes out of a bf16 backward and is summed over
tiles in float32, so the streamed step matches the plain bf16 step to bf16 round-off
(about 1e-2 relative), not bit for bit.

Inputs are a tensor (N, C, H, W) or a *lazy source*: any object with ``.shape == (C, H, W)``
and either ``.read(y, x, h, w) -> array (C, h, w)`` or NumPy-style slicing
``source[:, y0:y1, x0:x1]`` (a memory map, a zarr array, :class:`torch_impl.data.Slide`).
Lazy tiles are read on demand (the next tile in a background thread while the current one
computes), pinned, moved to the device one at a time and normalised there, so host memory
is O(tile), not O(image).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from reference.tiling import Tile, TilePlan, best_tile_size, plan_tiles

from .geometry import check_streamable, module_geometry

__all__ = ["StreamingTrunk", "to_model_input", "IMAGENET_MEAN", "IMAGENET_STD", "suggest_tile_sizes"]

log = logging.getLogger(__name__)

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
        shape = (-1, 1, 1)
        x = (x - torch.as_tensor(mean, dtype=dtype, device=x.device).view(shape)) / torch.as_tensor(
            std, dtype=dtype, device=x.device
        ).view(shape)
    return x


class _TensorSource:
    """Tiles of an (N, C, H, W) tensor: views, moved to the compute device."""

    def __init__(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        self.x = x
        self.spatial = tuple(x.shape[-2:])

    def read(self, tile: Tile) -> torch.Tensor:
        return self.x[(..., *tile.input_slices)]


class _LazySource:
    """Tiles read on demand from an object with ``.shape == (C, H, W)``."""

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
        rows, cols = tile.input_slices
        if hasattr(self.source, "read"):
            region = self.source.read(rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)
        else:
            region = self.source[:, rows, cols]
        region = torch.from_numpy(np.ascontiguousarray(region))[None]  # (1, C, h, w)
        if torch.cuda.is_available():
            region = region.pin_memory()  # lets the copy to the GPU overlap compute
        return region


class StreamingTrunk(nn.Module):
    """A convolutional trunk computed tile by tile, with exact gradients.

    Args:
        module: the trunk: nested ``nn.Sequential`` of local modules (see
            :mod:`torch_impl.geometry`), batch norm in eval mode. Not copied or changed.
        tile_size: maximum tile size (int or (h, w)) in input pixels for the forward pass,
            which keeps no activations and can use large tiles.
        backward_tile_size: maximum tile size for the recompute + backward pass (default:
            ``tile_size``); it holds one tile's activations and their gradients.
        mean, std: per-channel normalisation applied to lazy inputs (after scaling uint8 to
            [0, 1]); tensors are used as given.
        channels_last: convert tiles to channels-last memory format (faster on CUDA with
            a channels-last module).
    """

    def __init__(
        self,
        module: nn.Module,
        tile_size: int | Sequence[int],
        backward_tile_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        channels_last: bool = False,
    ):
        super().__init__()
        self.module = module
        self.geometry = module_geometry(module)  # raises on unsupported modules
        self.tile_size = tile_size
        self.backward_tile_size = backward_tile_size if backward_tile_size is not None else tile_size
        self.mean, self.std = mean, std
        self.channels_last = channels_last

    # ------------------------------------------------------------------ plans and tiles
    def plan(self, image_size: Sequence[int], backward: bool = False) -> TilePlan:
        """The tile plan for an (H, W) image, for the forward or the backward pass."""
        return plan_tiles(self.geometry, image_size, self.backward_tile_size if backward else self.tile_size)

    def _device(self, fallback: torch.device) -> torch.device:
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        return fallback

    def _input_dtype(self) -> torch.dtype:
        """Lazy tiles are normalised into the trunk's floating dtype (autocast casts later)."""
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _prepare(self, pixels: torch.Tensor, lazy: bool, device: torch.device) -> torch.Tensor:
        x = pixels.to(device, non_blocking=True)
        if lazy:
            x = to_model_input(x, self.mean, self.std, dtype=self._input_dtype())
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _tiles(self, source, plan: TilePlan, device: torch.device) -> Iterator[tuple[Tile, torch.Tensor]]:
        """Yield (tile, input on device); lazy sources read the next tile in the background."""
        tiles = plan.tiles
        lazy = isinstance(source, _LazySource)
        if not lazy:
            for tile in tiles:
                yield tile, self._prepare(source.read(tile), False, device)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(source.read, tiles[0])
            for i, tile in enumerate(tiles):
                pixels = pending.result()
                if i + 1 < len(tiles):
                    pending = pool.submit(source.read, tiles[i + 1])
                yield tile, self._prepare(pixels, True, device)

    # ------------------------------------------------------------------ the two passes
    def stream_forward(self, source) -> torch.Tensor:
        """Stitch the owned outputs of every tile; no tape. Returns (N, C_out, H_out, W_out)."""
        plan = self.plan(source.spatial)
        device = self._device(source.x.device if isinstance(source, _TensorSource) else torch.device("cpu"))
        y = None
        with torch.no_grad():
            for tile, x_tile in self._tiles(source, plan, device):
                y_tile = self.module(x_tile)  # (N, C_out, h_out, w_out)
                if y is None:
                    y = y_tile.new_empty((*y_tile.shape[:2], *plan.output_size))
                y[(..., *tile.output_slices)] = y_tile[(..., *tile.owned_slices)]
        return y

    def stream_backward(
        self, source, grad_y: torch.Tensor, params: Sequence[nn.Parameter], input_grad: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Recompute each tile with a tape and backpropagate its owned block of ``grad_y``.

        Returns the input gradient (or None) and one gradient per entry of ``params``.
        """
        plan = self.plan(source.spatial, backward=True)
        device = grad_y.device
        grad_x = torch.zeros_like(source.x) if input_grad else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        for tile, x_tile in self._tiles(source, plan, device):
            if input_grad:
                x_tile = x_tile.detach().requires_grad_(True)
            with torch.enable_grad():
                y_tile = self.module(x_tile)
                owned = y_tile[(..., *tile.owned_slices)]
                inputs = ([x_tile] if input_grad else []) + list(params)
                tile_grads = torch.autograd.grad(
                    owned, inputs, grad_y[(..., *tile.output_slices)].to(owned.dtype), allow_unused=True
                )
            if input_grad:
                grad_x[(..., *tile.input_slices)] += tile_grads[0].to(grad_x.device, grad_x.dtype)
                tile_grads = tile_grads[1:]
            for i, g in enumerate(tile_grads):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return grad_x, grads

    def forward(self, x: torch.Tensor | Any) -> torch.Tensor:
        """``module(x)``, streamed. ``x``: (N, C, H, W) tensor or a lazy (C, H, W) source."""
        check_streamable(self.module)
        source = _TensorSource(x) if isinstance(x, torch.Tensor) else _LazySource(x)
        params = [p for p in self.module.parameters() if p.requires_grad]
        input_grad = isinstance(x, torch.Tensor) and x.requires_grad
        if not torch.is_grad_enabled() or not (params or input_grad):
            return self.stream_forward(source)
        x_arg = x if isinstance(x, torch.Tensor) else None
        return _StreamedTrunk.apply(self, source, x_arg, *params)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _StreamedTrunk(torch.autograd.Function):
    """Autograd node: streamed forward now, streamed recompute + backward later.

    Inputs: the engine, the tile source, the input tensor (or None for lazy sources) and the
    trainable parameters, so autograd accumulates their gradients as for any other op.
    """

    @staticmethod
    def forward(ctx, engine: StreamingTrunk, source, x: torch.Tensor | None, *params: nn.Parameter):
        y = engine.stream_forward(source)
        ctx.engine, ctx.source, ctx.params = engine, source, params
        ctx.autocast = _autocast_state(y.device.type)
        if x is not None:
            ctx.save_for_backward(x)  # keeps x alive and guards against in-place changes
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        _ = ctx.saved_tensors  # unpacking raises if x was modified in place since the forward
        enabled, dtype = ctx.autocast
        params = ctx.params
        input_grad = ctx.needs_input_grad[2]
        with torch.autocast(grad_y.device.type, dtype=dtype, enabled=enabled):
            grad_x, grads = ctx.engine.stream_backward(ctx.source, grad_y, params, input_grad)
        grads = [g if g is None else g.to(p.dtype) for g, p in zip(grads, params)]
        return (None, None, grad_x, *grads)


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
    import copy

    copy.deepcopy(module).to("meta")(x)
