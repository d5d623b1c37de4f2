"""The device data path: augmentation in torch (DeviceAugmentedView) and the crop cache (CropCache).

Oracles: the NumPy augmentation (``AugmentedView``, the readable reference, and the NumPy
transform of the whole image), the source's own pixels, and the uncached training step
(gradients bit for bit on the CPU). Read counts show that with the cache each pixel is
decoded once per step.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import augment_params
from torch_impl.models.streaming_clam import ModelConfig, build_model
from torch_impl.slides import crop_cache as crop_cache_module
from torch_impl.slides import device_jitter
from torch_impl.slides import device_view as device_view_module
from torch_impl.slides.augment import AugmentedView, AugmentParams, jitter_hsv
from torch_impl.slides.crop_cache import CropCache, choose_mode
from torch_impl.slides.device_view import TABLE_MIN_PIXELS, DeviceAugmentedView, augmented_crop
from torch_impl.slides.inputs import open_slide_input
from torch_impl.slides.slide import ArrayImage
from torch_impl.slides.synthetic import synthesize_slide, write_pyramid_tiff
from torch_impl.slides.tiff_reader import interleaved_chw

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- helpers
def whole_image_augmented(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """The NumPy transform of the whole (3, H, W) image: flip_v, flip_h, k quarter turns, jitter."""
    a = image[:, ::-1] if p.flip_v else image
    a = a[:, :, ::-1] if p.flip_h else a
    a = np.ascontiguousarray(np.rot90(a, p.rot90_k, axes=(1, 2)))
    return jitter_hsv(a, p.hsv_shift) if any(p.hsv_shift) else a


def white_padded(image: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Region (y, x, h, w) of ``image`` (3, H, W), white (255) outside it."""
    return ArrayImage(image).read(y, x, h, w)


class CountingImage(ArrayImage):
    """An ArrayImage that counts, per pixel, how often it was read (thread-safe)."""

    def __init__(self, array: np.ndarray):
        super().__init__(array)
        self.counts = np.zeros(array.shape[1:], dtype=np.int64)  # (H, W)
        self.regions: list[tuple[int, int, int, int]] = []
        self._lock = threading.Lock()

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        with self._lock:
            self.regions.append((y, x, h, w))
            self.counts[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] += 1
        return super().read(y, x, h, w)


params_strategy = augment_params(saturation_value=0.5)


@st.composite
def image_and_region(draw):
    """A random (3, H, W) uint8 image and a region (y, x, h, w) that may cross its border or miss it."""
    H, W = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    image = np.random.default_rng(seed).integers(0, 256, (3, H, W), dtype=np.uint8)
    side = max(H, W)
    y, x = draw(st.integers(-side, side)), draw(st.integers(-side, side))
    h, w = draw(st.integers(0, 2 * side)), draw(st.integers(0, 2 * side))
    return image, (y, x, h, w)


# ----------------------------------------------------------------------------- device augmentation
@given(
    data=image_and_region(),
    p=params_strategy,
    cache=st.sampled_from(["none", "device", "host"]),
    band_rows=st.integers(1, 5),
)
def test_device_augmentation_equals_numpy_augmentation(data, p, cache, band_rows):
    """Bit for bit on the CPU: the device view == AugmentedView.read == the NumPy transform of the
    whole image cut to the region, white outside; read through a cache or straight from the source."""
    image, (y, x, h, w) = data
    source = ArrayImage(image)
    with CropCache.open(source, cache, CPU, band_bytes=band_rows * 3 * image.shape[2]) as crop:
        view = DeviceAugmentedView(crop, p, CPU)
        got = view.read(y, x, h, w)
        assert got.dtype == torch.uint8 and got.device == CPU and tuple(got.shape) == (3, h, w)
        assert view.shape == AugmentedView(source, p).shape
        np.testing.assert_array_equal(got.numpy(), AugmentedView(source, p).read(y, x, h, w))
        np.testing.assert_array_equal(got.numpy(), white_padded(whole_image_augmented(image, p), y, x, h, w))


