"""CNN layers with forward and backward passes, in NumPy float64.

Conventions
-----------
* Arrays are NCHW: ``x`` has shape ``(N, C, H, W)`` (batch, channels, rows, columns).
* ``padding`` is per side: ``p`` zeros (``-inf`` for max pooling) before the first and after
  the last row/column. ``dilation = 1`` means no dilation. Any of ``stride``, ``padding``,
  ``dilation`` and ``kernel_size`` is an int (both axes) or an ``(h, w)`` pair.
* Output size per axis, for ``n`` input pixels, kernel ``k``, stride ``s``, padding ``p``
  and dilation ``d`` (torch's formula; :meth:`reference.geometry.LayerSpec.output_size`)::

      n_out = floor((n + 2 p - d (k - 1) - 1) / s) + 1

Every layer is a pure function of its input and its own arrays (no caches, no state):

* ``forward(x) -> y``;
* ``backward(x, grad_y) -> (grad_x, {name: grad})``, the vector-Jacobian product at ``x``
  (``grad_y`` is dL/dy, the result is dL/dx and dL/d(parameter)); it recomputes from ``x``
  whatever it needs;
* ``geometry -> (rows, cols)``, one :class:`~reference.geometry.AxisGeometry` per axis;
* ``parameters() -> {name: array}``, the trainable arrays themselves (not copies).

Sliding-window layers (convolution, pooling) share one pattern. Pad, then view the windows
without copying::

    X[n, c, a, b, i, j] = x_pad[n, c, a s_h + i d_h, b s_w + j d_w]

and reduce over the taps ``(i, j)``. Their backward finds dL/dX and applies the adjoint of
that view: each tap ``(i, j)`` adds its slice ``dL/dX[..., i, j]`` back into the strided
slice of the padded input it was read from; cropping the padding then gives dL/dx.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .geometry import AxisGeometry, LayerSpec, compose, parallel

__all__ = [
    "Layer",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "ReLU",
    "BatchNorm2d",
    "Residual",
    "Sequential",
]

Grads = dict[str, np.ndarray]
Pair = int | tuple[int, int]  # one value for both axes, or (h, w)


class Layer(ABC):
    """The interface every layer follows (see the module docstring)."""

    @property
    @abstractmethod
    def geometry(self) -> tuple[AxisGeometry, AxisGeometry]:
        """(rows, cols): the halo geometry of each axis."""

    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """y for x of shape (N, C, H, W)."""

    @abstractmethod
    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        """(dL/dx, {name: dL/dparameter}) given dL/dy at input x."""

    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable arrays by name; none by default."""
        return {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)


# --------------------------------------------------------------------------- checks


def _pair(value: Pair, name: str) -> tuple[int, int]:
    """An int or an (h, w) pair as an (h, w) pair of ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
        return operator.index(value[0]), operator.index(value[1])
    return operator.index(value), operator.index(value)


def _as_input(layer: Layer, x: np.ndarray, channels: int | None = None) -> np.ndarray:
    """x as a float64 (N, C, H, W) array; ValueError if it is not 4-D or C != channels."""
    x = np.asarray(x, dtype=np.float64)
    name = type(layer).__name__
    if x.ndim != 4:
        raise ValueError(
            f"{name} expects x of shape (N, C, H, W), got shape {x.shape}; add the missing batch or channel axis"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} expects {channels} input channels, got x with {x.shape[1]} "
            f"(shape {x.shape}); match the previous layer's output channels"
        )
    return x


def _as_grad_y(layer: Layer, grad_y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """grad_y as a float64 array; ValueError unless it has the output's shape."""
    grad_y = np.asarray(grad_y, dtype=np.float64)
    if grad_y.shape != tuple(shape):
        raise ValueError(
            f"{type(layer).__name__}.backward: grad_y has shape {grad_y.shape}, but the "
            f"output for this x has shape {tuple(shape)}; pass dL/dy for this layer's output"
        )
    return grad_y


