"""Bad inputs get clear errors: one table of (what is wrong -> exception type, message fragment).

Each row builds one bad call; the test checks the exception's type and that its message
contains the fragment, which names what is wrong and, where it helps, what to do instead.
Add a row for every new failure mode.

Lazy sources are checked tile by tile against their contract (:mod:`torch_impl.streaming.sources`):
``.shape == (C, H, W)``; ``.read(y, x, h, w)`` (or slicing) returns an array (C, h, w) of
uint8, or of float16/32/64 in [0, 1]; the dtype a source declares is the dtype it returns.
A broken tile names the source and the region (y, x, h, w).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from reference import layers as L
from reference.nets import conv
from reference.streaming import stream_forward
from reference.tiling import plan_tiles
from torch_impl.streaming import LazySourceError, StreamingTrunk, to_model_input

pytestmark = pytest.mark.usefixtures("single_torch_thread")

H, W = 64, 60
PIXELS = np.random.default_rng(0).integers(0, 256, (3, H, W), dtype=np.uint8)  # (C, H, W)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).double().eval()


def streamed(tile: Any = 32, **kwargs: Any) -> StreamingTrunk:
    return StreamingTrunk(net(), tile, **kwargs)


class Source:
    """A lazy source over PIXELS whose ``read`` passes the correct tile through ``transform``
    (which breaks the contract on purpose); ``shape`` and ``dtype`` may be declared wrongly."""

    def __init__(self, name: str, transform: Callable[[np.ndarray], Any] = lambda t: t,
                 pixels: np.ndarray = PIXELS, shape: tuple | None = None, dtype: Any = None):
        self.name, self.transform, self.pixels = name, transform, pixels
        self.shape = pixels.shape if shape is None else shape
        if dtype is not None:
            self.dtype = dtype

    def read(self, y: int, x: int, h: int, w: int) -> Any:
        return self.transform(self.pixels[:, y:y + h, x:x + w])

    def __repr__(self) -> str:
        return f"Source({self.name!r})"


class ShapeOnly:
    shape = (3, H, W)


FIRST_TILE = streamed(32).plan((H, W)).tiles[0]  # the first region the engine reads
FIRST_H, FIRST_W = FIRST_TILE.shape
FIRST_REGION = f"(y, x, h, w) = ({FIRST_TILE.row.start}, {FIRST_TILE.col.start}, {FIRST_H}, {FIRST_W})"


def with_nan(tile: np.ndarray) -> np.ndarray:
    out = tile / 255.0
    out[0, 0, 0] = np.nan
    return out


@dataclass
class Case:
    name: str
    call: Callable[[], Any]
    error: type[BaseException]
    fragment: str


REFERENCE_NET = L.Sequential([conv(np.random.default_rng(0), 3, 2, 3, padding=1)])

CASES = [
    # ---- tile sizes: integral numbers (int, np.int64) only
    Case("tile_size float", lambda: streamed(960.0), ValueError,
         "tile_size must be a positive int or an (h, w) pair of positive ints, got 960.0 (float)"),
    Case("tile_size numpy float", lambda: streamed(np.float64(960)), ValueError, "got np.float64(960.0) (float64)"),
    Case("tile_size pair with a float", lambda: streamed((48, 48.0)), ValueError, "got (48, 48.0) (tuple)"),
    Case("tile_size triple", lambda: streamed((48, 48, 48)), ValueError, "got (48, 48, 48) (tuple)"),
    Case("tile_size bool", lambda: streamed(True), ValueError, "got True (bool)"),
    Case("tile_size string", lambda: streamed("960"), ValueError, "got '960' (str)"),
    Case("tile_size zero", lambda: streamed(0), ValueError, "positive int"),
    Case("backward_tile_size float", lambda: streamed(32, backward_tile_size=np.float32(16)), ValueError,
         "backward_tile_size must be a positive int"),
    Case("reference tile_size float", lambda: stream_forward(REFERENCE_NET, np.zeros((1, 3, 8, 8)), 960.0),
         ValueError, "tile_size must be a positive int or an (h, w) pair of positive ints, got 960.0 (float)"),
    Case("reference plan with a float tile", lambda: plan_tiles(REFERENCE_NET.geometry, (8, 8), (4.0, 4)),
         ValueError, "got (4.0, 4) (tuple)"),
    # ---- tensor inputs: used as given, so in the trunk's floating dtype
    Case("float16 tensor", lambda: streamed()(torch.zeros(1, 3, H, W, dtype=torch.float16)), TypeError,
         "x is torch.float16 but the trunk computes in torch.float64"),
    Case("uint8 tensor", lambda: streamed()(torch.zeros(1, 3, H, W, dtype=torch.uint8)), TypeError,
         "x is torch.uint8: a tensor input is used as given, so it must be floating point (torch.float64)"),
    Case("int64 tensor", lambda: streamed()(torch.zeros(1, 3, H, W, dtype=torch.int64)), TypeError,
         "to_model_input"),
    Case("3-D tensor", lambda: streamed()(torch.zeros(3, H, W, dtype=torch.float64)), ValueError, "(N, C, H, W)"),
    Case("to_model_input int16", lambda: to_model_input(torch.zeros(3, 4, 4, dtype=torch.int16)), TypeError,
         "uint8 or floating-point pixels, got torch.int16"),
    Case("to_model_input one channel", lambda: to_model_input(torch.zeros(1, 4, 4, dtype=torch.uint8)), ValueError,
         "pixels have 1 channels but mean and std have 3"),
    # ---- lazy sources: the declared shape and dtype
    Case("2-D source", lambda: streamed()(np.zeros((H, W), np.uint8)), LazySourceError, "needs .shape == (C, H, W)"),
    Case("(H, W, C) source", lambda: streamed()(Source("hwc", pixels=PIXELS.transpose(1, 2, 0).copy())),
         LazySourceError, "Source('hwc') has shape (64, 60, 3), which looks like (H, W, C)"),
    Case("no read, no slicing", lambda: streamed()(ShapeOnly()), LazySourceError, "neither .read(y, x, h, w) nor slicing"),
    Case("declares uint16", lambda: streamed()(Source("u16", pixels=PIXELS.astype(np.uint16), dtype=np.uint16)),
         LazySourceError, "Source('u16') declares .dtype uint16; a lazy source returns uint8 (0-255) or float16/32/64 in [0, 1]"),
    Case("declares a non-dtype", lambda: streamed()(Source("odd", dtype="pixels")), LazySourceError,
         "Source('odd') declares .dtype 'pixels', which is not a NumPy dtype"),
    Case("one channel, ImageNet normalisation", lambda: streamed()(Source("grey", pixels=PIXELS[:1].copy())),
         ValueError, "pixels have 1 channels but mean and std have 3"),
    # ---- lazy sources: every tile read
    Case("read one row short", lambda: streamed()(Source("short", lambda t: t[:, :-1])), LazySourceError,
         f"Source('short'), region {FIRST_REGION}: returned an array of shape (3, {FIRST_H - 1}, {FIRST_W}), "
         f"expected (C, h, w) = (3, {FIRST_H}, {FIRST_W})"),
    Case("read one channel of three", lambda: streamed()(Source("one", lambda t: t[:1])), LazySourceError,
         "returned 1 channels, the source declares 3"),
    Case("read channels last", lambda: streamed()(Source("hwc-read", lambda t: t.transpose(1, 2, 0))), LazySourceError,
         "(h, w, C) layout? Return channels first"),
    Case("read returns None", lambda: streamed()(Source("none", lambda t: None)), LazySourceError,
         f"Source('none'), region {FIRST_REGION}: returned None"),
    Case("float 0-255", lambda: streamed()(Source("f255", lambda t: t.astype(np.float32))), LazySourceError,
         "float pixels must lie in [0, 1], got values in [0, 255]"),
    Case("float with NaN", lambda: streamed()(Source("nan", with_nan)), LazySourceError,
         "float pixels must lie in [0, 1], got values in [nan, nan]"),
    Case("uint16 tile", lambda: streamed()(Source("u16-read", lambda t: t.astype(np.uint16))), LazySourceError,
         "returned dtype uint16; a lazy source returns uint8 (0-255) or float16/32/64 in [0, 1]"),
    Case("int16 tile", lambda: streamed()(Source("i16-read", lambda t: t.astype(np.int16))), LazySourceError,
         "returned dtype int16"),
    Case("tile dtype differs from the declared one", lambda: streamed()(Source("liar", lambda t: t / 255.0, dtype=np.uint8)),
         LazySourceError, "returned dtype float64 but declares .dtype uint8"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_has_a_clear_error(case: Case):
    with pytest.raises(case.error, match=re.escape(case.fragment)):
        case.call()


def test_broken_tiles_name_the_region_they_came_from():
    """A source that breaks only further into the image: the error names that region."""
    engine = streamed(24)
    bad = engine.plan((H, W)).tiles[3]
    region = (bad.row.start, bad.col.start, *bad.shape)

    def short_at_the_fourth_tile(y, x, h, w):
        tile = PIXELS[:, y:y + h, x:x + w]
        return tile[:, :-1] if (y, x, h, w) == region else tile

    source = Source("late")
    source.read = short_at_the_fourth_tile
    with pytest.raises(LazySourceError, match=re.escape(f"Source('late'), region (y, x, h, w) = {region}")):
        engine(source)


def test_accepted_inputs_stream_like_the_normalised_tensor():
    """Integral tile sizes of any type, and every accepted tile dtype, give the plain result."""
    x = to_model_input(torch.from_numpy(PIXELS)[None], dtype=torch.float64)
    with torch.no_grad():
        want = net()(x)
        for tile in (np.int64(32), (np.int32(32), 30), [32, np.uint16(30)]):
            assert torch.equal(streamed(tile)(x), streamed(32)(x))
        for dtype in (np.float16, np.float32, np.float64):
            floats = Source("floats", lambda t, dtype=dtype: (t / 255.0).astype(dtype), dtype=dtype)
            tolerance = 1e-3 if dtype == np.float16 else 1e-6 if dtype == np.float32 else 1e-12
            assert (streamed()(floats) - want).abs().max() <= tolerance * want.abs().max()
        assert (streamed()(Source("uint8", dtype=np.uint8)) - want).abs().max() <= 1e-12 * want.abs().max()
