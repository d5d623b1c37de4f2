"""Geometry and tile plans against independent oracles.

Oracles: torch's own output-size arithmetic (``conv1d`` on a zero signal) and explicit
dependency matrices built by enumerating every window tap, multiplied through the chain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from reference.geometry import (
    Chain,
    LayerSpec,
    Parallel,
    compose,
    cone,
    output_size,
    parallel,
    receptive_interval,
)
from reference.tiling import best_tile_size, min_tile_size, plan_axis, plan_tiles
from tests.strategies import chains, layer_specs


# ---------------------------------------------------------------- oracles
def torch_output_size(spec: LayerSpec, n: int) -> int:
    """Output length of a 1-D convolution as torch computes it (0 when torch refuses)."""
    try:
        y = torch.nn.functional.conv1d(
            torch.zeros(1, 1, n), torch.zeros(1, 1, spec.kernel),
            stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
        )
    except RuntimeError:  # padded input shorter than the window
        return 0
    return y.shape[-1]


def dependency_matrix(geometry, n: int) -> np.ndarray:
    """D[j, i] = True when output j reads input pixel i, by enumerating every tap.

    Returns an (n_out, n) bool array; (0, n) when the output is empty.
    """
    if isinstance(geometry, LayerSpec):
        n_out = max(torch_output_size(geometry, n), 0)
        D = np.zeros((n_out, n), dtype=bool)
        for j in range(n_out):
            for m in range(geometry.kernel):
                i = j * geometry.stride - geometry.padding + m * geometry.dilation
                if 0 <= i < n:
                    D[j, i] = True
        return D
    if isinstance(geometry, Chain):
        D = np.eye(n, dtype=bool)
        for layer in geometry.layers:
            D = (dependency_matrix(layer, D.shape[0]).astype(int) @ D.astype(int)) > 0
        return D
    if isinstance(geometry, Parallel):
        mats = [dependency_matrix(b, n) for b in geometry.branches]
        assert len({m.shape for m in mats}) == 1
        return np.logical_or.reduce(mats)
    raise TypeError(geometry)


# ---------------------------------------------------------------- single layers and composition
@given(layer_specs(), st.integers(1, 60))
def test_layer_output_size_matches_torch(spec, n):
    expected = torch_output_size(spec, n)
    if expected > 0:
        assert spec.output_size(n) == expected
    else:
        assert spec.output_size(n) <= 0


@given(layer_specs())
def test_single_layer_chain_is_the_layer(spec):
    chain = compose([spec])
    assert (chain.stride, chain.receptive_field, chain.offset) == (spec.stride, spec.effective_kernel, spec.padding)


@given(chains(3), chains(3), st.integers(1, 200))
def test_composition_is_associative(a, b, n):
    flat, nested = compose(a.layers + b.layers), compose([a, b])
    assert (flat.stride, flat.receptive_field, flat.offset) == (nested.stride, nested.receptive_field, nested.offset)
    assert flat.output_size(n) == nested.output_size(n)


def test_residual_hull_formula():
    main = compose([LayerSpec(3, 2, 1), LayerSpec(3, 1, 1)])  # r = 7, o = 3
    block = parallel([main, LayerSpec(1, 2)])  # shortcut r = 1, o = 0
    assert (block.stride, block.receptive_field, block.offset) == (2, 7, 3)
    with pytest.raises(ValueError, match="different total strides"):
        parallel([main, LayerSpec(1, 1)])
    with pytest.raises(ValueError, match="different output lengths"):
        parallel([compose([LayerSpec(3, 1, 0)]), compose([])]).output_size(10)


# ---------------------------------------------------------------- receptive field against the oracle
@given(chains(), st.integers(1, 90))
def test_receptive_interval_matches_dependencies(chain, n):
    """Every dependency lies in the interval; where the interval is not clipped by the
    image, its end pixels are real dependencies (the interval is tight). An output that
    reads only padding at some layer depends on no pixel at all."""
    n_out = chain.output_size(n)
    assume(n_out >= 1)
    D = dependency_matrix(chain, n)
    assert D.shape == (n_out, n)
    for j in range(n_out):
        lo, hi = receptive_interval(chain, j, j + 1)
        deps = np.flatnonzero(D[j])
        if deps.size == 0:  # reads only padding (possible where padding exceeds the window)
            continue
        assert deps.min() >= lo and deps.max() < hi
        if lo >= 0:
            assert D[j, lo]
        if hi <= n:
            assert D[j, hi - 1]


@given(chains(), st.integers(1, 90), st.data())
def test_cone_of_a_block_contains_its_dependencies(chain, n, data):
    n_out = chain.output_size(n)
    assume(n_out >= 1)
    j0 = data.draw(st.integers(0, n_out - 1))
    j1 = data.draw(st.integers(j0 + 1, n_out))
    start, stop = cone(chain, j0, j1, n)
    assert start % chain.stride == 0 and 0 <= start <= stop <= n
    deps = np.flatnonzero(dependency_matrix(chain, n)[j0:j1].any(axis=0))
    assert deps.size == 0 or (deps.min() >= start and deps.max() < stop)


def test_resnet34_axis_geometry():
    conv = LayerSpec
    layers = [conv(7, 2, 3), conv(3, 2, 1)]  # stem conv, max pool
    for blocks, stride in zip([3, 4, 6, 3], [1, 2, 2, 2]):
        for b in range(blocks):
            s = stride if b == 0 else 1
            main = compose([conv(3, s, 1), conv(3, 1, 1)])
            layers.append(parallel([main, conv(1, s) if s > 1 else compose([])]))
    g = compose(layers)
    assert (g.stride, g.receptive_field, g.offset) == (32, 899, 449)
    assert g.output_size(8192) == 256 and g.output_size(8193) == 257
    assert min_tile_size(g, 10**6) == 15 * 32 + 899 - 449


# ---------------------------------------------------------------- tile plans
@given(chains(), st.integers(1, 150), st.data())
def test_plan_partitions_output_with_exact_tiles(chain, n, data):
    n_out = chain.output_size(n)
    assume(n_out >= 1)
    smallest = min_tile_size(chain, n)
    tile = data.draw(st.integers(smallest, n + 20), label="tile")
    tiles = plan_axis(chain, n, tile)
    S = chain.stride
    # owned blocks partition [0, n_out) exactly once, in order
    assert tiles[0].out_start == 0 and tiles[-1].out_stop == n_out
    for prev, nxt in zip(tiles, tiles[1:]):
        assert prev.out_stop == nxt.out_start
    assert all(t.out_start < t.out_stop for t in tiles)
    # at most two tile lengths per axis
    assert len({t.length for t in tiles}) <= 2
    for t in tiles:
        assert 0 <= t.start < t.stop <= n and t.length <= tile
        assert t.start % S == 0
        # the owned block sits inside the tile's own output
        own = t.owned_slice
        assert t.out_length == chain.output_size(t.length)
        assert 0 <= own.start < own.stop <= t.out_length
        assert t.computed_output_slice.start == t.start // S
        # every owned output is exact: receptive field inside the tile or over a true border
        lo, hi = receptive_interval(chain, t.out_start, t.out_stop)
        assert lo >= t.start or t.start == 0
        assert hi <= t.stop or t.stop == n


@given(chains(), st.integers(2, 150), st.data())
def test_too_small_tile_names_the_smallest(chain, n, data):
    assume(chain.output_size(n) >= 1)
    smallest = min_tile_size(chain, n)
    assume(smallest > 1)
    tile = data.draw(st.integers(1, smallest - 1))
    with pytest.raises(ValueError, match=f"at least {smallest}"):
        plan_axis(chain, n, tile)
    plan_axis(chain, n, smallest)  # and the named size works


@given(chains(4), chains(4), st.integers(1, 120), st.integers(1, 120), st.data())
def test_2d_plan_shapes_and_overhead(gh, gw, H, W, data):
    assume(gh.output_size(H) >= 1 and gw.output_size(W) >= 1)
    th = data.draw(st.integers(min_tile_size(gh, H), H + 5))
    tw = data.draw(st.integers(min_tile_size(gw, W), W + 5))
    plan = plan_tiles((gh, gw), (H, W), (th, tw))
    assert len(plan.tile_shapes) <= 4
    assert plan.output_size == (gh.output_size(H), gw.output_size(W))
    covered = np.zeros(plan.output_size, dtype=int)
    pixels = 0
    for tile in plan:
        covered[tile.output_slices] += 1
        pixels += tile.shape[0] * tile.shape[1]
        assert tile.shape[0] <= th and tile.shape[1] <= tw
    assert (covered == 1).all()
    assert plan.overhead == pytest.approx(pixels / (H * W))


def test_outputs_that_read_only_padding_get_a_real_tile():
    """Stride 3 then padding 1: on 3 pixels the last output reads nothing but padding; its
    tile must still lie inside the image and end on the border (found by Hypothesis)."""
    g = compose([LayerSpec(1, 3), LayerSpec(1, 1, 1)])
    assert g.output_size(3) == 3 and receptive_interval(g, 2, 3) == (3, 4)
    assert min_tile_size(g, 3) == 3
    for n, tile in [(3, 3), (7, 1), (7, 2), (8, 2)]:
        tiles = plan_axis(g, n, max(tile, min_tile_size(g, n)))
        assert all(0 <= t.start < t.stop <= n for t in tiles)
        assert tiles[-1].stop == n and tiles[-1].out_stop == g.output_size(n)


def test_the_last_tile_gives_every_layer_an_output():
    """Pool 2 then pad 1 on 5 pixels: the pool drops pixel 4, and the last output reads only
    padding. A last tile [4, 5) would give the pool nothing to pool (torch raises); the
    smallest tile size is 3, so that the last tile can start at 2 (found by Hypothesis)."""
    g = compose([LayerSpec(2, 2), LayerSpec(1, 1, 1)])
    assert g.output_size(5) == 4 and g.output_size(1) == 0
    assert min_tile_size(g, 5) == 3
    with pytest.raises(ValueError, match="at least 3"):
        plan_axis(g, 5, 2)
    tiles = plan_axis(g, 5, 3)
    assert tiles[-1].stop == 5 and all(t.out_length >= 1 for t in tiles)


def test_plan_errors_are_clear():
    g = compose([LayerSpec(7, 2, 3), LayerSpec(3, 2, 1)])
    with pytest.raises(ValueError, match="image 100x80, tile 5x5.*at least"):
        plan_tiles((g, g), (100, 80), 5)
    with pytest.raises(ValueError, match="positive"):
        output_size(g, 0)
    with pytest.raises(ValueError, match="empty"):
        output_size(compose([LayerSpec(5)]), 3)
    with pytest.raises(ValueError, match="tile_size"):
        plan_tiles((g, g), (100, 80), (5, 5, 5))
    with pytest.raises(ValueError, match="kernel"):
        LayerSpec(0)


@given(chains(4), st.integers(2, 300), st.data())
def test_best_tile_size_computes_least(chain, n, data):
    assume(chain.output_size(n) >= 1)
    smallest = min_tile_size(chain, n)
    max_tile = data.draw(st.integers(smallest, n + 5))
    best = best_tile_size(chain, n, max_tile)
    assert smallest <= best <= min(max_tile, n)

    def computed(t):
        return sum(tile.length for tile in plan_axis(chain, n, t))

    assert computed(best) == min(computed(t) for t in range(smallest, min(max_tile, n) + 1))


def test_sizes_accept_any_integral_type():
    """np.int64 from a config or an array shape is as good as an int (floats are refused:
    tests/test_bad_inputs.py)."""
    g = compose([LayerSpec(7, 2, 3), LayerSpec(3, 2, 1)])
    want = plan_tiles((g, g), (100, 80), 40)
    assert plan_tiles((g, g), (np.int64(100), np.int32(80)), np.int64(40)) == want
    assert plan_tiles((g, g), np.array([100, 80]), (np.uint16(40), 40)) == want
    assert all(type(v) is int for v in (*want.image_size, *want.output_size))
    assert plan_axis(g, 100, np.int64(40)) == want.rows
