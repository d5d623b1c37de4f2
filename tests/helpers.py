"""Helpers shared by the test modules: one error measure, random frozen trunks, an array source.

``relative_error`` is the measure every streamed-versus-plain comparison uses; the trunk
builders give ResNet-34 trunks whose batch norms are non-trivial (an untouched batch norm
in eval mode is the identity and would test nothing); ``ArrayRegions`` is the simplest
lazy source the streaming engine reads (``.shape`` and ``.read``), recording its reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_float64(x: Any) -> np.ndarray:
    """A NumPy array or a torch tensor (any device and dtype, bf16 included) as float64."""
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so that NumPy-only tests need no torch
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(actual: Any, expected: Any, floor: float = 0.0) -> float:
    """``max |actual - expected| / max(max |expected|, floor)``, over the whole array.

    One scale for the whole array (its largest entry), not entry by entry: entries near
    zero would otherwise turn round-off into huge relative errors. ``floor`` treats an
    ``expected`` whose entries are all below it as zero-sized (e.g. a gradient that is 0 in
    exact arithmetic); when the scale is still 0 the absolute error is returned.
    Accepts NumPy arrays and torch tensors (compared in float64 on the host).
    """
    a, b = _as_float64(actual), _as_float64(expected)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} and {b.shape}")
    scale = max(float(np.abs(b).max(initial=0.0)), floor)
    return float(np.abs(a - b).max(initial=0.0) / (scale if scale > 0 else 1.0))


def randomize_batchnorm(module, seed: int):
    """Give every BatchNorm2d in ``module`` random running statistics and affine parameters.

    running_mean, bias ~ N(0, 0.1); running_var, weight ~ U(0.5, 1.5): far from the identity,
    yet mild enough that a 36-layer trunk keeps its activations of order one. Drawn from a
    generator seeded with ``seed`` (the global torch RNG is left alone). Returns ``module``.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return module


def random_resnet34_trunk(width: int, seed: int, dtype=None):
    """A ResNet-34 trunk (``width`` channels in the first stage) with random weights and
    random batch-norm statistics (:func:`randomize_batchnorm`), batch norm frozen.

    ``dtype`` defaults to float64, the dtype of every exactness test. Seeds the global
    torch RNG with ``seed`` (the convolutions' initialisation draws from it).
    """
    import torch

    from torch_impl.models.resnet import freeze_batchnorm, resnet34, trunk

    torch.manual_seed(seed)
    net = trunk(resnet34(width=width)).to(torch.float64 if dtype is None else dtype)
    return freeze_batchnorm(randomize_batchnorm(net, seed))


class ArrayRegions:
    """A lazy source over a (C, H, W) array: ``.shape`` and ``.read(y, x, h, w)``.

    ``reads`` records every requested region, so tests can check what was read.
    """

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape
        self.reads: list[tuple[int, int, int, int]] = []

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        self.reads.append((y, x, h, w))
        return self.array[:, y:y + h, x:x + w]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.array.dtype})"
