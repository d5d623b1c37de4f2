"""Small networks built from :mod:`reference.layers`, with seeded random weights.

Every factory takes a ``numpy.random.Generator`` so that tests, tutorials and benchmarks
get the same weights from the same seed. The layouts follow torchvision's ResNet
(``models/resnet.py``): 3x3 and 1x1 convolutions without bias, each followed by batch norm.
"""

from __future__ import annotations

import numpy as np

from .layers import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Residual, Sequential

__all__ = ["conv", "batchnorm", "basic_block", "resnet34_trunk", "RESNET34_BLOCKS"]

RESNET34_BLOCKS = (3, 4, 6, 3)  # basic blocks per stage (He et al. 2016, Table 1)


def conv(
    rng: np.random.Generator,
    c_in: int,
    c_out: int,
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    bias: bool = True,
) -> Conv2d:
    """A Conv2d with He-normal weights, std sqrt(2 / fan_in), fan_in = C_in/groups k_h k_w.

    The bias, if any, is small and random (not zero) so that its gradient is exercised.
    """
    k_h, k_w = (kernel, kernel) if isinstance(kernel, int) else kernel
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the {c_in} input channels")
    fan_in = c_in // groups * k_h * k_w
    weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(c_out, c_in // groups, k_h, k_w))
    b = rng.normal(0.0, 0.1, size=c_out) if bias else None
    return Conv2d(weight, b, stride=stride, padding=padding, dilation=dilation, groups=groups)


def batchnorm(rng: np.random.Generator, channels: int) -> BatchNorm2d:
    """An eval-mode BatchNorm2d with random statistics (var > 0) and random affine."""
    return BatchNorm2d(
        weight=rng.uniform(0.5, 1.5, size=channels),
        bias=rng.normal(0.0, 0.1, size=channels),
        running_mean=rng.normal(0.0, 0.1, size=channels),
        running_var=rng.uniform(0.5, 1.5, size=channels),
    )


def basic_block(rng: np.random.Generator, c_in: int, c_out: int, stride: int) -> Sequential:
    """torchvision's BasicBlock: relu(main(x) + shortcut(x)).

    main = conv3x3(stride, pad 1) - BN - ReLU - conv3x3(pad 1) - BN; the shortcut is
    conv1x1(stride) - BN where the shape changes (stride != 1 or c_in != c_out), else x.
    Returns ``Sequential([Residual(main, shortcut), ReLU()])``.
    """
    main = Sequential(
        [
            conv(rng, c_in, c_out, 3, stride=stride, padding=1, bias=False),
            batchnorm(rng, c_out),
            ReLU(),
            conv(rng, c_out, c_out, 3, padding=1, bias=False),
            batchnorm(rng, c_out),
        ]
    )
    shortcut = None
    if stride != 1 or c_in != c_out:
        projection = conv(rng, c_in, c_out, 1, stride=stride, bias=False)
        shortcut = Sequential([projection, batchnorm(rng, c_out)])
    return Sequential([Residual(main, shortcut), ReLU()])


def resnet34_trunk(
    rng: np.random.Generator,
    widths: tuple[int, int, int, int] = (4, 8, 16, 32),
    in_channels: int = 3,
) -> Sequential:
    """ResNet-34 without its head: real kernels, strides and paddings, narrow channels.

    Children, in torchvision's order: 0 conv1 (7x7, stride 2, pad 3), 1 bn1, 2 relu,
    3 maxpool (3x3, stride 2, pad 1), 4..7 layer1..layer4 with 3, 4, 6, 3 basic blocks
    (the first block of layers 2-4 has stride 2). ResNet-34 uses widths (64, 128, 256, 512).

    Per axis: total stride S = 32, receptive field r = 899, offset o = 449;
    (N, in_channels, H, W) -> (N, widths[3], ceil(H / 32), ceil(W / 32)).
    """
    layers = [
        conv(rng, in_channels, widths[0], 7, stride=2, padding=3, bias=False),
        batchnorm(rng, widths[0]),
        ReLU(),
        MaxPool2d(3, stride=2, padding=1),
    ]
    c_in = widths[0]
    for stage, (c_out, blocks) in enumerate(zip(widths, RESNET34_BLOCKS)):
        stride = 1 if stage == 0 else 2
        stage_blocks = []
        for b in range(blocks):
            stage_blocks.append(basic_block(rng, c_in, c_out, stride if b == 0 else 1))
            c_in = c_out
        layers.append(Sequential(stage_blocks))
    return Sequential(layers)
