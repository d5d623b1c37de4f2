"""CLAM attention head (Lu et al., Nature Biomedical Engineering 2021; mahmoodlab/CLAM).

StreamingCLAM (Dooper et al. 2023) puts CLAM's head on the feature map of a streamed
ResNet-34: every position of the map that lies on tissue is one *instance* of the slide's
*bag*. Per slide, with ``x_k`` the ``in_dim`` features of instance ``k`` (k = 1..K)::

    h_k = ReLU(W_1 x_k + b_1)                                 (K, hidden_dim)   "fc"
    s_k = w^T [ tanh(V h_k + b_V) * sigmoid(U h_k + b_U) ] + b_w   (K, n_heads)  gated attention
    a_k = exp(s_k) / sum_j exp(s_j)     (softmax over the K tissue instances only)
    M   = sum_k a_k h_k                                       (n_heads, hidden_dim) bag
    logits = W_c M + b_c                                      (n_classes,)

The *single-branch* head (CLAM_SB, the StreamingCLAM default) has one attention head and
one linear bag classifier. The *multi-branch* head (CLAM_MB) has one attention head and
one bag representation per class, and class ``c``'s logit is ``w_c^T M_c + b_c``.

Optional instance loss (CLAM's "instance-level clustering"): the ``k`` most attended
instances of the true class's branch are pseudo-labelled positive and the ``k`` least
attended negative; a per-class instance classifier (``Linear(hidden_dim, 2)``) is trained
on them with cross-entropy. The training loss is then
``bag_weight * CE(logits, label) + (1 - bag_weight) * instance_loss`` (:func:`total_loss`).

Conventions: features are NCHW, the trunk's output. The mask marks tissue positions on the
same grid (1 = tissue = instance). With ``pool`` set, features and mask are first pooled
with ``kernel = stride = pool_size`` and ``ceil_mode=True`` (no border position is dropped),
and all outputs (attention maps) live on the pooled grid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLAMOutput",
    "GatedAttention",
    "CLAMHead",
    "CLAMSingleBranch",
    "CLAMMultiBranch",
    "total_loss",
]


class CLAMOutput(NamedTuple):
    """What a CLAM head returns for a batch of ``B`` slides.

    Attributes:
        logits: ``(B, n_classes)`` bag logits.
        probs: ``(B, n_classes)`` softmax of ``logits``.
        attention: ``(B, n_heads, H', W')`` attention on the (pooled) feature grid; each
            head sums to 1 over the slide's tissue positions and is exactly 0 elsewhere.
            ``n_heads`` is 1 (single branch) or ``n_classes`` (multi branch).
        instance_loss: scalar, the instance loss averaged over the batch, or ``None`` when
            the head has no instance loss or no label was given (eval mode only).
    """

    logits: Tensor
    probs: Tensor
    attention: Tensor
    instance_loss: Tensor | None


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al., ICML 2018; CLAM's ``Attn_Net_Gated``)::

        s_k = attention_c( tanh(attention_a(h_k)) * sigmoid(attention_b(h_k)) )

    The tanh branch gives the score its sign and size, the sigmoid branch a learned gate
    in (0, 1); tanh alone saturates for large inputs and is nearly linear for small ones.
    Returns raw scores; the caller takes the softmax over the instances of one bag.

    Args:
        in_dim: features per instance.
        hidden_dim: width of the two gated branches (CLAM's ``D``).
        n_heads: independent scores per instance (1, or one per class for multi-branch).
        dropout: dropout after tanh and after sigmoid when > 0 (CLAM uses 0.25).

    Shapes: ``(K, in_dim) -> (K, n_heads)``.
    """

    def __init__(self, in_dim: int = 512, hidden_dim: int = 256, n_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        _check_dims(in_dim=in_dim, hidden_dim=hidden_dim, n_heads=n_heads)
        _check_dropout(dropout)
        branch_a: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.Tanh()]
        branch_b: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.Sigmoid()]
        if dropout > 0:
            branch_a.append(nn.Dropout(dropout))
            branch_b.append(nn.Dropout(dropout))
        self.attention_a = nn.Sequential(*branch_a)
        self.attention_b = nn.Sequential(*branch_b)
        self.attention_c = nn.Linear(hidden_dim, n_heads)

    def forward(self, h: Tensor) -> Tensor:
        a = self.attention_a(h)  # (K, hidden_dim), in (-1, 1)
        b = self.attention_b(h)  # (K, hidden_dim), in (0, 1)
        return self.attention_c(a * b)  # (K, n_heads)