# --------------------------------------------------------------------------- windows


def _pad(x: np.ndarray, rows: LayerSpec, cols: LayerSpec, value: float = 0.0) -> np.ndarray:
    """(N, C, H + 2 p_h, W + 2 p_w): x with p rows/columns of ``value`` on each side."""
    pads = ((0, 0), (0, 0), (rows.padding, rows.padding), (cols.padding, cols.padding))
    return np.pad(x, pads, constant_values=value)


def _crop(x_pad: np.ndarray, rows: LayerSpec, cols: LayerSpec) -> np.ndarray:
    """Undo :func:`_pad`: (N, C, H_pad, W_pad) -> (N, C, H, W)."""
    H_pad, W_pad = x_pad.shape[2:]
    return x_pad[:, :, rows.padding : H_pad - rows.padding, cols.padding : W_pad - cols.padding]


def _windows(x_pad: np.ndarray, rows: LayerSpec, cols: LayerSpec) -> np.ndarray:
    """Read-only view X[n, c, a, b, i, j] = x_pad[n, c, a s_h + i d_h, b s_w + j d_w].

    Args:
        x_pad: (N, C, H_pad, W_pad), already padded.
    Returns:
        (N, C, H_out, W_out, k_h, k_w), no copy.
    """
    e = (rows.effective_kernel, cols.effective_kernel)
    X = sliding_window_view(x_pad, e, axis=(2, 3))  # (N, C, H_pad-e_h+1, W_pad-e_w+1, e_h, e_w)
    # keep every s-th window start and every d-th tap inside the dilated window
    return X[:, :, :: rows.stride, :: cols.stride, :: rows.dilation, :: cols.dilation]


def _windows_adjoint(grad_X: np.ndarray, padded_shape: tuple[int, ...], rows: LayerSpec, cols: LayerSpec) -> np.ndarray:
    """Adjoint of :func:`_windows`, summing over every (a, b, i, j) that reads a pixel::

        grad_x_pad[n, c, a s_h + i d_h, b s_w + j d_w] += grad_X[n, c, a, b, i, j]

    Args:
        grad_X: (N, C, H_out, W_out, k_h, k_w), dL/dX.
        padded_shape: (N, C, H_pad, W_pad).
    Returns:
        (N, C, H_pad, W_pad), dL/dx_pad.
    """
    N, C, H_out, W_out, k_h, k_w = grad_X.shape
    grad_x_pad = np.zeros(padded_shape)
    for i in range(k_h):
        for j in range(k_w):
            # one tap reads rows i d_h + a s_h (a = 0 .. H_out - 1): a strided slice with no
            # repeats, so += is exact; different taps may overlap, hence the accumulation.
            r0, c0 = i * rows.dilation, j * cols.dilation
            r = slice(r0, r0 + (H_out - 1) * rows.stride + 1, rows.stride)
            c = slice(c0, c0 + (W_out - 1) * cols.stride + 1, cols.stride)
            grad_x_pad[:, :, r, c] += grad_X[:, :, :, :, i, j]  # (N, C, H_out, W_out)
    return grad_x_pad


