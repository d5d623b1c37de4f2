"""The HSV colour jitter: its cost per pixel, and its share of one training step's data work.

(1) ns per pixel (CPU time of the process, best of ``--repeat``) of the exact colour jitter
    on a ``--region`` square, for random colours (nearly every pixel its own colour: the worst
    case for a colour table) and for the colours of a synthetic slide's tissue: the NumPy
    reference (``augment.jitter_hsv``), the previous torch formulation (kept below for this
    comparison: where-chains and an 18-plane gather), the torch arithmetic of
    ``device_jitter.jitter_hsv_torch``, a gather in a complete colour table
    (``apply_jitter_table``), a fresh ``ColourJitter`` (a table created and filled with the
    region's colours: a slide's first tile), and what the crop cache does, interleaved pixels
    written into interleaved rows by 24-bit colour codes through a fresh table
    (``band_augment.augment_into``); and the complete table's build time. Every result is
    checked against the NumPy reference.
(2) One phase-2 step's data work on a synthetic JPEG TIFF slide: the crop decoded once into a
    ``CropCache``, then every tile of the forward and the backward plan (ResNet-34 halos,
    ``--tile``) read and turned into network input (``to_model_input``: a quarter-turned
    tile costs more to convert than an unturned one). Per tile read (the earlier ways): through ``DeviceAugmentedView`` with
    flips and a quarter turn, without and with the colour jitter (the previous formulation, by
    arithmetic, through the colour table filled on demand, and the view's default). At fill
    (what training does, ``augmented_crop``): the cache holds the crop flipped and turned, or
    flipped, turned and jittered, and the tiles are plain slices; the fill and the reads timed
    together, against a plain cache and plain reads. A share = added / (decode + added): the
    data work the augmentation adds to a step that decodes once.

    python benchmarks/bench_jitter.py                        # CPU, 4096^2 slide, tile 2048
    python benchmarks/bench_jitter.py --device cuda --size 16384 --tile 5760
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reference.tiling import plan_tiles
from torch_impl.models.resnet import resnet34_trunk
from torch_impl.slides.augment import AugmentParams, jitter_hsv
from torch_impl.slides.band_augment import Dihedral, augment_into
from torch_impl.slides.crop_cache import CropCache
from torch_impl.slides.device_jitter import ColourJitter, apply_jitter_table, jitter_hsv_torch, jitter_table
from torch_impl.slides.device_view import DeviceAugmentedView, augmented_crop
from torch_impl.slides.inputs import open_slide_input
from torch_impl.slides.synthetic import synthesize_slide, write_pyramid_tiff
from torch_impl.slides.tiff_reader import interleaved_chw
from torch_impl.streaming import to_model_input
from torch_impl.streaming.geometry import module_geometry

GEOMETRY = module_geometry(resnet34_trunk(width=4))  # the halo only depends on the layers
SHIFT = (0.02, 0.1, -0.1)  # within the config's default ranges
GEOMETRY_ONLY = AugmentParams(flip_v=True, flip_h=False, rot90_k=1)
AUGMENT = AugmentParams(flip_v=True, flip_h=False, rot90_k=1, hsv_shift=SHIFT)


def previous_jitter(pixels: torch.Tensor, hsv_shift: tuple[float, float, float]) -> torch.Tensor:
    """The torch jitter before the rewrite, for the side-by-side timing: the reference's
    formulas with torch.where chains, stacked planes and an 18-plane gather for the sector."""
    dh, ds, dv = hsv_shift
    r, g, b = (pixels.to(torch.float32) / 255.0).unbind(-3)
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
    h, s, v = torch.remainder(h + dh, 1.0), torch.clamp(s * (1.0 + ds), 0.0, 1.0), torch.clamp(v * (1.0 + dv), 0.0, 1.0)
    h6 = torch.remainder(h, 1.0) * 6.0
    sector = torch.remainder(torch.floor(h6).long(), 6)
    f = h6 - torch.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q]).view(3, 6, *v.shape)
    rgb = torch.gather(table, 1, sector.unsqueeze(0).unsqueeze(0).expand(3, 1, *v.shape))[:, 0]
    return torch.clamp(torch.round(rgb * 255.0), 0, 255).to(torch.uint8)


class PreviousView(DeviceAugmentedView):
    """DeviceAugmentedView as it was before the rewrite: flips and turns, then previous_jitter."""

    def _read_inside(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        block = self.source.read(*self.source_region(y, x, h, w))
        if not isinstance(block, torch.Tensor):
            block = torch.from_numpy(np.ascontiguousarray(block))
        block = block.to(self.device)
        for step in self._steps:  # the flips and turns as the view made them then
            if step == "flip_v":
                block = torch.flip(block, dims=(-2,))
            elif step == "flip_h":
                block = torch.flip(block, dims=(-1,))
            else:  # np.rot90 with k=1: counter-clockwise
                block = torch.rot90(block, 1, dims=(-2, -1))
        return previous_jitter(block, self.params.hsv_shift)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def best(fn, device: torch.device, repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` runs after one warm-up (CPU time on the CPU)."""
    fn()
    times = []
    for _ in range(repeat):
        start = clock(device)
        fn()
        times.append(clock(device) - start)
    return min(times)


