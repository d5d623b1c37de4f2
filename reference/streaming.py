"""Streamed forward and backward: the full computation, one tile at a time.

Forward. For every tile of the plan (:mod:`reference.tiling`), run the network on the
tile's input region and copy the tile's *owned* outputs into the full output. The owned
outputs of a tile are exact (their receptive fields lie inside the tile or on a true image
border) and the owned blocks partition the output, so the stitched result equals
``net.forward(x)``.

Backward. Let ``f`` be the network and ``g = dL/dy`` the gradient of the loss with respect
to its output. The gradient with respect to the input (and likewise any parameter θ) is
the vector-Jacobian product

    dL/dx = sum_j g_j dy_j/dx = sum_tiles sum_{j owned by tile} g_j dy_j/dx,

a sum over the owned blocks. Inside tile ``T``, the owned outputs are the same function
of the tile's input and of θ as in the full computation, so their Jacobians agree, and
``sum_{j owned by T} g_j dy_j/dx`` is the tile's own backward pass with the output gradient
``g`` kept on the owned block and zeroed on the fringe. Summing the tiles' input and
parameter gradients gives the full gradients exactly: no per-layer bookkeeping, any tile
order, any local layer.

Memory: one tile's activations at a time, plus the output, ``grad_x`` and the parameter
gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .geometry import AxisGeometry
from .tiling import TilePlan, plan_tiles

__all__ = ["Network", "plan_for", "stream_forward", "stream_backward"]


class Network(Protocol):
    """What the streaming functions need from a network (e.g. ``reference.layers.Sequential``)."""

    @property
    def geometry(self) -> tuple[AxisGeometry, AxisGeometry]: ...

    def forward(self, x: np.ndarray) -> np.ndarray: ...

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...

    def parameters(self) -> dict[str, np.ndarray]: ...


def _check_input(x: np.ndarray) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {x.shape}")
    if min(x.shape) == 0:
        raise ValueError(f"x must not be empty, got shape {x.shape}")


def plan_for(net: Network, x: np.ndarray, tile_size: int | Sequence[int]) -> TilePlan:
    """The tile plan of ``net`` for the spatial size of ``x`` (N, C, H, W)."""
    _check_input(x)
    return plan_tiles(net.geometry, x.shape[-2:], tile_size)


def stream_forward(net: Network, x: np.ndarray, tile_size: int | Sequence[int]) -> np.ndarray:
    """``net.forward(x)``, computed tile by tile.

    Args:
        net: a network exposing ``geometry`` and ``forward``.
        x: (N, C, H, W) input.
        tile_size: maximum tile size in input pixels, an int or an (h, w) pair.

    Returns:
        (N, C_out, H_out, W_out), equal to ``net.forward(x)``.
    """
    plan = plan_for(net, x, tile_size)
    y = None
    for tile in plan:
        y_tile = net.forward(x[(..., *tile.input_slices)])  # (N, C_out, h_out, w_out)
        if y is None:
            y = np.empty((*y_tile.shape[:2], *plan.output_size), dtype=y_tile.dtype)
        y[(..., *tile.output_slices)] = y_tile[(..., *tile.owned_slices)]
    return y


def stream_backward(
    net: Network, x: np.ndarray, grad_y: np.ndarray, tile_size: int | Sequence[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``net.backward(x, grad_y)``, computed tile by tile.

    Args:
        net: a network exposing ``geometry``, ``backward`` and ``parameters``.
        x: (N, C, H, W) input.
        grad_y: (N, C_out, H_out, W_out) gradient of the loss with respect to the output.
        tile_size: maximum tile size in input pixels, an int or an (h, w) pair.

    Returns:
        ``grad_x`` (N, C, H, W) and a dict of parameter gradients, equal to
        ``net.backward(x, grad_y)``.
    """
    plan = plan_for(net, x, tile_size)
    if grad_y.ndim != 4 or grad_y.shape[0] != x.shape[0] or grad_y.shape[2:] != plan.output_size:
        raise ValueError(
            f"grad_y must be (N={x.shape[0]}, C_out, {plan.output_size[0]}, {plan.output_size[1]}) "
            f"for this input, got {grad_y.shape}"
        )
    grad_x = np.zeros_like(x)
    grads = {name: np.zeros_like(p) for name, p in net.parameters().items()}
    for tile in plan:
        # The output gradient restricted to the owned block; zero on the tile's fringe.
        grad_tile = np.zeros((*grad_y.shape[:2], *tile.output_shape), dtype=grad_y.dtype)  # (N, C_out, h_out, w_out)
        grad_tile[(..., *tile.owned_slices)] = grad_y[(..., *tile.output_slices)]
        grad_x_tile, grads_tile = net.backward(x[(..., *tile.input_slices)], grad_tile)
        grad_x[(..., *tile.input_slices)] += grad_x_tile
        for name, g in grads_tile.items():
            grads[name] += g
    return grad_x, grads