class _Window(Layer):
    """What sliding-window layers share: the per-axis specs and the output-size check."""

    def __init__(self, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
        (k_h, k_w), (s_h, s_w) = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
        (p_h, p_w), (d_h, d_w) = _pair(padding, "padding"), _pair(dilation, "dilation")
        self._rows = LayerSpec(k_h, s_h, p_h, d_h)
        self._cols = LayerSpec(k_w, s_w, p_w, d_w)

    @property
    def geometry(self) -> tuple[LayerSpec, LayerSpec]:
        return self._rows, self._cols

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self._rows.kernel, self._cols.kernel

    @property
    def stride(self) -> tuple[int, int]:
        return self._rows.stride, self._cols.stride

    @property
    def padding(self) -> tuple[int, int]:
        return self._rows.padding, self._cols.padding

    @property
    def dilation(self) -> tuple[int, int]:
        return self._rows.dilation, self._cols.dilation

    def _windows(self, x: np.ndarray, pad_value: float = 0.0) -> tuple[tuple[int, ...], np.ndarray]:
        """Pad a checked x and view its windows.

        Returns:
            the padded shape (N, C, H_pad, W_pad) and X (N, C, H_out, W_out, k_h, k_w).
        """
        self._output_hw(x)
        x_pad = _pad(x, self._rows, self._cols, pad_value)
        return x_pad.shape, _windows(x_pad, self._rows, self._cols)

    def _grad_x(self, grad_X: np.ndarray, padded_shape: tuple[int, ...]) -> np.ndarray:
        """dL/dx from dL/dX: the adjoint of padding then windowing, (N, C, H, W)."""
        grad_x_pad = _windows_adjoint(grad_X, padded_shape, self._rows, self._cols)
        return _crop(grad_x_pad, self._rows, self._cols)

    def _output_hw(self, x: np.ndarray) -> tuple[int, int]:
        """(H_out, W_out) for x; ValueError when the padded input is smaller than the window."""
        H, W = x.shape[2:]
        H_out, W_out = self._rows.output_size(H), self._cols.output_size(W)
        if H_out <= 0 or W_out <= 0:
            e = (self._rows.effective_kernel, self._cols.effective_kernel)
            raise ValueError(
                f"{type(self).__name__}: input of {H}x{W} pixels with padding {self.padding} "
                f"is smaller than the window of {e[0]}x{e[1]} pixels, so the output is "
                "empty; use a larger input, more padding or a smaller kernel"
            )
        return H_out, W_out


def _check_pool_padding(layer: _Window) -> None:
    """torch's rule p <= k // 2 per axis: then every window holds at least one real pixel."""
    for p, k in zip(layer.padding, layer.kernel_size):
        if p > k // 2:
            raise ValueError(
                f"{type(layer).__name__}: padding {layer.padding} is more than half the "
                f"kernel {layer.kernel_size} (torch's rule p <= k // 2); reduce the padding"
            )


# --------------------------------------------------------------------------- layers


class Conv2d(_Window):
    """2-D cross-correlation, as torch's ``conv2d``: strided, padded, dilated, grouped.

    With G groups and ``C_g = C_in / G``, group g maps input channels
    ``[g C_g, (g+1) C_g)`` to output channels ``[g C_out/G, (g+1) C_out/G)``; in group-local
    channel indices (windows X as in the module docstring)::

        y[n, g, o, a, b] = bias[g, o] + sum_{c, i, j} w[g, o, c, i, j] X[n, g, c, a, b, i, j]

    and, with ``g_y = dL/dy``, the backward::

        dL/dw[g, o, c, i, j] = sum_{n, a, b} g_y[n, g, o, a, b] X[n, g, c, a, b, i, j]
        dL/dbias[g, o]       = sum_{n, a, b} g_y[n, g, o, a, b]
        dL/dX[n, g, c, a, b, i, j] = sum_o g_y[n, g, o, a, b] w[g, o, c, i, j]

    Shapes: x (N, C_in, H, W); weight (C_out, C_g, k_h, k_w); bias (C_out,) or None;
    y (N, C_out, H_out, W_out). Parameters "weight" and, if given, "bias".
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        stride: Pair = 1,
        padding: Pair = 0,
        dilation: Pair = 1,
        groups: int = 1,
    ) -> None:
        self.weight = np.asarray(weight, dtype=np.float64)
        if self.weight.ndim != 4:
            raise ValueError(f"Conv2d weight must have shape (C_out, C_in/groups, k_h, k_w), got {self.weight.shape}")
        C_out = self.weight.shape[0]
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float64)
        if self.bias is not None and self.bias.shape != (C_out,):
            raise ValueError(f"Conv2d bias must have shape ({C_out},), got {self.bias.shape}")
        self.groups = operator.index(groups)
        if self.groups < 1 or C_out % self.groups:
            raise ValueError(
                f"Conv2d groups={groups} must be a positive divisor of the {C_out} output "
                "channels (weight.shape[0]); change groups or the number of output channels"
            )
        super().__init__(self.weight.shape[2:], stride, padding, dilation)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def parameters(self) -> dict[str, np.ndarray]:
        params = {"weight": self.weight}
        if self.bias is not None:
            params["bias"] = self.bias
        return params

    def _grouped(self, x: np.ndarray) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
        """(padded shape, windows X per group, weight w per group) for a checked x."""
        G, (C_out, C_g, k_h, k_w) = self.groups, self.weight.shape
        padded_shape, X = self._windows(x)  # X: (N, C_in, H_out, W_out, k_h, k_w)
        X = X.reshape(x.shape[0], G, C_g, *X.shape[2:])  # (N, G, C_g, H_out, W_out, k_h, k_w)
        w = self.weight.reshape(G, C_out // G, C_g, k_h, k_w)
        return padded_shape, X, w

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_input(self, x, self.in_channels)
        _, X, w = self._grouped(x)
        N, G, _, H_out, W_out = X.shape[:5]
        y = np.einsum("ngcabij,gocij->ngoab", X, w, optimize=True)  # (N, G, C_out/G, H_out, W_out)
        y = y.reshape(N, -1, H_out, W_out)  # (N, C_out, H_out, W_out)
        if self.bias is not None:
            y += self.bias[:, None, None]
        return y

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        x = _as_input(self, x, self.in_channels)
        padded_shape, X, w = self._grouped(x)
        N, G, C_g, H_out, W_out = X.shape[:5]
        grad_y = _as_grad_y(self, grad_y, (N, self.weight.shape[0], H_out, W_out))
        g_y = grad_y.reshape(N, G, -1, H_out, W_out)  # (N, G, C_out/G, H_out, W_out)

        grad_w = np.einsum("ngoab,ngcabij->gocij", g_y, X, optimize=True)
        grads = {"weight": grad_w.reshape(self.weight.shape)}  # (C_out, C_g, k_h, k_w)
        if self.bias is not None:
            grads["bias"] = grad_y.sum(axis=(0, 2, 3))
        grad_X = np.einsum("ngoab,gocij->ngcabij", g_y, w, optimize=True)
        grad_X = grad_X.reshape(N, G * C_g, *grad_X.shape[3:])  # (N, C_in, H_out, W_out, k_h, k_w)
        return self._grad_x(grad_X, padded_shape), grads


class _Pool(_Window):
    """A pooling window: ``stride`` defaults to ``kernel_size``, no dilation, and (torch's rule)
    ``padding <= kernel_size // 2`` per axis."""

    def __init__(
        self,
        kernel_size: Pair,
        stride: Pair | None = None,
        padding: Pair = 0,
    ) -> None:
        super().__init__(kernel_size, kernel_size if stride is None else stride, padding, 1)
        _check_pool_padding(self)


class MaxPool2d(_Pool):
    """Max over each window; padding with -inf (as torch), so padding never wins::

        y[n, c, a, b] = max_{i, j} X[n, c, a, b, i, j]

    The gradient goes to the argmax of each window only (the first one in row-major tap
    order on ties, as torch). Shapes: x (N, C, H, W) -> y (N, C, H_out, W_out).
    ``stride`` defaults to ``kernel_size``; ``padding <= kernel_size // 2`` per axis.
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        _, X = self._windows(_as_input(self, x), pad_value=-np.inf)
        return X.max(axis=(4, 5))

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        padded_shape, X = self._windows(_as_input(self, x), pad_value=-np.inf)
        N, C, H_out, W_out, k_h, k_w = X.shape
        grad_y = _as_grad_y(self, grad_y, (N, C, H_out, W_out))
        X = X.reshape(N, C, H_out, W_out, k_h * k_w)  # taps in row-major order
        m = X.argmax(axis=4)[..., None]  # (N, C, H_out, W_out, 1), the first max
        grad_X = np.zeros_like(X)
        np.put_along_axis(grad_X, m, grad_y[..., None], axis=4)  # one-hot times dL/dy
        return self._grad_x(grad_X.reshape(N, C, H_out, W_out, k_h, k_w), padded_shape), {}


class AvgPool2d(_Pool):
    """Mean over each window, zero padding counted in the divisor (torch's count_include_pad)::

        y[n, c, a, b]          = 1 / (k_h k_w) sum_{i, j} X[n, c, a, b, i, j]
        dL/dX[n, c, a, b, i, j] = dL/dy[n, c, a, b] / (k_h k_w)

    Shapes as :class:`MaxPool2d`; ``stride`` defaults to ``kernel_size``;
    ``padding <= kernel_size // 2`` per axis.
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        _, X = self._windows(_as_input(self, x))
        return X.mean(axis=(4, 5))

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        padded_shape, X = self._windows(_as_input(self, x))
        N, C, H_out, W_out, k_h, k_w = X.shape
        grad_y = _as_grad_y(self, grad_y, (N, C, H_out, W_out))
        grad_X = np.broadcast_to(grad_y[..., None, None] / (k_h * k_w), X.shape)  # no copy
        return self._grad_x(grad_X, padded_shape), {}


_IDENTITY = (LayerSpec(1), LayerSpec(1))  # pointwise layers: k = s = 1, p = 0


class ReLU(Layer):
    """y = max(x, 0); dy/dx = 1 where x > 0, else 0 (also at x = 0, as torch). x, y (N, C, H, W)."""

    @property
    def geometry(self) -> tuple[LayerSpec, LayerSpec]:
        return _IDENTITY

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(_as_input(self, x), 0.0)

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        x = _as_input(self, x)
        return _as_grad_y(self, grad_y, x.shape) * (x > 0), {}


class BatchNorm2d(Layer):
    """Batch normalisation in eval mode: fixed running statistics (mean, var), per channel c::

        x_hat = (x - mean[c]) / sqrt(var[c] + eps)
        y     = x_hat weight[c] + bias[c]

    and the backward::

        dL/dx      = dL/dy weight[c] / sqrt(var[c] + eps)
        dL/dweight = sum_{n, h, w} dL/dy x_hat,   dL/dbias = sum_{n, h, w} dL/dy

    Shapes: x, y (N, C, H, W); weight, bias, running_mean, running_var (C,). Parameters
    "weight" and "bias"; the running statistics are fixed buffers. (Batch statistics would
    couple all pixels of the image, which streaming cannot do.)
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        eps: float = 1e-5,
    ) -> None:
        arrays = [np.asarray(a, np.float64) for a in (weight, bias, running_mean, running_var)]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1 or len(arrays[0].shape) != 1:
            raise ValueError(
                "BatchNorm2d weight, bias, running_mean and running_var must all have shape (C,), "
                f"got {[a.shape for a in arrays]}"
            )
        self.weight, self.bias, self.running_mean, self.running_var = arrays
        self.eps = float(eps)

    @property
    def geometry(self) -> tuple[LayerSpec, LayerSpec]:
        return _IDENTITY

    def parameters(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def _normalise(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x_hat, 1 / sqrt(var + eps)) with the latter shaped (C, 1, 1) to broadcast."""
        inv_std = (1.0 / np.sqrt(self.running_var + self.eps))[:, None, None]  # (C, 1, 1)
        return (x - self.running_mean[:, None, None]) * inv_std, inv_std

    def forward(self, x: np.ndarray) -> np.ndarray:
        x_hat, _ = self._normalise(_as_input(self, x, self.weight.shape[0]))
        return x_hat * self.weight[:, None, None] + self.bias[:, None, None]

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        x = _as_input(self, x, self.weight.shape[0])
        grad_y = _as_grad_y(self, grad_y, x.shape)
        x_hat, inv_std = self._normalise(x)
        grads = {"weight": (grad_y * x_hat).sum(axis=(0, 2, 3)), "bias": grad_y.sum(axis=(0, 2, 3))}
        return grad_y * (self.weight[:, None, None] * inv_std), grads


def _prefixed(prefix: str, named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{name}": value for name, value in named.items()}


class Residual(Layer):
    """A residual block: y = main(x) + shortcut(x), with shortcut(x) = x when None.

    Both branches see the same x, so dL/dx = main's dL/dx + shortcut's dL/dx. Geometry per
    axis is :func:`~reference.geometry.parallel` of the branches (an identity shortcut is
    ``compose([])``: S = 1, r = 1, o = 0). Parameter names are prefixed "main." and
    "shortcut.".
    """

    def __init__(self, main: Layer, shortcut: Layer | None = None) -> None:
        self.main, self.shortcut = main, shortcut
        _ = self.geometry  # evaluated now, so that branches with different strides fail here

    @property
    def geometry(self) -> tuple[AxisGeometry, AxisGeometry]:
        short = (compose([]), compose([])) if self.shortcut is None else self.shortcut.geometry
        return tuple(parallel([m, s]) for m, s in zip(self.main.geometry, short))

    def parameters(self) -> dict[str, np.ndarray]:
        short = {} if self.shortcut is None else self.shortcut.parameters()
        return {**_prefixed("main", self.main.parameters()), **_prefixed("shortcut", short)}

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_input(self, x)
        y_main = self.main(x)
        y_short = x if self.shortcut is None else self.shortcut(x)
        if y_main.shape != y_short.shape:
            raise ValueError(
                f"Residual: the main path gives shape {y_main.shape} but the shortcut gives "
                f"{y_short.shape} for x of shape {x.shape}; give the shortcut the main path's "
                "stride and output channels (e.g. a strided 1x1 convolution)"
            )
        return y_main + y_short

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        x = _as_input(self, x)
        grad_x, grads_main = self.main.backward(x, grad_y)  # checks grad_y against main's output
        if self.shortcut is None:
            grad_x = grad_x + _as_grad_y(self, grad_y, x.shape)
            grads_short = {}
        else:
            grad_x_short, grads_short = self.shortcut.backward(x, grad_y)
            grad_x = grad_x + grad_x_short
        return grad_x, {**_prefixed("main", grads_main), **_prefixed("shortcut", grads_short)}


class Sequential(Layer):
    """Layers applied in order: y = f_{L-1}( ... f_1(f_0(x))).

    Geometry per axis is :func:`~reference.geometry.compose` of the children's. Parameter
    names are "i.<child's name>", e.g. "3.main.0.weight". The backward recomputes the
    forward, keeping the activations only during that call, then applies the chain rule from
    the last child to the first.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = tuple(layers)

    @property
    def geometry(self) -> tuple[AxisGeometry, AxisGeometry]:
        return tuple(compose([layer.geometry[axis] for layer in self.layers]) for axis in (0, 1))

    def parameters(self) -> dict[str, np.ndarray]:
        params = {}
        for i, layer in enumerate(self.layers):
            params.update(_prefixed(str(i), layer.parameters()))
        return params

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_input(self, x)
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, x: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, Grads]:
        inputs = [_as_input(self, x)]  # inputs[i] is the input of layer i
        for layer in self.layers:
            inputs.append(layer(inputs[-1]))
        grad = _as_grad_y(self, grad_y, inputs[-1].shape)
        layer_grads = [{}] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            grad, layer_grads[i] = self.layers[i].backward(inputs[i], grad)
        grads = {}
        for i, named in enumerate(layer_grads):  # in parameters() order
            grads.update(_prefixed(str(i), named))
        return grad, grads
