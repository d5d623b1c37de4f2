"""Benchmark the slide data path: decoding, reading, resampling, augmentation, one step's data work.

Makes (once; cached outside the repository) a large synthetic JPEG-tiled pyramidal TIFF, by
default 32768 x 32768 at 0.25 um/px, 512-px tiles, JPEG quality 80 (the mosaic of
`make_slide` below), and prints in one run, side by side:

Region reads: the rate of each way of getting the pixels of one 4096 x 4096 region at
0.5 um/px (pyramid level 1; the region is tile-aligned, so it covers exactly 64 tiles), in
megapixels per second of returned pixels, and the ratio to the anchor:

    anchor        tifffile + imagecodecs decoding the 64 covering tiles, one thread, nothing
                  else (the bytes read with os.pread, each tile decoded to its own array)
    OpenSlide     openslide.OpenSlide.read_region (RGBA, level 1)
    Slide/OS      Slide(backend="openslide").read: OpenSlide + alpha check + copy
    Slide 1 thr   Slide(backend="tiff", threads=1).read: the fast reader, (3, h, w) uint8 (a
                  channels-first view of interleaved memory, see tiff_reader)
    Slide N thr   the same with all usable cores
    resampled     Slide(mpp=0.7).read: level 1 (0.5 um/px) shrunk 1.4x (box filter); each
                  returned pixel decodes 1.96 level pixels; OpenSlide backend, then fast
                  reader with 1 and N threads

Augmentation alone (no decoding, an in-memory region): NumPy `AugmentedView` against
`DeviceAugmentedView` on --device, flips + quarter turn, and with the HSV jitter.

One training step's data work: every tile of the streaming ResNet-34 trunk's forward plan
(tile --step-tile, 5760) and backward plan (tile --step-backward-tile, 2880) of a
--step-crop^2 crop at 0.5 um/px, read and turned into network input as training does it:
`augmented_crop(crop, params, device, mode)` (a `CropCache` seen through the augmentation,
identity or flip + quarter turn + HSV jitter; mode "none": every tile decoded from the file
and augmented as it is read; "device": the crop decoded once, on the device, which is host
memory on the CPU, and augmented once per crop pixel as the cache fills), read through the
engine's prefetching `LazySource`, and `to_model_input` on --device. Rate = crop pixels
per second; "decodes/px" = pixels read from the slide per crop pixel (the cache's bands
start on tile rows, or tile columns when the crop is turned, so with it each stored tile is
decoded once). Plus the cache's fill alone
(each crop pixel decoded once, 1 thread): what the host does in a step on a GPU, where the
augmentation and the normalisation run on the device.

Extrapolation (printed, not measured): the host data work of one 65536^2 step at 16 threads,
from the per-thread CPU time measured here (perfect scaling assumed), as a share of the
H100 bf16 step that bench_streaming.py's cost model predicts (r_fwd, r_step from the plain
bf16 8192^2 anchor of RESULTS.md; --h100-*). Target: <= 25%.

Each row is the best of --repeat runs by wall time after a warm-up run (the anchor and the
fast reader: 2 x --repeat runs in rounds, so that other processes' load weighs on each alike;
step rows: one run, no warm-up); the least process CPU time (all threads) is printed too. Target 1 compares CPU
times (one thread each: robust to other processes taking turns on the cores); target 2
compares wall times, which needs idle cores to mean anything: the load average before and
after is printed. Targets (from the issue): the fast reader with 1 thread at least 0.7x the
anchor; with 2 threads at least 1.7x its 1-thread rate on 2 idle cores; each slide pixel
decoded once per step with the cache; augmentation at most 5% of a step's data work;
the extrapolated 65536^2 host data work at most 25% of the H100 step.

Examples (from the repository root)::

    python benchmarks/bench_data.py                  # 32768^2 slide (built once, ~1 min), ~2-3 min
    python benchmarks/bench_data.py --quick          # smaller region and crop: ~1 min once the slide exists
    python benchmarks/bench_data.py --device cuda    # the step's data work on the GPU
    python benchmarks/bench_data.py --cache-dir /data/bench --repeat 5
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tifffile
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_streaming import CostModel  # noqa: E402
from reference.tiling import TilePlan  # noqa: E402
from torch_impl.models.resnet import resnet34_trunk  # noqa: E402
from torch_impl.slides import ArrayImage, RegionView, Slide  # noqa: E402
from torch_impl.slides.augment import AugmentedView, AugmentParams  # noqa: E402
from torch_impl.slides.crop_cache import CropCache  # noqa: E402
from torch_impl.slides.device_view import DeviceAugmentedView, augmented_crop  # noqa: E402
from torch_impl.slides.synthetic import pyramid, synthesize_slide  # noqa: E402
from torch_impl.slides.tiff_reader import TiffPyramid, usable_cores  # noqa: E402
from torch_impl.streaming import StreamingTrunk, to_model_input  # noqa: E402
from torch_impl.streaming.sources import LazySource, prefetched  # noqa: E402

log = logging.getLogger("bench_data")

MPP0 = 0.25  # level-0 um/px of the synthetic slide
PATCH = 4096  # side of the painted tissue patch the mosaic repeats


# --------------------------------------------------------------------------- the slide
def _dihedral(a: np.ndarray, v: int) -> np.ndarray:
    """One of the 8 flips/quarter turns of an (h, w, 3) array (v in 0..7)."""
    a = np.rot90(a, v % 4, axes=(0, 1))
    return np.ascontiguousarray(a[:, ::-1] if v >= 4 else a)


def make_slide(path: Path, size: int, tile: int, quality: int, seed: int = 0) -> None:
    """Write a size x size synthetic pyramidal TIFF (JPEG tiles) without holding it in memory.

    Level 0 is a mosaic of PATCH x PATCH blocks, each one of the 8 flips/quarter turns
    (seeded) of one painted slide (`synthesize_slide`, tumour, 0.25 um/px); level k is the
    same mosaic of the patch's own level k, which is exactly the 2x2 mean of level k-1
    because flips and quarter turns commute with 2x2 means. Levels halve down to <= 512 px.
    Written to a temporary name first, so an interrupted run leaves no broken cache.
    """
    if size % PATCH or size < PATCH:
        raise ValueError(f"--size must be a multiple of {PATCH}, got {size}")
    n_levels = 1 + max(0, int(math.log2(size // 512)))
    start = time.perf_counter()
    patch = synthesize_slide((PATCH, PATCH), tumor=True, seed=seed, mpp=MPP0).rgb
    patch_levels = pyramid(patch, min_size=PATCH >> (n_levels - 1))[:n_levels]
    variants = [[_dihedral(p, v) for v in range(8)] for p in patch_levels]  # ~0.5 GB
    blocks = np.random.default_rng(seed).integers(0, 8, (size // PATCH, size // PATCH))

    def tiles(k: int) -> Iterator[np.ndarray]:
        side, block = size >> k, PATCH >> k
        for ty in range(0, side, tile):
            for tx in range(0, side, tile):
                t = np.zeros((tile, tile, 3), dtype=np.uint8)
                for by in range(ty // block, (min(ty + tile, side) - 1) // block + 1):
                    for bx in range(tx // block, (min(tx + tile, side) - 1) // block + 1):
                        y0, y1 = max(ty, by * block), min(ty + tile, (by + 1) * block, side)
                        x0, x1 = max(tx, bx * block), min(tx + tile, (bx + 1) * block, side)
                        src = variants[k][blocks[by, bx]]
                        t[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = src[
                            y0 - by * block : y1 - by * block, x0 - bx * block : x1 - bx * block
                        ]
                yield t

    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for k in range(n_levels):
            side, px_per_cm = size >> k, 1e4 / (MPP0 * 2**k)
            tif.write(
                tiles(k),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                metadata=None,
            )
    tmp.rename(path)
    log.info(
        "wrote %s (%d levels, %.0f MB) in %.0f s",
        path,
        n_levels,
        path.stat().st_size / 1e6,
        time.perf_counter() - start,
    )


def cached_slide(cache_dir: Path, size: int, tile: int, quality: int) -> Path:
    """The benchmark slide for these parameters, written on first use."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"synthetic_{size}_tile{tile}_q{quality}.tif"
    if not path.is_file():
        log.info("writing %s (once; reused by later runs)", path)
        make_slide(path, size, tile, quality)
    return path


