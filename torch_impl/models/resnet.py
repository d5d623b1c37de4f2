"""ResNet (He et al., CVPR 2016) with torchvision's module and parameter names.

The trunk of StreamingCLAM is an ImageNet-pretrained ResNet-34. We do not depend on
torchvision, but we keep its names *exactly* (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``, ...) so that torchvision's checkpoint files load
unchanged with :func:`load_weights`. Blocks follow torchvision's "v1.5" layout: in a
:class:`Bottleneck` the stride sits on the 3x3 convolution, not on the first 1x1.

Layout is NCHW everywhere; padding is per side (torch's convention).

Geometry of the trunk (everything up to ``layer4``): every stride-2 layer maps a length
``n`` to ``ceil(n / 2)`` (7x7 s2 p3, 3x3 s2 p1 and 1x1 s2 p0 all do), and there are five
of them, so an ``H x W`` image gives an ``ceil(H / 32) x ceil(W / 32)`` feature map with
``8 * width * block.expansion`` channels (512 for ResNet-34 at ``width = 64``).

What this module adds for streaming:

* :func:`trunk` cuts the classifier off (global pooling has no place in a streamed trunk:
  the head pools with attention instead).
* :func:`freeze_batchnorm` keeps batch norm in eval mode for good, because batch
  statistics would need the whole image at once, which is what streaming avoids.
* :func:`load_weights` reads local checkpoint files only; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..streaming import ResidualLayout, register_residual_block

__all__ = [
    "conv3x3",
    "conv1x1",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "load_weights",
    "trunk",
    "TRUNK_LAYERS",
    "FrozenBatchNorm2d",
    "freeze_batchnorm",
    "resnet34_trunk",
]

logger = logging.getLogger(__name__)

# A factory for the normalisation layer: called with the number of channels.
NormLayer = Callable[[int], nn.Module]

# The children of a ResNet that make up its convolutional trunk, in order.
TRUNK_LAYERS: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1 per side, no bias (the batch norm after it has one)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no padding, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)::

        out = relu( bn2(conv2( relu(bn1(conv1(x))) )) + shortcut(x) )

    ``shortcut`` is the identity, or ``downsample`` (1x1 conv with the block's stride, then
    batch norm) where the block changes the resolution or the channel count.

    Shapes: ``(N, inplanes, H, W) -> (N, planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion: int = 1  # output channels = planes * expansion

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x  # (N, inplanes, H, W)

        out = self.conv1(x)  # (N, planes, H', W'), H' = ceil(H / stride)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)  # (N, planes, H', W')
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)  # (N, planes, H', W')

        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1 (reduce), 3x3 (with the stride), 1x1 (expand by 4) and a shortcut (ResNet-50+)::

        out = relu( bn3(conv3( relu(bn2(conv2( relu(bn1(conv1(x))) ))) )) + shortcut(x) )

    This is torchvision's "ResNet v1.5": the stride is on ``conv2`` (the 3x3), which is
    slightly more accurate than the paper's stride on ``conv1`` (see torchvision's notes).

    Shapes: ``(N, inplanes, H, W) -> (N, 4 planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion: int = 4  # output channels = planes * expansion

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x  # (N, inplanes, H, W)

        out = self.conv1(x)  # (N, planes, H, W)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)  # (N, planes, H', W'), H' = ceil(H / stride)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)  # (N, 4 planes, H', W')
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)  # (N, 4 planes, H', W')

        out += identity
        out = self.relu(out)
        return out


# The same structure as the two forwards above, for the streaming engine's halo geometry and
# its converter to the NumPy reference (tests/test_resnet.py checks that they agree).
register_residual_block(
    BasicBlock, ResidualLayout(main=("conv1", "bn1", "relu", "conv2", "bn2"), shortcut="downsample", after=("relu",))
)
register_residual_block(
    Bottleneck,
    ResidualLayout(
        main=("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"), shortcut="downsample", after=("relu",)
    ),
)

Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """The ResNet of torchvision, with a configurable base width and input channel count.

    Stem: 7x7 conv (stride 2, padding 3), batch norm, ReLU, 3x3 max pool (stride 2,
    padding 1). Then four stages ``layer1..layer4`` of ``layers[i]`` blocks with
    ``width * (1, 2, 4, 8)`` planes and strides ``(1, 2, 2, 2)``; global average pooling;
    a linear classifier ``fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks per stage, e.g. ``[3, 4, 6, 3]`` for ResNet-34.
        num_classes: outputs of ``fc``.
        width: planes of ``layer1`` (64 in the paper and in torchvision). Only with 64 do
            the parameter shapes match pretrained checkpoints; tests use e.g. 8.
        in_channels: channels of the input image (3 for RGB).
        norm_layer: normalisation factory, default :class:`torch.nn.BatchNorm2d`.

    Attributes:
        num_features: channels of ``layer4``'s output, ``8 * width * block.expansion``.

    Shapes: ``forward`` maps ``(N, in_channels, H, W)`` to ``(N, num_classes)``.
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be four ints >= 1 (blocks per stage), got {layers!r}")
        for name, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = width  # channels entering the next block; _make_layer updates it
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 8 * width * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        # torchvision's initialisation. He et al. (ICCV 2015): a zero-mean normal with
        # variance 2 / fan keeps activations' scale through ReLU layers; torchvision uses
        # fan_out. Batch norm starts as the identity map. fc keeps nn.Linear's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """One stage: the first block changes stride/channels, the others keep them."""
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # The shortcut must match the main path's output shape to be added to it.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = [block(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (N, w, ceil(H/2), ceil(W/2))
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)  # (N, w, ceil(H/4), ceil(W/4))

        x = self.layer1(x)  # (N, w e, ceil(H/4), ceil(W/4)), e = block.expansion
        x = self.layer2(x)  # (N, 2 w e, ceil(H/8), ceil(W/8))
        x = self.layer3(x)  # (N, 4 w e, ceil(H/16), ceil(W/16))
        x = self.layer4(x)  # (N, 8 w e, ceil(H/32), ceil(W/32))

        x = self.avgpool(x)  # (N, 8 w e, 1, 1)
        x = torch.flatten(x, 1)  # (N, 8 w e)
        x = self.fc(x)  # (N, num_classes)
        return x


