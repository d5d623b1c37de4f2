"""The augmentation written into interleaved rows (band_augment): what the crop cache stores.

Oracle: the NumPy reference, ``AugmentedView`` (flips and turns as array views, then the
float32 HSV jitter of ``augment.jitter_hsv``), on the whole block. Both ways of writing (by
colour codes on the CPU, by torch operations as on a GPU) must give its bytes exactly, for
every flip and turn, random block shapes (non-square, single rows and columns), blocks in any
memory layout (a reader's interleaved view, planar arrays, a window of a wider interleaved
image), and chunks that split the output anywhere.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import augment_params
from torch_impl.slides import band_augment
from torch_impl.slides.augment import AugmentedView, AugmentParams
from torch_impl.slides.band_augment import Dihedral, augment_by_codes, augment_by_torch, augment_into
from torch_impl.slides.device_jitter import ColourJitter
from torch_impl.slides.slide import ArrayImage
from torch_impl.slides.tiff_reader import interleaved_chw

WAYS = {"codes": augment_by_codes, "torch": augment_by_torch}


def reference(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """The whole (3, h, w) image through ``AugmentedView``: (3, h', w')."""
    view = AugmentedView(ArrayImage(image), p)
    return view.read(0, 0, *view.shape[1:])


def layouts(image: np.ndarray) -> dict[str, np.ndarray | torch.Tensor]:
    """The same (3, h, w) pixels in the memory layouts a block can come in."""
    _, h, w = image.shape
    interleaved = interleaved_chw(h, w)
    interleaved[...] = image
    wide = interleaved_chw(h + 1, w + 5)  # a window whose rows are spaced wider than its width
    window = wide[:, 1:, 2 : 2 + w]
    window[...] = image
    read_only = np.frombuffer(interleaved.transpose(1, 2, 0).tobytes(), np.uint8).reshape(h, w, 3)
    return {
        "planar": image,
        "interleaved": interleaved,
        "window": window,
        "tensor": torch.from_numpy(interleaved),
        "read-only": read_only.transpose(2, 0, 1),
    }


def test_dihedral_of_every_flip_and_turn_is_augmented_views_map():
    """The 16 flip and turn settings reduce to the 8 maps of the square, each as AugmentedView."""
    image = np.random.default_rng(0).integers(0, 256, (3, 2, 5), dtype=np.uint8)
    maps = set()
    for flip_v, flip_h, k in itertools.product([False, True], [False, True], range(4)):
        p = AugmentParams(flip_v, flip_h, k)
        g = Dihedral.of(p)
        want = reference(image, p)
        a = image[:, ::-1] if g.flip_rows else image
        a = a[:, :, ::-1] if g.flip_cols else a
        a = a.transpose(0, 2, 1) if g.transpose else a
        np.testing.assert_array_equal(a, want)
        assert g.shape(2, 5) == want.shape[1:]
        maps.add(g)
    assert len(maps) == 8 and Dihedral.of(AugmentParams()).is_identity


@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    p=augment_params(saturation_value=0.5),
    chunk=st.sampled_from([1, 7, 64, 2**18]),
)
def test_both_ways_write_augmented_views_bytes(h, w, seed, p, chunk):
    """By colour codes and by torch: AugmentedView's bytes, for every layout and chunk size."""
    image = np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)
    want = reference(image, p)
    g = Dihedral.of(p)
    jitter = ColourJitter(p.hsv_shift) if any(p.hsv_shift) else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(band_augment, "CHUNK_PIXELS", chunk)
        for layout, block in layouts(image).items():
            for way, write in WAYS.items():
                out = torch.empty((*g.shape(h, w), 3), dtype=torch.uint8)
                assert write(block, g, jitter, out) is out
                np.testing.assert_array_equal(out.permute(2, 0, 1).numpy(), want, err_msg=f"{way}, {layout}")
    # the block is not changed
    np.testing.assert_array_equal(layouts(image)["planar"], image)


