"""StreamingTrunk equals the plain module: outputs, parameter gradients, input gradients.

The oracle is the same torch module run on the whole image with ordinary autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from reference.geometry import compose, parallel
from reference.tiling import min_tile_size
from torch_impl.streaming.geometry import UnsupportedModuleError, module_geometry, register_geometry
from torch_impl.streaming import StreamingTrunk, to_model_input
from tests.helpers import ArrayRegions, randomize_batchnorm, relative_error


class SumBlock(nn.Module):
    """main(x) + shortcut(x): a residual block with arbitrary layers (taught via the registry)."""

    def __init__(self, main: nn.Sequential, shortcut: nn.Module | None):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


def _sum_block_geometry(block: SumBlock):
    main = module_geometry(block.main)
    short = module_geometry(block.shortcut) if block.shortcut is not None else (compose([]), compose([]))
    return parallel([main[0], short[0]]), parallel([main[1], short[1]])


register_geometry(SumBlock, _sum_block_geometry)


# ---------------------------------------------------------------- random trunks
ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.SiLU, nn.LeakyReLU, nn.Hardtanh)


def in_place_activations():
    return st.sampled_from([
        lambda: nn.ReLU(inplace=True), lambda: nn.LeakyReLU(0.1, inplace=True),
        lambda: nn.SiLU(inplace=True), lambda: nn.Hardtanh(-0.5, 0.5, inplace=True),
    ]).map(lambda make: make())


@st.composite
def trunks(draw, in_channels: int = 2, in_place: bool = False):
    """Random local trunks: conv (kernels, strides, paddings, dilations, groups), pools,
    batch norm, activations and residual blocks, with a channel count that flows through.

    ``in_place``: the trunk starts with an activation that writes into its input
    (``inplace=True``), so into the tiles the engine feeds it, and so does every activation
    but one right after another activation (whose backward may need the output that an
    in-place write would overwrite: plain torch refuses to differentiate that too).
    """
    c = in_channels
    layers: list[nn.Module] = [draw(in_place_activations())] if in_place else []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool", "bn", "act", "residual"]))
        if kind == "conv":
            kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
            depthwise = draw(st.booleans())
            c_out = c if depthwise else draw(st.integers(1, 3))
            layers.append(nn.Conv2d(
                c, c_out, (kh, kw), stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                padding=(draw(st.integers(0, 3)), draw(st.integers(0, 3))),
                dilation=(draw(st.integers(1, 3)), draw(st.integers(1, 2))),
                groups=c if depthwise else 1, bias=draw(st.booleans()),
            ))
            c = c_out
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.integers(1, 4))
            pool = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
            layers.append(pool(k, stride=draw(st.integers(1, 3)), padding=draw(st.integers(0, k // 2))))
        elif kind == "bn":
            layers.append(randomize_batchnorm(nn.BatchNorm2d(c), seed=draw(st.integers(0, 2**16))))
        elif kind == "act":
            after_activation = bool(layers) and isinstance(layers[-1], ACTIVATIONS)
            layers.append(draw(in_place_activations()) if in_place and not after_activation else
                          draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.SiLU, nn.LeakyReLU]))())
        else:
            s = draw(st.integers(1, 2))
            k = draw(st.sampled_from([1, 3, 5]))
            d = draw(st.integers(1, 2))
            c_out = draw(st.integers(1, 3))
            main = nn.Sequential(
                nn.Conv2d(c, c_out, k, stride=s, padding=d * (k - 1) // 2, dilation=d),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            )
            shortcut = None if (s == 1 and c == c_out) else nn.Conv2d(c, c_out, 1, stride=s, bias=False)
            layers.append(SumBlock(main, shortcut))
            c = c_out
    return nn.Sequential(*layers).double().eval()


@st.composite
def trunk_and_image(draw, in_place: bool = False):
    trunk = draw(trunks(in_place=in_place))
    gh, gw = module_geometry(trunk)
    H, W = draw(st.integers(4, 48)), draw(st.integers(4, 48))
    assume(gh.output_size(H) >= 1 and gw.output_size(W) >= 1)
    th = draw(st.integers(min_tile_size(gh, H), H + 8))
    tw = draw(st.integers(min_tile_size(gw, W), W + 8))
    batch = draw(st.integers(1, 2))
    return trunk, (batch, 2, H, W), (th, tw)


def _seeded(shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


@given(trunk_and_image(), st.integers(0, 2**16))
def test_streamed_output_and_gradients_equal_plain(case, seed):
    trunk, shape, tile = case
    x = _seeded(shape, seed).requires_grad_(True)
    streamed = StreamingTrunk(trunk, tile)
    assert len(streamed.plan(shape[-2:]).tile_shapes) <= 4

    y_plain = trunk(x)
    y = streamed(x)
    assert y.shape == y_plain.shape
    assert relative_error(y, y_plain) <= 1e-12

    grad_y = _seeded(y.shape, seed + 1)
    params = [p for p in trunk.parameters()]
    plain = torch.autograd.grad(y_plain, [x, *params], grad_y)
    stream = torch.autograd.grad(y, [x, *params], grad_y)
    for name, a, b in zip(["input", *[n for n, _ in trunk.named_parameters()]], stream, plain):
        assert relative_error(a, b) <= 1e-10, name


def in_place_example() -> tuple[nn.Sequential, torch.Tensor]:
    """The trunk that writes into its input, on a 200 x 200 float64 image (tile 48)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
    ).double()
    return trunk, _seeded((1, 3, 200, 200), 0)