class CLAMHead(nn.Module):
    """Common machinery of :class:`CLAMSingleBranch` and :class:`CLAMMultiBranch`.

    Args:
        in_dim: channels of the feature map (512 for ResNet-34).
        hidden_dim: width of ``fc`` and of the bag representation.
        attention_dim: width of the gated attention branches.
        n_classes: classes of the slide label (>= 2).
        dropout: dropout rate after ``fc`` and in the attention branches (0 = none).
        instance_loss: build instance classifiers and return CLAM's instance loss.
            Without it they are not built at all, so that DistributedDataParallel finds no
            unused parameters.
        k_sample: instances per pseudo-label (CLAM's ``k_sample``); clipped to the number
            of tissue instances of a slide. When a slide has fewer than ``2 k`` instances,
            the top-k and bottom-k sets overlap and some instances get both labels (CLAM
            would fail on such a slide).
        bag_weight: weight of the bag loss in :meth:`loss` (CLAM's default 0.7).
        pool: ``None``, ``"max"`` or ``"avg"``: pool the feature map with
            ``kernel = stride = pool_size`` (``ceil_mode=True``) before the head, as the
            StreamingCLAM paper does (max, 8) to shrink the bag.
        pool_size: the pooling window.
        subtyping: CLAM's flag. ``False`` (the default, and StreamingCLAM's setting for
            tumour vs normal): only the true class's branch gives an instance loss.
            ``True``: each other class's branch also labels its top-k instances negative,
            and the loss is averaged over the ``n_classes`` branches.

    The forward pass takes the trunk's feature map, see :meth:`forward`.
    """

    multi_branch: bool  # set by the subclasses

    def __init__(
        self,
        in_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        n_classes: int = 2,
        dropout: float = 0.0,
        instance_loss: bool = False,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        pool: str | None = None,
        pool_size: int = 8,
        subtyping: bool = False,
    ) -> None:
        super().__init__()
        if not hasattr(self, "multi_branch"):
            raise TypeError("CLAMHead is abstract: build a CLAMSingleBranch or a CLAMMultiBranch")
        _check_dims(in_dim=in_dim, hidden_dim=hidden_dim, attention_dim=attention_dim, k_sample=k_sample)
        _check_dropout(dropout)
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must lie in [0, 1], got {bag_weight!r}")
        if pool not in (None, "max", "avg"):
            raise ValueError(f"pool must be None, 'max' or 'avg', got {pool!r}")
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")

        self.in_dim = in_dim
        self.n_classes = n_classes
        self.n_heads = n_classes if self.multi_branch else 1
        self.use_instance_loss = instance_loss
        self.k_sample = k_sample
        self.bag_weight = bag_weight
        self.subtyping = subtyping
        self.pool = pool
        self.pool_size = pool_size

        fc: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.ReLU()]
        if dropout > 0:
            fc.append(nn.Dropout(dropout))
        self.fc = nn.Sequential(*fc)
        self.attention = GatedAttention(hidden_dim, attention_dim, self.n_heads, dropout)
        self.classifiers = self._make_classifiers(hidden_dim, n_classes)
        self.instance_classifiers = (
            nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_classes)) if instance_loss else None
        )

    # --- what the two variants define -------------------------------------------------

    def _make_classifiers(self, hidden_dim: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def _classify(self, bag: Tensor) -> Tensor:
        """``(n_heads, hidden_dim)`` bag representations -> ``(n_classes,)`` logits."""
        raise NotImplementedError

    def _head_of_class(self, c: int) -> int:
        """The attention head whose ranking the instance classifier of class ``c`` uses."""
        return c if self.multi_branch else 0

    # --- forward ----------------------------------------------------------------------

    def forward(self, features: Tensor, mask: Tensor | None = None, label: Tensor | None = None) -> CLAMOutput:
        """Classify a batch of slides from their feature maps.

        Args:
            features: ``(B, C, H, W)`` trunk output, ``C = in_dim``.
            mask: ``(B, H, W)`` or ``(B, 1, H, W)``, bool or 0/1 numbers, on the same
                grid as ``features`` (before pooling); 1 = tissue. ``None``: everything is
                tissue. Positions with 0 are no instances: they get exactly zero attention
                and their features do not reach the output, except through ``pool``: a
                pooled window is tissue when *any* of its inputs is (max-pooled mask), and
                then all its inputs, background included, enter its pooled features.
            label: ``(B,)`` integer class labels. Needed for the instance loss; in
                training mode a head with ``instance_loss=True`` raises without it.

        Each slide is processed on its own (bags differ in size), so ``B > 1`` is the
        same as ``B`` calls with ``B = 1``.

        Returns:
            :class:`CLAMOutput`; attention maps are ``(B, n_heads, H', W')`` with
            ``H' = ceil(H / pool_size)`` when pooling, else ``H' = H``.

        Raises:
            ValueError: bad shapes, a mask with values other than 0/1, a slide without
                tissue, a label out of range, or a missing label (see above).
        """
        features, mask = self._prepare(features, mask)  # (B, C, H', W'), (B, H', W') bool
        B, _, H, W = features.shape  # H, W: the pooled grid
        want_instance_loss = self.use_instance_loss and (label is not None or self.training)
        if label is not None:
            self._check_label(label, B)
        elif want_instance_loss:
            raise ValueError(
                "this CLAM head has instance_loss=True and is in training mode: pass label=(B,) class labels"
            )

        logits, attention, instance_losses = [], [], []
        for b in range(B):
            keep = mask[b].flatten()  # (H' W',) bool, K of them True
            h = features[b].flatten(1).T[keep]  # (K, C): one row per tissue position
            h = self.fc(h)  # (K, hidden_dim)
            scores = self.attention(h)  # (K, n_heads)
            # Softmax along the contiguous last dim: along dim 0 (strided) torch wakes its
            # worker threads for every call, up to ~100x slower for small bags on 2 cores.
            a = torch.softmax(scores.T, dim=1)  # (n_heads, K), each row sums to 1
            bag = a @ h  # (n_heads, hidden_dim): M = sum_k a_k h_k per head
            logits.append(self._classify(bag))  # (n_classes,)

            amap = a.new_zeros(self.n_heads, H * W)  # background stays exactly 0
            amap[:, keep] = a  # (n_heads, H' W')
            attention.append(amap.view(self.n_heads, H, W))
            if want_instance_loss:
                instance_losses.append(self._instance_loss(scores, h, int(label[b])))

        logits_t = torch.stack(logits)  # (B, n_classes)
        return CLAMOutput(
            logits=logits_t,
            probs=torch.softmax(logits_t, dim=1),
            attention=torch.stack(attention),  # (B, n_heads, H', W')
            instance_loss=torch.stack(instance_losses).mean() if want_instance_loss else None,
        )

    def loss(self, output: CLAMOutput, label: Tensor) -> Tensor:
        """:func:`total_loss` with this head's ``bag_weight``."""
        return total_loss(output, label, self.bag_weight)

    # --- pieces -----------------------------------------------------------------------

    def _prepare(self, features: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Check shapes, pool, and return ``(B, C, H', W')`` features and a ``(B, H', W')`` bool mask."""
        if features.dim() != 4 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"features must be (B, {self.in_dim}, H, W) (the trunk's output), got {tuple(features.shape)}"
            )
        B, _, H, W = features.shape
        if mask is None:
            mask = torch.ones(B, H, W, dtype=torch.bool, device=features.device)
        else:
            if mask.dim() == 4 and mask.shape[1] == 1:
                mask = mask[:, 0]  # (B, H, W)
            if tuple(mask.shape) != (B, H, W):
                raise ValueError(
                    f"mask must be ({B}, {H}, {W}) or ({B}, 1, {H}, {W}), on the feature map's grid "
                    f"before pooling; got {tuple(mask.shape)}"
                )
            if mask.dtype != torch.bool:
                if not ((mask == 0) | (mask == 1)).all():
                    raise ValueError("mask must hold only 0 and 1 (or be bool)")
                mask = mask != 0
            mask = mask.to(features.device)

        if self.pool is not None:
            k = self.pool_size
            pool_fn = F.max_pool2d if self.pool == "max" else F.avg_pool2d
            # ceil_mode keeps a partial window at the bottom/right border; avg_pool2d then
            # averages over the window's existing inputs only.
            features = pool_fn(features, k, k, ceil_mode=True)  # (B, C, ceil(H/k), ceil(W/k))
            # A pooled window is tissue when any of its inputs is: max over the 0/1 mask.
            mask = F.max_pool2d(mask[:, None].float(), k, k, ceil_mode=True)[:, 0] > 0  # (B, H', W')

        empty = (~mask.flatten(1).any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"slide(s) at batch index {empty} have no tissue: their mask is all zero, so "
                "there are no instances to attend to"
            )
        return features, mask

    def _check_label(self, label: Tensor, batch: int) -> None:
        if not isinstance(label, Tensor) or label.shape != (batch,) or label.is_floating_point():
            shape = tuple(label.shape) if isinstance(label, Tensor) else type(label).__name__
            raise ValueError(f"label must be an integer tensor of shape ({batch},), got {shape}")
        if ((label < 0) | (label >= self.n_classes)).any():
            raise ValueError(f"label values must lie in [0, {self.n_classes}), got {label.tolist()}")

    def _instance_loss(self, scores: Tensor, h: Tensor, label: int) -> Tensor:
        """CLAM's ``inst_eval`` / ``inst_eval_out`` for one slide.

        Args:
            scores: ``(K, n_heads)`` attention scores before the softmax (same ranking as
                the softmax, without its underflow ties).
            h: ``(K, hidden_dim)`` instance features after ``fc``.
            label: the slide's class.

        Returns a scalar: for the true class ``y``, cross-entropy of instance classifier
        ``y`` on the top-k instances (target 1) and bottom-k (target 0) of branch ``y``;
        with ``subtyping``, plus for each other class ``c`` cross-entropy of classifier
        ``c`` on branch ``c``'s top-k (target 0), averaged over the ``n_classes`` terms.
        """
        assert self.instance_classifiers is not None
        k = min(self.k_sample, h.shape[0])
        total = h.new_zeros(())
        for c, classifier in enumerate(self.instance_classifiers):
            s = scores[:, self._head_of_class(c)]  # (K,)
            top = torch.topk(s, k).indices  # (k,) most attended
            if c == label:
                bottom = torch.topk(s, k, largest=False).indices  # (k,) least attended
                instances = torch.cat([h[top], h[bottom]])  # (2k, hidden_dim)
                targets = torch.cat([h.new_ones(k), h.new_zeros(k)]).long()  # (2k,): 1 = evidence, 0 = not
            elif self.subtyping:
                # Another class's branch should not attend to evidence of its class here.
                instances = h[top]  # (k, hidden_dim)
                targets = torch.zeros(k, dtype=torch.long, device=h.device)  # (k,)
            else:
                continue
            total = total + F.cross_entropy(classifier(instances), targets)
        if self.subtyping:
            total = total / self.n_classes
        return total


class CLAMSingleBranch(CLAMHead):
    """CLAM_SB: one attention head, bag classifier ``Linear(hidden_dim, n_classes)``.

    The StreamingCLAM head: ``CLAMSingleBranch(512, 512, 256, n_classes=2, pool="max",
    pool_size=8)`` without instance loss. See :class:`CLAMHead` for the arguments.
    """

    multi_branch = False

    def _make_classifiers(self, hidden_dim: int, n_classes: int) -> nn.Module:
        return nn.Linear(hidden_dim, n_classes)

    def _classify(self, bag: Tensor) -> Tensor:
        return self.classifiers(bag)[0]  # (1, hidden_dim) -> (n_classes,)


class CLAMMultiBranch(CLAMHead):
    """CLAM_MB: one attention head and one ``Linear(hidden_dim, 1)`` per class.

    Class ``c``'s logit is ``classifiers[c](M_c)``, where ``M_c`` pools the instances with
    head ``c``'s attention. See :class:`CLAMHead` for the arguments.
    """

    multi_branch = True

    def _make_classifiers(self, hidden_dim: int, n_classes: int) -> nn.Module:
        return nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(n_classes))

    def _classify(self, bag: Tensor) -> Tensor:
        # bag: (n_classes, hidden_dim), row c pooled with head c's attention
        return torch.cat([classifier(bag[c]) for c, classifier in enumerate(self.classifiers)])  # (n_classes,)


def total_loss(output: CLAMOutput, label: Tensor, bag_weight: float = 0.7) -> Tensor:
    """CLAM's training loss: ``bag_weight * CE(logits, label) + (1 - bag_weight) * instance_loss``.

    Without an instance loss (``output.instance_loss is None``) it is the plain bag
    cross-entropy, as in CLAM with ``--no_inst_cluster``. ``label``: ``(B,)`` integers.
    """
    bag_loss = F.cross_entropy(output.logits, label)
    if output.instance_loss is None:
        return bag_loss
    return bag_weight * bag_loss + (1.0 - bag_weight) * output.instance_loss


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {p!r}")
