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
  the 24-bit colour only, so one slide's jitter is a table of 2^24 jittered colours, computed
  by the arithmetic above, and a tile is jittered by one gather. A colour's place in the
  table is its *code* r + 256 g + 65536 b: the pixel's three bytes read as a little-endian
  number, which is how :mod:`torch_impl.slides.band_augment` reads them from interleaved
  memory, four bytes at a time, without splitting the pixel.

:class:`ColourJitter` is one slide's jitter: through a table filled on demand (each colour
computed once, on the CPU) or built whole (on a GPU), or by arithmetic alone.
"""

from __future__ import annotations

import math
import sys
import threading

import torch

__all__ = [
    "TABLE_ENTRIES",
    "TABLE_MIN_PIXELS",
    "use_table",
    "ColourJitter",
    "apply_jitter_table",
    "jitter_hsv_torch",
    "jitter_table",
]

#: Entries of a colour table: one per 24-bit RGB colour.
TABLE_ENTRIES = 2**24

#: Images of at least this many pixels jitter through a colour table by default: creating the
#: 64 MiB table and filling it costs about as much as the arithmetic on 2^20 pixels (30-50 ms
#: on one CPU core; measured for 256^2 to 2048^2 crops of a synthetic slide).
TABLE_MIN_PIXELS = 2**20


def use_table(pixels: int, colour_table: bool | None = None) -> bool:
    """Whether an image of ``pixels`` pixels jitters through a colour table: ``colour_table``
    when given, else from :data:`TABLE_MIN_PIXELS` pixels on."""
    return colour_table if colour_table is not None else pixels >= TABLE_MIN_PIXELS


#: Pixels per chunk of the arithmetic: on the CPU the chunk's temporaries stay in the cache
#: (2^15 pixels: ~1.4x faster than whole 1 Mpx planes on one core); on a GPU a chunk bounds their memory.
CHUNK_PIXELS = {"cpu": 2**15}
DEVICE_CHUNK_PIXELS = 2**22

#: Pixels per table lookup on the CPU: a chunk's new colours are in the table for the next
#: chunks (a tile's repeated colours are computed about once), and its temporaries stay small.
LOOKUP_CHUNK_PIXELS = 2**18

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
# A table entry is the int32 whose four bytes are (r', g', b', 1); 0 marks a colour not yet
# computed (a table filled on demand). Bytes are written and read through the same byte
# view, so the layout does not depend on the machine's byte order.
_LITTLE_ENDIAN = sys.byteorder == "little"


def _colour_codes(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, h, w) uint8 -> (n,) int32 codes r | (g << 8) | (b << 16), pixels in C order."""
    r, g, b = (pixels.select(-3, k) for k in range(3))  # strided views are fine: no copy first
    codes = b.to(torch.int32).bitwise_left_shift_(16)
    codes |= g.to(torch.int32).bitwise_left_shift_(8)
    codes |= r
    return codes.reshape(-1)


def _code_colours(codes: torch.Tensor) -> torch.Tensor:
    """(m,) int32 codes -> (3, m) uint8 RGB (the inverse of :func:`_colour_codes`)."""
    return torch.stack([codes & 255, (codes >> 8) & 255, codes >> 16]).to(torch.uint8)


def _pack(rgb: torch.Tensor) -> torch.Tensor:
    """(3, m) uint8 jittered colours -> (m,) int32 table entries (bytes r', g', b', 1)."""
    entries = torch.ones((rgb.shape[1], 4), dtype=torch.uint8, device=rgb.device)
    entries[:, :3] = rgb.T
    return entries.view(torch.int32).view(-1)