def test_a_trunk_that_writes_into_its_input_streams_exactly():
    """Overlapping tiles are views of one image: a first layer that writes into its input
    must get a copy, or it changes its neighbours' pixels (and the caller's tensor)."""
    trunk, x = in_place_example()
    before = x.clone()
    streamed = StreamingTrunk(trunk, 48)
    assert len(streamed.plan(x.shape[-2:])) > 1
    y = streamed(x)
    assert torch.equal(x, before)  # the caller's tensor is untouched
    y_plain = trunk(x.clone())  # plain torch writes into its input: give it a copy
    assert relative_error(y, y_plain) <= 1e-12

    grad_y = _seeded(y.shape, 1)
    params = list(trunk.parameters())
    plain = torch.autograd.grad(y_plain, params, grad_y)
    stream = torch.autograd.grad(y, params, grad_y)
    assert torch.equal(x, before)
    for a, b in zip(stream, plain):
        assert relative_error(a, b) <= 1e-10


@given(trunk_and_image(in_place=True), st.integers(0, 2**16))
def test_in_place_trunks_stream_exactly_and_leave_the_input_alone(case, seed):
    """Random trunks whose activations all write into their input, the first one into the
    tile itself: output, parameter and input gradients equal plain, and the input is unchanged.

    The input is a non-leaf tensor (x0 * 1): plain torch refuses in-place writes into a leaf
    that requires a gradient, but an input computed by earlier layers is fair game.
    """
    trunk, shape, tile = case
    x0 = _seeded(shape, seed).requires_grad_(True)
    x = x0 * 1.0
    before = x.detach().clone()
    y = StreamingTrunk(trunk, tile)(x)
    assert torch.equal(x, before)
    y_plain = trunk(x0 * 1.0)
    assert relative_error(y, y_plain) <= 1e-12

    grad_y = _seeded(y.shape, seed + 1)
    params = list(trunk.parameters())
    plain = torch.autograd.grad(y_plain, [x0, *params], grad_y)
    stream = torch.autograd.grad(y, [x0, *params], grad_y)
    assert torch.equal(x, before)
    for name, a, b in zip(["input", *[n for n, _ in trunk.named_parameters()]], stream, plain):
        assert relative_error(a, b) <= 1e-10, name


def test_a_lazy_source_is_never_written_to():
    """A float image read whole (one tile, no normalisation) is not handed to the module
    itself: a first layer that writes into its input would change the caller's array."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Hardtanh(0.2, 0.8, inplace=True), nn.Conv2d(3, 4, 3, padding=1)).double()
    image = np.random.default_rng(0).random((3, 50, 40))  # (C, H, W) float64 in [0, 1]
    before = image.copy()
    streamed = StreamingTrunk(trunk, 64, mean=None, std=None)
    with torch.no_grad():
        y = streamed(ArrayRegions(image))
    np.testing.assert_array_equal(image, before)
    with torch.no_grad():
        assert relative_error(y, trunk(torch.from_numpy(before.copy())[None])) <= 1e-12


def test_loss_backward_accumulates_into_grad():
    """A plain loss.backward() runs the streamed backward and fills .grad, as autograd does."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1)).double()
    head = nn.Linear(4, 1).double()
    x = torch.randn(1, 3, 40, 33, dtype=torch.float64)

    def loss_of(features):
        return head(features.mean(dim=(2, 3))).square().sum()

    loss_of(trunk(x)).backward()
    expected = {n: p.grad.clone() for n, p in [*trunk.named_parameters(), *head.named_parameters()]}
    trunk.zero_grad(), head.zero_grad()
    loss_of(StreamingTrunk(trunk, 12)(x)).backward()
    for n, p in [*trunk.named_parameters(), *head.named_parameters()]:
        assert relative_error(p.grad, expected[n]) <= 1e-10, n