class InterleavedImage(ArrayImage):
    """Reads like a slide reader: (3, h, w) views of new interleaved (h, w, 3) memory
    (``interleaved_chw``); keeps the last block it returned."""

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        block = interleaved_chw(h, w)
        block[...] = super().read(y, x, h, w)
        self.last = block
        return block


def test_reads_of_interleaved_blocks_are_not_copied_before_the_transform(monkeypatch):
    """The block a slide reader returns reaches the device view's transform as it is: the
    identity view returns it (same memory), and the augmentation (``augment_into``) reads it
    (same memory), with the bytes of AugmentedView either way."""
    image = np.random.default_rng(5).integers(0, 256, (3, 40, 30), dtype=np.uint8)
    source = InterleavedImage(image)
    identity = DeviceAugmentedView(source, AugmentParams(), CPU)
    tile = identity.read(3, 4, 20, 25)
    assert tile.data_ptr() == source.last.ctypes.data and tile.stride() == source.last.strides
    np.testing.assert_array_equal(tile.numpy(), AugmentedView(ArrayImage(image), AugmentParams()).read(3, 4, 20, 25))

    p = AugmentParams(True, False, 1, (0.05, 0.2, -0.1))
    seen = []
    real = device_view_module.augment_into
    monkeypatch.setattr(
        device_view_module, "augment_into", lambda block, *args: seen.append(block.data_ptr()) or real(block, *args)
    )
    for colour_table in (True, False):
        view = DeviceAugmentedView(source, p, CPU, colour_table=colour_table)
        seen.clear()
        got = view.read(-2, 5, 20, 30)
        assert seen == [source.last.ctypes.data]
        np.testing.assert_array_equal(got.numpy(), AugmentedView(ArrayImage(image), p).read(-2, 5, 20, 30))


