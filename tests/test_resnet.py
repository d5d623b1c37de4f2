"""ResNet with torchvision's names: state-dict layout, trunk geometry, weight loading, frozen batch norm."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from torch_impl.models.resnet import (
    BasicBlock,
    Bottleneck,
    FrozenBatchNorm2d,
    ResNet,
    freeze_batchnorm,
    load_weights,
    resnet18,
    resnet34,
    resnet34_trunk,
    resnet50,
    trunk,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --- the expected layout, written from torchvision's architecture, not from our module ---


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def torchvision_basic_resnet_layout(blocks: list[int], num_classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of torchvision's resnet18/34 state dict, in registration order."""
    keys = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64)
    cin = 64
    for stage, (planes, n, stride) in enumerate(zip([64, 128, 256, 512], blocks, [1, 2, 2, 2]), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys += [(f"{p}.conv1.weight", (planes, cin, 3, 3))] + _bn(f"{p}.bn1", planes)
            keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
            if i == 0 and (stride != 1 or cin != planes):
                keys += [(f"{p}.downsample.0.weight", (planes, cin, 1, 1))] + _bn(f"{p}.downsample.1", planes)
            cin = planes
    keys += [("fc.weight", (num_classes, 512)), ("fc.bias", (num_classes,))]
    return keys


def test_resnet34_state_dict_matches_torchvision_layout():
    model = resnet34()
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = torchvision_basic_resnet_layout([3, 4, 6, 3])
    assert got == expected
    # torchvision documents 21,797,672 parameters for resnet34 (and 11,689,512 for resnet18).
    assert sum(p.numel() for p in model.parameters()) == 21_797_672


def test_resnet18_and_50_parameter_counts_match_torchvision():
    assert [(k, tuple(v.shape)) for k, v in resnet18().state_dict().items()] == torchvision_basic_resnet_layout(
        [2, 2, 2, 2]
    )
    assert sum(p.numel() for p in resnet50().parameters()) == 25_557_032
    keys = resnet50().state_dict().keys()
    assert "layer1.0.downsample.0.weight" in keys  # 64 -> 256 channels needs a projection
    assert "layer1.0.conv3.weight" in keys


def test_blocks_have_torchvision_attribute_names():
    b = BasicBlock(8, 8)
    assert [n for n, _ in b.named_children()] == ["conv1", "bn1", "relu", "conv2", "bn2"]
    assert b.relu.inplace and b.downsample is None
    bt = Bottleneck(8, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)))
    assert bt.conv2.stride == (2, 2) and bt.conv1.stride == (1, 1)  # v1.5: stride on the 3x3
    assert [n for n, _ in bt.named_children()] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"]


