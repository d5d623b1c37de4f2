"""The NumPy layers against independent oracles.

* forward: scipy.signal.correlate (convolution) and torch.nn.functional (every layer);
* backward: torch autograd (Hypothesis-drawn layers and sizes) and central finite
  differences on tiny inputs with fixed seeds (every entry of x and of every parameter);
* geometry and shapes: the output-size formula and ResNet-34's S = 32, r = 899, o = 449;
* errors: the messages say what is wrong and what to change.

Everything is float64. Comparisons are on whole arrays; the absolute tolerance is the
relative one times the largest magnitude of the reference, so that entries near zero
(where a relative tolerance means nothing) are still compared tightly.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from reference.geometry import LayerSpec
from reference.layers import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Layer,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
)
from reference.nets import basic_block, batchnorm, conv, resnet34_trunk

MAX_PX = 24  # largest drawn image side, to keep the suite fast


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def assert_close(actual: np.ndarray, desired: np.ndarray, rtol: float) -> None:
    """Whole-array comparison with atol = rtol * max(1, max |desired|)."""
    desired = np.asarray(desired)
    assert np.shape(actual) == desired.shape
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------- oracles


def torch_forward(layer: Layer, x: torch.Tensor, params: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """The same network in torch.nn.functional; ``params`` named as in layer.parameters()."""
    p = lambda name: params.get(prefix + name)  # noqa: E731
    if isinstance(layer, Conv2d):
        args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.conv2d(x, p("weight"), p("bias"), *args)
    if isinstance(layer, MaxPool2d):
        return F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, AvgPool2d):  # count_include_pad=True is torch's default
        return F.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, ReLU):
        return F.relu(x)
    if isinstance(layer, BatchNorm2d):
        mean, var = torch.from_numpy(layer.running_mean), torch.from_numpy(layer.running_var)
        return F.batch_norm(x, mean, var, p("weight"), p("bias"), training=False, eps=layer.eps)
    if isinstance(layer, Residual):
        main = torch_forward(layer.main, x, params, prefix + "main.")
        if layer.shortcut is None:
            return main + x
        return main + torch_forward(layer.shortcut, x, params, prefix + "shortcut.")
    if isinstance(layer, Sequential):
        for i, child in enumerate(layer.layers):
            x = torch_forward(child, x, params, f"{prefix}{i}.")
        return x
    raise TypeError(f"no torch oracle for {type(layer).__name__}")


def assert_matches_torch(layer: Layer, x: np.ndarray, rng: np.random.Generator) -> None:
    """Forward, dL/dx and every dL/dparameter against torch autograd, for a random dL/dy."""
    params = {k: torch.tensor(v, requires_grad=True) for k, v in layer.parameters().items()}
    x_t = torch.tensor(x, requires_grad=True)
    y_t = torch_forward(layer, x_t, params)
    y = layer(x)
    assert_close(y, y_t.detach().numpy(), rtol=1e-12)

    grad_y = rng.normal(size=y.shape)
    y_t.backward(torch.from_numpy(grad_y))
    grad_x, grads = layer.backward(x, grad_y)
    assert_close(grad_x, x_t.grad.numpy(), rtol=1e-12)
    assert grads.keys() == params.keys()
    for name, g in grads.items():
        assert_close(g, params[name].grad.numpy(), rtol=1e-12)


def conv_scipy(x: np.ndarray, layer: Conv2d) -> np.ndarray:
    """Slow, obvious convolution: one scipy correlate per (n, output channel, input channel).

    Dilation by a kernel with d - 1 zeros between taps; stride by subsampling the
    stride-1 result.
    """
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = layer.stride, layer.padding, layer.dilation
    C_out, C_g, k_h, k_w = layer.weight.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (p_h, p_h), (p_w, p_w)))
    y = []
    for n in range(x.shape[0]):
        for o in range(C_out):
            first = o // (C_out // layer.groups) * C_g  # first input channel of o's group
            acc = 0.0 if layer.bias is None else layer.bias[o]
            for c in range(C_g):
                kernel = np.zeros((d_h * (k_h - 1) + 1, d_w * (k_w - 1) + 1))
                kernel[::d_h, ::d_w] = layer.weight[o, c]
                full = scipy.signal.correlate(x_pad[n, first + c], kernel, "valid", "direct")
                acc = acc + full[::s_h, ::s_w]
            y.append(acc)
    return np.stack(y).reshape(x.shape[0], C_out, *y[0].shape)


def numerical_grads(
    layer: Layer, x: np.ndarray, grad_y: np.ndarray, h: float = 1e-6
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Central differences of L = sum(layer(x) * grad_y) in every entry of x and of every parameter.

    Parameters are perturbed in place (parameters() returns the layer's own arrays) and
    restored.
    """
    x = x.copy()

    def loss() -> float:
        return float(np.sum(layer(x) * grad_y))

    def numerical(a: np.ndarray) -> np.ndarray:
        grad = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            saved = a[idx]
            a[idx] = saved + h
            plus = loss()
            a[idx] = saved - h
            minus = loss()
            a[idx] = saved
            grad[idx] = (plus - minus) / (2 * h)
        return grad

    return numerical(x), {name: numerical(p) for name, p in layer.parameters().items()}


