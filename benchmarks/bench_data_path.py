"""The slide data path of one training step, without the model: decode, augmentation, normalisation.

(1) Augmentation alone, on an in-memory image (no decoding): Mpx/s of the NumPy reference
    ``AugmentedView.read`` and of ``DeviceAugmentedView.read`` (torch, on ``--device``), for
    the flips + quarter turn alone and with the HSV jitter.
(2) The data work of one phase-2 step on a synthetic JPEG TIFF slide: every tile of the
    forward and of the backward plan of the ResNet-34 trunk read through the lazy-source
    contract and turned into network input on ``--device`` (``to_model_input``), as
    ``StreamingTrunk`` does, for: today's path (NumPy ``AugmentedView`` over the slide, every
    tile decoded from the file), the device view without a cache, and the device view over a
    ``CropCache`` on the device. Each with and without augmentation; the augmentation's share
    of the data work is (with - without) / with. Also counted: how often each pixel was
    decoded (mean over the crop).

Times are CPU seconds of the process (all threads: the prefetch and cache-filling threads
too), the median of ``--repeat`` runs; on CUDA wall seconds after a synchronize.

    python benchmarks/bench_data_path.py                       # CPU, 4096^2 slide, tile 2048
    python benchmarks/bench_data_path.py --device cuda --size 16384 --tile 5760
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from reference.tiling import plan_tiles
from torch_impl.models.resnet import resnet34_trunk
from torch_impl.slides.augment import AugmentedView, AugmentParams
from torch_impl.slides.crop_cache import CropCache
from torch_impl.slides.device_view import DeviceAugmentedView
from torch_impl.slides.inputs import open_slide_input
from torch_impl.slides.slide import ArrayImage
from torch_impl.slides.synthetic import synthesize_slide, write_pyramid_tiff
from torch_impl.streaming.geometry import module_geometry
from torch_impl.streaming.sources import LazySource, prefetched, to_model_input

GEOMETRY = module_geometry(resnet34_trunk(width=4))  # the halo only depends on the layers
AUGMENT = AugmentParams(flip_v=True, flip_h=False, rot90_k=1, hsv_shift=(0.02, 0.1, -0.1))  # config's ranges
GEOMETRY_ONLY = AugmentParams(flip_v=True, flip_h=False, rot90_k=1)


class Counting:
    """A source wrapper that counts decoded pixels (thread-safe)."""

    def __init__(self, source):
        self.source, self.pixels, self.lock = source, 0, threading.Lock()

    shape = property(lambda self: self.source.shape)
    dtype = property(lambda self: self.source.dtype)

    def read(self, y, x, h, w):
        with self.lock:
            self.pixels += h * w
        return self.source.read(y, x, h, w)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = clock(device)
        fn()
        times.append(clock(device) - start)
    return statistics.median(times)


def augmentation_alone(device: torch.device, side: int, repeat: int) -> None:
    image = ArrayImage(np.random.default_rng(0).integers(0, 256, (3, side, side), dtype=np.uint8))
    mpx = side * side / 1e6
    print(f"(1) augmentation alone, {side} x {side} region of an in-memory image, Mpx/s (higher is better)")
    for name, params in (("flip + rot90", GEOMETRY_ONLY), ("flip + rot90 + HSV jitter", AUGMENT)):
        numpy_view, torch_view = AugmentedView(image, params), DeviceAugmentedView(image, params, device)
        numpy_s = timed(lambda v=numpy_view: v.read(0, 0, side, side), torch.device("cpu"), repeat)
        torch_s = timed(lambda v=torch_view: v.read(0, 0, side, side), device, repeat)
        print(
            f"    {name:28s} NumPy AugmentedView {mpx / numpy_s:7.1f}   DeviceAugmentedView ({device}) "
            f"{mpx / torch_s:7.1f}"
        )


def step_data_work(source, make_view, device: torch.device, tile: int, cache: str | None) -> None:
    """Read and normalise every tile of the forward and the backward plan (through a CropCache
    in mode ``cache``, or straight from ``source`` for None)."""
    with CropCache.open(source, cache, device) if cache else nullcontext(source) as crop:
        view = LazySource(make_view(crop))
        for _ in ("forward", "backward"):
            for _, pixels in prefetched(view, plan_tiles(GEOMETRY, view.spatial, tile).tiles):
                to_model_input(pixels.to(device, non_blocking=True))


def step(slide_path: Path, device: torch.device, tile: int, repeat: int) -> None:
    slide = open_slide_input(slide_path, mpp=0.25)
    source = slide.source
    mpx = source.shape[1] * source.shape[2] / 1e6
    print(
        f"(2) data work of one step (forward + backward plans, tile {tile}), crop {source.shape[1]} x "
        f"{source.shape[2]} ({mpx:.1f} Mpx), seconds"
    )
    paths = {
        "today: NumPy AugmentedView, no cache": (lambda s, p: AugmentedView(s, p), None),
        "DeviceAugmentedView, no cache": (lambda s, p: DeviceAugmentedView(s, p, device), "none"),
        "DeviceAugmentedView, CropCache on the device": (lambda s, p: DeviceAugmentedView(s, p, device), "device"),
    }
    for name, (make, cache) in paths.items():
        seconds = {}
        for label, params in (("plain", AugmentParams()), ("augmented", AUGMENT)):
            counting = Counting(source)

            def view_of(crop, make=make, params=params):
                return make(crop, params)

            seconds[label] = timed(
                lambda counting=counting, view_of=view_of, cache=cache: step_data_work(
                    counting, view_of, device, tile, cache
                ),
                device,
                repeat,
            )
            decoded = counting.pixels / (repeat + 1) / (mpx * 1e6)
        share = (seconds["augmented"] - seconds["plain"]) / seconds["augmented"]
        print(
            f"    {name:46s} plain {seconds['plain']:6.2f}  augmented {seconds['augmented']:6.2f}  "
            f"augmentation {100 * share:5.1f}% of the data work; each pixel decoded {decoded:.2f} times"
        )
    slide.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=4096, help="synthetic slide side, pixels (0.25 um/px)")
    parser.add_argument("--tile", type=int, default=2048, help="tile side (forward and backward plans)")
    parser.add_argument("--region", type=int, default=2048, help="region side for (1)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    augmentation_alone(device, args.region, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        write_pyramid_tiff(path, synthesize_slide((args.size, args.size), True, 0).rgb, 0.25)
        step(path, device, args.tile, args.repeat)


if __name__ == "__main__":
    main()
