"""Time one real training step on a slide file, file to optimizer step, and split it into its parts.

The step is training's own: ``_train_slide`` (open the slide and its tissue, draw the crop
and the augmentation, ``augmented_crop`` (a ``CropCache`` holding the crop augmented), the streamed StreamingCLAM
forward, the loss, ``torch.autograd.grad``) and ``_optimizer_step`` (Adam), phase 2 (the
trunk trains), on the synthetic JPEG-tiled pyramidal TIFF of ``bench_data.py`` (written
once to a cache folder outside the repository). One step is run first as a warm-up, then
``--repeat`` steps under ``torch.profiler``; the table is the median step by wall time.

The split comes from the named ranges (``torch.profiler.record_function``) of the code:

    open + tissue   slides.open (open the file, find its tissue, draw the crop)
    read/decode     streaming.read (a tile read), slides.decode (a crop-cache band decoded,
                    or waited for)
    augment         slides.augment (flips, quarter turns, HSV jitter of a crop-cache band as
                    it is filled, or of a tile with slide cache none)
    transfer        streaming.transfer (host -> device copies)
    trunk forward   streaming.forward (one tile's tape-free forward and its stitching)
    trunk backward  streaming.backward (one tile's recompute + backward)
    head            model.head (the CLAM head's forward) and every backward node outside
                    the trunk (the head's and the loss's backward)
    optimizer       train.optimizer (this script's range around ``_optimizer_step``)

Ranges nest (a tile read contains its augmentation, which contains the decode); each moment
of a thread counts for the innermost range. Columns:

    step s      time on the step's own threads (those that run the trunk, the head or the
                optimizer: the main thread, and on CUDA autograd's device thread), with two
                more rows: "other ops" = operators outside the named ranges (the
                normalisation of tiles, the loss, the gradients' checks and sums) and
                "waiting, Python" = wall minus all the rest (waiting for tiles, for the
                GPU, Python work without operators such as the tissue mask on the feature
                grid); the shares add up to 100%
    bg s        time of the same ranges on background threads (the engine's tile readers,
                the crop cache's filler), which overlaps the step's threads: it costs wall
                time only where the step waits for it (then it shows as "other / waiting")
    GPU s       (CUDA) kernel and copy time on the GPU launched inside each range

Share outside trunk + head (the target of the issue "Training at GPU speed": at most 25% on
a 32768^2 slide file on CUDA): on the CPU 1 - (trunk forward + trunk backward + head) / wall
from the step-threads column; on CUDA the same from the GPU column (the time the GPU spends
on the trunk and the head; everything else is reading, augmenting, transferring or waiting).

The process's CPU time (all threads) is printed next to the wall time: on a shared machine
the wall time includes time given to other processes. The profiler adds a little to every
operator; the times of one step without it (after the warm-up) are printed for comparison.

    python benchmarks/bench_train_step.py                     # CPU: width 8, crop 4096^2, tile 2048
    python benchmarks/bench_train_step.py --device cuda       # width 64, bf16, crop 16384^2, tiles 5760/2880
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._C._profiler import _ExperimentalConfig
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

if __package__ in (None, ""):  # run as a script: the repository root and this folder importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import cached_slide  # noqa: E402

from torch_impl.models.streaming_clam import ModelConfig, build_model  # noqa: E402
from torch_impl.pipeline.calibration import calibrate_batchnorm, calibration_batch  # noqa: E402
from torch_impl.pipeline.config import TrainConfig  # noqa: E402
from torch_impl.pipeline.distributed import DistInfo  # noqa: E402
from torch_impl.pipeline.train import (  # noqa: E402
    _amp_dtype,
    _make_optimizer,
    _optimizer_step,
    _set_phase,
    _train_slide,
    slide_rng,
)
from torch_impl.slides import SlideRecord  # noqa: E402

log = logging.getLogger("bench_train_step")

#: The table's rows, and the named ranges each one counts.
CATEGORIES = {
    "open + tissue": ("slides.open",),
    "read/decode": ("streaming.read", "slides.decode"),
    "augment": ("slides.augment",),
    "transfer": ("streaming.transfer",),
    "trunk forward": ("streaming.forward",),
    "trunk backward": ("streaming.backward",),
    "head": ("model.head",),
    "optimizer": ("train.optimizer",),
}
CATEGORY_OF = {name: category for category, names in CATEGORIES.items() for name in names}
#: Backward nodes are named like this; those outside the trunk belong to the head (and loss).
#: The trunk's own node is left unnamed (its tiles' ranges are inside), and the nodes of each
#: tile's backward, which run inside a streaming.backward range, are not counted as head.
BACKWARD_NODE = "autograd::engine::evaluate_function: "
TRUNK_NODE = "_StreamedTrunk"
#: The categories that run only on the step's own threads.
STEP_CATEGORIES = ("trunk forward", "trunk backward", "head", "optimizer")
COMPUTE = ("trunk forward", "trunk backward", "head")
TARGET = 0.25
#: Operators outside the named ranges (the normalisation of tiles, the loss, ...).
OTHER_OPS = "other ops"

#: Device-dependent defaults: (width, dtype, tile, backward tile, crop).
DEFAULTS = {"cpu": (8, "fp32", 2048, None, 4096), "cuda": (64, "bf16", 5760, 2880, 16384)}


def category(name: str) -> str | None:
    """The table row of a profiler event's name, None for unnamed work."""
    if name in CATEGORY_OF:
        return CATEGORY_OF[name]
    if name.startswith(BACKWARD_NODE) and TRUNK_NODE not in name:
        return "head"
    return None


