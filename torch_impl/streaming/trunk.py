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
:mod:`reference.tiling`, the halo from :mod:`torch_impl.streaming.geometry`).

Under ``torch.autocast`` (bf16/fp16) the recompute runs with the same autocast state as the
forward; each tile's parameter gradient comes out of a bf16 backward and is summed over
tiles in float32, so the streamed step matches the plain bf16 step to bf16 round-off
(about 1e-2 relative), not bit for bit.

Inputs are a tensor (N, C, H, W) or a *lazy source* (see :mod:`torch_impl.streaming.sources`):
any object with ``.shape == (C, H, W)`` and ``.read(y, x, h, w)`` or NumPy slicing, read tile
by tile, so host memory is O(tile), not O(image). Every tile the module sees is a copy, so a
module that writes into its input changes neither the caller's data nor the next tile; the
sources check the input's dtype and each lazy read against the contract.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from numbers import Integral
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from reference.tiling import Tile, TilePlan, plan_tiles, size_pair

from .geometry import check_streamable, module_geometry
from .sources import IMAGENET_MEAN, IMAGENET_STD, LazySource, TensorSource, as_source, prefetched, to_model_input

__all__ = ["StreamingTrunk"]


class StreamingTrunk(nn.Module):
    """A convolutional trunk computed tile by tile, with exact gradients.

    Args:
        module: the trunk: nested ``nn.Sequential`` of local modules (see
            :mod:`torch_impl.streaming.geometry`), batch norm in eval mode. Not copied or changed.
        tile_size: maximum tile size (int or (h, w), any integral type) in input pixels for
            the forward pass, which keeps no activations and can use large tiles.
        backward_tile_size: maximum tile size for the recompute + backward pass (default:
            ``tile_size``); it holds one tile's activations and their gradients.
        mean, std: per-channel normalisation applied to lazy inputs (after scaling uint8 to
            [0, 1], :func:`~torch_impl.streaming.sources.to_model_input`); tensors are used as given.
        channels_last: convert tiles to channels-last memory format (faster on CUDA with
            a channels-last module).
        prefetch: lazy inputs: tiles read ahead while one computes (0: read each tile when
            needed); host memory holds ``prefetch + 1`` tiles.
        read_threads: lazy inputs: threads reading those tiles; more than 1 needs a
            thread-safe ``read`` (see :func:`~torch_impl.streaming.sources.prefetched`).
    """

    def __init__(
        self,
        module: nn.Module,
        tile_size: int | Sequence[int],
        backward_tile_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        channels_last: bool = False,
        prefetch: int = 2,
        read_threads: int = 1,
    ):
        super().__init__()
        self.module = module
        self.geometry = module_geometry(module)  # raises on unsupported modules
        size_pair(tile_size, "tile_size")  # raises on anything but positive integral sizes
        if backward_tile_size is not None:
            size_pair(backward_tile_size, "backward_tile_size")
        self.tile_size = tile_size
        self.backward_tile_size = backward_tile_size if backward_tile_size is not None else tile_size
        self.mean, self.std = mean, std
        self.channels_last = channels_last
        for name, value, least in (("prefetch", prefetch, 0), ("read_threads", read_threads, 1)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.prefetch, self.read_threads = int(prefetch), int(read_threads)

    # ------------------------------------------------------------------ plans and tiles
    def plan(self, image_size: Sequence[int], backward: bool = False) -> TilePlan:
        """The tile plan for an (H, W) image, for the forward or the backward pass."""
        return plan_tiles(self.geometry, image_size, self.backward_tile_size if backward else self.tile_size)

    def _device(self, fallback: torch.device) -> torch.device:
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        return fallback

    def _dtype(self) -> torch.dtype | None:
        """The trunk's floating dtype (None for a trunk without floating parameters)."""
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def _prepare(self, pixels: torch.Tensor, lazy: bool, device: torch.device) -> torch.Tensor:
        """The network input of one tile on ``device``, never sharing memory with ``pixels``
        (host or device tensor; a tile already on ``device`` is not moved)."""
        with record_function("streaming.transfer"):
            x = pixels.to(device, non_blocking=True)
        if lazy:
            # into the trunk's dtype (autocast casts later)
            x = to_model_input(x, self.mean, self.std, dtype=self._dtype() or torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.untyped_storage().data_ptr() == pixels.untyped_storage().data_ptr():
            # nothing above copied: a module writing into its input (ReLU(inplace=True)) would
            # change the caller's data and the overlapping next tile
            x = x.clone()
        return x

    def _tiles(
        self, source: TensorSource | LazySource, plan: TilePlan, device: torch.device
    ) -> Iterator[tuple[Tile, torch.Tensor]]:
        """Yield (tile, network input on ``device``) for every tile of ``plan``."""
        for tile, pixels in prefetched(source, plan.tiles, self.prefetch, self.read_threads):
            yield tile, self._prepare(pixels, source.lazy, device)

    # ------------------------------------------------------------------ the two passes
    def stream_forward(self, source) -> torch.Tensor:
        """Stitch the owned outputs of every tile; no tape. Returns (N, C_out, H_out, W_out)."""
        plan = self.plan(source.spatial)
        device = self._device(source.x.device if isinstance(source, TensorSource) else torch.device("cpu"))
        y = None
        with torch.no_grad():
            for tile, x_tile in self._tiles(source, plan, device):
                with record_function("streaming.forward"):
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
            leaf = x_tile.detach().requires_grad_(input_grad)
            with torch.enable_grad(), record_function("streaming.backward"):
                # a clone, not the leaf itself: autograd refuses in-place writes into a leaf
                y_tile = self.module(leaf.clone() if input_grad else leaf)
                owned = y_tile[(..., *tile.owned_slices)]
                inputs = ([leaf] if input_grad else []) + list(params)
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
        device = self._device(x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
        source = as_source(x, self._dtype(), device.type)  # checks the input against what the trunk needs
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