class CoordinateImage:
    """A lazy (3, H, W) uint8 image too large to hold in a test: the pixel at (y, x) has colour
    (y mod 256, x mod 256, (7 y + 3 x) mod 256)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, height: int, width: int):
        self.shape = (3, height, width)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        rows, cols = np.arange(y, y + h)[:, None], np.arange(x, x + w)[None, :]
        planes = [rows + 0 * cols, cols + 0 * rows, 7 * rows + 3 * cols]
        return (np.stack(planes) % 256).astype(np.uint8)


@pytest.mark.parametrize(
    "p",
    [
        AugmentParams(True, False, 1, (0.03, -0.1, 0.08)),
        AugmentParams(False, True, 2, (-0.41, 0.5, -0.5)),
        AugmentParams(True, True, 3, (0.5, -0.5, 0.5)),
    ],
)
def test_the_colour_table_gives_the_numpy_augmentation(p):
    """colour_table=True (through the slide's colour table), False (the arithmetic) and the
    default: the same bytes as AugmentedView, inside, across and outside the border."""
    image = np.random.default_rng(11).integers(0, 256, (3, 37, 29), dtype=np.uint8)
    views = {table: DeviceAugmentedView(ArrayImage(image), p, CPU, colour_table=table) for table in (True, False, None)}
    regions = [(0, 0, *views[True].shape[1:]), (-5, 3, 20, 40), (10, -7, 9, 9), (30, 20, 15, 15), (-50, -50, 4, 4)]
    for y, x, h, w in regions:
        want = AugmentedView(ArrayImage(image), p).read(y, x, h, w)
        for table, view in views.items():
            np.testing.assert_array_equal(view.read(y, x, h, w).numpy(), want, err_msg=f"colour_table={table}")
    assert views[True].jitter.table is not None
    assert views[False].jitter.table is None and views[None].jitter.table is None  # small: arithmetic


def test_views_of_at_least_table_min_pixels_jitter_through_the_table():
    """Default colour_table: the table for a view of >= TABLE_MIN_PIXELS pixels (filled with the
    colours read), the arithmetic below; the same bytes as AugmentedView either way."""
    p = AugmentParams(False, True, 1, (0.1, -0.2, 0.2))
    for (height, width), table in (((1024, 1024), True), ((1024, 1023), False)):
        assert (height * width >= TABLE_MIN_PIXELS) == table
        view = DeviceAugmentedView(CoordinateImage(height, width), p, CPU)
        tile = view.read(100, 300, 500, 600)
        assert (view.jitter.table is not None) == table
        want = AugmentedView(CoordinateImage(height, width), p).read(100, 300, 500, 600)
        np.testing.assert_array_equal(tile.numpy(), want)
    assert DeviceAugmentedView(CoordinateImage(1024, 1024), AugmentParams(True)).jitter is None  # no colour jitter


def test_every_orientation_of_a_labelled_image():
    """The eight flips and rotations on an image whose pixels are their own coordinates, against np.rot90."""
    H, W = 5, 7
    codes = np.arange(H * W).reshape(H, W)
    image = np.stack([codes // 256, codes % 256, np.zeros_like(codes)]).astype(np.uint8)
    for k in range(4):
        for flip_v in (False, True):
            for flip_h in (False, True):
                p = AugmentParams(flip_v, flip_h, k)
                got = DeviceAugmentedView(ArrayImage(image), p).read(
                    0, 0, *DeviceAugmentedView(ArrayImage(image), p).shape[1:]
                )
                np.testing.assert_array_equal(got.numpy(), whole_image_augmented(image, p))


def test_device_view_needs_uint8():
    with pytest.raises(TypeError, match="needs a uint8 source"):
        DeviceAugmentedView(ArrayImage(np.zeros((3, 4, 4), np.float32)), AugmentParams())


def test_device_view_keeps_the_feature_mask_of_the_numpy_view(tmp_path):
    """The tissue mask on the feature grid moves with the pixels exactly as AugmentedView's does."""
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, synthesize_slide((512, 512), False, 1).rgb, 0.25)
    slide_input = open_slide_input(path, mpp=0.25)
    try:
        p = AugmentParams(True, False, 1, (0.02, 0.1, -0.1))
        with CropCache.open(slide_input.source, "device", CPU) as crop:
            got = DeviceAugmentedView(crop, p).feature_mask(slide_input, (4, 3), 32)
        want = AugmentedView(slide_input.source, p).feature_mask(slide_input, (4, 3), 32)
        assert torch.equal(got, want)
    finally:
        slide_input.close()


# ----------------------------------------------------------------------------- the cache
@given(data=image_and_region(), mode=st.sampled_from(["device", "host", "none"]), band_rows=st.integers(1, 30))
def test_cache_returns_exactly_the_source_pixels(data, mode, band_rows):
    image, (y, x, h, w) = data
    source = ArrayImage(image)
    with CropCache.open(source, mode, CPU, band_bytes=band_rows * 3 * image.shape[2]) as crop:
        got = crop.read(y, x, h, w)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
        np.testing.assert_array_equal(got.numpy(), source.read(y, x, h, w))


def test_cache_of_a_slide_returns_what_the_slide_decodes(tmp_path):
    """A synthetic JPEG TIFF served at its own resolution: band reads cut into tiles == tile reads."""
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, synthesize_slide((640, 576), True, 3).rgb, 0.25)
    slide_input = open_slide_input(path, mpp=0.25)
    source = slide_input.source
    rng = np.random.default_rng(0)
    try:
        with CropCache.open(source, "device", CPU, band_bytes=37 * 3 * source.shape[2]) as crop:
            assert crop.mode == "device" and crop.nbytes == np.prod(source.shape)
            np.testing.assert_array_equal(
                crop.fill().read(0, 0, *source.shape[1:]).numpy(), source.read(0, 0, *source.shape[1:])
            )
            for _ in range(10):
                h, w = (int(v) for v in rng.integers(1, 200, 2))
                y, x = int(rng.integers(-50, source.shape[1])), int(rng.integers(-50, source.shape[2]))
                np.testing.assert_array_equal(crop.read(y, x, h, w).numpy(), source.read(y, x, h, w))
    finally:
        slide_input.close()


