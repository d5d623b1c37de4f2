"""Convert a torch trunk into the NumPy reference layers, to check one implementation against the other.

``layer, names = to_reference(module)`` builds the :mod:`reference.layers` network that
computes the same function in float64, and ``names`` maps each reference parameter name
(``"4.0.0.main.0.weight"``) to the torch parameter it came from (``"layer1.0.conv1.weight"``),
so outputs and gradients of the two implementations can be compared entry by entry.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from reference import layers as L

from .blocks import residual_layout

__all__ = ["to_reference"]


def _array(t) -> np.ndarray:
    return t.detach().cpu().double().numpy().copy()


def _conv(m: nn.Conv2d) -> L.Conv2d:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise ValueError(f"{m}: only explicit zero padding converts to the reference")
    bias = None if m.bias is None else _array(m.bias)
    return L.Conv2d(_array(m.weight), bias, m.stride, m.padding, m.dilation, m.groups)


def _batchnorm(m: nn.BatchNorm2d) -> L.BatchNorm2d:
    if m.training:
        raise ValueError(f"{m} is in training mode; the reference has eval-mode batch norm only")
    return L.BatchNorm2d(_array(m.weight), _array(m.bias), _array(m.running_mean), _array(m.running_var), m.eps)


def _children(modules: list[tuple[str, nn.Module]]) -> tuple[L.Sequential, dict[str, str]]:
    """A reference Sequential of the converted modules; parameter names joined per child."""
    layers, names = [], {}
    for i, (torch_name, child) in enumerate(modules):
        layer, child_names = to_reference(child)
        layers.append(layer)
        names.update({f"{i}.{ref}": f"{torch_name}.{tn}" for ref, tn in child_names.items()})
    return L.Sequential(layers), names


def to_reference(module: nn.Module) -> tuple[L.Layer, dict[str, str]]:
    """The reference layer computing ``module`` and the reference -> torch parameter names.

    Supports Conv2d (zero padding), eval-mode BatchNorm2d, ReLU, Identity, MaxPool2d,
    AvgPool2d (count_include_pad, no ceil_mode), nn.Sequential and residual blocks registered
    with :func:`torch_impl.streaming.blocks.register_residual_block`.
    """
    if isinstance(module, nn.Sequential):
        return _children(list(module.named_children()))
    layout = residual_layout(module)
    if layout is not None:  # after(main(x) + shortcut(x))
        main_modules, shortcut_module, after_modules = layout.modules(module)
        main, main_names = _children(main_modules)
        names = {f"0.main.{r}": t for r, t in main_names.items()}
        shortcut = None
        if shortcut_module is not None:
            shortcut, short_names = to_reference(shortcut_module)
            names.update({f"0.shortcut.{r}": f"{layout.shortcut}.{t}" for r, t in short_names.items()})
        after, after_names = _children(after_modules)
        names.update({f"1.{r}": t for r, t in after_names.items()})
        return L.Sequential([L.Residual(main, shortcut), after]), names
    if isinstance(module, nn.Conv2d):
        conv = _conv(module)
        return conv, {name: name for name in conv.parameters()}
    if isinstance(module, nn.BatchNorm2d):
        return _batchnorm(module), {"weight": "weight", "bias": "bias"}
    if isinstance(module, nn.ReLU):
        return L.ReLU(), {}
    if isinstance(module, nn.Identity):
        return L.Sequential([]), {}
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode:
            raise ValueError(f"{module}: ceil_mode has no reference equivalent")
        stride = module.stride if module.stride is not None else module.kernel_size
        if isinstance(module, nn.MaxPool2d):
            if module.dilation not in (1, (1, 1)):
                raise ValueError(f"{module}: dilated max pooling has no reference equivalent")
            return L.MaxPool2d(module.kernel_size, stride, module.padding), {}
        if not module.count_include_pad or module.divisor_override is not None:
            raise ValueError(f"{module}: the reference AvgPool2d counts padding (torch's default)")
        return L.AvgPool2d(module.kernel_size, stride, module.padding), {}
    raise ValueError(f"{type(module).__name__} has no reference equivalent")