def resnet18(width: int = 64, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2]. ``kwargs`` go to :class:`ResNet`."""
    return ResNet(BasicBlock, [2, 2, 2, 2], width=width, **kwargs)


def resnet34(width: int = 64, **kwargs) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3]; the StreamingCLAM trunk. ``kwargs`` go to :class:`ResNet`."""
    return ResNet(BasicBlock, [3, 4, 6, 3], width=width, **kwargs)


def resnet50(width: int = 64, **kwargs) -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3]. ``kwargs`` go to :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 6, 3], width=width, **kwargs)


def load_weights(model: nn.Module, path: str | os.PathLike, ignore_fc: bool = False) -> nn.Module:
    """Load a local checkpoint into ``model`` (in place) and return ``model``.

    The file (read with ``torch.load(..., weights_only=True)``, so it cannot run code) holds
    either a plain state dict or a dict with the state dict under ``"state_dict"`` or
    ``"model"`` (common training-script layouts). A ``"module."`` prefix, which
    ``DistributedDataParallel`` adds to every key, is removed.

    Loading is strict: a missing, unexpected or wrongly shaped tensor raises
    ``RuntimeError``. With ``ignore_fc=True`` the file's ``fc.*`` entries are skipped
    altogether (they may be missing or have another ``num_classes``) and the model keeps its
    own ``fc``; the trunk does not use ``fc`` anyway.

    Weights are never downloaded: get e.g. torchvision's ``resnet34-b627a593.pth`` once by
    hand and pass its path.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is no torch weight file (text, another format), or it is a
            StreamingCLAM training checkpoint (those resume a run or load whole models).
        TypeError: the file holds no mapping of names to tensors.
        RuntimeError: the names or shapes do not match ``model``.
        Every message names the file.
    """
    name = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file {name!r} not found; weights are never downloaded, "
            "so save the checkpoint (e.g. torchvision's resnet34-b627a593.pth) locally and pass its path"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a foreign file (UnpicklingError, KeyError, ...)
        raise ValueError(
            f"weights file {name!r} is not a torch weight file that can be read safely "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); pass a ResNet state dict "
            "saved with torch.save, e.g. torchvision's resnet34-b627a593.pth"
        ) from e
    if isinstance(checkpoint, Mapping) and "model_config" in checkpoint and "model" in checkpoint:
        raise ValueError(
            f"weights file {name!r} is a StreamingCLAM training checkpoint, not ResNet weights: continue its run "
            "with --resume (train) or use it with load_model / --checkpoint (evaluate, predict, heatmap); "
            "the weights option takes a ResNet state dict such as torchvision's resnet34-b627a593.pth"
        )
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                state_dict = checkpoint[key]
                break
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()
    ):
        raise TypeError(
            f"{name!r} holds no state dict (a mapping of names to tensors, possibly "
            f"under 'state_dict' or 'model'); found {type(state_dict).__name__}"
        )

    prefix = "module."
    state_dict = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    if ignore_fc:
        # Keep the model's own fc tensors, so that strict loading still checks everything else.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        state_dict.update({k: v for k, v in model.state_dict().items() if k.startswith("fc.")})
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"weights file {name!r} does not fit this network (another architecture or width?): {e}"
        ) from e
    return model


