"""torch_impl and reference agree: the same network, converted, gives the same numbers.

Also the real (full-width) ResNet-34 trunk streamed against plain torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_impl.streaming import StreamingTrunk
from torch_impl.streaming.to_reference import to_reference
from tests.helpers import random_resnet34_trunk, relative_error


def test_converted_trunk_matches_torch_streamed():
    """reference full == torch plain == torch streamed, outputs and every gradient."""
    net = random_resnet34_trunk(width=4, seed=0)
    ref, names = to_reference(net)
    assert set(names.values()) == {n for n, _ in net.named_parameters()}

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, 3, 1000, 1010))
    x = torch.from_numpy(x_np).requires_grad_(True)
    streamed = StreamingTrunk(net, 992)
    plan = streamed.plan(x.shape[-2:])
    assert len(plan.rows) == 2 and len(plan.cols) == 2

    y_ref = ref.forward(x_np)
    y_plain, y_stream = net(x), streamed(x)
    assert relative_error(y_plain.detach(), y_ref) <= 1e-12
    assert relative_error(y_stream.detach(), y_ref) <= 1e-12

    grad_y = rng.standard_normal(y_ref.shape)
    grad_x_ref, grads_ref = ref.backward(x_np, grad_y)
    params = dict(net.named_parameters())
    got = torch.autograd.grad(y_stream, [x, *params.values()], torch.from_numpy(grad_y))
    assert relative_error(got[0], grad_x_ref) <= 1e-10
    torch_grads = dict(zip(params, got[1:]))
    for ref_name, torch_name in names.items():
        assert relative_error(torch_grads[torch_name], grads_ref[ref_name]) <= 1e-10, torch_name


def test_full_width_resnet34_streams_exactly():
    """The real ResNet-34 trunk (64..512 channels), several tiles each way, all gradients."""
    net = random_resnet34_trunk(width=64, seed=1)
    params = dict(net.named_parameters())
    assert len(params) > 100
    x = torch.randn(1, 3, 1000, 1010, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # one tile for the tape-free forward, 2 x 2 tiles for the recompute + backward
    streamed = StreamingTrunk(net, tile_size=2048, backward_tile_size=992)
    assert len(streamed.plan(x.shape[-2:])) == 1
    assert len(streamed.plan(x.shape[-2:], backward=True)) == 4

    y_plain = net(x)
    grad_y = torch.randn_like(y_plain)
    plain = torch.autograd.grad(y_plain, list(params.values()), grad_y)
    del y_plain
    y = streamed(x)
    stream = torch.autograd.grad(y, list(params.values()), grad_y)
    for name, a, b in zip(params, stream, plain):
        assert relative_error(a, b) <= 1e-10, name


def test_unsupported_modules_do_not_convert():
    with pytest.raises(ValueError, match="no reference equivalent"):
        to_reference(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="training mode"):
        to_reference(torch.nn.BatchNorm2d(2))
