"""The HSV colour jitter of :mod:`torch_impl.slides.augment` in torch, for tiles already on the device.

The jitter is pointwise (one RGB -> RGB map per slide), so jittering each tile after it
reaches the GPU equals jittering the whole image first, and the CPU never touches the
colours. The formulas are those of :func:`torch_impl.slides.augment.rgb_to_hsv`,
:func:`~torch_impl.slides.augment.hsv_to_rgb` and :func:`~torch_impl.slides.augment.jitter_hsv`
(the readable NumPy reference), in float32, the same operations in the same order;
``tests/test_device_jitter.py`` compares the two on every uint8 colour.
"""

from __future__ import annotations

import torch

__all__ = ["jitter_hsv_torch"]


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, h, w) RGB in [0, 1] -> (..., 3, h, w) HSV in [0, 1] (hue in turns), float32."""
    r, g, b = rgb.unbind(-3)  # each (..., h, w)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    s = torch.where(v > 0, c / torch.where(v > 0, v, 1.0), 0.0)
    safe = torch.where(c > 0, c, 1.0)
    h = torch.where(
        v == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.where(c > 0, h / 6.0, 0.0)
    return torch.stack([h, s, v], dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(..., 3, h, w) HSV in [0, 1] -> (..., 3, h, w) RGB in [0, 1], float32 (sector formulas)."""
    h, s, v = hsv.unbind(-3)
    h6 = torch.remainder(h, 1.0) * 6.0
    sector = torch.remainder(torch.floor(h6).long(), 6)  # (..., h, w) in 0..5
    f = h6 - torch.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q]).view(3, 6, *v.shape)
    picked = torch.gather(table, 1, sector.unsqueeze(0).unsqueeze(0).expand(3, 1, *v.shape))[:, 0]  # (3, ...)
    return picked.movedim(0, -3)


def jitter_hsv_torch(pixels: torch.Tensor, hsv_shift: tuple[float, float, float]) -> torch.Tensor:
    """The colour jitter of one slide on (..., 3, h, w) uint8 RGB tiles; returns uint8, same device.

    ``hsv_shift`` = (dh, ds, dv): hue shift in turns, relative saturation and value change:
    H' = (H + dh) mod 1, S' = clip(S (1 + ds), 0, 1), V' = clip(V (1 + dv), 0, 1).
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"jitter_hsv_torch takes uint8 RGB tiles, got {pixels.dtype}")
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"jitter_hsv_torch takes (..., 3, h, w) RGB tiles, got shape {tuple(pixels.shape)}")
    dh, ds, dv = (float(v) for v in hsv_shift)
    hsv = _rgb_to_hsv(pixels.to(torch.float32) / 255.0)  # (..., 3, h, w)
    h, s, v = hsv.unbind(-3)
    hsv = torch.stack(
        [torch.remainder(h + dh, 1.0), torch.clamp(s * (1.0 + ds), 0.0, 1.0), torch.clamp(v * (1.0 + dv), 0.0, 1.0)],
        dim=-3,
    )
    return torch.clamp(torch.round(_hsv_to_rgb(hsv) * 255.0), 0, 255).to(torch.uint8)
