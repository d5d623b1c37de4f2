"""CUDA: the streamed ResNet-34 trunk on the GPU against the plain model, and the slide data path
on the GPU against the CPU (skipped without a GPU).

Tolerances (relative to the largest entry of each tensor):
* fp32 with TF32 off: streamed vs plain <= 1e-5 (cuDNN picks different algorithms per tile
  shape, so the sums run in another order).
* bf16 autocast: streamed vs plain bf16 <= 2e-2; both vs the fp32 plain result <= 1e-1 on
  outputs (bf16 keeps 8 mantissa bits, and 36 layers compound the rounding).
* the data path (colour table, device augmentation, crop cache): equal bytes; uint8 -> model
  input: <= 1e-6 (CUDA scales by the reciprocal of 255 where the CPU divides).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import helpers
from torch_impl.models.resnet import freeze_batchnorm, resnet34, trunk
from torch_impl.slides import device_jitter
from torch_impl.slides.augment import AugmentParams
from torch_impl.slides.crop_cache import CropCache
from torch_impl.slides.device_jitter import jitter_table
from torch_impl.slides.device_view import DeviceAugmentedView, augmented_crop
from torch_impl.slides.slide import ArrayImage
from torch_impl.slides.tiff_reader import interleaved_chw
from torch_impl.streaming import StreamingTrunk, to_model_input
from torch_impl.streaming.sources import host_tensor, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return helpers.relative_error(a, b, floor=1e-12)


@pytest.fixture
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def cuda_trunk(channels_last: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = freeze_batchnorm(trunk(resnet34(width=64))).cuda()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def streamed_and_plain_step(net, x, tile, autocast: bool, channels_last: bool = False):
    """(output, parameter gradients) of the streamed and of the plain model."""
    params = list(net.parameters())
    results = []
    for model in (StreamingTrunk(net, tile, channels_last=channels_last), net):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        grads = torch.autograd.grad(y.float().square().mean(), params)
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_fp32_streamed_equals_plain(no_tf32, channels_last):
    net = cuda_trunk(channels_last)
    x = torch.randn(1, 3, 1500, 1400, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    (y_s, g_s), (y_p, g_p) = streamed_and_plain_step(net, x, 1000, autocast=False, channels_last=channels_last)
    assert relative_error(y_s, y_p) <= 1e-5
    for a, b in zip(g_s, g_p):
        assert relative_error(a, b) <= 1e-5


def test_cuda_bf16_autocast_within_documented_tolerance(no_tf32):
    net = cuda_trunk()
    x = torch.randn(1, 3, 1500, 1400, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    (y_s, g_s), (y_p, g_p) = streamed_and_plain_step(net, x, 1000, autocast=True)
    with torch.no_grad():
        y_ref = net(x)  # plain fp32
    assert y_s.dtype == torch.bfloat16
    assert relative_error(y_s, y_p) <= 2e-2
    assert relative_error(y_s, y_ref) <= 1e-1
    for a, b in zip(g_s, g_p):
        assert relative_error(a, b) <= 2e-2


def test_cuda_lazy_host_source_matches_device_tensor(no_tf32):
    """A uint8 image on the host, read tile by tile, equals the normalised tensor on the GPU."""
    net = cuda_trunk()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 1200, 1100), dtype=np.uint8)
    streamed = StreamingTrunk(net, 1000)
    x = to_model_input(torch.from_numpy(pixels).cuda())[None]
    with torch.no_grad():
        assert relative_error(streamed(pixels), net(x)) <= 1e-5


# ----------------------------------------------------------------------------- the data path on the GPU
SHIFT = (0.03, -0.2, 0.1)
AUGMENT = AugmentParams(flip_v=True, flip_h=False, rot90_k=1, hsv_shift=SHIFT)


def interleaved_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(3, H, W) uint8 view of interleaved (H, W, 3) memory, as slide readers return."""
    image = interleaved_chw(height, width)
    image[...] = np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8)
    return image


