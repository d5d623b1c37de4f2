"""CLAM head: masked attention, pooling, hand-computed oracles for attention and instance loss, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torch_impl.models.clam import (
    CLAMHead,
    CLAMMultiBranch,
    CLAMOutput,
    CLAMSingleBranch,
    GatedAttention,
    total_loss,
)

HEADS = {"sb": CLAMSingleBranch, "mb": CLAMMultiBranch}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_head(kind: str, in_dim: int = 6, hidden_dim: int = 5, attention_dim: int = 4, n_classes: int = 3, **kw):
    torch.manual_seed(0)
    return HEADS[kind](in_dim, hidden_dim, attention_dim, n_classes, **kw).double()


def random_mask(B: int, H: int, W: int, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """(B, H, W) bool with at least one tissue position per item."""
    mask = torch.rand(B, H, W, generator=gen) < p
    for b in range(B):
        i = int(torch.randint(H * W, (1,), generator=gen))
        mask[b].view(-1)[i] = True
    return mask


# --- slow, obvious versions of the pooling, to check the head's against -------------------


def pool_oracle(x: torch.Tensor, k: int, how: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H/k), ceil(W/k)); windows cut at the border, not padded."""
    B, C, H, W = x.shape
    out = x.new_zeros(B, C, math.ceil(H / k), math.ceil(W / k))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            window = x[:, :, i * k : (i + 1) * k, j * k : (j + 1) * k].flatten(2)  # (B, C, <= k*k)
            out[:, :, i, j] = window.amax(2) if how == "max" else window.mean(2)
    return out


def pooled_mask_oracle(mask: torch.Tensor, k: int | None) -> torch.Tensor:
    """A pooled position is tissue when any position of its window is."""
    if k is None:
        return mask
    return pool_oracle(mask[:, None].double(), k, "max")[:, 0] > 0


# --- the shapes -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sb", "mb"])
@pytest.mark.parametrize("pool,pool_size", [(None, 8), ("max", 3), ("avg", 4)])
def test_output_shapes(kind, pool, pool_size):
    head = make_head(kind, n_classes=3, pool=pool, pool_size=pool_size)
    B, H, W = 2, 7, 10
    out = head(torch.randn(B, 6, H, W, dtype=torch.float64))
    assert isinstance(out, CLAMOutput)
    Hp, Wp = (H, W) if pool is None else (math.ceil(H / pool_size), math.ceil(W / pool_size))
    n_heads = 1 if kind == "sb" else 3
    assert out.logits.shape == (B, 3) and out.probs.shape == (B, 3)
    assert out.attention.shape == (B, n_heads, Hp, Wp)
    assert out.instance_loss is None
    torch.testing.assert_close(out.probs, torch.softmax(out.logits, 1))


def test_module_names_follow_clam():
    sb = CLAMSingleBranch(instance_loss=True, dropout=0.25)
    names = set(dict(sb.named_parameters()))
    assert {
        "fc.0.weight",
        "attention.attention_a.0.weight",
        "attention.attention_b.0.weight",
        "attention.attention_c.weight",
        "classifiers.weight",
        "instance_classifiers.1.weight",
    } <= names
    assert sb.classifiers.weight.shape == (2, 512) and sb.attention.attention_c.weight.shape == (1, 256)
    assert any(isinstance(m, nn.Dropout) for m in sb.fc)
    mb = CLAMMultiBranch(n_classes=4)
    assert mb.instance_classifiers is None  # not built: DDP would see unused parameters
    assert mb.attention.attention_c.weight.shape == (4, 256) and len(mb.classifiers) == 4
    assert not any(isinstance(m, nn.Dropout) for m in mb.modules())


# --- attention over the mask -------------------------------------------------------------