#: The augmentation of the step rows: the config's ranges at their ends (as bench_train_step).
AUGMENT = AugmentParams(flip_v=True, flip_h=False, rot90_k=1, hsv_shift=(0.02, 0.1, -0.1))
GEOMETRY_ONLY = AugmentParams(flip_v=True, flip_h=False, rot90_k=1)
#: H100 anchors of RESULTS.md: plain bf16 ResNet-34 step at 8192^2 took 0.26 s; its no-grad
#: forward is about 20% of a step.
H100_BF16_NS_PER_PX = 0.26 / 8192**2 * 1e9
H100_BF16_FORWARD_SHARE = 0.20


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], repeat: int, warm_up: bool = True) -> tuple[float, float]:
    """(least wall s, least process CPU s) over `repeat` runs, after one warm-up run."""
    if warm_up:
        fn()
    wall = cpu = math.inf
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def best_of_interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple[float, float]]:
    """`best_of` for several functions in rounds (each round runs each once), so that load from
    other processes, which comes and goes, weighs on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, (math.inf, math.inf))
    for _ in range(repeat):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def raw_decode(path: Path, level: int, y: int, x: int, h: int, w: int) -> Callable[[], None]:
    """The anchor: read and decode, in this thread, the tiles covering a region of `level`."""
    with TiffPyramid(path, threads=1) as tiff:
        page_index = tiff.levels[level].page
    tif = tifffile.TiffFile(path)
    page = tif.pages[page_index]
    th, tw = page.tilelength, page.tilewidth
    across = math.ceil(page.imagewidth / tw)
    indices = [
        ty * across + tx for ty in range(y // th, (y + h - 1) // th + 1) for tx in range(x // tw, (x + w - 1) // tw + 1)
    ]
    offsets, counts = page.dataoffsets, page.databytecounts
    decode, tables = page.decode, page.jpegtables
    fd = os.open(path, os.O_RDONLY)

    def run() -> None:
        for i in indices:
            decode(os.pread(fd, counts[i], offsets[i]), i, jpegtables=tables)

    return run


class Counting:
    """An image source that counts the pixels read from it (thread-safe)."""

    def __init__(self, source: RegionView) -> None:
        self.source, self.pixels, self._lock = source, 0, threading.Lock()

    shape = property(lambda self: self.source.shape)
    dtype = property(lambda self: self.source.dtype)
    tile_rows = property(lambda self: self.source.tile_rows)  # CropCache aligns its bands to them
    tile_cols = property(lambda self: self.source.tile_cols)  # (to these when the crop is turned)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        with self._lock:
            self.pixels += h * w
        return self.source.read(y, x, h, w)

    def __repr__(self) -> str:
        return f"Counting({self.source!r})"


# --------------------------------------------------------------------------- one step's data work
def trunk_plans(crop: int, tile: int, backward_tile: int) -> tuple[TilePlan, TilePlan]:
    """The forward and the backward tile plan of the streaming ResNet-34 trunk for a crop^2 image."""
    logging.getLogger("torch_impl.models.resnet").setLevel(logging.ERROR)  # random-weights warning
    trunk = StreamingTrunk(resnet34_trunk(width=8), tile, backward_tile)  # plans ignore the width
    return trunk.plan((crop, crop)), trunk.plan((crop, crop), backward=True)


def step_data_work(
    source: Counting, plans: tuple[TilePlan, TilePlan], cache: str, params: AugmentParams, device: torch.device
) -> Callable[[], None]:
    """One step's data work as training does it (module docstring): the crop cache, the device
    view, the engine's prefetching reads of both plans' tiles, `to_model_input` on `device`."""

    def run() -> None:
        with augmented_crop(source, params, device, cache) as augmented:
            view = LazySource(augmented)
            for plan in plans:
                for _, pixels in prefetched(view, plan.tiles):
                    to_model_input(pixels.to(device, non_blocking=True))
            _sync(device)

    return run


def fill_once(source: Counting) -> Callable[[], None]:
    """The crop decoded once into a host cache: the host's share of a step on a GPU."""

    def run() -> None:
        with CropCache.open(source, "host", "cpu") as crop:
            crop.fill()

    return run


