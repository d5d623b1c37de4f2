"""Hypothesis strategies for random per-axis geometries (shared by the geometry tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from reference.geometry import AxisGeometry, LayerSpec, compose, parallel


@st.composite
def layer_specs(draw) -> LayerSpec:
    """A convolution or pooling axis: kernel 1-7, stride 1-3, padding 0-3, dilation 1-3."""
    return LayerSpec(
        kernel=draw(st.integers(1, 7)),
        stride=draw(st.integers(1, 3)),
        padding=draw(st.integers(0, 3)),
        dilation=draw(st.integers(1, 3)),
    )


@st.composite
def residual_axes(draw) -> AxisGeometry:
    """A residual block's axis: a 'same'-padded main path, identity or strided 1x1 shortcut.

    The main path pads ``(e - 1) / 2`` per side (odd effective kernel), so its output length
    ``floor((n - 1) / s) + 1`` matches the strided 1x1 shortcut for every n.
    """
    stride = draw(st.integers(1, 3))
    main = []
    for i in range(draw(st.integers(1, 2))):
        k, d = draw(st.sampled_from([1, 3, 5, 7])), draw(st.integers(1, 3))
        main.append(LayerSpec(k, stride if i == 0 else 1, d * (k - 1) // 2, d))
    shortcut = LayerSpec(1, stride) if stride > 1 or draw(st.booleans()) else compose([])
    return parallel([compose(main), shortcut])


def chains(max_layers: int = 6):
    """Chains of 1-``max_layers`` elements, each a layer or a residual block."""
    return st.lists(st.one_of(layer_specs(), residual_axes()), min_size=1, max_size=max_layers).map(compose)