def test_slices_inside_the_crop_are_views_of_the_buffer():
    image = np.random.default_rng(0).integers(0, 256, (3, 20, 30), dtype=np.uint8)
    with CropCache.open(ArrayImage(image), "device", CPU) as crop:
        tile = crop.read(3, 4, 10, 12)
        assert tile.untyped_storage().data_ptr() == crop.fill().read(0, 0, 20, 30).untyped_storage().data_ptr()


MODE_CASES = [
    # (mode, device budget, host budget) for a crop of 100 bytes -> tier
    ("auto", 100, 0, "device"),
    ("auto", 99, 100, "host"),
    ("auto", 99, 99, "none"),
    ("auto", 0, 10**12, "host"),
    ("device", 100, 0, "device"),
    ("host", 0, 100, "host"),
    ("none", 10**12, 10**12, "none"),
]


@pytest.mark.parametrize("mode, budget, host_budget, expected", MODE_CASES)
def test_the_tier_follows_the_budgets(mode, budget, host_budget, expected):
    chosen, reason = choose_mode(100, mode, CPU, budget, host_budget)
    assert chosen == expected and reason


@pytest.mark.parametrize("mode, budget, host_budget, expected", MODE_CASES)
def test_open_holds_the_crop_where_it_chose(mode, budget, host_budget, expected, caplog):
    image = np.random.default_rng(0).integers(0, 256, (3, 5, 6), dtype=np.uint8)  # 90 bytes
    scale = 90 / 100  # the budgets above are for 100 bytes
    with caplog.at_level("DEBUG", logger="torch_impl.slides.crop_cache"):
        crop = CropCache.open(ArrayImage(image), mode, CPU, int(budget * scale), int(host_budget * scale))
    with crop:
        assert crop.mode == expected
        assert crop.nbytes == (0 if expected == "none" else image.size)
        assert crop.device == (None if expected == "none" else CPU)
        assert f"slide cache {expected}" in caplog.text and crop.reason in caplog.text


@pytest.mark.parametrize(
    "mode, match",
    [
        ("device", "mode 'device': the crop of 0.00 GiB does not fit the cpu budget of 0.00 GiB; use mode 'auto'"),
        ("host", "mode 'host': the crop of 0.00 GiB does not fit the host budget of 0.00 GiB; use mode 'auto'"),
        ("fast", "slide cache mode must be one of auto, device, host, none, got 'fast'"),
    ],
)
def test_a_tier_that_cannot_be_had_is_refused(mode, match):
    with pytest.raises(ValueError, match=match):
        CropCache.open(ArrayImage(np.zeros((3, 4, 4), np.uint8)), mode, CPU, budget_bytes=10, host_budget_bytes=10)


def test_the_cache_holds_uint8_only():
    with pytest.raises(ValueError, match="CropCache holds uint8 pixels"):
        CropCache.open(ArrayImage(np.zeros((3, 4, 4), np.float32)))


def test_a_failed_band_read_is_raised_by_the_reads_that_need_it():
    """A slide that breaks in its third band: reads of the first bands work, later ones raise the
    reader's own error (OSError here), so training's handling of unreadable slides still applies."""

    class BreaksAtRow(ArrayImage):
        def read(self, y, x, h, w):
            if y >= 6:
                raise OSError("corrupt JPEG tile")
            return super().read(y, x, h, w)

    image = np.random.default_rng(0).integers(0, 256, (3, 12, 5), dtype=np.uint8)
    with CropCache.open(BreaksAtRow(image), "device", CPU, band_bytes=3 * 3 * 5) as crop:  # bands of 3 rows
        np.testing.assert_array_equal(crop.read(0, 0, 6, 5).numpy(), image[:, :6])
        with pytest.raises(OSError, match="corrupt JPEG tile"):
            crop.read(4, 0, 4, 5)


