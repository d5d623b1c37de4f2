"""The halo of a torch trunk, read off its modules (no probing with dummy tiles).

Each supported module maps to its per-axis geometry from :mod:`reference.geometry`:
convolutions and poolings to a :class:`~reference.geometry.LayerSpec`, pointwise modules
to the identity, ``nn.Sequential`` to a chain, and residual blocks to a
:class:`~reference.geometry.Parallel` of their main path and shortcut. Modules that are
not local (train-mode batch norm, dropout, attention, global pooling, ...) raise
:class:`UnsupportedModuleError` naming the module and what to do instead.

Residual blocks registered with :func:`torch_impl.streaming.blocks.register_residual_block`
are read from their layout; any other custom local block can be taught with
:func:`register_geometry`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from reference.geometry import AxisGeometry, LayerSpec, compose, parallel

from .blocks import residual_layout

__all__ = ["UnsupportedModuleError", "module_geometry", "register_geometry", "check_streamable"]

AxisPair = tuple[AxisGeometry, AxisGeometry]

IDENTITY: AxisPair = (LayerSpec(1), LayerSpec(1))

# Pointwise modules: each output pixel depends on the same input pixel only.
POINTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
)


class UnsupportedModuleError(TypeError):
    """A module that cannot be streamed exactly."""


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_geometry(m: nn.Conv2d) -> AxisPair:
    if m.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"{m}: padding_mode={m.padding_mode!r} reads pixels across tile borders; use 'zeros'"
        )
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    if isinstance(m.padding, str):  # 'valid' or 'same' (stride 1)
        if m.padding == "valid":
            p = (0, 0)
        else:
            spans = [dd * (kk - 1) for kk, dd in zip(k, d)]
            if any(span % 2 for span in spans):
                raise UnsupportedModuleError(f"{m}: padding='same' with an even span pads unevenly; pad explicitly")
            p = tuple(span // 2 for span in spans)
    else:
        p = _pair(m.padding)
    return tuple(LayerSpec(k[i], s[i], p[i], d[i]) for i in range(2))  # type: ignore[return-value]


def _pool_geometry(m: nn.MaxPool2d | nn.AvgPool2d) -> AxisPair:
    if m.ceil_mode:
        raise UnsupportedModuleError(
            f"{m}: ceil_mode=True changes the output size at tile borders; use ceil_mode=False"
        )
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise UnsupportedModuleError(f"{m}: return_indices=True is not supported in a streamed trunk")
    k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
    d = _pair(getattr(m, "dilation", 1))
    return tuple(LayerSpec(k[i], s[i], p[i], d[i]) for i in range(2))  # type: ignore[return-value]


def _batchnorm_geometry(m: nn.BatchNorm2d) -> AxisPair:
    if m.training and m.track_running_stats is not False:
        raise UnsupportedModuleError(
            f"{m} is in training mode: batch statistics would need the whole image. "
            "Put it in eval mode (torch_impl.models.resnet.freeze_batchnorm) before streaming"
        )
    if not m.track_running_stats or m.running_mean is None:
        raise UnsupportedModuleError(f"{m}: batch norm without running statistics cannot be streamed")
    return IDENTITY


def _chain(children) -> AxisPair:
    pairs = [module_geometry(c) for c in children]
    return compose([p[0] for p in pairs]), compose([p[1] for p in pairs])


def _residual(block: nn.Module) -> AxisPair:
    """after(main(x) + shortcut(x)) of a registered residual block."""
    main, shortcut, after = residual_layout(block).modules(block)
    main_h, main_w = _chain(m for _, m in main)
    short_h, short_w = module_geometry(shortcut) if shortcut is not None else (compose([]), compose([]))
    after_h, after_w = _chain(m for _, m in after)
    return (
        compose([parallel([main_h, short_h]), after_h]),
        compose([parallel([main_w, short_w]), after_w]),
    )


_REGISTRY: dict[type, Callable[[nn.Module], AxisPair]] = {}


def register_geometry(cls: type, geometry: Callable[[nn.Module], AxisPair]) -> None:
    """Teach :func:`module_geometry` a custom block: ``geometry(module) -> (rows, cols)``.

    The block must be local: output pixel ``i`` depends only on input pixels in the window
    ``[i S - o, i S - o + r)`` that the returned geometry describes.
    """
    _REGISTRY[cls] = geometry


def module_geometry(module: nn.Module) -> AxisPair:
    """(rows, cols) geometry of a streamable module; raises UnsupportedModuleError otherwise."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](module)
    if residual_layout(module) is not None:
        return _residual(module)
    if isinstance(module, nn.Sequential):
        return _chain(module.children())
    if isinstance(module, nn.Conv2d):
        return _conv_geometry(module)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool_geometry(module)
    if isinstance(module, nn.BatchNorm2d):
        return _batchnorm_geometry(module)
    if isinstance(module, POINTWISE):
        return IDENTITY
    if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)):
        raise UnsupportedModuleError(
            f"{module}: dropout has no place in a streamed trunk (its mask would differ between "
            "the forward and the recomputed backward); move it into the head"
        )
    raise UnsupportedModuleError(
        f"{type(module).__name__} cannot be streamed: only local modules are supported "
        "(Conv2d, MaxPool2d, AvgPool2d, eval-mode BatchNorm2d, pointwise activations, Identity, "
        "nn.Sequential and registered residual blocks); register a residual block with "
        "torch_impl.streaming.register_residual_block or any local block with "
        "torch_impl.streaming.register_geometry"
    )


def check_streamable(module: nn.Module) -> None:
    """Raise when any batch norm inside ``module`` is in training mode (checked per forward)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise UnsupportedModuleError(
                f"batch norm {name!r} is in training mode: batch statistics would need the whole "
                "image. Call torch_impl.models.resnet.freeze_batchnorm(trunk) or trunk.eval()"
            )
