"""Hypothesis strategies shared by several test modules: random per-axis geometries (the
geometry tests) and random augmentations (the training and device data path tests)."""

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


@st.composite
def reference_networks(draw, in_channels: int = 2, linear: bool = False):
    """Random ``reference.layers`` networks of 1-6 elements with seeded weights.

    Elements: convolutions (kernels 1-7, strides 1-3, paddings 0-3, dilations 1-3, groups 1
    or depthwise), max/avg pools, ReLU, batch norm and residual blocks with an identity or a
    strided 1x1 shortcut. ``linear`` leaves out ReLU and max pooling, so that every pixel in
    an output's receptive field changes it.
    """
    import numpy as np

    from reference import layers as L
    from reference.nets import batchnorm, conv

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="weight seed"))
    kinds = ["conv", "conv", "avgpool", "bn", "residual"] + ([] if linear else ["maxpool", "relu"])
    c = in_channels
    net = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            depthwise = draw(st.booleans())
            c_out = c if depthwise else draw(st.integers(1, 3))
            net.append(
                conv(
                    rng,
                    c,
                    c_out,
                    (draw(st.integers(1, 7)), draw(st.integers(1, 7))),
                    stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                    padding=(draw(st.integers(0, 3)), draw(st.integers(0, 3))),
                    dilation=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                    groups=c if depthwise else 1,
                    bias=draw(st.booleans()),
                )
            )
            c = c_out
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.integers(1, 4))
            pool = L.MaxPool2d if kind == "maxpool" else L.AvgPool2d
            net.append(pool(k, stride=draw(st.integers(1, 3)), padding=draw(st.integers(0, k // 2))))
        elif kind == "relu":
            net.append(L.ReLU())
        elif kind == "bn":
            net.append(batchnorm(rng, c))
        else:
            s, k, d = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 5])), draw(st.integers(1, 2))
            c_out = draw(st.integers(1, 3))
            main = [conv(rng, c, c_out, k, stride=s, padding=d * (k - 1) // 2, dilation=d)]
            if not linear:
                main.append(L.ReLU())
            main += [conv(rng, c_out, c_out, 3, padding=1, bias=False), batchnorm(rng, c_out)]
            shortcut = None
            if s > 1 or c != c_out:
                shortcut = L.Sequential([conv(rng, c, c_out, 1, stride=s, bias=False), batchnorm(rng, c_out)])
            net.append(L.Residual(L.Sequential(main), shortcut))
            c = c_out
    return L.Sequential(net)


def augment_params(saturation_value: float):
    """Random ``AugmentParams``: any flips and quarter turns; no colour jitter, or hue shift in
    [-0.5, 0.5] and saturation and value shifts in [-saturation_value, saturation_value]."""
    from torch_impl.slides.augment import AugmentParams  # imports torch: only when asked for

    bound = saturation_value
    return st.builds(
        AugmentParams,
        flip_v=st.booleans(),
        flip_h=st.booleans(),
        rot90_k=st.integers(0, 3),
        hsv_shift=st.one_of(
            st.just((0.0, 0.0, 0.0)),
            st.tuples(st.floats(-0.5, 0.5), st.floats(-bound, bound), st.floats(-bound, bound)),
        ),
    )