# --------------------------------------------------------------------------- strategies

rngs = st.integers(0, 2**32 - 1).map(np.random.default_rng)


@st.composite
def image_size(draw, rows: LayerSpec, cols: LayerSpec) -> tuple[int, int]:
    """(H, W) up to MAX_PX with a non-empty output: n + 2 p >= e per axis."""
    return tuple(draw(st.integers(max(1, a.effective_kernel - 2 * a.padding), MAX_PX)) for a in (rows, cols))


@st.composite
def inputs(draw, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal noise or, half the time, integers in [-2, 2] (ties for max pooling, 0 for ReLU)."""
    if draw(st.booleans()):
        return rng.integers(-2, 3, size=shape).astype(np.float64)
    return rng.normal(size=shape)


@st.composite
def conv_args(draw) -> dict:
    """nets.conv arguments: kernels 1-5, strides 1-3, paddings 0-3, dilations 1-3, each an
    (h, w) pair (often non-square); groups from 1 to depthwise; with or without bias."""
    pair = lambda lo, hi: (draw(st.integers(lo, hi)), draw(st.integers(lo, hi)))  # noqa: E731
    c_in = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in range(1, c_in + 1) if c_in % g == 0]))
    c_out = groups * draw(st.integers(1, max(1, 4 // groups)))
    return dict(
        c_in=c_in,
        c_out=c_out,
        kernel=pair(1, 5),
        stride=pair(1, 3),
        padding=pair(0, 3),
        dilation=pair(1, 3),
        groups=groups,
        bias=draw(st.booleans()),
    )


@st.composite
def conv_cases(draw) -> tuple[Conv2d, np.ndarray, np.random.Generator]:
    """A random Conv2d (see conv_args) and an x of batch 1-3 with a non-empty output."""
    rng = draw(rngs)
    layer = conv(rng, **draw(conv_args()))
    H, W = draw(image_size(*layer.geometry))
    x = rng.normal(size=(draw(st.integers(1, 3)), layer.in_channels, H, W))
    return layer, x, rng


@st.composite
def pool_cases(draw) -> tuple[Layer, np.ndarray, np.random.Generator]:
    """MaxPool2d or AvgPool2d: kernels 1-4, strides 1-3 or the default, legal padding."""
    rng = draw(rngs)
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.none() | st.tuples(st.integers(1, 3), st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    layer = draw(st.sampled_from([MaxPool2d, AvgPool2d]))(kernel, stride, padding)
    H, W = draw(image_size(*layer.geometry))
    x = draw(inputs(rng, (draw(st.integers(1, 3)), draw(st.integers(1, 4)), H, W)))
    return layer, x, rng


@st.composite
def pointwise_cases(draw) -> tuple[Layer, np.ndarray, np.random.Generator]:
    """ReLU or BatchNorm2d on x of any small shape."""
    rng = draw(rngs)
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    H, W = draw(st.integers(1, MAX_PX)), draw(st.integers(1, MAX_PX))
    layer = ReLU() if draw(st.booleans()) else batchnorm(rng, C)
    return layer, draw(inputs(rng, (N, C, H, W))), rng


@st.composite
def block_cases(draw) -> tuple[Layer, np.ndarray, np.random.Generator]:
    """A BasicBlock (identity or strided 1x1 shortcut) and x."""
    rng = draw(rngs)
    c_in, c_out, stride = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 2))
    N, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    return basic_block(rng, c_in, c_out, stride), rng.normal(size=(N, c_in, H, W)), rng


# --------------------------------------------------------------------------- forward


@given(conv_args(), rngs, st.data())
def test_conv_forward_matches_scipy_and_shape_formula(args, rng, data):
    layer = conv(rng, **args)
    (k_h, k_w), (s_h, s_w) = args["kernel"], args["stride"]
    (p_h, p_w), (d_h, d_w) = args["padding"], args["dilation"]
    assert layer.geometry == (LayerSpec(k_h, s_h, p_h, d_h), LayerSpec(k_w, s_w, p_w, d_w))

    H, W = data.draw(image_size(*layer.geometry))
    x = rng.normal(size=(data.draw(st.integers(1, 3)), args["c_in"], H, W))
    y = layer(x)
    # floor((n + 2p - d(k-1) - 1) / s) + 1, written out rather than taken from the geometry
    H_out = (H + 2 * p_h - d_h * (k_h - 1) - 1) // s_h + 1
    W_out = (W + 2 * p_w - d_w * (k_w - 1) - 1) // s_w + 1
    assert y.shape == (x.shape[0], args["c_out"], H_out, W_out)
    assert_close(y, conv_scipy(x, layer), rtol=1e-12)


# --------------------------------------------------------------------------- torch autograd


@given(conv_cases())
def test_conv_matches_torch(case):
    assert_matches_torch(*case)


@given(pool_cases())
def test_pools_match_torch(case):
    assert_matches_torch(*case)  # integer inputs check torch's first-max rule on ties


@given(pointwise_cases())
def test_relu_and_batchnorm_match_torch(case):
    assert_matches_torch(*case)  # integer inputs check ReLU's zero gradient at 0


@given(block_cases())
def test_basic_block_matches_torch(case):
    assert_matches_torch(*case)


def test_resnet34_trunk_geometry_shape_and_torch():
    rng = np.random.default_rng(0)
    net = resnet34_trunk(rng)
    for axis in net.geometry:
        assert (axis.stride, axis.receptive_field, axis.offset) == (32, 899, 449)
    rows, cols = net.geometry
    x = rng.normal(size=(1, 3, 64, 96))
    # every strided layer maps n to ceil(n / 2), so the trunk maps n to ceil(n / 32)
    assert net(x).shape == (1, 32, rows.output_size(64), cols.output_size(96)) == (1, 32, 2, 3)
    assert_matches_torch(net, x, rng)


# --------------------------------------------------------------------------- finite differences


def _small_net(rng: np.random.Generator) -> Sequential:
    """conv-BN-ReLU-maxpool, a block with a strided 1x1 shortcut, avgpool.

    (N, 2, 12, 11) -> (N, 3, 2, 2).
    """
    return Sequential(
        [
            conv(rng, 2, 3, 3, padding=1),
            batchnorm(rng, 3),
            ReLU(),
            MaxPool2d(3, stride=2, padding=1),
            basic_block(rng, 3, 3, stride=2),
            AvgPool2d(2, stride=1),
        ]
    )


FD_CASES = {  # name: (layer factory, x shape)
    "conv": (
        lambda rng: conv(rng, 2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        (2, 2, 7, 6),
    ),
    "conv_grouped": (
        lambda rng: conv(rng, 4, 2, (2, 3), stride=(1, 2), padding=1, groups=2),
        (1, 4, 5, 7),
    ),
    "conv_depthwise_no_bias": (
        lambda rng: conv(rng, 3, 3, 3, dilation=2, groups=3, bias=False),
        (2, 3, 6, 7),
    ),
    "maxpool": (lambda rng: MaxPool2d((3, 2), stride=(2, 1), padding=1), (2, 2, 7, 5)),
    "avgpool": (lambda rng: AvgPool2d(3, stride=2, padding=1), (2, 2, 6, 7)),
    "relu": (lambda rng: ReLU(), (2, 2, 3, 4)),
    "batchnorm": (lambda rng: batchnorm(rng, 3), (2, 3, 3, 4)),
    "residual_identity": (lambda rng: Residual(conv(rng, 2, 2, 3, padding=1)), (2, 2, 4, 5)),
    "block_strided_shortcut": (lambda rng: basic_block(rng, 2, 3, stride=2), (2, 2, 5, 6)),
    "small_net": (_small_net, (2, 2, 12, 11)),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", FD_CASES)
def test_backward_matches_finite_differences(name, seed):
    rng = np.random.default_rng(seed)
    make, shape = FD_CASES[name]
    layer = make(rng)
    x = rng.normal(size=shape)
    grad_y = rng.normal(size=layer(x).shape)
    grad_x, grads = layer.backward(x, grad_y)
    num_x, num_grads = numerical_grads(layer, x, grad_y)
    np.testing.assert_allclose(grad_x, num_x, rtol=1e-6, atol=1e-8)
    assert grads.keys() == num_grads.keys() == layer.parameters().keys()
    for key in grads:
        np.testing.assert_allclose(grads[key], num_grads[key], rtol=1e-6, atol=1e-8, err_msg=key)


# --------------------------------------------------------------------------- structure


def test_parameters_are_the_layers_own_arrays_with_nested_names():
    rng = np.random.default_rng(0)
    block = basic_block(rng, 2, 3, stride=2)
    params = block.parameters()
    assert list(params) == [
        "0.main.0.weight", "0.main.1.weight", "0.main.1.bias",
        "0.main.3.weight", "0.main.4.weight", "0.main.4.bias",
        "0.shortcut.0.weight", "0.shortcut.1.weight", "0.shortcut.1.bias",
    ]  # fmt: skip
    assert params["0.main.0.weight"] is block.layers[0].main.layers[0].weight
    x = rng.normal(size=(1, 2, 5, 5))
    _, grads = block.backward(x, np.ones(block(x).shape))
    assert list(grads) == list(params)
    assert all(grads[k].shape == params[k].shape for k in params)


def test_residual_geometry_is_the_hull_of_its_branches():
    rng = np.random.default_rng(0)
    rows, _ = basic_block(rng, 2, 3, stride=2).geometry
    # main: 3x3 s2 p1, 3x3 p1 -> S = 2, r = 3 + 2 * 2 = 7, o = 1 + 1 * 2 = 3;
    # shortcut: 1x1 s2 -> r = 1, o = 0; hull: o = 3, r = max(7 - 3, 1 - 0) + 3 = 7
    assert (rows.stride, rows.receptive_field, rows.offset) == (2, 7, 3)
    rows, _ = Residual(ReLU()).geometry
    assert (rows.stride, rows.receptive_field, rows.offset) == (1, 1, 0)


# --------------------------------------------------------------------------- errors


def test_errors_say_what_to_change():
    rng = np.random.default_rng(0)
    layer = conv(rng, 3, 4, 3)
    with pytest.raises(ValueError, match=r"expects 3 input channels, got x with 2"):
        layer(np.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match=r"expects x of shape \(N, C, H, W\), got shape \(3, 8"):
        layer(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"groups=2 must be a positive divisor of the 3 output"):
        Conv2d(np.zeros((3, 2, 3, 3)), groups=2)
    with pytest.raises(ValueError, match=r"groups=2 must divide the 3 input channels"):
        conv(rng, 3, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"input of 4x8 pixels .* smaller than the window of 5x5"):
        conv(rng, 1, 1, 5)(np.zeros((1, 1, 4, 8)))
    with pytest.raises(ValueError, match=r"smaller than the window"):
        MaxPool2d(3, padding=1)(np.zeros((1, 1, 8, 0)))
    with pytest.raises(ValueError, match=r"grad_y has shape \(1, 4, 5, 5\), but .* \(1, 4, 6, 6\)"):
        layer.backward(np.zeros((1, 3, 8, 8)), np.zeros((1, 4, 5, 5)))
    with pytest.raises(ValueError, match=r"grad_y has shape"):
        basic_block(rng, 2, 2, 1).backward(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 5)))
    with pytest.raises(ValueError, match=r"more than half the kernel"):
        MaxPool2d(3, padding=2)
    with pytest.raises(ValueError, match=r"more than half the kernel"):
        AvgPool2d(2, padding=(0, 2))
    with pytest.raises(ValueError, match=r"expects 3 input channels"):
        batchnorm(rng, 3)(np.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError, match=r"main path gives shape \(1, 3, 4, 4\) but the shortcut"):
        Residual(conv(rng, 2, 3, 3, padding=1))(np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"different total strides"):
        Residual(conv(rng, 2, 2, 3, stride=2, padding=1))
