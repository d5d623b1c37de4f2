"""The torch colour jitter (for tiles on the device) equals the NumPy reference of augment.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_impl.slides.augment import AugmentedView, jitter_hsv
from torch_impl.slides.device_jitter import jitter_hsv_torch
from torch_impl.slides.slide import ArrayImage


def every_colour() -> np.ndarray:
    """(3, 4096, 4096) uint8: all 2^24 RGB colours once."""
    codes = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255]).astype(np.uint8)
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


def test_bad_tiles_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        jitter_hsv_torch(torch.zeros(3, 4, 4), (0, 0, 0))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, h, w\)"):
        jitter_hsv_torch(torch.zeros(4, 4, 4, dtype=torch.uint8), (0, 0, 0))