def _device_us(event, self_only: bool = False) -> float:
    """Kernel (and copy) time an event launched, microseconds (its children too unless ``self_only``)."""
    names = (
        ("self_device_time_total", "self_cuda_time_total") if self_only else ("device_time_total", "cuda_time_total")
    )
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


@dataclass
class Split:
    """Seconds per category: on the step's threads, on background threads, on the GPU."""

    step: dict[str, float]
    background: dict[str, float]
    gpu: dict[str, float]
    gpu_total: float


def split(events) -> Split:
    """Attribute every moment of every thread (and every kernel) to the innermost named range.

    ``events``: ``profile.events()``. A thread is one of the step's threads if it runs any
    of :data:`STEP_CATEGORIES`. Operators (``aten::``) outside every named range and every
    other operator count as :data:`OTHER_OPS`; what is left of a thread's time is Python
    work without operators, or waiting.
    """
    by_thread = defaultdict(list)  # thread -> [(start us, end us, category, device us)]
    gpu_total = 0.0
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        gpu_total += _device_us(e, self_only=True)
        cat = category(e.name) or (OTHER_OPS if e.name.startswith("aten::") else None)
        if cat is not None:
            node = e.name.startswith(BACKWARD_NODE)
            by_thread[e.thread].append((e.time_range.start, e.time_range.end, cat, _device_us(e), node))
    step, background, gpu = defaultdict(float), defaultdict(float), defaultdict(float)
    for intervals in by_thread.values():
        own, own_gpu = defaultdict(float), defaultdict(float)
        intervals.sort(key=lambda t: (t[0], -t[1]))
        stack: list[tuple[float, float, str, float, bool]] = []
        for start, end, cat, dev, node in intervals:
            while stack and stack[-1][1] <= start:
                stack.pop()
            if stack and (node or cat == OTHER_OPS):
                continue  # the trunk's per-tile backward nodes; an operator inside a range or another operator
            if stack:  # nested: its time is not its parent's own time
                parent = stack[-1][2]
                own[parent] -= end - start
                own_gpu[parent] -= dev
            own[cat] += end - start
            own_gpu[cat] += dev
            stack.append((start, end, cat, dev, node))
        target = step if any(c in own for c in STEP_CATEGORIES) else background
        for cat in own:
            target[cat] += own[cat] / 1e6
            gpu[cat] += own_gpu[cat] / 1e6
    return Split(dict(step), dict(background), dict(gpu), gpu_total / 1e6)