def _unpack(entries: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(n,) int32 table entries of (..., 3, h, w) tiles in C order of (..., h, w) -> the tiles."""
    *lead, _, height, width = shape
    rgb = entries.view(torch.uint8).view(-1, 4)[:, :3].T  # (3, n)
    return rgb.reshape(3, *lead, height, width).movedim(0, -3).contiguous()


def _all_present(entries: torch.Tensor) -> bool:
    """No entry is 0 (on a little-endian machine entries are >= 2^24, and min() is the cheaper scan)."""
    if entries.numel() == 0:
        return True
    return bool(entries.min() > 0) if _LITTLE_ENDIAN else bool(entries.all())


def jitter_table(hsv_shift: tuple[float, float, float], device: torch.device | str = "cpu") -> torch.Tensor:
    """(2^24,) int32 on ``device``, complete: entry r | (g << 8) | (b << 16) (the colour's code,
    module docstring) holds the jittered colour of (r, g, b) as the int32 whose bytes are
    (r', g', b', 1) (:func:`apply_jitter_table` reads it).

    Built by :func:`jitter_hsv_torch` on every colour, in chunks (temporaries O(chunk)); costs
    as much as jittering 2^24 pixels by arithmetic (~0.5-1 s on one CPU core, milliseconds on
    a GPU).
    """
    shift = _shift(hsv_shift)
    device = torch.device(device)
    table = torch.empty(TABLE_ENTRIES, dtype=torch.int32, device=device)
    step = 2**20
    for start in range(0, TABLE_ENTRIES, step):
        rgb = _code_colours(torch.arange(start, start + step, dtype=torch.int32, device=device))  # (3, step)
        table[start : start + step] = _pack(jitter_hsv_torch(rgb[:, None], shift)[:, 0])
    return table


def apply_jitter_table(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Jitter (..., 3, h, w) uint8 RGB tiles by a complete :func:`jitter_table` (on the same
    device): one gather. Returns contiguous uint8 tiles."""
    _check_tiles(pixels, "apply_jitter_table")
    if table.shape != (TABLE_ENTRIES,) or table.dtype != torch.int32:
        raise ValueError(f"not a colour table from jitter_table: {table.dtype} of shape {tuple(table.shape)}")
    return _unpack(table.index_select(0, _colour_codes(pixels)), pixels.shape)


class ColourJitter:
    """One slide's colour jitter on ``device``, by arithmetic or through a colour table.

    With ``table=True`` the jittered colours are kept in a table of all 2^24 colours
    (64 MiB), so that each colour is computed once per slide and every later pixel of that
    colour costs one gather. On the CPU the table is filled on demand: a tile's colours are
    looked up, and only those not in the table yet are computed (by
    :func:`jitter_hsv_torch`) and added; a slide holds far fewer distinct colours than it
    has pixels, and far fewer than 2^24, so this costs less than building the whole table.
    On a GPU the whole table is built at the first call (:func:`jitter_table`, milliseconds),
    which keeps the reads free of the host synchronisations a miss check needs.
    With ``table=False`` every call computes by arithmetic. Every way gives the same bytes.

    Thread-safe: tiles are looked up concurrently and new colours are added under a lock. A
    concurrent lookup of a colour being added finds it or finds 0 and computes it again (the
    entries are aligned int32 words, written whole, and a colour's entry never changes).

    Args:
        hsv_shift: (dh, ds, dv) as for :func:`jitter_hsv_torch`.
        device: where the table lives (the device of the tiles).
        table: keep a colour table (created at the first call), or compute every pixel.
    """

    def __init__(self, hsv_shift: tuple[float, float, float], device: torch.device | str = "cpu", table: bool = True):
        self.hsv_shift = _shift(hsv_shift)
        self.device = torch.device(device)
        self.use_table = bool(table)
        self._lock = threading.Lock()
        self._table: torch.Tensor | None = None

    @property
    def table(self) -> torch.Tensor | None:
        """The (2^24,) int32 colour table (0 = a colour not computed yet), once created; else None."""
        return self._table

    def _the_table(self) -> torch.Tensor:
        with self._lock:
            if self._table is None:
                if self.device.type == "cpu":
                    self._table = torch.zeros(TABLE_ENTRIES, dtype=torch.int32)
                else:
                    table = jitter_table(self.hsv_shift, self.device)
                    if table.device.type == "cuda":
                        torch.cuda.current_stream(table.device).synchronize()  # before other threads' streams read it
                    self._table = table
            return self._table

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Jittered (..., 3, h, w) uint8 tiles (contiguous) on the tiles' device."""
        _check_tiles(pixels, "ColourJitter")
        if not self.use_table or pixels.device != self.device:
            return jitter_hsv_torch(pixels, self.hsv_shift)
        table = self._the_table()
        if pixels.device.type != "cpu":  # the whole table is there
            return apply_jitter_table(pixels, table)
        *lead, _, height, width = pixels.shape
        flat = pixels.reshape(math.prod(lead), 3, height * width)  # (B, 3, n)
        out = torch.empty(flat.shape, dtype=torch.uint8)
        for b in range(flat.shape[0]):  # in chunks of LOOKUP_CHUNK_PIXELS (see there)
            for start in range(0, height * width, LOOKUP_CHUNK_PIXELS):
                stop = start + LOOKUP_CHUNK_PIXELS
                entries = self.entries(_colour_codes(flat[b, :, None, start:stop]))
                out[b, :, start:stop] = entries.view(torch.uint8).view(-1, 4)[:, :3].T
        return out.view(pixels.shape)

    def entries(self, codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Table entries of (n,) int32 colour codes r | (g << 8) | (b << 16) on ``device``:
        (n,) int32 whose bytes are each pixel's jittered (r', g', b', 1), into ``out`` if given.

        On the CPU, in chunks of :data:`LOOKUP_CHUNK_PIXELS`, each chunk's colours not in the
        table yet computed and added first; on a GPU one gather in the whole table. Needs
        ``table=True``.
        """
        if not self.use_table:
            raise ValueError("ColourJitter(table=False) keeps no table to look colour codes up in")
        table = self._the_table()
        if out is None:
            out = torch.empty(codes.shape, dtype=torch.int32, device=codes.device)
        if codes.device.type != "cpu":
            return torch.index_select(table, 0, codes, out=out)
        for start in range(0, codes.numel(), LOOKUP_CHUNK_PIXELS):
            chunk, got = codes[start : start + LOOKUP_CHUNK_PIXELS], out[start : start + LOOKUP_CHUNK_PIXELS]
            torch.index_select(table, 0, chunk, out=got)
            if not _all_present(got):
                self._add_missing(table, chunk, got)
        return out

    def _add_missing(self, table: torch.Tensor, codes: torch.Tensor, entries: torch.Tensor) -> None:
        """Compute the colours whose ``entries`` are 0 (new to the table), and put them in
        ``entries`` (in place) and in the table."""
        missing = (entries == 0).nonzero().squeeze(1)
        missing_codes = codes[missing]
        new_codes = torch.unique(missing_codes)  # a new colour often repeats within a chunk: compute it once
        new = _pack(jitter_hsv_torch(_code_colours(new_codes)[:, None], self.hsv_shift)[:, 0])
        with self._lock:
            table[new_codes] = new
        entries[missing] = table[missing_codes]

    def __repr__(self) -> str:
        if self._table is None:
            state = "table, not created yet" if self.use_table else "arithmetic"
        else:
            state = "table"
        return f"ColourJitter({self.hsv_shift}, {self.device}, {state})"
