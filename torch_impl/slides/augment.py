"""Slide augmentation on lazy sources: flips, 90-degree rotations and an HSV colour jitter.

A slide is never loaded whole, so augmentation cannot transform an array. Instead
:class:`AugmentedView` wraps a lazy source and answers each tile read in the *augmented*
frame by reading the matching region of the *original* and transforming only that region:

    augmented image = jitter( rot90^k( flip_h( flip_v( original ))))

Geometry. The transform is a chain of elementary grid maps applied in order
(``flip_v``, ``flip_h``, then ``k`` times ``rot90``), each taking a frame of shape
(H_p, W_p) to the next; with a region (y, x, h, w) of the *output* frame, each step's
inverse gives the region of its *input* frame that maps onto it:

    flip_v:  (y, x, h, w) <- (H_p - y - h, x, h, w)
    flip_h:  (y, x, h, w) <- (y, W_p - x - w, h, w)
    rot90:   (y, x, h, w) <- (x, W_p - y - h, w, h)      output frame (W_p, H_p);
             np.rot90: out[i, j] = in[j, W_p - 1 - i]

Every step maps pixel rectangles onto pixel rectangles, so reading the input rectangle and
applying the same steps to that small array gives exactly the requested part of the
transformed whole image; ``tests/test_train.py`` checks this against the whole-image
transform for random regions.

Colour. The jitter is one pointwise map RGB -> RGB per slide, the same for every pixel of
every tile (a tile boundary can never show a seam): in HSV (all in [0, 1]),

    H' = (H + dh) mod 1,    S' = clip(S (1 + ds), 0, 1),    V' = clip(V (1 + dv), 0, 1)

Scaling S and V (rather than adding) leaves grey and white background grey and white up to
brightness: a background pixel has S = 0 and no hue to shift. Pixels outside the image are
white, before and after the transform (the `ImageSource` convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .slide import ImageSource, check_region, read_clipped
from .tissue import mask_at_resolution

__all__ = ["AugmentParams", "AugmentedView", "draw_augmentation", "rgb_to_hsv", "hsv_to_rgb", "jitter_hsv"]


# ----------------------------------------------------------------------------- colour
def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(3, ...) RGB in [0, 1] -> (3, ...) HSV in [0, 1] (hue in turns), float32.

    V = max, C = max - min, S = C / V (0 where V = 0), and the hue sector formula
    H = ((G - B) / C mod 6, (B - R) / C + 2, (R - G) / C + 4)[argmax] / 6 (0 where C = 0).
    """
    r, g, b = rgb[0], rgb[1], rgb[2]
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    s = np.divide(c, v, out=np.zeros_like(v), where=v > 0)
    safe = np.where(c > 0, c, 1.0)
    h = np.where(v == r, ((g - b) / safe) % 6.0, np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(c > 0, h / 6.0, 0.0)
    return np.stack([h, s, v]).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(3, ...) HSV in [0, 1] -> (3, ...) RGB in [0, 1], float32 (inverse of :func:`rgb_to_hsv`).

    With sector i = floor(6 H), fraction f = 6 H - i: p = V(1 - S), q = V(1 - S f),
    t = V(1 - S (1 - f)), and (R, G, B) = (V,t,p), (q,V,p), (p,V,t), (p,q,V), (t,p,V), (V,p,q).
    """
    h, s, v = hsv[0], hsv[1], hsv[2]
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b]).astype(np.float32)


def jitter_hsv(pixels: np.ndarray, hsv_shift: tuple[float, float, float]) -> np.ndarray:
    """Apply the colour jitter (module docstring) to (3, h, w) uint8 RGB; returns uint8.

    ``hsv_shift`` = (dh, ds, dv): hue shift in turns, relative saturation and value change.
    """
    dh, ds, dv = hsv_shift
    hsv = rgb_to_hsv(pixels.astype(np.float32) / 255.0)  # (3, h, w)
    hsv[0] = (hsv[0] + dh) % 1.0
    hsv[1] = np.clip(hsv[1] * (1.0 + ds), 0.0, 1.0)
    hsv[2] = np.clip(hsv[2] * (1.0 + dv), 0.0, 1.0)
    return np.clip(np.rint(hsv_to_rgb(hsv) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class AugmentParams:
    """One slide's augmentation: flips, quarter turns (counter-clockwise, np.rot90) and jitter."""

    flip_v: bool = False
    flip_h: bool = False
    rot90_k: int = 0
    hsv_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def is_identity(self) -> bool:
        return not (self.flip_v or self.flip_h or self.rot90_k % 4 or any(self.hsv_shift))


def draw_augmentation(
    rng: np.random.Generator,
    flip: bool = True,
    rot90: bool = True,
    hue_shift: float = 0.0,
    saturation_scale: float = 0.0,
    value_scale: float = 0.0,
) -> AugmentParams:
    """Draw one slide's :class:`AugmentParams` from ``rng`` (always the same number of draws,
    whatever is switched off, so the rest of a seeded stream does not depend on the switches)."""
    u = rng.random(7)  # (7,) uniform in [0, 1)
    return AugmentParams(
        flip_v=bool(flip and u[0] < 0.5),
        flip_h=bool(flip and u[1] < 0.5),
        rot90_k=int(u[2] * 4) if rot90 else 0,
        hsv_shift=(
            float(hue_shift * (2 * u[3] - 1)),
            float(saturation_scale * (2 * u[4] - 1)),
            float(value_scale * (2 * u[5] - 1)),
        ),
    )


def _steps(p: AugmentParams) -> list[str]:
    """The elementary grid maps of ``p`` in the order they are applied."""
    return (["flip_v"] if p.flip_v else []) + (["flip_h"] if p.flip_h else []) + ["rot90"] * (p.rot90_k % 4)


def _apply_step(step: str, a: np.ndarray) -> np.ndarray:
    """One grid map on the last two axes of ``a`` (..., h, w)."""
    if step == "flip_v":
        return a[..., ::-1, :]
    if step == "flip_h":
        return a[..., :, ::-1]
    return np.rot90(a, 1, axes=(-2, -1))  # (..., w, h)


class AugmentedView:
    """A lazy source seen through one slide's augmentation; itself an ``ImageSource``.

    Args:
        source: any lazy (3, H, W) uint8 source with ``.read(y, x, h, w)`` (e.g. the
            ``RegionView`` of a :class:`~torch_impl.slides.inputs.SlideInput`). Never read whole.
        params: the transform (module docstring); or give ``flip_v``, ``flip_h``,
            ``rot90_k``, ``hsv_shift`` as keywords.

    ``shape`` is (3, W, H) after an odd number of quarter turns, else (3, H, W).
    ``read`` is thread-safe (the view holds no mutable state).
    """

    def __init__(self, source: ImageSource, params: AugmentParams | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("give either params or flip_v/flip_h/rot90_k/hsv_shift keywords, not both")
        self.source = source
        self.params = params if params is not None else AugmentParams(**kwargs)
        self._steps = _steps(self.params)
        C, H, W = source.shape
        self._frames = [(H, W)]  # (H_p, W_p) of the frame *before* each step, then the final one
        for step in self._steps:
            h, w = self._frames[-1]
            self._frames.append((w, h) if step == "rot90" else (h, w))
        self._shape = (C, *self._frames[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    def source_region(self, y: int, x: int, h: int, w: int) -> tuple[int, int, int, int]:
        """The region (y, x, h, w) of the original that the augmented region maps from.

        Affine in (y, x): regions reaching past the augmented image map to regions reaching
        past the original (negative starts allowed).
        """
        for step, (Hp, Wp) in zip(reversed(self._steps), reversed(self._frames[:-1]), strict=True):
            if step == "flip_v":
                y = Hp - y - h
            elif step == "flip_h":
                x = Wp - x - w
            else:  # rot90: output (y, x, h, w) <- input (x, Wp - y - h, w, h)
                y, x, h, w = x, Wp - y - h, w, h
        return y, x, h, w

    def transform_array(self, a: np.ndarray) -> np.ndarray:
        """Apply the flips and rotations (not the colour) to the last two axes of ``a``.

        Returns ``a`` itself when that leaves no negative stride (no flip or turn: a reader's
        interleaved view stays as it is, for the engine's one conversion pass), else a
        C-contiguous copy (torch.from_numpy rejects negative strides; size-1 axes can keep a
        negative stride while numpy calls the array contiguous, so the strides are checked).
        """
        for step in self._steps:
            a = _apply_step(step, a)
        if any(s < 0 for s in a.strides):
            a = a.copy()
        return a

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(3, h, w) uint8: rows [y, y+h), columns [x, x+w) of the augmented image; white outside."""
        y, x, h, w = check_region(y, x, h, w)
        C, H, W = self._shape
        return read_clipped(y, x, h, w, H, W, self._read_inside, lambda: np.full((C, h, w), 255, dtype=self.dtype))

    def _read_inside(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(3, h, w) of a region inside the augmented image: the original block, transformed."""
        block = self.source.read(*self.source_region(y, x, h, w))  # (3, ., .) original frame
        block = self.transform_array(block)  # (3, h, w)
        if any(self.params.hsv_shift):
            block = jitter_hsv(block, self.params.hsv_shift)
        return block

    def feature_mask(self, slide_input: Any, feature_hw: tuple[int, int], stride: int) -> torch.Tensor:
        """(1, h', w') bool tissue mask on the feature grid of the *augmented* image.

        Feature position (i, j) covers augmented pixels [i S, (i+1) S) x [j S, (j+1) S)
        (the convention of :meth:`torch_impl.slides.inputs.SlideInput.feature_mask`, S = ``stride``).
        The grid's cells map one to one onto a grid of S x S cells in the original frame,
        anchored at ``source_region`` of the augmented grid's extent; we resample the
        thumbnail tissue mask onto that grid and move the cells with the same flips and
        rotations. Without augmentation this equals ``slide_input.feature_mask``.

        Args:
            slide_input: the :class:`~torch_impl.slides.inputs.SlideInput` whose ``source`` this
                view wraps (its crop ``box``, thumbnail mask and scale are used).
            feature_hw: (h', w') of the trunk's output for this view.
            stride: the trunk's total stride S (32 for ResNet).
        """
        h, w = feature_hw
        ys, xs, hs, ws = self.source_region(0, 0, h * stride, w * stride)  # original-frame extent
        y0, x0, _, _ = slide_input.box
        sy, sx = slide_input.scale
        box = ((y0 + ys) / sy, (x0 + xs) / sx, hs / sy, ws / sx)  # in thumbnail pixels
        grid = mask_at_resolution(slide_input.thumbnail_mask, (hs // stride, ws // stride), box)
        return torch.from_numpy(self.transform_array(grid))[None]  # (1, h', w')

    def __repr__(self) -> str:
        return f"AugmentedView({self.source!r}, {self.params})"
