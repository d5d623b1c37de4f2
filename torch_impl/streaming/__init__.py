"""The streaming engine: a convolutional trunk computed tile by tile, with exact gradients.

Readable, and copyable into another project, on its own: it imports the NumPy
:mod:`reference` (halo math and tile plans), torch and numpy, nothing else of this project.

    geometry.py      module -> per-axis halo geometry (receptive field r, stride S, offset o),
                     with a registry that model families fill
    blocks.py        residual blocks described once: after(main(x) + shortcut(x))
    trunk.py         StreamingTrunk: streamed forward, streamed recompute + backward in autograd
    sources.py       where tiles come from: tensors, lazy sources (their contract checked on
                     every read), prefetch, normalisation
    tile_size.py     tile sizes that fit a memory budget
    to_reference.py  torch trunk -> NumPy reference layers, to check one against the other
"""

from .blocks import ResidualLayout, register_residual_block, residual_layout
from .geometry import UnsupportedModuleError, check_streamable, module_geometry, register_geometry
from .sources import IMAGENET_MEAN, IMAGENET_STD, LazySourceError, to_model_input
from .tile_size import suggest_tile_sizes
from .to_reference import to_reference
from .trunk import StreamingTrunk

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LazySourceError",
    "ResidualLayout",
    "StreamingTrunk",
    "UnsupportedModuleError",
    "check_streamable",
    "module_geometry",
    "register_geometry",
    "register_residual_block",
    "residual_layout",
    "suggest_tile_sizes",
    "to_model_input",
    "to_reference",
]
