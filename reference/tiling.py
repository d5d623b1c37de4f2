"""Tile plans: cut an image into tiles whose owned outputs partition the final output.

Per axis, with total stride ``S``, receptive field ``r`` and offset ``o`` (see
:mod:`reference.geometry`) and ``c = ceil(o / S)``:

* A tile is an input interval ``[a, b)`` with ``a`` a multiple of ``S``. Its output index
  ``t`` is the full output index ``j = a / S + t`` (every layer's grid stays aligned).
* Output ``j`` is *exact* in the tile when its receptive interval ``[j S - o, j S - o + r)``
  lies inside ``[a, b)``, except that it may run past a true image border (``a = 0`` or
  ``b = n``), where the tile pads exactly as the full computation does.
* The tile *owns* a block ``[j0, j1)`` of exact outputs; the blocks of all tiles partition
  ``[0, n_out)`` exactly once. Summing per-tile gradients of the owned blocks therefore
  gives the full gradient (linearity), and stitching the owned blocks gives the full output.

A tile of length ``L`` that starts at ``a > 0`` owns ``B = floor((L - r + o) / S) - c + 1``
outputs, so the smallest useful tile is ``L_min = c S + r - o`` (``B = 1``), and the
shortest length owning ``B`` outputs is ``L_B = (B - 1 + c) S + r - o``. For a cap ``T`` the
planner finds the fewest tiles that some ``L_B <= T`` needs, takes the shortest such tiles,
steps them by ``B S`` and moves the last one back so that it ends on the image border.
Each axis thus has at most two tile lengths, and an image at most four tile shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from itertools import product
from numbers import Integral
from typing import Iterator, Sequence

from .geometry import AxisGeometry, _ceil_div, output_size

__all__ = [
    "AxisTile",
    "Tile",
    "TilePlan",
    "min_tile_size",
    "best_tile_size",
    "plan_axis",
    "plan_tiles",
    "size_pair",
]


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis.

    Attributes:
        start, stop: the tile's input interval ``[start, stop)`` in image pixels;
            ``start`` is a multiple of ``stride``.
        out_start, out_stop: the owned block ``[out_start, out_stop)`` in final-output
            positions of the full image.
        stride: S, the total stride.
        out_length: outputs the tile computes, fringe included (``output_size(stop - start)``).
    """

    start: int
    stop: int
    out_start: int
    out_stop: int
    stride: int
    out_length: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def input_slice(self) -> slice:
        """Where the tile sits in the image."""
        return slice(self.start, self.stop)

    @property
    def output_slice(self) -> slice:
        """Where the owned block sits in the full output."""
        return slice(self.out_start, self.out_stop)

    @property
    def computed_output_slice(self) -> slice:
        """Where the tile's whole output (fringe included) would sit in the full output;
        it may run past the full output's end (the fringe of the last tile)."""
        shift = self.start // self.stride
        return slice(shift, shift + self.out_length)

    @property
    def owned_slice(self) -> slice:
        """Where the owned block sits in the tile's own output (``t = j - start / S``)."""
        shift = self.start // self.stride
        return slice(self.out_start - shift, self.out_stop - shift)


@dataclass(frozen=True)
class Tile:
    """A 2-D tile: one row interval and one column interval."""

    row: AxisTile
    col: AxisTile

    @property
    def shape(self) -> tuple[int, int]:
        return self.row.length, self.col.length

    @property
    def output_shape(self) -> tuple[int, int]:
        """(h_out, w_out) of the tile's own output, fringe included."""
        return self.row.out_length, self.col.out_length

    @property
    def input_slices(self) -> tuple[slice, slice]:
        """``image[..., rows, cols]`` is the tile's input."""
        return self.row.input_slice, self.col.input_slice

    @property
    def output_slices(self) -> tuple[slice, slice]:
        """``output[..., rows, cols]`` receives the owned block."""
        return self.row.output_slice, self.col.output_slice

    @property
    def owned_slices(self) -> tuple[slice, slice]:
        """``tile_output[..., rows, cols]`` is the owned block."""
        return self.row.owned_slice, self.col.owned_slice


