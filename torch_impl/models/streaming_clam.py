"""StreamingCLAM: a streamed ResNet trunk followed by a CLAM attention head.

    slide (1, 3, H, W) or lazy source --StreamingTrunk--> features (1, 512, H/32, W/32)
        --CLAM head (optional 8x8 max pool, tissue mask)--> logits, probabilities, attention

The trunk runs tile by tile (exact gradients, see :mod:`torch_impl.streaming`); the head
sees the whole feature map at once, so attention is over every instance of the slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from ..streaming import StreamingTrunk
from .clam import CLAMHead, CLAMMultiBranch, CLAMOutput, CLAMSingleBranch
from .resnet import resnet34_trunk

__all__ = ["ModelConfig", "StreamingCLAM", "build_model"]


@dataclass
class ModelConfig:
    """What the model is made of (defaults: the StreamingCLAM paper's recipe)."""

    width: int = 64  # ResNet-34 base width (64 = the real network; smaller for CPU demos)
    weights: str | None = None  # local torchvision resnet34 weight file; None = random init
    freeze_bn_affine: bool = True  # also freeze batch-norm weight/bias (statistics are always frozen)
    head: str = "sb"  # "sb" (single branch, the paper's) or "mb" (multi branch)
    n_classes: int = 2  # slide classes (2: normal, tumour)
    hidden_dim: int = 512  # width of the head's first layer (fc 512 -> 512)
    attention_dim: int = 256  # D of the gated attention
    dropout: float = 0.0  # head only; the streamed trunk has no dropout
    instance_loss: bool = False  # CLAM's instance-level clustering loss (off in StreamingCLAM)
    k_sample: int = 8  # instance loss: feature-map cells per pseudo-label (CLAM's k_sample)
    bag_weight: float = 0.7  # instance loss: weight of the bag loss (the instance loss gets 1 - bag_weight)
    pool: str | None = "max"  # pooling of the feature map before the head ("max", "avg", None)
    pool_size: int = 8  # pooling window and stride, feature-map cells
    tile_size: int = 5760  # forward (tape-free) tile, input pixels
    backward_tile_size: int | None = None  # recompute + backward tile; None = tile_size
    channels_last: bool = False  # run the trunk in channels-last memory format


class StreamingCLAM(nn.Module):
    """Trunk (streamed) + CLAM head.

    Args:
        trunk: a streamable trunk, e.g. ``torch_impl.models.resnet.resnet34_trunk()`` (batch norm
            frozen). It is wrapped, not copied: parameter names become ``trunk.module.*``.
        head: a CLAM head whose ``in_dim`` equals the trunk's output channels.
        tile_size, backward_tile_size, mean, std, channels_last: see
            :class:`torch_impl.streaming.StreamingTrunk`.
    """

    def __init__(
        self,
        trunk: nn.Module,
        head: CLAMHead,
        tile_size: int | Sequence[int],
        backward_tile_size: int | Sequence[int] | None = None,
        channels_last: bool = False,
        **normalisation: Any,
    ):
        super().__init__()
        self.trunk = StreamingTrunk(trunk, tile_size, backward_tile_size, channels_last=channels_last, **normalisation)
        self.head = head
        # Parameters frozen when the model was built (e.g. batch-norm affine) stay frozen.
        self._fixed = frozenset(n for n, p in trunk.named_parameters() if not p.requires_grad)

    def set_trunk_trainable(self, trainable: bool) -> None:
        """Freeze (head-only training, the paper's first phase) or unfreeze the trunk.

        A frozen trunk runs only the tape-free streamed forward: no recompute, no backward.
        """
        for name, p in self.trunk.module.named_parameters():
            p.requires_grad_(trainable and name not in self._fixed)

    @property
    def trunk_trainable(self) -> bool:
        return any(p.requires_grad for p in self.trunk.module.parameters())

    def features(self, slide: torch.Tensor | Any) -> torch.Tensor:
        """(1, C, H', W') trunk features of a slide (tensor (N, 3, H, W) or lazy (3, H, W))."""
        return self.trunk(slide)

    def forward(
        self, slide: torch.Tensor | Any, mask: torch.Tensor | None = None, label: torch.Tensor | None = None
    ) -> CLAMOutput:
        """Logits, probabilities and attention of a slide.

        Args:
            slide: (N, 3, H, W) tensor (used as given) or a lazy (3, H, W) source (uint8
                tiles normalised on the device).
            mask: optional tissue mask (N, H', W') at the trunk's output resolution.
            label: (N,) class indices; needed only for the instance loss in training.
        """
        features = self.features(slide)
        # The head runs in float32 even under autocast's bf16 trunk: attention softmax over
        # up to a million instances needs the precision.
        with torch.autocast(features.device.type, enabled=False), record_function("model.head"):
            head_dtype = next(self.head.parameters()).dtype
            return self.head(features.to(head_dtype), mask, label)

    def loss(self, output: CLAMOutput, label: torch.Tensor) -> torch.Tensor:
        """The head's loss (cross-entropy, plus the weighted instance loss if enabled)."""
        return self.head.loss(output, label)


def build_model(config: ModelConfig) -> StreamingCLAM:
    """The StreamingCLAM of a configuration: ResNet-34 trunk (BN frozen) + CLAM head."""
    trunk = resnet34_trunk(weights=config.weights, width=config.width, freeze_bn_affine=config.freeze_bn_affine)
    if config.channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    heads = {"sb": CLAMSingleBranch, "mb": CLAMMultiBranch}
    if config.head not in heads:
        raise ValueError(f"head must be 'sb' or 'mb', got {config.head!r}")
    head = heads[config.head](
        in_dim=8 * config.width,
        hidden_dim=config.hidden_dim,
        attention_dim=config.attention_dim,
        n_classes=config.n_classes,
        dropout=config.dropout,
        instance_loss=config.instance_loss,
        k_sample=config.k_sample,
        bag_weight=config.bag_weight,
        pool=config.pool,
        pool_size=config.pool_size,
    )
    return StreamingCLAM(trunk, head, config.tile_size, config.backward_tile_size, config.channels_last)