def test_a_read_ahead_of_the_filler_decodes_its_own_bands():
    """The filler is stuck in the first band (a slow decode); a read of the last rows does not
    wait for it (a vertically flipped view starts there)."""
    gate = threading.Event()

    class SlowTop(ArrayImage):
        def read(self, y, x, h, w):
            if y == 0:
                assert gate.wait(10), "the read of the last rows waited for the first band"
            return super().read(y, x, h, w)

    image = np.random.default_rng(0).integers(0, 256, (3, 12, 5), dtype=np.uint8)
    with CropCache.open(SlowTop(image), "device", CPU, band_bytes=3 * 3 * 5) as crop:  # bands of 3 rows
        np.testing.assert_array_equal(crop.read(9, 0, 3, 5).numpy(), image[:, 9:])
        gate.set()
        np.testing.assert_array_equal(crop.fill().read(0, 0, 12, 5).numpy(), image)


def test_concurrent_reads_decode_every_band_once():
    image = np.random.default_rng(0).integers(0, 256, (3, 90, 40), dtype=np.uint8)
    source = CountingImage(image)
    regions = [tuple(int(v) for v in r) for r in np.random.default_rng(1).integers(0, 60, (64, 4))]
    with CropCache.open(source, "device", CPU, band_bytes=4 * 3 * 40) as crop, ThreadPoolExecutor(8) as pool:
        tiles = list(pool.map(lambda region: crop.read(*region).numpy(), regions))  # re-raises a failed read
        crop.fill()
    for region, tile in zip(regions, tiles, strict=True):
        np.testing.assert_array_equal(tile, ArrayImage(image).read(*region))
    assert (source.counts == 1).all()


def test_a_closed_cache_refuses_reads_and_frees_its_buffer():
    crop = CropCache.open(ArrayImage(np.zeros((3, 8, 8), np.uint8)), "device", CPU)
    with crop:
        crop.read(0, 0, 2, 2)
    assert crop.nbytes == 0
    with pytest.raises(RuntimeError, match="is closed: read it inside its `with` block"):
        crop.read(0, 0, 2, 2)


def test_a_bad_band_is_named():
    class Short(ArrayImage):
        def read(self, y, x, h, w):
            return super().read(y, x, h, w)[:, :, :-1]

    expected = r"returned uint8 of shape \(3, 4, 3\), expected uint8 of shape \(3, 4, 4\)"
    with (
        CropCache.open(Short(np.zeros((3, 4, 4), np.uint8)), "device", CPU) as crop,
        pytest.raises(ValueError, match=expected),
    ):
        crop.read(0, 0, 1, 1)


