"""Halo math: receptive field, total stride and offset of a chain of sliding-window layers.

Everything here is per axis and pure integer arithmetic. A 2-D layer has one spec for the
rows (H) and one for the columns (W); the two axes never interact.

Conventions
-----------
* ``padding`` is per side (torch's convention): ``p`` zeros before the first and after
  the last input position.
* ``dilation = 1`` means no dilation; the *effective kernel* is ``e = d (k - 1) + 1``.
* Output position ``i`` of one layer reads input positions ``i s - p + d m`` for
  ``m = 0 .. k-1``, i.e. the window ``[i s - p, i s - p + e)``.

The recursion (layer ``l`` with ``k_l, s_l, p_l, d_l``; ``J_0 = 1, r_0 = 1, o_0 = 0``)::

    J_l = J_{l-1} s_l                      cumulative stride
    r_l = r_{l-1} + (e_l - 1) J_{l-1}      receptive field (input pixels)
    o_l = o_{l-1} + p_l J_{l-1}            offset (input pixels left of the window)

With ``S = J_L``, ``r = r_L`` and ``o = o_L``, final output position ``j`` depends on the
input interval ``[j S - o, j S - o + r)``; the parts outside the image are the network's
own padding. A single layer is the case ``L = 1``: ``S = s``, ``r = e``, ``o = p``.

Anything with ``stride``, ``receptive_field``, ``offset`` and ``output_size(n)`` composes
with the same recursion (the :class:`AxisGeometry` protocol). That is how residual blocks
fit in: a :class:`Parallel` block (main path plus shortcut) behaves like one layer whose
window is the union of its branches' windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "AxisGeometry",
    "LayerSpec",
    "Chain",
    "Parallel",
    "compose",
    "parallel",
    "output_size",
    "receptive_interval",
    "cone",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@runtime_checkable
class AxisGeometry(Protocol):
    """One axis of anything that maps an input grid to an output grid by local windows."""

    @property
    def stride(self) -> int: ...  # S: input pixels between neighbouring outputs

    @property
    def receptive_field(self) -> int: ...  # r: input pixels one output depends on

    @property
    def offset(self) -> int: ...  # o: output 0's window starts at input pixel -o

    def output_size(self, n: int) -> int: ...  # outputs for n input pixels


@dataclass(frozen=True)
class LayerSpec:
    """One axis of a convolution or pooling layer.

    Attributes:
        kernel: k, window taps (>= 1).
        stride: s (>= 1).
        padding: p, per side (>= 0).
        dilation: d, spacing of the taps (1 = none).
    """

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    def __post_init__(self) -> None:
        for name, low in (("kernel", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"LayerSpec.{name} must be an int >= {low}, got {value!r}")

    @property
    def effective_kernel(self) -> int:
        """e = d (k - 1) + 1, the span of the window in input pixels."""
        return self.dilation * (self.kernel - 1) + 1

    @property
    def receptive_field(self) -> int:
        return self.effective_kernel

    @property
    def offset(self) -> int:
        return self.padding

    def output_size(self, n: int) -> int:
        """floor((n + 2 p - e) / s) + 1, the output length for an input of length n.

        Returns a value <= 0 when the padded input is shorter than the window.
        """
        return (n + 2 * self.padding - self.effective_kernel) // self.stride + 1


@dataclass(frozen=True)
class Chain:
    """Layers applied one after another; ``S``, ``r`` and ``o`` by the recursion above."""

    layers: tuple[AxisGeometry, ...]

    @property
    def stride(self) -> int:
        S = 1
        for layer in self.layers:
            S *= layer.stride
        return S

    @property
    def receptive_field(self) -> int:
        J, r = 1, 1
        for layer in self.layers:
            r += (layer.receptive_field - 1) * J
            J *= layer.stride
        return r

    @property
    def offset(self) -> int:
        J, o = 1, 0
        for layer in self.layers:
            o += layer.offset * J
            J *= layer.stride
        return o

    def output_size(self, n: int) -> int:
        """Output length, layer by layer (each layer floors on its own)."""
        for layer in self.layers:
            if n <= 0:
                return n
            n = layer.output_size(n)
        return n


@dataclass(frozen=True)
class Parallel:
    """Branches applied to the same input and summed (a residual block).

    All branches must share the stride and give the same output length. Output ``i``
    then depends on the union of the branches' windows; its hull has

        S = S_b,   o = max_b o_b,   r = max_b (r_b - o_b) + o.
    """

    branches: tuple[AxisGeometry, ...]

    def __post_init__(self) -> None:
        if not self.branches:
            raise ValueError("Parallel needs at least one branch")
        strides = {b.stride for b in self.branches}
        if len(strides) != 1:
            raise ValueError(
                f"residual branches have different total strides {sorted(strides)}; "
                "give the shortcut the same stride as the main path"
            )

    @property
    def stride(self) -> int:
        return self.branches[0].stride

    @property
    def offset(self) -> int:
        return max(b.offset for b in self.branches)

    @property
    def receptive_field(self) -> int:
        return max(b.receptive_field - b.offset for b in self.branches) + self.offset

    def output_size(self, n: int) -> int:
        sizes = [b.output_size(n) for b in self.branches]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"residual branches give different output lengths {sizes} for input length "
                f"{n}; pad the main path so that its output matches the shortcut's"
            )
        return sizes[0]


def compose(layers: Sequence[AxisGeometry]) -> Chain:
    """The chain of ``layers`` (first applied first)."""
    return Chain(tuple(layers))


def parallel(branches: Sequence[AxisGeometry]) -> Parallel:
    """The summed branches (main path, shortcut) of a residual block."""
    return Parallel(tuple(branches))


def output_size(geometry: AxisGeometry, n: int) -> int:
    """Output length of ``geometry`` for ``n`` input pixels; ValueError when it is empty."""
    if n <= 0:
        raise ValueError(f"input length must be positive, got {n}")
    m = geometry.output_size(n)
    if m <= 0:
        raise ValueError(
            f"an input of length {n} is shorter than the window (receptive field "
            f"{geometry.receptive_field}, offset {geometry.offset}): the output is empty"
        )
    return m


def receptive_interval(geometry: AxisGeometry, j0: int, j1: int) -> tuple[int, int]:
    """Unclipped input interval ``[j0 S - o, (j1 - 1) S - o + r)`` of outputs ``[j0, j1)``.

    May extend below 0 or beyond the image: those pixels are padding.
    """
    if j1 <= j0:
        raise ValueError(f"empty output block [{j0}, {j1})")
    S, r, o = geometry.stride, geometry.receptive_field, geometry.offset
    return j0 * S - o, (j1 - 1) * S - o + r


def cone(geometry: AxisGeometry, j0: int, j1: int, n: int, aligned: bool = True) -> tuple[int, int]:
    """Input pixels ``[start, stop)`` that outputs ``[j0, j1)`` depend on, inside ``[0, n)``.

    With ``aligned`` the start is rounded down to a multiple of ``S`` so that a tile cut
    there keeps every layer's grid aligned with the full image's grid.
    """
    lo, hi = receptive_interval(geometry, j0, j1)
    start = min(max(lo, 0), n)
    stop = min(max(hi, start), n)  # empty when the block reads only padding
    if aligned:
        start -= start % geometry.stride
    return start, stop