def h100_step_seconds(plans: tuple[TilePlan, TilePlan], ns_per_px: float, forward_share: float) -> float:
    """bench_streaming.py's cost model of a streamed step on the H100 in bf16: r_step from the
    plain anchor (ns per pixel), r_fwd its no-grad forward share."""
    r_step = ns_per_px * 1e-9
    model = CostModel(size=8192, r_fwd=forward_share * r_step, r_step=r_step)
    forward, backward = plans
    H, W = forward.image_size
    streamed = SimpleNamespace(  # the fields CostModel.predict reads of a streamed result
        config=SimpleNamespace(tile=forward.tiles[0].shape[0]),
        plans={"forward": {"overhead": forward.overhead}, "backward": {"overhead": backward.overhead}},
        pixels=H * W,
    )
    return model.predict(streamed)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "streamingclam-bench",
        help="where the synthetic slide is written and reused (default: %(default)s)",
    )
    parser.add_argument("--size", type=int, default=32768, help="level-0 side, pixels (multiple of 4096)")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side, pixels")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    parser.add_argument("--region", type=int, default=None, help="side of the region read (default 4096; quick 2048)")
    parser.add_argument(
        "--mpp-resampled", type=float, default=0.7, help="um/px of the resampled read (no level within 10%%)"
    )
    parser.add_argument("--threads", type=int, default=usable_cores(), help="the N of the N-thread rows")
    parser.add_argument("--repeat", type=int, default=None, help="runs per region row, best kept (default 5; quick 2)")
    parser.add_argument("--device", default="cpu", help="where the step's augmentation and normalisation run")
    parser.add_argument(
        "--step-crop", type=int, default=None, help="training crop side at 0.5 um/px (default 8192; quick 4096)"
    )
    parser.add_argument("--step-tile", type=int, default=5760, help="forward tile of the trunk")
    parser.add_argument("--step-backward-tile", type=int, default=2880, help="backward tile of the trunk")
    parser.add_argument("--augment-region", type=int, default=None, help="side of the augmentation-alone region")
    parser.add_argument("--extrapolate-crop", type=int, default=65536, help="crop side of the extrapolated step")
    parser.add_argument("--extrapolate-threads", type=int, default=16, help="host threads of the extrapolated step")
    parser.add_argument(
        "--h100-ns-per-px",
        type=float,
        default=H100_BF16_NS_PER_PX,
        help="plain bf16 ResNet-34 step on the H100, ns per pixel (default: the 8192^2 anchor, %(default).2f)",
    )
    parser.add_argument(
        "--h100-forward-share",
        type=float,
        default=H100_BF16_FORWARD_SHARE,
        help="no-grad forward / step on the H100 (default %(default).2f)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller region, crop and repeats: about a minute")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, normal, small in (("region", 4096, 2048), ("repeat", 5, 2), ("step_crop", 8192, 4096)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else normal)
    if args.augment_region is None:
        args.augment_region = 1024 if quick else 2048
    if args.region % args.tile or args.step_crop > args.size // 2:
        parser.error(f"--region must be a multiple of --tile and --step-crop at most --size / 2 ({args.size // 2})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # No benchmarks.allocator.keep_freed_memory here: with glibc's mmap threshold raised,
    # the decoding threads stopped running in parallel (measured: CPU time = wall time with
    # 2 threads), and a training process runs with the default allocator anyway.
    import openslide

    device = torch.device(args.device)
    path = cached_slide(args.cache_dir, args.size, args.tile, args.quality)
    n, r = args.threads, args.region
    level1 = args.size // 2  # 0.5 um/px
    y = x = (level1 - r) // 2 // args.tile * args.tile  # tile-aligned, centred
    px = r * r
    load0 = os.getloadavg()
    rows: list[tuple[str, float, float, float, str]] = []  # name, Mpx/s, wall, cpu, note

    def add(
        name: str,
        fn: Callable[[], object],
        pixels: int,
        repeat: int = args.repeat,
        warm_up: bool = True,
        note: str = "",
    ) -> tuple[float, float]:
        return record(name, *best_of(fn, repeat, warm_up), pixels, note)

    def record(name: str, wall: float, cpu: float, pixels: int, note: str = "") -> tuple[float, float]:
        rows.append((name, pixels / wall / 1e6, wall, cpu, note))
        log.info("%-62s %8.1f Mpx/s  %s", name, pixels / wall / 1e6, note)
        return wall, cpu

    # region reads
    torch.set_num_threads(1)
    # the rows of targets 1 and 2, measured in rounds
    anchor_name = "anchor: raw tifffile decode, 1 thread"
    slides = {threads: Slide(path, mpp=0.5, threads=threads) for threads in dict.fromkeys((1, n))}
    assert all(s.backend == "tiff" and s.level == 1 for s in slides.values())
    names = {threads: f"Slide.read, fast reader, {threads} thread(s)" for threads in slides}
    fns = {anchor_name: raw_decode(path, 1, y, x, r, r)}
    fns.update({names[threads]: lambda s=s: s.read(y, x, r, r) for threads, s in slides.items()})
    measured = best_of_interleaved(fns, 2 * args.repeat)
    anchor_wall, anchor_cpu = record(anchor_name, *measured[anchor_name], px)
    osr = openslide.OpenSlide(str(path))
    add("OpenSlide read_region", lambda: osr.read_region((2 * x, 2 * y), 1, (r, r)), px)
    osr.close()
    with Slide(path, mpp=0.5, backend="openslide") as s:
        add("Slide.read, OpenSlide backend", lambda: s.read(y, x, r, r), px)
    timings = {threads: record(names[threads], *measured[names[threads]], px) for threads in slides}
    for s in slides.values():
        s.close()
    for backend, threads in dict.fromkeys((("openslide", 1), ("tiff", 1), ("tiff", n))):
        with Slide(path, mpp=args.mpp_resampled, backend=backend, threads=threads) as s:
            fy, fx = s.resample
            yr, xr = int(y / fy), int(x / fx)
            add(
                f"resampled {fy:.2f}x, {backend}, {threads} thread(s)",
                lambda s=s, yr=yr, xr=xr: s.read(yr, xr, r, r),
                px,
                1 if backend == "openslide" else args.repeat,
            )

    # augmentation alone, on an in-memory region
    a = args.augment_region
    image = ArrayImage(np.random.default_rng(0).integers(0, 256, (3, a, a), dtype=np.uint8))
    for name, params in (("flip+rot90", GEOMETRY_ONLY), ("flip+rot90+HSV", AUGMENT)):
        numpy_view, torch_view = AugmentedView(image, params), DeviceAugmentedView(image, params, device)
        add(f"augment {a}^2 {name}, NumPy AugmentedView", lambda v=numpy_view: v.read(0, 0, a, a), a * a, 1)

        def device_read(v=torch_view) -> None:
            v.read(0, 0, a, a)
            _sync(device)

        add(f"augment {a}^2 {name}, DeviceAugmentedView ({device.type})", device_read, a * a, 1)

    # one step's data work
    crop = args.step_crop
    plans = trunk_plans(crop, args.step_tile, args.step_backward_tile)
    tile_px = sum(t.shape[0] * t.shape[1] for p in plans for t in p.tiles)
    steps: dict[str, tuple[float, float, float]] = {}  # key -> (wall, cpu, decodes per crop pixel)
    step_rows = [("fill", 1, "host", AugmentParams()), ("none", 1, "none", AugmentParams())]
    step_rows += [("none", n, "none", AugmentParams()), ("device", 1, "device", AugmentParams())]
    step_rows += [("device", n, "device", AugmentParams()), ("device+aug", n, "device", AUGMENT)]
    for key, threads, cache, params in dict.fromkeys(step_rows):
        torch.set_num_threads(threads)
        with Slide(path, mpp=0.5, threads=threads) as s:
            _, H, W = s.shape
            counting = Counting(RegionView(s, (H - crop) // 2, (W - crop) // 2, crop, crop))
            if key == "fill":
                name, fn = f"step {crop}^2: cache fill alone (decode once), {threads} thr", fill_once(counting)
            else:
                aug = "flip+rot90+HSV" if not params.is_identity else "no aug"
                name = f"step {crop}^2: cache {cache}, {aug}, {device.type}, {threads} thr"
                fn = step_data_work(counting, plans, cache, params, device)
            wall, cpu = add(name, fn, crop * crop, 1, warm_up=False)
            decodes = counting.pixels / crop**2
            rows[-1] = (*rows[-1][:4], f"{decodes:.2f} decodes/px")
            steps[f"{key}/{threads}"] = (wall, cpu, decodes)
    torch.set_num_threads(n)
    load1 = os.getloadavg()

    # report
    print()
    print(
        f"slide {path.name}: {args.size}^2 at {MPP0} um/px, {args.tile}-px JPEG tiles (q{args.quality});"
        f" region {r}^2 at level 1 (0.5 um/px), {(r // args.tile) ** 2} tiles; {usable_cores()} usable"
        f" cores; load average {load0[0]:.2f} before, {load1[0]:.2f} after"
    )
    forward, backward = plans
    print(
        f"step: crop {crop}^2 at 0.5 um/px, ResNet-34 plans: forward tile {args.step_tile} ({len(forward)} tiles, "
        f"overhead {forward.overhead:.2f}), backward tile {args.step_backward_tile} ({len(backward)} tiles, "
        f"overhead {backward.overhead:.2f}), {tile_px / crop**2:.2f} tile px per crop px; device {device}"
    )
    print(f"{'path':<62} {'Mpx/s':>8} {'x anchor':>9} {'wall s':>8} {'CPU s':>8}  note")
    anchor = px / anchor_wall / 1e6
    for name, rate, wall, cpu, note in rows:
        print(f"{name:<62} {rate:8.1f} {rate / anchor:9.2f} {wall:8.3f} {cpu:8.3f}  {note}".rstrip())

    one_wall, one_cpu = timings[1]
    many_wall = timings[n][0]
    ratio1, ratio2 = anchor_cpu / one_cpu, one_wall / many_wall
    plain, augmented = steps[f"device/{n}"], steps[f"device+aug/{n}"]
    aug_share = (augmented[1] - plain[1]) / augmented[1]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"target 1: fast reader 1 thread / anchor, by CPU time = {ratio1:.2f} (>= 0.7: {verdict(ratio1 >= 0.7)})")
    print(
        f"target 2: fast reader {n} threads / 1 thread, by wall time = {ratio2:.2f} (>= 1.7 on 2 idle "
        f"cores: {verdict(ratio2 >= 1.7)}{'' if n == 2 else f'; measured with {n} threads'})"
    )
    print(
        f"target 3: decodes per crop pixel with the cache = {steps[f'device/{n}'][2]:.2f} (1.00: "
        f"{verdict(abs(steps[f'device/{n}'][2] - 1) < 1e-9)}); without it {steps[f'none/{n}'][2]:.2f}"
    )
    print(
        f"target 4: augmentation's share of the step's data work ({device.type}, {n} thr, by CPU time) = "
        f"{100 * aug_share:.1f}% (<= 5%: {verdict(aug_share <= 0.05)})"
    )

    # extrapolation to a 65536^2 step on a 16-core host with an H100
    big, t16 = args.extrapolate_crop, args.extrapolate_threads
    big_plans = trunk_plans(big, args.step_tile, args.step_backward_tile)
    big_px = big * big
    big_tile_px = sum(p.overhead for p in big_plans) * big_px
    gpu_s = h100_step_seconds(big_plans, args.h100_ns_per_px, args.h100_forward_share)
    decode_s_per_px = steps["fill/1"][1] / crop**2  # CPU s per decoded pixel, 1 thread
    cached_s = decode_s_per_px * big_px / t16
    uncached_s = decode_s_per_px * big_tile_px / t16
    # everything on the host as measured here: the fill once per crop pixel, the rest per tile pixel
    per_tile_px = max(augmented[1] - steps["fill/1"][1], 0.0) / tile_px
    all_host_s = cached_s + per_tile_px * big_tile_px / t16
    print(
        f"extrapolation (not a measurement): one {big}^2 step, tiles {args.step_tile} / {args.step_backward_tile} "
        f"(forward overhead {big_plans[0].overhead:.2f}, backward {big_plans[1].overhead:.2f}); H100 bf16 step by "
        f"bench_streaming.py's cost model (plain {args.h100_ns_per_px:.2f} ns/px, forward share "
        f"{args.h100_forward_share:.0%}) = {gpu_s:.1f} s; host work at {t16} threads from this run's 1-thread "
        f"decode rate ({1e-6 / decode_s_per_px:.0f} Mpx/s per thread, perfect scaling assumed):"
    )
    print(
        f"  crop cache on the GPU (decode once; augmentation, normalisation on the GPU): {cached_s:.2f} s = "
        f"{100 * cached_s / gpu_s:.1f}% of the step (target 5: <= 25%: {verdict(cached_s <= 0.25 * gpu_s)})"
    )
    print(
        f"  no cache (every tile decoded, {big_tile_px / big_px:.2f} decodes/px): {uncached_s:.2f} s = "
        f"{100 * uncached_s / gpu_s:.1f}%"
    )
    print(
        f"  all of the data work on the host as measured here ({device.type}; cache, flips, jitter, "
        f"normalisation): {all_host_s:.1f} s = {100 * all_host_s / gpu_s:.0f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