@dataclass(frozen=True)
class TilePlan:
    """The product of a row plan and a column plan.

    Attributes:
        rows, cols: the per-axis tiles, top to bottom and left to right.
        image_size: (H, W) input pixels.
        output_size: (H_out, W_out) final-output positions.
    """

    rows: tuple[AxisTile, ...]
    cols: tuple[AxisTile, ...]
    image_size: tuple[int, int]
    output_size: tuple[int, int]

    @cached_property
    def tiles(self) -> list[Tile]:
        """All tiles, row-major."""
        return [Tile(r, c) for r, c in product(self.rows, self.cols)]

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def tile_shapes(self) -> set[tuple[int, int]]:
        """Distinct (h, w) tile shapes (at most four)."""
        return {(r.length, c.length) for r in self.rows for c in self.cols}

    @property
    def computed_pixels(self) -> int:
        return sum(r.length for r in self.rows) * sum(c.length for c in self.cols)

    @property
    def overhead(self) -> float:
        """Computed input pixels over image pixels (1.0 = no recomputation)."""
        H, W = self.image_size
        return self.computed_pixels / (H * W)


def min_tile_size(geometry: AxisGeometry, n: int) -> int:
    """Smallest tile length the planner accepts for an axis of ``n`` pixels.

    ``min(n, max(c S + r - o, l))``: one tile covering the axis always works; otherwise
    every interior tile must hold the halo ``c S - o`` on its left, one receptive field, and
    own at least one output, and the last tile, which starts on a multiple of ``S`` inside
    the image, must reach the border and give every layer a non-empty output: ``l`` is the
    shortest such length, ``n - S floor((n - 1) / S)`` (the pixels after the last multiple
    of S) plus as many S as that takes. (A pooling that floors drops the image's last
    pixels; an output past them that reads only padding still needs the tile to reach the
    pooling window.)
    """
    S, r, o = geometry.stride, geometry.receptive_field, geometry.offset
    last = n - (n - 1) // S * S  # pixels after the last multiple of S (1..S)
    while last < n and geometry.output_size(last) < 1:
        last += S
    return min(n, max(_ceil_div(o, S) * S + r - o, last))


def plan_axis(geometry: AxisGeometry, n: int, tile: int) -> tuple[AxisTile, ...]:
    """Tiles of at most ``tile`` pixels whose owned blocks partition the outputs of ``n`` pixels.

    Raises:
        ValueError: ``n`` gives no output, or ``tile`` is below :func:`min_tile_size`.
    """
    if not _is_integral(tile) or tile <= 0:
        raise ValueError(f"tile size must be a positive int, got {tile!r} ({type(tile).__name__})")
    tile = int(tile)
    n_out = output_size(geometry, n)
    S, r, o = geometry.stride, geometry.receptive_field, geometry.offset
    if tile >= n:
        return (AxisTile(0, n, 0, n_out, S, n_out),)
    smallest = min_tile_size(geometry, n)
    if tile < smallest:
        raise ValueError(
            f"tile size {tile} cannot hold the halo of this network (receptive field {r}, "
            f"offset {o}, stride {S}) on an axis of {n} pixels; use a tile size of at "
            f"least {smallest}"
        )
    c = _ceil_div(o, S)
    most_owned = (tile - r + o) // S - c + 1  # B >= 1 outputs owned by an interior tile
    # The fewest tiles that the cap allows, then the shortest tiles that need no more of
    # them: owning fewer outputs each, tiles overlap less and the last one is not forced
    # far back over its neighbour.
    def spans_owning(B: int) -> list[tuple[int, int, int, int]]:
        return _spans(geometry, n, n_out, (B - 1 + c) * S + r - o)

    fewest = len(spans_owning(most_owned))
    low, high = 1, most_owned  # bisect for the smallest B that needs no more tiles
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(spans_owning(mid)) <= fewest else (mid + 1, high)
    spans = spans_owning(low)
    out_lengths = {b - a: geometry.output_size(b - a) for a, b, _, _ in spans}  # two lengths at most
    return tuple(AxisTile(a, b, j0, j1, S, out_lengths[b - a]) for a, b, j0, j1 in spans)


