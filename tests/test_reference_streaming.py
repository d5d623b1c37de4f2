"""The NumPy streamed forward and backward equal the full computation.

Oracle: the same reference network run on the whole image (whose layers are themselves
checked against scipy, torch and finite differences in test_reference_layers.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from reference.geometry import receptive_interval
from reference.nets import resnet34_trunk
from reference.streaming import plan_for, stream_backward, stream_forward
from reference.tiling import min_tile_size
from tests.helpers import relative_error
from tests.strategies import reference_networks


@st.composite
def streaming_cases(draw, linear: bool = False):
    """A random network, a non-square image that gives an output, a batch 1-3 and a
    tile size from the smallest valid one to larger than the image."""
    net = draw(reference_networks(linear=linear))
    gh, gw = net.geometry
    H, W = draw(st.integers(3, 40)), draw(st.integers(3, 40))
    assume(gh.output_size(H) >= 1 and gw.output_size(W) >= 1)
    tile = (draw(st.integers(min_tile_size(gh, H), H + 6)), draw(st.integers(min_tile_size(gw, W), W + 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="input seed"))
    x = rng.standard_normal((draw(st.integers(1, 3)), 2, H, W))
    return net, x, tile, rng


@given(streaming_cases())
def test_stream_forward_equals_forward(case):
    net, x, tile, _ = case
    y = net.forward(x)
    y_streamed = stream_forward(net, x, tile)
    assert y_streamed.shape == y.shape
    assert relative_error(y_streamed, y) <= 1e-12


@given(streaming_cases())
def test_stream_backward_equals_backward(case):
    net, x, tile, rng = case
    grad_y = rng.standard_normal(net.forward(x).shape)
    grad_x, grads = net.backward(x, grad_y)
    grad_x_s, grads_s = stream_backward(net, x, grad_y, tile)
    assert relative_error(grad_x_s, grad_x) <= 1e-10
    assert grads_s.keys() == grads.keys() == net.parameters().keys()
    for name in grads:
        assert relative_error(grads_s[name], grads[name]) <= 1e-10, name


@given(streaming_cases(), st.data())
def test_pixels_outside_the_cone_do_not_change_owned_outputs(case, data):
    net, x, tile, rng = case
    plan = plan_for(net, x, tile)
    t = data.draw(st.sampled_from(plan.tiles), label="tile")
    (gh, gw), (H, W) = net.geometry, x.shape[-2:]
    (r0, r1), (c0, c1) = receptive_interval(gh, t.row.out_start, t.row.out_stop), receptive_interval(
        gw, t.col.out_start, t.col.out_stop
    )
    outside = np.ones((H, W), dtype=bool)
    outside[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = False
    x2 = np.where(outside, rng.standard_normal(x.shape) * 10, x)
    owned = (..., *t.output_slices)
    np.testing.assert_array_equal(net.forward(x2)[owned], net.forward(x)[owned])


@given(streaming_cases(linear=True), st.data())
def test_the_cone_border_pixels_do_change_owned_outputs(case, data):
    """The cone is tight. In a linear network, an output row that depends on the image at
    all depends on the first row of its receptive interval (when that row is inside the
    image), and likewise the last row, the first and the last column."""
    net, x, tile, rng = case
    plan = plan_for(net, x, tile)
    t = data.draw(st.sampled_from(plan.tiles), label="tile")
    y = net.forward(x)
    noise = rng.standard_normal(x.shape) + 1.0
    for axis, geometry, owned in ((-2, net.geometry[0], t.row), (-1, net.geometry[1], t.col)):
        n = x.shape[axis]
        for j, end in ((owned.out_start, 0), (owned.out_stop - 1, 1)):
            border = receptive_interval(geometry, j, j + 1)[end] - end  # first or last pixel
            if not 0 <= border < n:
                continue  # clipped by the image: the padding is the border
            block = [slice(None), slice(None), *t.output_slices]
            block[axis] = slice(j, j + 1)  # one output line of the owned block
            block = tuple(block)
            if np.array_equal(net.forward(x + noise)[block], y[block]):
                continue  # this output line reads only padding
            pixels = [slice(None)] * 4
            pixels[axis] = slice(border, border + 1)
            x2 = x.copy()
            x2[tuple(pixels)] += noise[tuple(pixels)]
            assert np.abs(net.forward(x2)[block] - y[block]).max() > 1e-12 * max(np.abs(y[block]).max(), 1.0)


def test_narrow_resnet34_streams_exactly():
    rng = np.random.default_rng(0)
    net = resnet34_trunk(rng, widths=(2, 2, 4, 4))
    gh, gw = net.geometry
    assert (gh.stride, gh.receptive_field, gh.offset) == (32, 899, 449)
    x = rng.standard_normal((1, 3, 1100, 1000))
    plan = plan_for(net, x, 980)
    assert len(plan.rows) >= 2 and len(plan.cols) >= 2  # several tiles in each direction
    y = net.forward(x)
    assert y.shape == (1, 4, 35, 32)  # ceil(1100 / 32), ceil(1000 / 32)
    assert relative_error(stream_forward(net, x, 980), y) <= 1e-12
    grad_y = rng.standard_normal(y.shape)
    grad_x, grads = net.backward(x, grad_y)
    grad_x_s, grads_s = stream_backward(net, x, grad_y, 980)
    assert relative_error(grad_x_s, grad_x) <= 1e-10
    for name in grads:
        assert relative_error(grads_s[name], grads[name]) <= 1e-10, name


def test_errors_are_clear():
    rng = np.random.default_rng(0)
    net = resnet34_trunk(rng, widths=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="at least 930"):
        stream_forward(net, np.zeros((1, 3, 2000, 2000)), 500)
    with pytest.raises(ValueError, match="empty"):
        stream_forward(net, np.zeros((1, 3, 0, 10)), 500)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        stream_forward(net, np.zeros((3, 64, 64)), 500)
    with pytest.raises(ValueError, match="grad_y must be"):
        stream_backward(net, np.zeros((1, 3, 64, 64)), np.zeros((1, 2, 3, 3)), 500)
