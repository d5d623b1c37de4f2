"""The torch colour jitter (for tiles on the device) equals the NumPy reference of augment.py:
the arithmetic and the colour table, on every uint8 colour."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_impl.slides import device_jitter
from torch_impl.slides.augment import AugmentedView, jitter_hsv
from torch_impl.slides.device_jitter import (
    TABLE_ENTRIES,
    ColourJitter,
    apply_jitter_table,
    jitter_hsv_torch,
    jitter_table,
)
from torch_impl.slides.slide import ArrayImage


def every_colour() -> np.ndarray:
    """(3, 4096, 4096) uint8: all 2^24 RGB colours once, pixel k (in C order) the colour of
    code k = r + 256 g + 65536 b (the colour table's order)."""
    codes = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([codes & 255, (codes >> 8) & 255, codes >> 16]).astype(np.uint8)
    return rgb.reshape(3, 4096, 4096)


@pytest.mark.parametrize("shift", [(0.05, 0.1, -0.1), (-0.5, -0.3, 0.25), (0.0, 0.0, 0.0), (0.999, 1.0, -1.0)])
def test_torch_jitter_equals_numpy_on_every_colour(shift):
    """Bit for bit on the CPU: the same float32 operations in the same order.

    (On a GPU, fused or reordered float32 arithmetic may move a value across a .5 rounding
    boundary: tests/test_cuda.py allows one grey level there.)
    """
    rgb = every_colour()[:, ::4, :]  # (3, 1024, 4096): every colour whose G is a multiple of 4
    expected = jitter_hsv(rgb, shift)
    got = jitter_hsv_torch(torch.from_numpy(np.ascontiguousarray(rgb)), shift).numpy()
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shift=st.tuples(st.floats(-0.5, 0.5), st.floats(-0.5, 0.5), st.floats(-0.5, 0.5)),
    tile=st.tuples(st.integers(0, 59), st.integers(0, 49), st.integers(1, 60), st.integers(1, 50)),
)
def test_jitter_per_tile_equals_jitter_of_the_whole_image(seed, shift, tile):
    """Pointwise: jittering a tile on the device == cutting the tile out of the jittered image.

    Tiles lie inside the image, as the streaming engine's tiles do (its plans clip input
    regions to the image; outside pixels are the network's zero padding, never read).
    """
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(3, 60, 50), dtype=np.uint8)
    y, x, h, w = tile
    h, w = min(h, 60 - y), min(w, 50 - x)
    whole = AugmentedView(ArrayImage(image), hsv_shift=shift).read(y, x, h, w)  # NumPy, CPU
    plain = AugmentedView(ArrayImage(image)).read(y, x, h, w)
    per_tile = jitter_hsv_torch(torch.from_numpy(plain), shift).numpy()
    np.testing.assert_array_equal(per_tile, whole)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shift=st.tuples(st.floats(-3.0, 3.0), st.floats(-1.5, 1.5), st.floats(-1.5, 1.5)),
    lead=st.lists(st.integers(0, 3), max_size=2),
    hw=st.tuples(st.integers(0, 40), st.integers(0, 40)),
    transpose=st.booleans(),
)
def test_any_shift_any_layout_equals_numpy(seed, shift, lead, hw, transpose):
    """Shifts beyond the training ranges (hue by several turns, saturation and value scaled below
    0 and past 1), batches, empty tiles and non-contiguous tiles: the reference on each (3, h, w)."""
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(rng.integers(0, 256, (*lead, 3, *hw), dtype=np.uint8))
    if transpose:
        pixels = pixels.transpose(-1, -2)  # a view, as torch.rot90 returns
    got = jitter_hsv_torch(pixels, shift)
    assert got.shape == pixels.shape and got.dtype == torch.uint8
    batch = (int(np.prod(lead)), 3, *pixels.shape[-2:])
    flat, want = got.reshape(batch), pixels.reshape(batch).numpy()
    for k in range(batch[0]):
        np.testing.assert_array_equal(flat[k].numpy(), jitter_hsv(want[k], shift))


# ----------------------------------------------------------------------------- the colour table
@pytest.mark.parametrize("shift", [(0.02, 0.1, -0.1), (-0.73, -0.45, 0.3)])
def test_the_table_holds_the_reference_jitter_of_every_colour(shift):
    """All 2^24 colours: the table (built by the arithmetic) against the NumPy reference."""
    table = jitter_table(shift)
    assert table.shape == (TABLE_ENTRIES,) and table.dtype == torch.int32
    entries = table.view(torch.uint8).view(TABLE_ENTRIES, 4).numpy()  # (r', g', b', 0) per colour
    expected = jitter_hsv(every_colour(), shift).reshape(3, TABLE_ENTRIES)
    np.testing.assert_array_equal(entries[:, :3].T, expected)
    assert (entries[:, 3] == 1).all()  # 0 marks a colour not yet computed (a table filled on demand)