def test_basic_block_forward_is_the_residual_formula():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(3, 4, 1, 2, bias=False), nn.BatchNorm2d(4))
    b = BasicBlock(3, 4, stride=2, downsample=down).double().eval()
    for bn in (b.bn1, b.bn2, down[1]):  # non-trivial eval-mode batch norms
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)

    def bn(m: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (t - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(
            shape
        ) + m.bias.view(shape)

    main = torch.relu(bn(b.bn1, torch.nn.functional.conv2d(x, b.conv1.weight, stride=2, padding=1)))
    main = bn(b.bn2, torch.nn.functional.conv2d(main, b.conv2.weight, padding=1))
    short = bn(down[1], torch.nn.functional.conv2d(x, down[0].weight, stride=2))
    expected = torch.relu(main + short)
    torch.testing.assert_close(b(x), expected, rtol=1e-12, atol=1e-12)
    assert b(x).shape == (2, 4, 5, 3)  # ceil(9/2), ceil(6/2)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("hw", [(37, 70), (64, 33), (1, 1), (95, 32)])
def test_trunk_output_shape_follows_the_formula(hw):
    H, W = hw
    width = 8
    model = resnet34(width=width).eval()
    t = trunk(model)
    assert [n for n, _ in t.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]

    def expected(n: int) -> int:
        n = _conv_out(n, 7, 2, 3)  # conv1
        n = _conv_out(n, 3, 2, 1)  # maxpool
        for _ in range(3):  # first 3x3 conv of layer2..4
            n = _conv_out(n, 3, 2, 1)
        return n

    with torch.no_grad():
        out = t(torch.randn(2, 3, H, W))
    assert out.shape == (2, 8 * width, expected(H), expected(W))
    assert out.shape[2:] == (math.ceil(H / 32), math.ceil(W / 32))
    assert model.num_features == 8 * width


def test_trunk_shares_modules_and_keeps_names():
    model = resnet34(width=8)
    t = trunk(model)
    assert t.layer3 is model.layer3 and t.conv1 is model.conv1
    names = set(dict(t.named_parameters()))
    assert names == {k for k, _ in model.named_parameters() if not k.startswith("fc.")}
    assert "layer2.0.downsample.0.weight" in names
    assert hasattr(model, "fc") and hasattr(model, "avgpool")  # model left intact
    with pytest.raises(TypeError, match="lacks"):
        trunk(nn.Linear(2, 2))


def test_resnet_forward_shapes_small_width():
    x = torch.randn(2, 3, 40, 50)
    for factory, expansion in ((resnet18, 1), (resnet34, 1), (resnet50, 4)):
        model = factory(width=4, num_classes=5).eval()
        assert model.num_features == 32 * expansion
        with torch.no_grad():
            assert model(x).shape == (2, 5)
            assert trunk(model)(x).shape == (2, 32 * expansion, 2, 2)
    gray = resnet18(width=4, in_channels=1)
    assert gray.conv1.weight.shape == (4, 1, 7, 7)


def test_resnet_init_matches_torchvision():
    torch.manual_seed(0)
    model = resnet34(width=16)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = model.layer3[1].conv1.weight  # kaiming normal, fan_out = 64 * 9
    assert abs(w.std().item() - math.sqrt(2 / (64 * 9))) < 0.05 * math.sqrt(2 / (64 * 9))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, [3, 4, 6])
    with pytest.raises(TypeError, match="block"):
        ResNet(nn.Linear, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="width"):
        resnet18(width=0)


# --- load_weights ---------------------------------------------------------------------


def _assert_same_state(a: nn.Module, b: nn.Module, skip_prefix: str | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if skip_prefix and k.startswith(skip_prefix):
            continue
        assert torch.equal(sa[k], sb[k]), k


def _randomise_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "ddp"])
def test_load_weights_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    src = resnet18(width=4)
    _randomise_bn_stats(src)
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {}},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[layout]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    dst = resnet18(width=4)
    assert load_weights(dst, path) is dst
    _assert_same_state(src, dst)


def test_load_weights_ignore_fc(tmp_path):
    src = resnet18(width=4, num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(src.state_dict(), path)
    dst = resnet18(width=4, num_classes=2)
    with pytest.raises(RuntimeError, match="fc.weight"):
        load_weights(dst, path)  # strict: fc shapes differ
    fc_before = dst.fc.weight.clone()
    load_weights(dst, path, ignore_fc=True)
    _assert_same_state(src.layer1, dst.layer1)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert torch.equal(dst.fc.weight, fc_before)  # model keeps its own fc

    # fc absent from the file: fine with ignore_fc; anything else missing is not.
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, path)
    load_weights(dst, path, ignore_fc=True)
    del sd["layer4.1.bn2.running_var"]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="layer4.1.bn2.running_var"):
        load_weights(dst, path, ignore_fc=True)


def test_load_weights_missing_file_and_bad_content(tmp_path):
    path = tmp_path / "nope" / "resnet34.pth"
    with pytest.raises(FileNotFoundError, match="never downloaded") as info:
        load_weights(resnet18(width=4), path)
    assert str(path) in str(info.value)
    bad = tmp_path / "bad.pth"
    torch.save([1, 2, 3], bad)
    with pytest.raises(TypeError, match="no state dict"):
        load_weights(resnet18(width=4), bad)