def trunk(model: ResNet) -> nn.Sequential:
    """The convolutional trunk of ``model``: ``conv1, bn1, relu, maxpool, layer1..layer4``.

    The children keep their names, so parameter names stay those of the ResNet
    (``"layer1.0.conv1.weight"``): a ResNet state dict without its ``fc.*`` entries loads
    into the trunk strictly. ``avgpool`` and ``fc`` are left out.

    The modules are *shared*, not copied: training the trunk trains ``model``, and
    :func:`freeze_batchnorm` on the trunk freezes ``model``'s batch norms too. ``model``
    itself is not modified.

    Shapes: ``(N, in_channels, H, W) -> (N, model.num_features, ceil(H/32), ceil(W/32))``
    (total stride 32).
    """
    missing = [name for name in TRUNK_LAYERS if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a torchvision-style ResNet: it lacks {missing}")
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in TRUNK_LAYERS))


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A :class:`torch.nn.BatchNorm2d` that stays in eval mode: ``train()`` cannot unfreeze it.

    In eval mode batch norm is a fixed per-channel affine map,
    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``; the running
    statistics are used and never updated. That is what streaming needs: the map is local
    (a 1x1 operation), so tile by tile equals the whole image, whereas batch statistics
    would depend on all tiles at once.

    It is still an ``nn.BatchNorm2d`` (``isinstance`` holds) with the same parameters,
    buffers and state-dict keys, so checkpoints and code that look for batch norms work
    unchanged. ``weight`` and ``bias`` remain trainable parameters unless frozen with
    ``freeze_batchnorm(..., affine=True)``.

    Unlike ``torchvision.ops.FrozenBatchNorm2d`` (which stores weight and bias as buffers
    and drops ``num_batches_tracked``) this class changes nothing but the mode.

    Caution: ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns every batch norm, this one
    included, into a trainable SyncBatchNorm; frozen batch norms need no syncing, so do not
    convert a frozen model.
    """

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        # Ignore the requested mode: the whole point is that model.train() leaves us alone.
        return super().train(False)


def freeze_batchnorm(module: nn.Module, affine: bool = False) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` in ``module`` (itself included) into a :class:`FrozenBatchNorm2d`.

    This works in place and keeps object identity: each batch norm's class is switched to
    the frozen subclass (which adds no state, only a ``train`` override) instead of being
    replaced by a new module. Why not replace: a trunk shares its modules with its ResNet,
    optimizers hold references to the parameters, and hooks are registered on the modules;
    a replacement would silently detach all three.

    Args:
        module: any module; its batch norms are put in eval mode now and for good.
        affine: also set ``requires_grad=False`` on the batch norms' ``weight`` and
            ``bias`` (a later ``module.requires_grad_(True)`` turns them back on).

    Returns:
        ``module`` itself.

    Raises:
        TypeError: a batch norm is not a plain ``nn.BatchNorm2d`` (e.g. 1-D, 3-D or
            SyncBatchNorm), so we cannot vouch for freezing it this way.
        ValueError: a batch norm has ``track_running_stats=False``: in eval mode it would
            still use batch statistics, which streaming cannot compute.
    """
    for name, m in module.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        where = name or type(module).__name__
        if not isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.SyncBatchNorm):
            raise TypeError(f"{where}: can only freeze nn.BatchNorm2d, got {type(m).__name__}")
        if not m.track_running_stats or m.running_mean is None:
            raise ValueError(
                f"{where}: batch norm without running statistics (track_running_stats=False) "
                "uses batch statistics even in eval mode and cannot be frozen"
            )
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FrozenBatchNorm2d  # same attributes, only train() differs
        elif not isinstance(m, FrozenBatchNorm2d):
            raise TypeError(f"{where}: cannot freeze a subclass of nn.BatchNorm2d, {type(m).__name__}")
        m.eval()
        if affine and m.affine:
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    return module


def resnet34_trunk(
    weights: str | os.PathLike | None = None, width: int = 64, freeze_bn_affine: bool = False
) -> nn.Sequential:
    """The StreamingCLAM trunk: ResNet-34 up to ``layer4``, batch norm frozen.

    Args:
        weights: local checkpoint of a ResNet-34 (e.g. torchvision's ImageNet weights,
            ``resnet34-b627a593.pth``); its ``fc`` is ignored. ``None`` keeps the random
            initialisation and logs a warning, because a randomly initialised trunk with
            frozen batch norm trains poorly and is almost never what one wants.
        width: planes of ``layer1``; pretrained weights need 64.
        freeze_bn_affine: also freeze the batch norms' ``weight`` and ``bias``.

    Returns:
        ``nn.Sequential`` with children ``conv1, bn1, relu, maxpool, layer1..layer4``;
        ``(N, 3, H, W) -> (N, 8 width, ceil(H/32), ceil(W/32))``.
    """
    model = resnet34(width=width)
    if weights is None:
        logger.warning("resnet34_trunk: no weights given, the trunk keeps its random initialisation")
    else:
        load_weights(model, weights, ignore_fc=True)
    return freeze_batchnorm(trunk(model), affine=freeze_bn_affine)