def every_thread() -> _ExperimentalConfig | None:
    """The profiler's setting that records every thread (by default it records only the thread
    that starts it, not the tile readers); None, with a warning, where this torch lacks it."""
    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        log.warning("this torch's profiler cannot record other threads: the bg s column stays empty")
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="bf16 = autocast (default: fp32 on the CPU, bf16 on CUDA)",
    )
    parser.add_argument(
        "--width", type=int, default=None, help="ResNet-34 base width (default: 8 on the CPU, 64 on CUDA)"
    )
    parser.add_argument(
        "--tile", type=int, default=None, help="forward tile side (default: 2048 on the CPU, 5760 on CUDA)"
    )
    parser.add_argument(
        "--backward-tile",
        type=int,
        default=None,
        help="recompute + backward tile side (default: --tile on the CPU, 2880 on CUDA)",
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help="training crop side at 0.5 um/px (default: 4096 on the CPU, 16384 on CUDA)",
    )
    parser.add_argument("--size", type=int, default=32768, help="level-0 side of the synthetic slide at 0.25 um/px")
    parser.add_argument("--slide-cache", choices=("auto", "device", "host", "none"), default="auto")
    parser.add_argument("--repeat", type=int, default=1, help="profiled steps after the warm-up (the median is shown)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as training)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "streamingclam-bench",
        help="where bench_data.py's synthetic slide is written and reused (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    kind = torch.device(args.device).type
    if kind not in DEFAULTS:
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    width, dtype, tile, back, crop = DEFAULTS[kind]
    args.width = args.width or width
    args.dtype = args.dtype or dtype
    args.tile = args.tile or tile
    args.backward_tile = args.backward_tile or back or args.tile
    args.crop = args.crop or crop
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.crop > args.size // 2:
        parser.error(f"--crop {args.crop} is larger than the slide at 0.5 um/px ({args.size // 2}); raise --size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("torch_impl.models.resnet").setLevel(logging.ERROR)  # random-weights warning
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    path = cached_slide(args.cache_dir, args.size, 512, 80)

    config = TrainConfig(
        model=ModelConfig(width=args.width, tile_size=args.tile, backward_tile_size=args.backward_tile),
        mpp=0.5,
        max_size=args.crop,
        head_only_epochs=0,  # phase 2: the trunk trains
        amp="bf16" if args.dtype == "bf16" else "off",
        slide_cache=args.slide_cache,
    )
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    _set_phase(model, config, epoch=0)
    optimizer = _make_optimizer(model, config)
    record = SlideRecord(slide_id=path.stem, path=path, label=1, split="train")
    calibrate_batchnorm(model.trunk.module, calibration_batch(model, [record], config, device))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    amp_dtype, info = _amp_dtype(config, device), DistInfo()

    def step() -> tuple[float, float]:
        """One training step as ``_train_epoch`` runs it (accumulate 1); (wall s, process CPU s)."""
        if cuda:
            torch.cuda.synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        group = torch.zeros(3, dtype=torch.float64, device=device)  # slides, loss sum, skipped
        loss = _train_slide(model, params, record, config, slide_rng(config.seed, 0, 0), device, amp_dtype, "(bench)")
        group += torch.tensor([1.0, loss, 0.0], dtype=torch.float64, device=device)
        with record_function("train.optimizer"):
            _optimizer_step(optimizer, params, group, info, config.grad_clip)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - w0, time.process_time() - c0

    log.info("warm-up step")
    step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    plain_wall, plain_cpu = step()
    load0 = os.getloadavg()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    all_threads = every_thread()
    runs = []
    for i in range(args.repeat):
        with profile(activities=activities, experimental_config=all_threads) as prof:
            wall, cpu = step()
        runs.append((wall, cpu, split(prof.events())))
        log.info("profiled step %d: %.2f s", i + 1, wall)
    load1 = os.getloadavg()
    wall, cpu, parts = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]  # the median (lower for even)
    print_table(args, device, path, wall, cpu, plain_wall, plain_cpu, parts, (load0[0], load1[0]))
    return 0


def print_table(args, device, path, wall, cpu, plain_wall, plain_cpu, parts: Split, loads) -> None:
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print()
    print(
        f"## bench_train_step: one training step (phase 2), {path.name}, crop {args.crop}^2 at 0.5 um/px, "
        f"ResNet-34 width {args.width}, {args.dtype}, tile {args.tile} / backward {args.backward_tile}, "
        f"slide cache {args.slide_cache}, {name}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"load average {loads[0]:.2f} before, {loads[1]:.2f} after"
    )
    print(
        f"step wall {wall:.2f} s, process CPU {cpu:.2f} s (median of {args.repeat} profiled); "
        f"without the profiler: wall {plain_wall:.2f} s, CPU {plain_cpu:.2f} s"
        + (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else "")
    )
    header = f"{'part':<16} {'step s':>8} {'share':>7} {'bg s':>8}"
    if cuda:
        header += f" {'GPU s':>8} {'share':>7}"
    print(header)
    waiting = "waiting, Python"
    named_gpu = sum(parts.gpu.get(c, 0.0) for c in CATEGORIES)
    for row in [*CATEGORIES, OTHER_OPS, waiting]:
        on_step = wall - sum(parts.step.values()) if row == waiting else parts.step.get(row, 0.0)
        line = f"{row:<16} {on_step:8.2f} {100 * on_step / wall:6.1f}% {parts.background.get(row, 0.0):8.2f}"
        if cuda:  # the GPU has no "waiting" row: its idle time is wall minus "GPU busy"
            g = {OTHER_OPS: parts.gpu_total - named_gpu, waiting: 0.0}.get(row, parts.gpu.get(row, 0.0))
            line += f" {g:8.2f} {100 * g / wall:6.1f}%"
        print(line)
    if cuda:
        print(f"{'GPU busy':<16} {'':8} {'':7} {'':8} {parts.gpu_total:8.2f} {100 * parts.gpu_total / wall:6.1f}%")
    inside = sum(parts.gpu.get(c, 0.0) if cuda else parts.step.get(c, 0.0) for c in COMPUTE)
    outside = 1 - inside / wall
    if cuda:
        verdict = f"target <= {100 * TARGET:.0f}% for a 32768^2 slide file: {'met' if outside <= TARGET else 'NOT met'}"
    else:
        verdict = f"for reference: the target, <= {100 * TARGET:.0f}%, is for CUDA"
    print(f"outside trunk + head: {100 * outside:.1f}% of the step ({'GPU' if cuda else 'step threads'}; {verdict})")
    print(
        "step s: the step's own threads, innermost named range; bg s: the same ranges on the reader and "
        "cache-filling threads, overlapping the step (thread-seconds)"
    )


if __name__ == "__main__":
    sys.exit(main())
