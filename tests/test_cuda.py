"""CUDA: the streamed ResNet-34 trunk on the GPU against the plain model (skipped without a GPU).

Tolerances (relative to the largest entry of each tensor):
* fp32 with TF32 off: streamed vs plain <= 1e-5 (cuDNN picks different algorithms per tile
  shape, so the sums run in another order).
* bf16 autocast: streamed vs plain bf16 <= 2e-2; both vs the fp32 plain result <= 1e-1 on
  outputs (bf16 keeps 8 mantissa bits, and 36 layers compound the rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_impl.models.resnet import freeze_batchnorm, resnet34, trunk
from torch_impl.streaming import StreamingTrunk, to_model_input
from tests import helpers

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
