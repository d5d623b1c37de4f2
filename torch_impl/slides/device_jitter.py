"""The HSV colour jitter of :mod:`torch_impl.slides.augment` in torch, for tiles already on the device.

The jitter is pointwise (one RGB -> RGB map per slide), so jittering each tile after it
reaches the GPU equals jittering the whole image first, and the CPU never touches the
colours. Two exact ways to compute it, both equal to
:func:`torch_impl.slides.augment.jitter_hsv` (the readable NumPy reference) bit for bit on
the CPU, on every uint8 colour (``tests/test_device_jitter.py``):

* :func:`jitter_hsv_torch`, the arithmetic: the reference's float32 operations on the
  values that decide the result, the same operations in the same order, but with every
  decision (which channel is the maximum, which hue sector) taken on the uint8 values or by
  bit masks instead of ``where`` and gathers. Each float32 value that the reference
  computes is computed here by the same IEEE operation on the same operands, so it is the
  same number (the module's helpers say why for each step);
* a colour table (:func:`jitter_table`, :func:`apply_jitter_table`): the jitter depends on
  the 24-bit colour only, so one slide's jitter is a table of 2^24 jittered colours, built
  by the arithmetic above, and a tile is jittered by one gather.

:class:`ColourJitter` chooses between them per augmented view: the table costs as much as
jittering 2^24 pixels by arithmetic, and is built once that many are due.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["TABLE_ENTRIES", "ColourJitter", "apply_jitter_table", "jitter_hsv_torch", "jitter_table"]

#: Entries of a colour table: one per 24-bit RGB colour.
TABLE_ENTRIES = 2**24

#: Pixels per chunk of the arithmetic: on the CPU the chunk's temporaries stay in the cache
#: (2^15 pixels: ~4x faster than whole 1 Mpx planes here); on a GPU a chunk bounds their memory.
CHUNK_PIXELS = {"cpu": 2**15}
DEVICE_CHUNK_PIXELS = 2**22

# Hue sector i = floor(6 H') (6 where 6 H' rounds up to 6, the same as 0) -> (R, G, B), with
# p = V(1 - S), q = V(1 - S f), t = V(1 - S (1 - f)):
#   0: (V, t, p)  1: (q, V, p)  2: (p, V, t)  3: (p, q, V)  4: (t, p, V)  5: (V, p, q)
# so each channel is V, p, or x = q (odd sectors) / t (even sectors). Per channel, the bit
# patterns over sectors 0..6 of where it is V and where it is x (p elsewhere):
_SECTOR_BITS = [
    (0b1100001, 0b0010010),  # R: V in 0, 5 (and 6); x in 1, 4
    (0b0000110, 0b1001001),  # G: V in 1, 2; x in 0, 3 (and 6)
    (0b0011000, 0b0100100),  # B: V in 3, 4; x in 2, 5
]


def _check_tiles(pixels: torch.Tensor, name: str) -> None:
    if pixels.dtype != torch.uint8:
        raise TypeError(f"{name} takes uint8 RGB tiles, got {pixels.dtype}")
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"{name} takes (..., 3, h, w) RGB tiles, got shape {tuple(pixels.shape)}")


def _shift(hsv_shift: tuple[float, float, float]) -> tuple[float, float, float]:
    dh, ds, dv = (float(v) for v in hsv_shift)
    return dh, ds, dv


def _byte_mask(condition: torch.Tensor) -> torch.Tensor:
    """bool -> uint8 0x00 / 0xFF, for selecting bytes with & and |."""
    return condition.view(torch.uint8).neg()


def _nonzero_mask(bits: torch.Tensor) -> torch.Tensor:
    """uint8 values 0 or 2^k -> 0x00 / 0xFF (in place)."""
    return bits.clamp_max_(1).neg_()


def _jitter_chunk(rgb: torch.Tensor, shift: tuple[float, float, float], out: torch.Tensor) -> None:
    """Jitter (3, n) uint8 RGB into ``out`` (3, n) uint8: the reference's float32 values, exactly.

    Reference (augment.py), with r, g, b = k / 255 in float32:
        V = max, C = V - min, S = C / V (0 if V = 0), H = one of
        ((g - b) / C mod 6, (b - r) / C + 2, (r - g) / C + 4) by argmax (r first), / 6 (0 if C = 0)
        H' = (H + dh) mod 1, S' = clip(S (1 + ds)), V' = clip(V (1 + dv)), then the sector formulas.
    """
    dh, ds, dv = shift
    r8, g8, b8 = rgb.unbind(0)
    # Decisions on the bytes: k -> k / 255 is strictly increasing, so comparisons of the
    # float32 values are comparisons of the bytes.
    max8 = torch.maximum(torch.maximum(r8, g8), b8)
    min8 = torch.minimum(torch.minimum(r8, g8), b8)
    red = r8 == max8
    m_r = _byte_mask(red)
    m_g = _byte_mask((g8 == max8) & ~red)
    m_b = ~(m_r | m_g)
    # the hue formula's numerator is hi - lo: (g, b), (b, r) or (r, g) by the argmax
    hi8 = (g8 & m_r) | (b8 & m_g) | (r8 & m_b)
    lo8 = (b8 & m_r) | (r8 & m_g) | (g8 & m_b)
    # the reference adds 6 (the mod 6 of a negative quotient; |quotient| <= 1, so mod 6 adds 6
    # or nothing), 2 or 4; adding 0.0 leaves the quotient as it is
    offset8 = ((hi8 < lo8).view(torch.uint8) * 6 & m_r) | (m_g & 2) | (m_b & 4)

    v, low, hi, lo = torch.stack([max8, min8, hi8, lo8]).to(torch.float32).div_(255.0)
    c = v - low
    s = torch.div(c, v).nan_to_num_(0.0)  # 0 / 0 only where V = 0, where S = 0
    quotient = hi.sub_(lo).div_(c).nan_to_num_(0.0)  # 0 / 0 only where C = 0, where H = 0 (offset 0 there)
    h = quotient.add_(offset8.to(torch.float32)).div_(6.0)

    # (H + dh) mod 1 = a - floor(a): fmod(a, 1) is a - trunc(a) exactly, and the mod's "+ 1"
    # for a negative remainder rounds the same real number a - floor(a) once.
    h = h.add_(dh)
    h = h.sub_(torch.floor(h))  # in [0, 1]; 1 only by rounding, which the reference's second mod makes 0
    s = s.mul_(1.0 + ds).clamp_(0.0, 1.0)
    v = v.mul_(1.0 + dv).clamp_(0.0, 1.0)

    h6 = h.mul_(6.0)
    sector_f = torch.floor(h6)
    f = h6.sub_(sector_f)  # H' = 1 gives sector 6 and f = 0, what H' = 0 gives in sector 0
    sector = sector_f.to(torch.uint8)  # 0..6
    # V, q, t, p in [0, 1]: round(255 x) lies in 0..255, so the reference's clip does nothing
    values = torch.empty((4, *v.shape), dtype=torch.float32, device=v.device)
    values[0].copy_(v)
    torch.mul(v, 1 - s * f, out=values[1])
    torch.mul(v, 1 - s * (1 - f), out=values[2])
    torch.mul(v, 1 - s, out=values[3])
    v8, q8, t8, p8 = values.mul_(255.0).round_().to(torch.uint8)

    odd = (sector & 1).neg_()
    x8 = (q8 & odd) | (t8 & ~odd)
    one_hot = torch.ones_like(sector).bitwise_left_shift_(sector)  # 1 << sector
    for channel, (v_bits, x_bits) in enumerate(_SECTOR_BITS):
        is_v = _nonzero_mask(one_hot & v_bits)
        is_x = _nonzero_mask(one_hot & x_bits)
        target = out[channel]
        torch.bitwise_and(v8, is_v, out=target)
        target |= x8 & is_x
        target |= p8 & ~(is_v | is_x)


def jitter_hsv_torch(pixels: torch.Tensor, hsv_shift: tuple[float, float, float]) -> torch.Tensor:
    """The colour jitter of one slide on (..., 3, h, w) uint8 RGB tiles; returns uint8, same device.

    ``hsv_shift`` = (dh, ds, dv): hue shift in turns, relative saturation and value change:
    H' = (H + dh) mod 1, S' = clip(S (1 + ds), 0, 1), V' = clip(V (1 + dv), 0, 1).
    Equals :func:`torch_impl.slides.augment.jitter_hsv` bit for bit on the CPU.
    """
    _check_tiles(pixels, "jitter_hsv_torch")
    shift = _shift(hsv_shift)
    *lead, _, height, width = pixels.shape
    flat = pixels.reshape(math.prod(lead), 3, height * width)  # (B, 3, n)
    out = torch.empty(flat.shape, dtype=torch.uint8, device=pixels.device)
    chunk = CHUNK_PIXELS.get(pixels.device.type, DEVICE_CHUNK_PIXELS)
    for b in range(flat.shape[0]):
        for start in range(0, height * width, chunk):
            _jitter_chunk(flat[b, :, start : start + chunk], shift, out[b, :, start : start + chunk])
    return out.view(pixels.shape)


# ----------------------------------------------------------------------------- the colour table
def jitter_table(hsv_shift: tuple[float, float, float], device: torch.device | str = "cpu") -> torch.Tensor:
    """(2^24,) int32 on ``device``: entry (r << 16) | (g << 8) | b holds the jittered colour of
    (r, g, b) as the four bytes (r', g', b', 0) (:func:`apply_jitter_table` reads them back).

    Built by :func:`jitter_hsv_torch` on every colour, in chunks (temporaries O(chunk)); costs
    as much as jittering 2^24 pixels (~0.5-1 s on one CPU core, milliseconds on a GPU).
    """
    shift = _shift(hsv_shift)
    device = torch.device(device)
    table = torch.zeros((TABLE_ENTRIES, 4), dtype=torch.uint8, device=device)
    step = 2**20
    for start in range(0, TABLE_ENTRIES, step):
        codes = torch.arange(start, start + step, dtype=torch.int32, device=device)
        rgb = torch.stack([codes >> 16, (codes >> 8) & 255, codes & 255]).to(torch.uint8)  # (3, step)
        table[start : start + step, :3] = jitter_hsv_torch(rgb[:, None], shift)[:, 0].T
    return table.view(torch.int32).view(TABLE_ENTRIES)


def apply_jitter_table(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Jitter (..., 3, h, w) uint8 RGB tiles by a :func:`jitter_table` (on the same device): one gather."""
    _check_tiles(pixels, "apply_jitter_table")
    if table.shape != (TABLE_ENTRIES,) or table.dtype != torch.int32:
        raise ValueError(f"not a colour table from jitter_table: {table.dtype} of shape {tuple(table.shape)}")
    planes = pixels.movedim(-3, 0).reshape(3, pixels.numel() // 3)  # (3, n)
    r, g, b = (p.to(torch.int32) for p in planes)
    codes = r.mul_(65536).add_(g.mul_(256)).add_(b)
    words = table.index_select(0, codes)  # (n,) int32: bytes (r', g', b', 0)
    rgb = words.view(torch.uint8).view(-1, 4)[:, :3].T  # (3, n)
    return rgb.reshape(3, *pixels.shape[:-3], *pixels.shape[-2:]).movedim(0, -3).contiguous()


class ColourJitter:
    """One slide's colour jitter on ``device``: arithmetic, or a colour table once it pays.

    Building the table (:func:`jitter_table`) costs as much as jittering ``TABLE_ENTRIES``
    pixels by arithmetic; a gather in it costs a fraction of the arithmetic per pixel. So the
    table is built once ``build_after`` pixels have been jittered by arithmetic (default
    ``TABLE_ENTRIES``: at most about twice the cost of the better choice made in hindsight),
    precisely: by the first call that would take the count past ``build_after``; so
    ``build_after=0`` builds it at the first call, ``build_after=None`` never. Both
    ways give the same bytes. Thread-safe: while one thread builds the table, the others go
    on by arithmetic.

    Args:
        hsv_shift: (dh, ds, dv) as for :func:`jitter_hsv_torch`.
        device: where the table lives (the device of the tiles).
        build_after: arithmetic pixels before the table is built; 0 = at once; None = never.
    """

    def __init__(
        self,
        hsv_shift: tuple[float, float, float],
        device: torch.device | str = "cpu",
        build_after: int | None = TABLE_ENTRIES,
    ) -> None:
        if build_after is not None and build_after < 0:
            raise ValueError(f"build_after must be >= 0 pixels or None (never), got {build_after}")
        self.hsv_shift = _shift(hsv_shift)
        self.device = torch.device(device)
        self.build_after = build_after
        self._lock = threading.Lock()
        self._jittered = 0  # pixels jittered by arithmetic so far
        self._building = False
        self._table: torch.Tensor | None = None

    @property
    def table(self) -> torch.Tensor | None:
        """The colour table once built, else None."""
        return self._table

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Jittered (..., 3, h, w) uint8 tiles on their device (``self.device`` for the table)."""
        _check_tiles(pixels, "ColourJitter")
        n = pixels.numel() // 3
        with self._lock:
            table = self._table
            build = (
                table is None
                and not self._building
                and self.build_after is not None
                and self._jittered + n > self.build_after
            )
            if build:
                self._building = True
            elif table is None:
                self._jittered += n
        if build:
            try:
                table = jitter_table(self.hsv_shift, self.device)
                if table.device.type == "cuda":
                    torch.cuda.current_stream(table.device).synchronize()  # before other threads' streams read it
            finally:
                with self._lock:
                    self._table, self._building = table, False
        if table is not None and pixels.device == table.device:
            return apply_jitter_table(pixels, table)
        return jitter_hsv_torch(pixels, self.hsv_shift)

    def __repr__(self) -> str:
        state = "table" if self._table is not None else f"arithmetic, {self._jittered} px"
        return f"ColourJitter({self.hsv_shift}, {self.device}, {state})"