class AugmentedPixels:
    """A spy on the crop cache's ``augment_into``: the pixels it writes, per call (thread-safe)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int]] = []  # (h', w') written per call
        self._lock = threading.Lock()
        real = crop_cache_module.augment_into

        def spy(block, geometry, jitter, out):
            with self._lock:
                self.calls.append(tuple(out.shape[:2]))
            return real(block, geometry, jitter, out)

        monkeypatch.setattr(crop_cache_module, "augment_into", spy)

    @property
    def pixels(self) -> int:
        return sum(h * w for h, w in self.calls)


@pytest.mark.parametrize("mode", ["device", "host", "none"])
def test_an_augmented_cache_augments_each_crop_pixel_once(mode, monkeypatch):
    """With a buffer, every band is read once from the original and written augmented once, in
    whole rows of the augmented crop, however often and wherever the tiles over it are read; in
    mode none each tile read is augmented. Reads answer AugmentedView's pixels."""
    image = np.random.default_rng(2).integers(0, 256, (3, 23, 17), dtype=np.uint8)
    p = AugmentParams(flip_v=True, flip_h=False, rot90_k=1, hsv_shift=(0.2, 0.1, -0.1))
    reference = AugmentedView(ArrayImage(image), p)
    spy, counting = AugmentedPixels(monkeypatch), CountingImage(image)
    regions = [(0, 0, 17, 23), (3, 2, 10, 10), (-4, 5, 30, 9), (12, -3, 8, 8), (3, 2, 10, 10)]
    with CropCache.open(counting, mode, CPU, band_bytes=5 * 3 * 23, augment=p) as crop:
        assert crop.shape == reference.shape == (3, 17, 23) and crop.augment == p and crop.jitter is not None
        for region in regions:
            np.testing.assert_array_equal(crop.read(*region).numpy(), reference.read(*region))
        crop.fill()
    if mode == "none":
        assert spy.pixels == counting.counts.sum() > image[0].size
    else:
        assert (counting.counts == 1).all() and spy.pixels == image[0].size
        assert {w for _, w in spy.calls} == {23} and len(spy.calls) == 4  # bands of 5 rows of the turned crop


class GriddedImage(CountingImage):
    """A CountingImage that declares a file's tile grid: ``tile_rows`` and ``tile_cols``."""

    def __init__(self, array: np.ndarray, tile_rows: tuple[int, int], tile_cols: tuple[int, int]):
        super().__init__(array)
        self.tile_rows, self.tile_cols = tile_rows, tile_cols


@given(
    H=st.integers(1, 60),
    W=st.integers(1, 60),
    grid=st.tuples(st.integers(1, 13), st.integers(0, 12), st.integers(1, 13), st.integers(0, 12)),
    p=params_strategy,
    band_rows=st.integers(1, 70),
)
def test_bands_start_and_end_on_the_sources_tile_grid(H, W, grid, p, band_rows):
    """Each band of the (augmented) crop is read from the original as one region whose edges
    across the bands lie on the source's tile grid (rows, or columns when turned; flips mirror
    the grid) or on the image's border; the bands cover the original exactly once."""
    period_r, phase_r, period_c, phase_c = grid
    rows, cols = (period_r, phase_r % period_r), (period_c, phase_c % period_c)
    source = GriddedImage(np.zeros((3, H, W), np.uint8), rows, cols)
    turned = p.rot90_k % 2 == 1
    width = H if turned else W  # of the augmented crop
    with CropCache.open(source, "host", CPU, band_bytes=band_rows * 3 * width, augment=p) as crop:
        crop.fill()
    assert (source.counts == 1).all()
    period, phase = cols if turned else rows
    length = W if turned else H
    for y, x, h, w in source.regions:
        start, size = (x, w) if turned else (y, h)
        assert (h, w) == ((H, size) if turned else (size, W))  # whole rows, or whole columns
        for edge in (start, start + size):
            assert edge in (0, length) or (edge - phase) % period == 0, (edge, period, phase)


def test_an_identity_cache_copies_and_augments_nothing(monkeypatch):
    """Without augmentation (or the identity) the cache copies the source's bands as they are."""
    image = np.random.default_rng(3).integers(0, 256, (3, 9, 11), dtype=np.uint8)
    spy = AugmentedPixels(monkeypatch)
    for augment in (None, AugmentParams()):
        with CropCache.open(ArrayImage(image), "host", CPU, augment=augment) as crop:
            np.testing.assert_array_equal(crop.fill().read(0, 0, 9, 11).numpy(), image)
            assert crop.augment.is_identity and crop.jitter is None
    assert spy.calls == []