def _spans(geometry: AxisGeometry, n: int, n_out: int, L: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, out_start, out_stop) of tiles of length ``L`` stepped by the outputs they
    own; the last one ends on the border."""
    S, r, o = geometry.stride, geometry.receptive_field, geometry.offset
    c = _ceil_div(o, S)
    spans = []
    a, j0 = 0, 0
    while j0 < n_out:
        if a + L >= n:  # last tile: move it back to end on the border, keep a multiple of S
            # (and start inside the image: outputs that read only padding need a real tile)
            a_last = min(max(_ceil_div(n - L, S) * S, 0), (n - 1) // S * S)
            while a_last > 0 and geometry.output_size(n - a_last) < 1:  # a layer would get nothing
                a_last -= S  # (no longer than min_tile_size, so within the cap)
            spans.append((a_last, n, j0, n_out))
            break
        j1 = min((a + L - r + o) // S + 1, n_out)  # first output not inside [a, a + L)
        spans.append((a, a + L, j0, j1))
        j0 = j1
        a = (j0 - c) * S
    return spans


def best_tile_size(geometry: AxisGeometry, n: int, max_tile: int) -> int:
    """The tile size up to ``max_tile`` whose plan computes the fewest pixels on ``n`` pixels.

    Overhead is not monotone in the tile size (a slightly smaller tile can split the axis
    more evenly), so every useful length ``(B - 1 + c) S + r - o`` up to ``max_tile`` is tried;
    ties go to the larger tile (fewer tiles).

    Raises:
        ValueError: ``max_tile`` is below :func:`min_tile_size`.
    """
    smallest = min_tile_size(geometry, n)
    if max_tile < smallest:
        plan_axis(geometry, n, max_tile)  # raises the planner's error, which names the smallest
    # One tile over the whole axis, and one tile size per number B of outputs an interior
    # tile owns (the planner trims every size to its B's length).
    S, r, o = geometry.stride, geometry.receptive_field, geometry.offset
    c = _ceil_div(o, S)
    largest = min(max_tile, n - 1)
    candidates = [n] if max_tile >= n else []
    if largest >= smallest:
        owned = range((smallest - r + o) // S - c + 1, (largest - r + o) // S - c + 2)
        candidates += [max(smallest, (B - 1 + c) * S + r - o) for B in owned]
    return min(candidates, key=lambda t: (sum(tile.length for tile in plan_axis(geometry, n, t)), -t))


def _is_integral(value: object) -> bool:
    """int, np.int64, ...: any integral number but a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def size_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, all positive, as a pair of Python ints.

    Any integral type is accepted (``np.int64(960)`` from a config or an array shape); any
    other value is refused naming its type (``960.0`` is a float: pass ``int(960.0)``).

    Raises:
        ValueError: not a positive integral number or a pair of them.
    """
    if _is_integral(value):
        pair = (value, value)
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        pair = tuple(value)
    else:
        pair = ()
    if len(pair) != 2 or not all(_is_integral(v) and v > 0 for v in pair):
        raise ValueError(
            f"{name} must be a positive int or an (h, w) pair of positive ints, got {value!r} "
            f"({type(value).__name__})"
        )
    return int(pair[0]), int(pair[1])


def plan_tiles(
    geometry: tuple[AxisGeometry, AxisGeometry],
    image_size: Sequence[int],
    tile_size: int | Sequence[int],
) -> TilePlan:
    """Plan tiles for an image.

    Args:
        geometry: (rows, cols) geometry of the network, e.g. ``net.geometry``.
        image_size: (H, W) in pixels.
        tile_size: maximum tile size, an int or an (h, w) pair (any integral type, see
            :func:`size_pair`).
    """
    H, W = size_pair(image_size, "image_size")
    th, tw = size_pair(tile_size, "tile_size")
    gh, gw = geometry
    try:
        rows = plan_axis(gh, H, th)
        cols = plan_axis(gw, W, tw)
    except ValueError as err:
        raise ValueError(f"image {H}x{W}, tile {th}x{tw}: {err}") from None
    return TilePlan(rows, cols, (H, W), (rows[-1].out_stop, cols[-1].out_stop))