def test_frozen_parameters_get_no_gradient_and_no_grad_mode_streams():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 2, 3, 1, 1)).double()
    trunk[0].weight.requires_grad_(False)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    StreamingTrunk(trunk, 10)(x).sum().backward()
    assert trunk[0].weight.grad is None and trunk[1].weight.grad is not None
    with torch.no_grad():
        y = StreamingTrunk(trunk, 10)(x)
    assert not y.requires_grad and relative_error(y, trunk(x)) <= 1e-12


def test_lazy_source_gives_the_same_output_and_gradients(tmp_path):
    rng = np.random.default_rng(3)
    pixels = np.lib.format.open_memmap(tmp_path / "image.npy", mode="w+", dtype=np.uint8, shape=(3, 57, 70))
    pixels[:] = rng.integers(0, 256, pixels.shape, dtype=np.uint8)
    pixels.flush()
    trunk = nn.Sequential(nn.Conv2d(3, 4, 5, 2, 2), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1)).double().eval()
    streamed = StreamingTrunk(trunk, 24)
    source = ArrayRegions(np.load(tmp_path / "image.npy", mmap_mode="r"))

    x = to_model_input(torch.from_numpy(np.array(pixels))[None], dtype=torch.float64)
    y_plain = trunk(x)
    grad_y = torch.randn_like(y_plain)
    expected = torch.autograd.grad(y_plain, list(trunk.parameters()), grad_y)

    y = streamed(source)
    got = torch.autograd.grad(y, list(trunk.parameters()), grad_y)
    assert y.dtype == torch.float64  # lazy tiles are normalised into the trunk's dtype
    assert relative_error(y, y_plain) <= 1e-12
    for a, b in zip(got, expected):
        assert relative_error(a, b) <= 1e-10
    # every read was one tile: the image was never read whole
    assert all(h * w < 57 * 70 for _, _, h, w in source.reads)
    # slicing-only sources (a plain memory map) work as well
    y_sliced = streamed(np.load(tmp_path / "image.npy", mmap_mode="r"))
    assert relative_error(y_sliced, y.detach()) == 0


def test_bf16_autocast_streams_like_plain_bf16():
    """Under autocast the streamed step matches the plain bf16 step to 1% (tiles sum the
    gradient in another order); bf16 itself is a few % from fp32 on random weights."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
    x = torch.randn(1, 3, 48, 40)
    grad_y = torch.randn(1, 8, 24, 20).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain = trunk(x)
        y = StreamingTrunk(trunk, 20)(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), y_plain.float()) <= 1e-2
    plain = torch.autograd.grad(y_plain, list(trunk.parameters()), grad_y)
    streamed = torch.autograd.grad(y, list(trunk.parameters()), grad_y)
    for a, b in zip(streamed, plain):
        assert a.dtype == torch.float32
        assert relative_error(a, b) <= 1e-2


@pytest.mark.parametrize(
    "module, match",
    [
        (nn.Dropout(0.1), "dropout"),
        (nn.Linear(3, 3), "cannot be streamed"),
        (nn.AdaptiveAvgPool2d(1), "cannot be streamed"),
        (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.BatchNorm2d(3), "training mode"),
    ],
)
def test_unsupported_modules_fail_at_wrap_time(module, match):
    with pytest.raises(UnsupportedModuleError, match=match):
        StreamingTrunk(nn.Sequential(nn.Conv2d(3, 3, 1), module), 16)


def test_batchnorm_switched_to_training_after_wrapping_fails_at_forward():
    trunk = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)).eval()
    streamed = StreamingTrunk(trunk, 16)
    trunk.train()
    with pytest.raises(UnsupportedModuleError, match="training mode"):
        streamed(torch.randn(1, 3, 20, 20))


def test_bad_inputs_have_clear_errors():
    streamed = StreamingTrunk(nn.Sequential(nn.Conv2d(3, 3, 7, 2, 3), nn.MaxPool2d(3, 2, 1)), 8)
    with pytest.raises(ValueError, match="at least"):
        streamed(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        streamed(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        streamed(np.zeros((64, 64)))


def test_suggest_tile_sizes_fit_the_budget_and_the_image():
    from torch_impl.models.resnet import resnet34_trunk
    from torch_impl.streaming import suggest_tile_sizes

    trunk = resnet34_trunk(width=8)
    forward, backward = suggest_tile_sizes(trunk, memory_bytes=2**30, bytes_per_value=4)
    assert forward > backward >= 930  # the forward keeps no activations
    forward2, _ = suggest_tile_sizes(trunk, memory_bytes=2**32, bytes_per_value=4)
    assert forward2 == pytest.approx(2 * forward, rel=0.01)  # side ~ sqrt(memory)
    fitted = suggest_tile_sizes(trunk, memory_bytes=2**30, bytes_per_value=4, image_size=(8192, 6000))
    assert fitted[0] <= forward and fitted[1] <= backward
    with pytest.raises(ValueError, match="memory_bytes"):
        suggest_tile_sizes(trunk)