@pytest.mark.parametrize("mode", ["host", "none"])
def test_the_cache_jitters_through_a_colour_table_from_table_min_pixels_on(mode, monkeypatch):
    """A crop of at least TABLE_MIN_PIXELS pixels jitters through the slide's colour table (by
    colour codes on the CPU); a smaller one by arithmetic (a new table would cost more); the
    same bytes either way."""
    monkeypatch.setattr(device_jitter, "TABLE_MIN_PIXELS", 200)
    image = np.random.default_rng(4).integers(0, 256, (3, 13, 17), dtype=np.uint8)
    p = AugmentParams(flip_h=True, rot90_k=3, hsv_shift=(-0.3, 0.2, 0.1))
    for width, table in ((17, True), (15, False)):  # 221 and 195 pixels
        part = ArrayImage(np.ascontiguousarray(image[:, :, :width]))
        reference = AugmentedView(part, p)
        with CropCache.open(part, mode, CPU, augment=p) as crop:
            assert crop.shape == reference.shape == (3, width, 13)
            np.testing.assert_array_equal(crop.read(0, 0, width, 13).numpy(), reference.read(0, 0, width, 13))
            assert crop.jitter.use_table == table


def test_augmenting_a_source_that_is_not_rgb_is_refused():
    with pytest.raises(ValueError, match="augments RGB pixels"):
        CropCache.open(ArrayImage(np.zeros((4, 5, 5), np.uint8)), "host", CPU, augment=AugmentParams(flip_v=True))


@given(data=image_and_region(), p=params_strategy, mode=st.sampled_from(["none", "device", "host"]))
def test_the_augmented_crop_reads_like_augmented_view(data, p, mode):
    """augmented_crop (augmented at fill; in mode none per tile): AugmentedView's bytes, white outside."""
    image, (y, x, h, w) = data
    with augmented_crop(ArrayImage(image), p, CPU, mode, band_bytes=3 * 3 * image.shape[2]) as view:
        assert view.shape == AugmentedView(ArrayImage(image), p).shape
        np.testing.assert_array_equal(
            view.read(y, x, h, w).numpy(), AugmentedView(ArrayImage(image), p).read(y, x, h, w)
        )
        assert view.augment == p and (view.jitter is not None) == any(p.hsv_shift)


# ----------------------------------------------------------------------------- a training step
SIZE, TILE = (1100, 1000), 1024  # ResNet-34 trunk: three tiles per pass at this size
PARAMS = AugmentParams(flip_v=True, flip_h=False, rot90_k=1, hsv_shift=(0.03, -0.1, 0.08))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(width=4, hidden_dim=16, attention_dim=8, pool=None, tile_size=TILE))


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(7).integers(0, 256, (3, *SIZE), dtype=np.uint8)


def step(model, source) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and trainable-parameter gradients of one slide (label 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    label = torch.tensor([1])
    loss = model.loss(model(source, label=label), label)
    return loss.detach(), list(torch.autograd.grad(loss, params))


def test_cached_and_uncached_steps_have_bitwise_equal_gradients_and_the_cache_decodes_once(tiny_model, pixels):
    """The training step on today's path (NumPy AugmentedView, every tile read from the source)
    against the device view over a cache on the device (here the CPU), in host memory, and over
    no cache: equal losses and gradients, bit for bit. With a cache every pixel is read from the
    source exactly once per step (forward and backward); without, halos and the second pass read
    pixels again."""
    assert len(tiny_model.trunk.plan(SIZE[::-1]).tiles) > 1  # the augmented image is rotated
    uncached = CountingImage(pixels)
    want_loss, want = step(tiny_model, AugmentedView(uncached, PARAMS))
    assert uncached.counts.min() >= 2 and uncached.counts.max() >= 3  # forward + backward, halos
    for mode in ("device", "host", "none"):
        counting = CountingImage(pixels)
        with CropCache.open(counting, mode, CPU, band_bytes=100 * 3 * SIZE[1]) as crop:
            loss, got = step(tiny_model, DeviceAugmentedView(crop, PARAMS, CPU))
        assert torch.equal(loss, want_loss), mode
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), mode
        if mode == "none":  # reads go to the source tile by tile, as without a cache
            np.testing.assert_array_equal(counting.counts, uncached.counts)
        else:
            assert (counting.counts == 1).all(), mode