# --- frozen batch norm ---------------------------------------------------------------


def test_freeze_batchnorm_survives_train_and_keeps_stats():
    torch.manual_seed(0)
    model = resnet18(width=4)
    keys_before = list(model.state_dict().keys())
    freeze_batchnorm(model)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 8 + 3  # stem, two per block, three downsamples
    assert all(isinstance(m, FrozenBatchNorm2d) and not m.training for m in bns)
    assert all(m.training for m in model.modules() if not isinstance(m, nn.BatchNorm2d))
    assert list(model.state_dict().keys()) == keys_before

    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.bn1.weight.grad is not None  # affine stays trainable by default


def test_freeze_batchnorm_eval_mode_equals_unfrozen_eval():
    torch.manual_seed(0)
    model = resnet18(width=4)
    _randomise_bn_stats(model)
    x = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        expected = model.eval()(x)
        got = freeze_batchnorm(model).train()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_freeze_batchnorm_affine_and_sharing():
    model = resnet34(width=4)
    t = freeze_batchnorm(trunk(model), affine=True)
    assert isinstance(model.bn1, FrozenBatchNorm2d)  # shared with the trunk
    assert not model.layer2[0].downsample[1].weight.requires_grad
    assert not model.layer2[0].downsample[1].bias.requires_grad
    assert model.layer2[0].conv1.weight.requires_grad
    t.train()
    assert not model.layer4[2].bn2.training
    freeze_batchnorm(t)  # idempotent


def test_freeze_batchnorm_rejects_what_it_cannot_freeze():
    with pytest.raises(ValueError, match="track_running_stats"):
        freeze_batchnorm(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(TypeError, match="BatchNorm1d"):
        freeze_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))


def test_resnet34_trunk(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="torch_impl.models.resnet"):
        t = resnet34_trunk(width=4)
    assert "random" in caplog.text
    assert isinstance(t, nn.Sequential)
    assert all(not m.training for m in t.modules() if isinstance(m, nn.BatchNorm2d))

    src = resnet34(width=4, num_classes=1000)
    _randomise_bn_stats(src)
    path = tmp_path / "r34.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torch_impl.models.resnet"):
        t = resnet34_trunk(path, width=4, freeze_bn_affine=True)
    assert caplog.text == ""
    _assert_same_state(trunk(src), t)
    assert not t.bn1.weight.requires_grad
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(t(x), trunk(src.eval())(x), rtol=0, atol=0)
    assert t(x).shape == (1, 32, 2, 3)


def _random_bn(block: nn.Module) -> None:
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)


@pytest.mark.parametrize("block_type", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("stride", [1, 2])
def test_registered_residual_layout_computes_what_forward_computes(block_type, stride):
    """The layout the engine reads (geometry, reference converter) is the block's forward."""
    from torch_impl.streaming import residual_layout

    torch.manual_seed(stride)
    planes = 4
    out = planes * block_type.expansion
    down = nn.Sequential(nn.Conv2d(3, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    block = block_type(3, planes, stride=stride, downsample=down).double().eval()
    _random_bn(block)
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)

    main, shortcut, after = residual_layout(block).modules(block)
    y = nn.Sequential(*[m for _, m in main])(x) + shortcut(x)
    y = nn.Sequential(*[m for _, m in after])(y)
    assert (block(x) - y).abs().max().item() == 0.0


def test_bottleneck_converts_to_the_reference_and_agrees():
    """Bottleneck reaches the reference through its registered layout (written once)."""
    import numpy as np

    from torch_impl.streaming import to_reference

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(3, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    block = Bottleneck(3, 4, stride=2, downsample=down).double().eval()
    _random_bn(block)
    ref, names = to_reference(block)
    assert set(names.values()) == {n for n, _ in block.named_parameters()}
    x = np.random.default_rng(0).standard_normal((1, 3, 13, 10))
    expected = block(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ref.forward(x) - expected).max() <= 1e-12 * np.abs(expected).max()
