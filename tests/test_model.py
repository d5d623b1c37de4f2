"""StreamingCLAM end to end: streamed model == the same trunk and head without streaming."""

from __future__ import annotations

import pytest
import torch

from torch_impl.models.clam import CLAMSingleBranch
from torch_impl.models.streaming_clam import ModelConfig, StreamingCLAM, build_model
from tests import helpers


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Gradients below 1e-8 count as zero: the attention bias's gradient is exactly 0 in
    exact arithmetic (softmax ignores a common shift)."""
    return helpers.relative_error(a, b, floor=1e-8)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def small_model(pool: str | None) -> StreamingCLAM:
    body = helpers.random_resnet34_trunk(width=2, seed=0)
    head = CLAMSingleBranch(in_dim=16, hidden_dim=8, attention_dim=4, pool=pool, pool_size=2).double()
    return StreamingCLAM(body, head, tile_size=992)


@pytest.mark.parametrize("pool", [None, "max"])
def test_streamed_model_gradients_equal_plain(pool):
    model = small_model(pool)
    x = torch.randn(1, 3, 1000, 1010, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 32, 32, dtype=torch.bool)
    mask[:, :5] = False  # background rows: no instances there
    label = torch.tensor([1])
    assert len(model.trunk.plan(x.shape[-2:])) == 4

    out = model(x, mask)
    model.loss(out, label).backward()
    streamed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    plain_out = model.head(model.trunk.module(x), mask)
    model.loss(plain_out, label).backward()
    assert relative_error(out.logits, plain_out.logits) <= 1e-12
    assert relative_error(out.attention, plain_out.attention) <= 1e-12
    assert len(streamed) > 100
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert relative_error(streamed[n], p.grad) <= 1e-10, n


def test_frozen_trunk_trains_only_the_head():
    model = small_model("max")
    model.set_trunk_trainable(False)
    assert not model.trunk_trainable
    out = model(torch.randn(1, 3, 128, 96, dtype=torch.float64))
    model.loss(out, torch.tensor([0])).backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    model.set_trunk_trainable(True)
    assert model.trunk_trainable


def test_build_model_from_config():
    model = build_model(ModelConfig(width=4, tile_size=512, hidden_dim=16, attention_dim=8))
    assert model.head.fc[0].in_features == 32
    out = model(torch.randn(1, 3, 96, 160))
    assert out.logits.shape == (1, 2) and out.attention.shape[-2:] == (1, 1)  # 3x5 map, 8x8 pooled
    with pytest.raises(ValueError, match="'sb' or 'mb'"):
        build_model(ModelConfig(width=4, head="xx"))


def test_load_model_with_overrides(tmp_path):
    import dataclasses

    from torch_impl.pipeline.checkpoint import load_model, save_checkpoint

    config = ModelConfig(width=4, tile_size=512, hidden_dim=16, attention_dim=8)
    model = build_model(config)
    save_checkpoint(tmp_path / "m.pt", model=model.state_dict(), model_config=dataclasses.asdict(config))
    loaded, stored = load_model(tmp_path / "m.pt", tile_size=2048, backward_tile_size=1024)
    assert stored.tile_size == 2048 and loaded.trunk.tile_size == 2048 and loaded.trunk.backward_tile_size == 1024
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