def test_cuda_jitter_table_equals_the_cpu_table():
    assert torch.equal(jitter_table(SHIFT, "cuda").cpu(), jitter_table(SHIFT, "cpu"))


@pytest.mark.parametrize("colour_table", [True, False])
def test_cuda_device_view_reads_equal_the_cpu_reads(colour_table):
    """DeviceAugmentedView over an interleaved source: the same bytes on the GPU as on the CPU
    (whose equality to the NumPy AugmentedView tests/test_device_view.py checks)."""
    source = ArrayImage(interleaved_image(300, 260))
    cpu = DeviceAugmentedView(source, AUGMENT, "cpu", colour_table=colour_table)
    gpu = DeviceAugmentedView(source, AUGMENT, "cuda", colour_table=colour_table)
    for region in [(0, 0, *cpu.shape[1:]), (-20, 30, 150, 400), (100, 7, 33, 45)]:
        tile = gpu.read(*region)
        assert tile.device.type == "cuda"
        assert torch.equal(tile.cpu(), cpu.read(*region)), region


@pytest.mark.parametrize("table_min_pixels", [0, None], ids=["colour table", "default: arithmetic here"])
def test_cuda_crop_cache_on_the_device_equals_host_memory(table_min_pixels, monkeypatch):
    """A CropCache on the GPU == one in host memory, plain and augmented (augmented_crop: flipped,
    turned and jittered on the GPU, through the whole colour table or, for a crop under
    TABLE_MIN_PIXELS, by arithmetic; on the host by colour codes and the table filled on demand,
    or by arithmetic); in mode none the tiles are augmented on the GPU as they are read."""
    if table_min_pixels is not None:  # this small crop through the colour table, as a large one
        monkeypatch.setattr(device_jitter, "TABLE_MIN_PIXELS", table_min_pixels)
    image = interleaved_image(257, 190, seed=1)
    regions = [(0, 0, 257, 190), (-5, 20, 100, 300), (200, 3, 57, 60)]
    with (
        CropCache.open(ArrayImage(image), "device", "cuda", band_bytes=40 * 3 * 190) as device,
        CropCache.open(ArrayImage(image), "host", "cuda", band_bytes=40 * 3 * 190) as host,
    ):
        assert device.device.type == "cuda" and host.device.type == "cpu"
        for region in regions:
            assert torch.equal(device.read(*region).cpu(), host.read(*region)), region
    for params in (AUGMENT, AugmentParams(flip_h=True, rot90_k=3), AugmentParams(hsv_shift=SHIFT)):
        for mode in ("device", "none"):  # the augmented crop on the GPU, and augmented tile by tile there
            with (
                augmented_crop(ArrayImage(image), params, "cuda", mode, band_bytes=40 * 3 * 190) as gpu,
                augmented_crop(ArrayImage(image), params, "cpu", "host", band_bytes=40 * 3 * 190) as cpu,
            ):
                if gpu.jitter is not None:
                    assert gpu.jitter.device.type == "cuda" and cpu.jitter.device.type == "cpu"
                    assert gpu.jitter.use_table == cpu.jitter.use_table == (table_min_pixels == 0)
                for region in regions:
                    tile = gpu.read(*region)
                    assert tile.device.type == "cuda"
                    assert torch.equal(tile.cpu(), cpu.read(*region)), (params, mode, region)


def test_cuda_interleaved_tiles_become_the_cpu_model_input():
    """to_model_input of an interleaved (3, h, w) tile moved to the GPU (pinned, non-blocking):
    the CPU's values to float32 rounding, and C-contiguous there too."""
    tile = host_tensor(interleaved_image(123, 97, seed=2))
    assert not tile.is_contiguous()
    gpu = to_model_input(to_device(tile, "cuda"))
    assert gpu.is_contiguous()
    # not bit for bit: CUDA divides by a scalar (the 1/255) as a multiplication by its reciprocal
    torch.testing.assert_close(gpu.cpu(), to_model_input(tile), rtol=1e-6, atol=1e-6)