def per_pixel(device: torch.device, side: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, (3, side, side), dtype=np.uint8)
    slide = synthesize_slide((2 * side, 2 * side), True, 0).rgb  # (H, W, 3)
    tissue = np.ascontiguousarray(
        np.moveaxis(slide, -1, 0)[:, side // 2 : side // 2 + side, side // 2 : side // 2 + side]
    )
    start = clock(device)
    table = jitter_table(SHIFT, device)
    build_s = clock(device) - start
    n = side * side
    print(f"(1) colour jitter of a {side} x {side} region on {device}, ns per pixel (lower is better)")
    print(f"    {'':48s} {'random colours':>15s} {'slide colours':>15s}")
    methods = {
        "NumPy reference (augment.jitter_hsv)": None,
        "torch, previous formulation": lambda x: previous_jitter(x, SHIFT),
        "torch arithmetic (jitter_hsv_torch)": lambda x: jitter_hsv_torch(x, SHIFT),
        "gather in a complete table (apply_jitter_table)": lambda x: apply_jitter_table(x, table),
        "ColourJitter, new table filled on demand": lambda x: ColourJitter(SHIFT, device)(x),
        "codes, new table, into rows (augment_into)": "rows",
    }
    for name, fn in methods.items():
        row: list[float] = []
        for image in (random, tissue):
            want = jitter_hsv(image, SHIFT)
            if fn is None:
                seconds = best(lambda image=image: jitter_hsv(image, SHIFT), torch.device("cpu"), repeat)
            elif fn == "rows":  # the crop cache's way: a reader's interleaved pixels into interleaved rows
                x = interleaved_chw(side, side)
                x[...] = image
                out = torch.empty((side, side, 3), dtype=torch.uint8, device=device)

                def write(x=x, out=out) -> torch.Tensor:
                    return augment_into(x, Dihedral(), ColourJitter(SHIFT, device), out).permute(2, 0, 1)

                np.testing.assert_array_equal(write().cpu().numpy(), want)
                seconds = best(write, device, repeat)
            else:
                x = torch.from_numpy(image).to(device)
                np.testing.assert_array_equal(fn(x).cpu().numpy(), want)  # exact, or the timing means nothing
                seconds = best(lambda x=x, fn=fn: fn(x), device, repeat)
            row.append(seconds / n * 1e9)
        print(f"    {name:48s} {row[0]:15.1f} {row[1]:15.1f}")
    distinct = len(np.unique(tissue.reshape(3, -1).astype(np.int64).T @ np.array([65536, 256, 1])))
    print(
        f"    building the complete table (jitter_table): {build_s:.2f} s ({build_s / 2**24 * 1e9:.1f} ns per colour)"
    )
    print(f"    the slide region has {distinct} distinct colours ({distinct / n * 100:.1f}% of its pixels)")


def read_plans(view, tile: int) -> int:
    """Read every tile of the forward and the backward plan from ``view`` and turn it into
    network input (``to_model_input``, where a turned tile costs more); returns the pixels read."""
    pixels = 0
    for _ in ("forward", "backward"):
        for t in plan_tiles(GEOMETRY, view.shape[1:], tile).tiles:
            to_model_input(view.read(t.row.start, t.col.start, t.row.length, t.col.length))
            pixels += t.row.length * t.col.length
    return pixels


def step_share(slide_path: Path, device: torch.device, tile: int, repeat: int) -> None:
    slide = open_slide_input(slide_path, mpp=0.25)
    source = slide.source
    area = source.shape[1] * source.shape[2]
    print(
        f"(2) one step's data work, crop {source.shape[1]} x {source.shape[2]} ({area / 1e6:.1f} Mpx), tile {tile}, "
        f"forward + backward plans, seconds on {device}"
    )
    decode = best(lambda: CropCache.open(source, "device", device).fill().close(), device, repeat)
    with CropCache.open(source, "device", device) as crop:
        crop.fill()
        read = read_plans(DeviceAugmentedView(crop, GEOMETRY_ONLY, device), tile)
        print(
            f"    decode once (CropCache fill): {decode:.2f}; tiles read through the view: {read / area:.2f}x the crop"
        )
        geometry = best(lambda: read_plans(DeviceAugmentedView(crop, GEOMETRY_ONLY, device), tile), device, repeat)
        turns = max(geometry - best(lambda: read_plans(crop, tile), device, repeat), 0.0)
        print(
            f"    flips + turn per tile read    {turns:6.2f} s = {turns / read * 1e9:5.1f} ns per pixel read; "
            f"{100 * turns / (decode + turns):5.1f}% of decode + it"
        )
        ways = {
            "previous": lambda: PreviousView(crop, AUGMENT, device),
            "arithmetic": lambda: DeviceAugmentedView(crop, AUGMENT, device, colour_table=False),
            "colour table": lambda: DeviceAugmentedView(crop, AUGMENT, device, colour_table=True),
            "default": lambda: DeviceAugmentedView(crop, AUGMENT, device),
        }
        for name, make_view in ways.items():
            augmented = best(lambda make_view=make_view: read_plans(make_view(), tile), device, repeat)
            jitter = max(augmented - geometry, 0.0)
            print(
                f"    colour jitter per tile, {name:12s} {jitter:6.2f} s = {jitter / read * 1e9:5.1f} ns per pixel "
                f"read; {100 * jitter / (decode + jitter):5.1f}% of decode + jitter"
            )

    def fill_and_read(params: AugmentParams) -> None:  # training's way: the tiles are slices of the crop
        with augmented_crop(source, params, device, "device") as crop:
            read_plans(crop.fill(), tile)

    plain = best(lambda: fill_and_read(AugmentParams()), device, repeat)
    for name, params in (("flips + turn", GEOMETRY_ONLY), ("flips + turn + jitter", AUGMENT)):
        added = max(best(lambda params=params: fill_and_read(params), device, repeat) - plain, 0.0)
        print(
            f"    at fill (augmented_crop), {name:22s} {added:6.2f} s = {added / area * 1e9:5.1f} ns per crop pixel "
            f"= {added / read * 1e9:5.1f} ns per pixel read; {100 * added / (decode + added):5.1f}% of decode + it"
        )
    print(f"    (fill + plain reads, no augmentation: {plain:.2f} s)")
    slide.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=4096, help="synthetic slide side, pixels (0.25 um/px)")
    parser.add_argument("--tile", type=int, default=2048, help="tile side (forward and backward plans)")
    parser.add_argument("--region", type=int, default=1024, help="region side for (1)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    per_pixel(device, args.region, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        write_pyramid_tiff(path, synthesize_slide((args.size, args.size), True, 0).rgb, 0.25)
        step_share(path, device, args.tile, args.repeat)


if __name__ == "__main__":
    main()