@pytest.mark.parametrize("colour_table", [True, False])
def test_either_way_of_jittering_leaves_the_gradients_bit_for_bit(tiny_model, pixels, colour_table):
    """The same step with the jitter through the slide's colour table (the default at this size)
    and by arithmetic: equal loss and gradients, bit for bit, to today's path (NumPy AugmentedView)."""
    want_loss, want = step(tiny_model, AugmentedView(ArrayImage(pixels), PARAMS))
    with CropCache.open(ArrayImage(pixels), "device", CPU) as crop:
        view = DeviceAugmentedView(crop, PARAMS, CPU, colour_table=colour_table)
        loss, got = step(tiny_model, view)
    assert (view.jitter.table is not None) == colour_table
    assert torch.equal(loss, want_loss)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["device", "host", "none"])
def test_augmenting_at_fill_leaves_the_gradients_bit_for_bit_and_augments_each_pixel_once(
    tiny_model, pixels, mode, monkeypatch
):
    """Training's augmented_crop against the per-tile augmentation (DeviceAugmentedView over a
    plain cache) and NumPy AugmentedView: equal loss and gradients, bit for bit. With a buffer
    every crop pixel is augmented once per step; in mode none every tile pixel read (halos,
    both passes)."""
    want_loss, want = step(tiny_model, AugmentedView(ArrayImage(pixels), PARAMS))
    with CropCache.open(ArrayImage(pixels), mode, CPU) as crop:
        per_tile_loss, per_tile = step(tiny_model, DeviceAugmentedView(crop, PARAMS, CPU))
    spy, counting = AugmentedPixels(monkeypatch), CountingImage(pixels)
    with augmented_crop(counting, PARAMS, CPU, mode, band_bytes=100 * 3 * SIZE[0]) as view:
        loss, got = step(tiny_model, view)
    assert torch.equal(loss, want_loss) and torch.equal(per_tile_loss, want_loss)
    for a, b, c in zip(got, per_tile, want, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)
    if mode == "none":
        assert spy.pixels == counting.counts.sum() > 2 * pixels[0].size
    else:
        assert spy.pixels == pixels[0].size and (counting.counts == 1).all()


def test_phase_one_reads_each_pixel_once(tiny_model, pixels):
    """Trunk frozen (the paper's first phase): only the forward pass reads; with the cache each
    pixel once, without it the tiles' halos are read twice."""
    tiny_model.set_trunk_trainable(False)
    try:
        counting, uncached = CountingImage(pixels), CountingImage(pixels)
        with CropCache.open(counting, "auto", CPU) as crop:
            cached_loss, _ = step(tiny_model, DeviceAugmentedView(crop, PARAMS, CPU))
        loss, _ = step(tiny_model, AugmentedView(uncached, PARAMS))
        assert torch.equal(cached_loss, loss)
        assert (counting.counts == 1).all()
        assert uncached.counts.max() >= 2
    finally:
        tiny_model.set_trunk_trainable(True)


def test_without_a_cache_nothing_larger_than_a_tile_is_read_or_held(tiny_model, pixels):
    """Mode none: the cache holds no buffer, and each source read is one tile's input region."""
    counting = CountingImage(pixels)
    largest = max(
        t.shape[0] * t.shape[1]
        for t in [*tiny_model.trunk.plan(SIZE).tiles, *tiny_model.trunk.plan(SIZE, backward=True).tiles]
    )
    with CropCache.open(counting, "none", CPU) as crop:
        assert crop.nbytes == 0
        step(tiny_model, crop)
    assert counting.regions and all(h * w <= largest for _, _, h, w in counting.regions)