def test_the_codes_are_each_pixels_bytes_little_endian_even_at_the_end_of_memory():
    """A block whose last pixel ends its memory (its word would reach one byte past it): the
    code of every pixel is r + 256 g + 65536 b, the last one included."""
    rng = np.random.default_rng(1)
    for h, w in [(1, 1), (1, 9), (6, 1), (5, 7)]:
        flat = rng.integers(0, 256, 3 * h * w, dtype=np.uint8)  # its own allocation, nothing after it
        pixels = flat.reshape(h, w, 3)
        r, g, b = pixels.astype(np.int64).transpose(2, 0, 1)
        want = r + 256 * g + 65536 * b
        for flip_rows, flip_cols in itertools.product([False, True], repeat=2):
            flipped = want[::-1] if flip_rows else want
            flipped = flipped[:, ::-1] if flip_cols else flipped
            np.testing.assert_array_equal(band_augment._codes(pixels, flip_rows, flip_cols).numpy(), flipped)
        np.testing.assert_array_equal(band_augment._codes(pixels[:, : max(w - 1, 1)]).numpy(), want[:, : max(w - 1, 1)])


def guarded_bytes(n: int) -> np.ndarray:
    """n writable bytes that end exactly where a page that may not be read begins (a one-byte
    over-read is a segmentation fault)."""
    page = mmap.PAGESIZE
    pages = -(-n // page)
    memory = mmap.mmap(-1, (pages + 1) * page)
    whole = np.frombuffer(memory, np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(whole.ctypes.data + pages * page, page, 0) != 0:  # PROT_NONE
        pytest.skip("mprotect is not available")
    return whole[pages * page - n : pages * page]


@pytest.mark.skipif(sys.platform != "linux", reason="mprotect through libc")
def test_no_byte_past_the_blocks_memory_is_read():
    """Blocks whose memory ends at an unreadable page, in every layout the codes are read from
    (contiguous, a window, a broadcast row, an expanded tensor), for every flip and turn: the
    same bytes as AugmentedView, and no fault."""
    h, w = 4, 5
    memory = guarded_bytes(3 * h * w)
    memory[...] = np.random.default_rng(2).integers(0, 256, memory.size, dtype=np.uint8)
    pixels = memory.reshape(h, w, 3)
    row = pixels[-1:]  # the last row: ends at the guard
    blocks = {
        "contiguous": pixels.transpose(2, 0, 1),
        "window": pixels[1:, 2:].transpose(2, 0, 1),
        "broadcast row": np.broadcast_to(row, (h, w, 3)).transpose(2, 0, 1),
        "expanded tensor": torch.from_numpy(row).expand(h, w, 3).permute(2, 0, 1),
    }
    for name, block in blocks.items():
        image = block.numpy().copy() if isinstance(block, torch.Tensor) else np.array(block)
        for flip_v, flip_h, k in itertools.product([False, True], [False, True], range(4)):
            p = AugmentParams(flip_v, flip_h, k)
            g = Dihedral.of(p)
            out = torch.empty((*g.shape(*image.shape[1:]), 3), dtype=torch.uint8)
            augment_by_codes(block, g, None, out)
            np.testing.assert_array_equal(out.permute(2, 0, 1).numpy(), reference(image, p), err_msg=name)


def test_augment_into_refuses_what_does_not_fit():
    g = Dihedral.of(AugmentParams(rot90_k=1))
    block = np.zeros((3, 4, 6), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(6, 4, 3\)"):
        augment_into(block, g, None, torch.empty((4, 6, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        augment_into(block, g, None, torch.empty((6, 4, 3), dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\(3, h, w\) block"):
        augment_into(np.zeros((4, 6, 3), np.uint8), g, None, torch.empty((6, 4, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 pixels"):
        augment_into(np.zeros((3, 4, 6), np.float32), g, None, torch.empty((6, 4, 3), dtype=torch.uint8))
