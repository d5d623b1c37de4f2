"""Residual blocks, described once: ``after(main(x) + shortcut(x))``.

A model family tells the engine how its residual blocks compute by registering a
:class:`ResidualLayout` for the block class (``torch_impl.models.resnet`` registers
``BasicBlock`` and ``Bottleneck`` in its own module). The halo geometry
(:mod:`~torch_impl.streaming.geometry`) and the converter to the NumPy reference
(:mod:`~torch_impl.streaming.to_reference`) both read the block's structure from here, so it
is written once, beside the block's own ``forward``; the model family's tests check that the
layout computes what ``forward`` computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ResidualLayout", "register_residual_block", "residual_layout"]


@dataclass(frozen=True)
class ResidualLayout:
    """``after(main(x) + shortcut(x))``, each part named by the block's attribute names.

    Attributes:
        main: attribute names of the main path, applied in order (e.g. conv1, bn1, relu, ...).
        shortcut: attribute name of the shortcut module; the attribute may hold None (identity).
        after: attribute names applied after the sum, in order (e.g. the final relu).
    """

    main: tuple[str, ...]
    shortcut: str | None = None
    after: tuple[str, ...] = ()

    def modules(
        self, block: nn.Module
    ) -> tuple[list[tuple[str, nn.Module]], nn.Module | None, list[tuple[str, nn.Module]]]:
        """(named main modules, shortcut module or None, named after modules) of ``block``."""
        shortcut = getattr(block, self.shortcut) if self.shortcut is not None else None
        return (
            [(name, getattr(block, name)) for name in self.main],
            shortcut,
            [(name, getattr(block, name)) for name in self.after],
        )


_LAYOUTS: dict[type, ResidualLayout] = {}


def register_residual_block(cls: type, layout: ResidualLayout) -> None:
    """Teach the engine (geometry and reference converter) a residual block class."""
    _LAYOUTS[cls] = layout


def residual_layout(module: nn.Module) -> ResidualLayout | None:
    """The registered layout of ``module``'s class (or a base class), or None."""
    for cls in type(module).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
    return None