@pytest.fixture(scope="module")
def table_and_shift():
    shift = (0.31, -0.2, 0.15)
    return jitter_table(shift), shift


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lead=st.lists(st.integers(0, 3), max_size=2),
    hw=st.tuples(st.integers(0, 30), st.integers(0, 30)),
    transpose=st.booleans(),
)
def test_a_gather_in_the_table_equals_the_arithmetic(table_and_shift, seed, lead, hw, transpose):
    table, shift = table_and_shift
    pixels = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (*lead, 3, *hw), dtype=np.uint8))
    if transpose:
        pixels = pixels.transpose(-1, -2)
    got = apply_jitter_table(pixels, table)
    assert got.shape == pixels.shape and got.is_contiguous()
    assert torch.equal(got, jitter_hsv_torch(pixels, shift))


def test_a_wrong_table_is_refused(table_and_shift):
    table, _ = table_and_shift
    with pytest.raises(ValueError, match="not a colour table from jitter_table"):
        apply_jitter_table(torch.zeros(3, 2, 2, dtype=torch.uint8), table[:100])
    with pytest.raises(ValueError, match="not a colour table from jitter_table"):
        apply_jitter_table(torch.zeros(3, 2, 2, dtype=torch.uint8), table.view(torch.float32))


# ----------------------------------------------------------------------------- one slide's jitter
@pytest.mark.parametrize("chunk", [7, 2**18])
def test_the_table_is_filled_with_the_colours_seen_and_only_those(table_and_shift, chunk, monkeypatch):
    """On the CPU the table starts empty; each call adds its new colours, computed exactly
    (looked up in chunks: of 7 pixels a tile spans many, its colours repeat across them)."""
    monkeypatch.setattr(device_jitter, "LOOKUP_CHUNK_PIXELS", chunk)
    full, shift = table_and_shift
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (3, 300), dtype=np.uint8)  # tiles drawn from 300 colours, as a slide repeats its own
    tiles = [torch.from_numpy(palette[:, rng.integers(0, 300, (4, 25 * k))].reshape(3, 4, 25 * k)) for k in range(5)]
    jitter = ColourJitter(shift)
    assert jitter.table is None  # created at the first call
    seen: set[int] = set()
    for tile in tiles:
        got = jitter(tile)
        np.testing.assert_array_equal(got.numpy(), jitter_hsv(tile.numpy(), shift))
        codes = tile.numpy().astype(np.int64).reshape(3, -1)
        seen |= set((codes[0] | codes[1] << 8 | codes[2] << 16).tolist())
        filled = torch.nonzero(jitter.table).squeeze(1)
        assert set(filled.tolist()) == seen
        assert torch.equal(jitter.table[filled], full[filled])
    never = ColourJitter(shift, table=False)
    assert torch.equal(never(tiles[3]), jitter(tiles[3])) and never.table is None


def test_concurrent_calls_share_one_table_and_agree(monkeypatch):
    """Eight threads on tiles with shared colours: every result exact, the table consistent."""
    monkeypatch.setattr(device_jitter, "LOOKUP_CHUNK_PIXELS", 999)
    shift = (-0.2, 0.3, 0.1)
    rng = np.random.default_rng(5)
    palette = rng.integers(0, 256, (3, 2000), dtype=np.uint8)
    tiles = [torch.from_numpy(palette[:, rng.integers(0, 2000, (64, 64))]) for _ in range(32)]
    jitter = ColourJitter(shift)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(jitter, tiles))
    for tile, got in zip(tiles, results, strict=True):
        np.testing.assert_array_equal(got.numpy(), jitter_hsv(tile.numpy(), shift))
    filled = torch.nonzero(jitter.table).squeeze(1)
    codes = filled.to(torch.int32)
    rgb = torch.stack([codes & 255, (codes >> 8) & 255, codes >> 16]).to(torch.uint8)
    entries = jitter.table[filled].view(torch.uint8).view(-1, 4)[:, :3].T.numpy()
    np.testing.assert_array_equal(entries, jitter_hsv(rgb.numpy()[:, None], shift)[:, 0])


@pytest.mark.parametrize("chunk", [5, 2**18])
def test_entries_of_colour_codes_are_the_complete_tables(table_and_shift, chunk, monkeypatch):
    """ColourJitter.entries (what the crop cache gathers by): for codes r + 256 g + 65536 b,
    repeated and in any order, the complete table's entries, written into ``out`` if given."""
    monkeypatch.setattr(device_jitter, "LOOKUP_CHUNK_PIXELS", chunk)
    full, shift = table_and_shift
    codes = torch.from_numpy(np.random.default_rng(6).integers(0, 2**24, 40, dtype=np.int32)).repeat(3)
    jitter = ColourJitter(shift)
    assert torch.equal(jitter.entries(codes), full[codes.long()])
    out = torch.zeros(codes.shape, dtype=torch.int32)
    assert jitter.entries(codes, out=out) is out and torch.equal(out, full[codes.long()])
    with pytest.raises(ValueError, match="no table"):
        ColourJitter(shift, table=False).entries(codes)


def test_bad_tiles_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        jitter_hsv_torch(torch.zeros(3, 4, 4), (0, 0, 0))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, h, w\)"):
        jitter_hsv_torch(torch.zeros(4, 4, 4, dtype=torch.uint8), (0, 0, 0))
    with pytest.raises(TypeError, match="uint8"):
        ColourJitter((0.1, 0, 0))(torch.zeros(3, 4, 4))