@given(
    kind=st.sampled_from(["sb", "mb"]),
    pool=st.sampled_from([None, "max", "avg"]),
    B=st.integers(1, 3),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_attention_is_a_distribution_over_tissue(kind, pool, B, H, W, seed):
    gen = torch.Generator().manual_seed(seed)
    k = 3
    head = make_head(kind, pool=pool, pool_size=k)
    features = torch.randn(B, 6, H, W, generator=gen, dtype=torch.float64)
    mask = random_mask(B, H, W, gen)
    with torch.no_grad():
        out = head(features, mask)
    tissue = pooled_mask_oracle(mask, None if pool is None else k)  # (B, H', W')
    assert out.attention.shape[2:] == tissue.shape[1:]
    a = out.attention.permute(1, 0, 2, 3)  # (n_heads, B, H', W')
    assert torch.all(a[:, ~tissue] == 0)  # exactly zero off tissue
    assert torch.all(a[:, tissue] > 0)
    sums = out.attention.sum((2, 3))  # (B, n_heads)
    assert torch.max(torch.abs(sums - 1)) < 1e-12


@given(
    kind=st.sampled_from(["sb", "mb"]),
    pool=st.sampled_from([None, "max", "avg"]),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_features_off_tissue_do_not_reach_the_output(kind, pool, H, W, seed):
    """Background positions (without pooling) or background windows (with pooling) are inert."""
    gen = torch.Generator().manual_seed(seed)
    k = 2
    head = make_head(kind, pool=pool, pool_size=k)
    features = torch.randn(2, 6, H, W, generator=gen, dtype=torch.float64)
    mask = random_mask(2, H, W, gen, p=0.4)
    # Positions whose pooled window holds no tissue at all (all background without pooling).
    inert = (
        ~mask
        if pool is None
        else ~F.interpolate(pooled_mask_oracle(mask, k)[:, None].double(), scale_factor=k, mode="nearest")[
            :, 0, :H, :W
        ].bool()
    )
    changed = features.clone()
    noise = 100 * torch.randn(features.shape, generator=gen, dtype=torch.float64)
    changed[inert[:, None].expand_as(features)] = noise[inert[:, None].expand_as(features)]
    with torch.no_grad():
        a, b = head(features, mask), head(changed, mask)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=0)


def test_mask_formats_are_equivalent():
    gen = torch.Generator().manual_seed(1)
    head = make_head("sb")
    features = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    mask = random_mask(2, 4, 5, gen)
    ref = head(features, mask).logits
    for m in (mask[:, None], mask.float(), mask.long()[:, None], mask.double()):
        torch.testing.assert_close(head(features, m).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(head(features).logits, head(features, torch.ones(2, 4, 5)).logits, rtol=0, atol=0)


def test_batch_equals_one_slide_at_a_time():
    gen = torch.Generator().manual_seed(2)
    head = make_head("mb", pool="max", pool_size=2, instance_loss=True, subtyping=True)
    features = torch.randn(3, 6, 5, 7, generator=gen, dtype=torch.float64)
    mask = random_mask(3, 5, 7, gen)
    label = torch.tensor([2, 0, 1])
    out = head(features, mask, label)
    singles = [head(features[b : b + 1], mask[b : b + 1], label[b : b + 1]) for b in range(3)]
    torch.testing.assert_close(out.logits, torch.cat([s.logits for s in singles]), rtol=0, atol=0)
    torch.testing.assert_close(out.attention, torch.cat([s.attention for s in singles]), rtol=0, atol=0)
    torch.testing.assert_close(out.instance_loss, torch.stack([s.instance_loss for s in singles]).mean())


# --- hand-computed oracles -----------------------------------------------------------


def test_gated_attention_formula():
    torch.manual_seed(0)
    att = GatedAttention(in_dim=4, hidden_dim=3, n_heads=2).double()
    h = torch.randn(5, 4, dtype=torch.float64)
    Va, ba = att.attention_a[0].weight, att.attention_a[0].bias  # (3, 4), (3,)
    Ub, bb = att.attention_b[0].weight, att.attention_b[0].bias
    w, bw = att.attention_c.weight, att.attention_c.bias  # (2, 3), (2,)
    expected = torch.empty(5, 2, dtype=torch.float64)
    for k in range(5):
        gate = torch.tanh(Va @ h[k] + ba) * (1 / (1 + torch.exp(-(Ub @ h[k] + bb))))  # (3,)
        expected[k] = w @ gate + bw
    torch.testing.assert_close(att(h), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["sb", "mb"])
@pytest.mark.parametrize("pool", [None, "max", "avg"])
def test_head_forward_equals_the_formulas(kind, pool):
    """logits = W_c sum_k a_k h_k + b_c, softmax over tissue only, written out position by position."""
    gen = torch.Generator().manual_seed(3)
    n_classes, k_pool = 3, 3
    head = make_head(kind, n_classes=n_classes, pool=pool, pool_size=k_pool)
    features = torch.randn(2, 6, 7, 5, generator=gen, dtype=torch.float64)
    mask = random_mask(2, 7, 5, gen)
    out = head(features, mask)

    x_all = features if pool is None else pool_oracle(features, k_pool, pool)
    tissue = pooled_mask_oracle(mask, None if pool is None else k_pool)
    W1, b1 = head.fc[0].weight, head.fc[0].bias
    for b in range(2):
        positions = [(i, j) for i in range(tissue.shape[1]) for j in range(tissue.shape[2]) if tissue[b, i, j]]
        hs = [torch.relu(W1 @ x_all[b, :, i, j] + b1) for i, j in positions]
        scores = torch.stack([head.attention(h[None])[0] for h in hs])  # (K, n_heads), checked above
        weights = torch.exp(scores) / torch.exp(scores).sum(0)  # (K, n_heads)
        bags = sum(weights[n][:, None] * hs[n][None] for n in range(len(hs)))  # (n_heads, hidden)
        if kind == "sb":
            logits = head.classifiers.weight @ bags[0] + head.classifiers.bias
        else:
            logits = torch.stack([c.weight[0] @ bags[i] + c.bias[0] for i, c in enumerate(head.classifiers)])
        torch.testing.assert_close(out.logits[b], logits, rtol=1e-12, atol=1e-12)
        for n, (i, j) in enumerate(positions):
            torch.testing.assert_close(out.attention[b, :, i, j], weights[n], rtol=1e-12, atol=1e-12)


def _ranking_head(kind: str, n_classes: int, k_sample: int, subtyping: bool) -> nn.Module:
    """A head whose attention ranks instances by feature channel c (head c), by construction.

    fc = identity (features are positive, so ReLU is too), attention_a = identity on the
    channels, attention_b = 0 (gate 1/2), attention_c = identity: score_c = tanh(x_c) / 2.
    """
    C = 3
    head = HEADS[kind](C, C, C, n_classes, instance_loss=True, k_sample=k_sample, subtyping=subtyping).double()
    n_heads = head.n_heads
    with torch.no_grad():
        head.fc[0].weight.copy_(torch.eye(C))
        head.fc[0].bias.zero_()
        head.attention.attention_a[0].weight.copy_(torch.eye(C))
        head.attention.attention_a[0].bias.zero_()
        head.attention.attention_b[0].weight.zero_()
        head.attention.attention_b[0].bias.zero_()
        head.attention.attention_c.weight.copy_(torch.eye(C)[:n_heads])
        head.attention.attention_c.bias.zero_()
    return head


def _expected_instance_loss(head, x, label: int, k: int) -> torch.Tensor:
    """CLAM's instance loss written out: rankings by sorting, cross-entropy by log-sum-exp.

    x: (K, C) tissue instances (= h, since fc is the identity); head c ranks by x[:, c].
    """
    total = torch.zeros((), dtype=torch.float64)
    for c in range(head.n_classes):
        column = c if head.multi_branch else 0
        order = sorted(range(x.shape[0]), key=lambda i: float(x[i, column]))  # ascending
        top, bottom = order[::-1][:k], order[:k]
        if c == label:
            pairs = [(i, 1) for i in top] + [(i, 0) for i in bottom]
        elif head.subtyping:
            pairs = [(i, 0) for i in top]
        else:
            continue
        Wc, bc = head.instance_classifiers[c].weight, head.instance_classifiers[c].bias
        terms = []
        for i, target in pairs:
            z = Wc @ x[i] + bc  # (2,)
            terms.append(torch.log(torch.exp(z[0]) + torch.exp(z[1])) - z[target])
        total = total + sum(terms) / len(terms)
    if head.subtyping:
        total = total / head.n_classes
    return total


@pytest.mark.parametrize(
    "kind,n_classes,subtyping,label",
    [("sb", 2, False, 1), ("sb", 2, False, 0), ("sb", 3, True, 2), ("mb", 3, False, 1), ("mb", 3, True, 1)],
)
@pytest.mark.parametrize("k_sample", [2, 10])  # 10 > 5 tissue instances: k is clipped to 5
def test_instance_loss_by_hand(kind, n_classes, subtyping, label, k_sample):
    head = _ranking_head(kind, n_classes, k_sample, subtyping)
    # Channel 0 on a 2 x 3 map; (0, 0) has the largest value but is background.
    features = torch.tensor(
        [
            [[0.9, 0.1, 0.5], [0.3, 0.7, 0.2]],
            [[0.15, 0.8, 0.45], [0.6, 0.05, 0.35]],
            [[0.25, 0.55, 0.65], [0.12, 0.4, 0.95]],
        ],
        dtype=torch.float64,
    )[None]  # (1, 3, 2, 3)
    mask = torch.tensor([[[0, 1, 1], [1, 1, 1]]])
    out = head(features, mask, torch.tensor([label]))
    tissue = features[0].flatten(1).T[mask[0].flatten().bool()]  # (5, 3)
    expected = _expected_instance_loss(head, tissue, label, min(k_sample, 5))
    torch.testing.assert_close(out.instance_loss, expected, rtol=1e-12, atol=1e-12)

    if kind == "sb" and not subtyping and k_sample == 2:
        # The sets, spelled out once: top-2 of channel 0 on tissue = 0.7, 0.5; bottom-2 = 0.1, 0.2.
        Wc, bc = head.instance_classifiers[label].weight, head.instance_classifiers[label].bias
        pos = features[0, :, [1, 0], [1, 2]].T  # (2, 3)
        neg = features[0, :, [0, 1], [1, 2]].T
        z = torch.cat([pos, neg]) @ Wc.T + bc  # (4, 2)
        targets = [1, 1, 0, 0]
        manual = sum(torch.logsumexp(z[n], 0) - z[n, t] for n, t in enumerate(targets)) / 4
        torch.testing.assert_close(out.instance_loss, manual, rtol=1e-12, atol=1e-12)


def test_total_loss_combines_bag_and_instance_loss():
    head = make_head("sb", n_classes=2, instance_loss=True, bag_weight=0.6)
    features = torch.rand(2, 6, 4, 4, dtype=torch.float64)
    label = torch.tensor([1, 0])
    out = head(features, label=label)
    bag = F.cross_entropy(out.logits, label)
    torch.testing.assert_close(head.loss(out, label), 0.6 * bag + 0.4 * out.instance_loss)
    torch.testing.assert_close(total_loss(out, label, 0.7), 0.7 * bag + 0.3 * out.instance_loss)
    plain = make_head("sb", n_classes=2)(features)
    torch.testing.assert_close(total_loss(plain, label), F.cross_entropy(plain.logits, label))


# --- gradients ----------------------------------------------------------------------


def test_backward_reaches_every_parameter_and_skips_background():
    head = make_head("mb", instance_loss=True, subtyping=True, dropout=0.1).train()
    features = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 4, 5, torch.Generator().manual_seed(4))
    label = torch.tensor([0, 2])
    head.loss(head(features, mask, label), label).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.all(features.grad.permute(1, 0, 2, 3)[:, ~mask] == 0)
    assert features.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,pool", [("sb", None), ("mb", "avg"), ("sb", "max")])
def test_gradcheck(kind, pool):
    head = make_head(
        kind,
        in_dim=3,
        hidden_dim=4,
        attention_dim=3,
        n_classes=2,
        pool=pool,
        pool_size=2,
        instance_loss=True,
        k_sample=2,
    )
    mask = torch.tensor([[[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 0]]])
    label = torch.tensor([1])
    features = torch.randn(1, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    features.requires_grad_(True)

    def fn(x):
        out = head(x, mask, label)
        return out.logits, out.attention, out.instance_loss

    assert torch.autograd.gradcheck(fn, (features,), eps=1e-6, atol=1e-8)


# --- loud errors ------------------------------------------------------------------------


def test_slide_without_tissue_raises():
    head = make_head("sb")
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"batch index \[1\] have no tissue"):
        head(torch.randn(2, 6, 3, 3, dtype=torch.float64), mask)


def test_instance_loss_needs_a_label_in_training():
    head = make_head("sb", instance_loss=True).train()
    x = torch.randn(1, 6, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="label"):
        head(x)
    assert head.eval()(x).instance_loss is None  # inference on unlabelled slides
    assert head(x, label=torch.tensor([1])).instance_loss is not None


@pytest.mark.parametrize(
    "features_shape,mask,label,match",
    [
        ((1, 5, 3, 3), None, None, r"\(B, 6, H, W\)"),
        ((1, 6, 3, 3), torch.ones(1, 3, 4), None, "mask must be"),
        ((1, 6, 3, 3), torch.full((1, 3, 3), 0.5), None, "only 0 and 1"),
        ((2, 6, 3, 3), None, torch.tensor([1]), r"shape \(2,\)"),
        ((1, 6, 3, 3), None, torch.tensor([3]), r"\[0, 3\)"),
        ((1, 6, 3, 3), None, torch.tensor([1.0]), "integer"),
    ],
)
def test_bad_inputs_raise(features_shape, mask, label, match):
    head = make_head("sb")
    with pytest.raises(ValueError, match=match):
        head(torch.randn(features_shape, dtype=torch.float64), mask, label)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pool="mean"), "pool must be"),
        (dict(pool_size=0), "pool_size"),
        (dict(n_classes=1), "n_classes"),
        (dict(dropout=1.0), "dropout"),
        (dict(bag_weight=1.5), "bag_weight"),
        (dict(k_sample=0), "k_sample"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CLAMSingleBranch(**kwargs)


def test_head_base_class_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        CLAMHead()
