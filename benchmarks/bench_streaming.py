"""Benchmark StreamingTrunk against plain training on one image: time, peak memory, cost model.

For the ResNet-34 trunk (``torch_impl.models.resnet.resnet34_trunk``, batch norm frozen), one image
and one training step (forward, ``loss = output.float().mean()``, ``loss.backward()``):

* *plain*: the whole image through the trunk with autograd (``OOM`` when it does not fit);
  the no-grad forward is timed as well;
* *streamed*: ``StreamingTrunk(trunk, tile, backward_tile)`` on a lazy image that lives on
  the host (:class:`SyntheticSlide`, uint8, read tile by tile), for each tile size.

Printed per configuration: median step time; peak memory (CUDA: ``max_memory_allocated``;
CPU: the peak bytes of live torch tensors, read from the profiler's allocation events, and
the process's peak resident set size above its baseline, which includes what malloc and
oneDNN keep cached and is only meaningful with ``--isolate``, one fresh process per
configuration); the tile plans (tile count and distinct shapes); and a prediction from a
cost model measured in the same run:

    r_fwd  = plain no-grad forward seconds / (H W)      at the calibration size
    r_step = plain forward + backward seconds / (H W)   at the calibration size
    predicted streamed step = forward_plan.overhead  * r_fwd  * H W
                            + backward_plan.overhead * r_step * H W

(the streamed step is a no-grad forward over the forward plan, then a recompute with
autograd and a backward over the backward plan; ``overhead`` is the plan's computed input
pixels over image pixels). ``meas/pred`` near 1 means streaming costs what its halo
predicts and nothing else.

Examples (from the repository root)::

    python benchmarks/bench_streaming.py                 # CPU defaults, 2-5 minutes on 2 cores
    python benchmarks/bench_streaming.py --cpu-check     # one line: streamed vs cost model at 2048^2
    python benchmarks/bench_streaming.py --device cuda --dtype bf16   # the H100 anchors of RESULTS.md
    python benchmarks/bench_streaming.py --device cuda --sizes 65536 --tiles 5760 --plain-max 0 --calibrate 8192

On the CPU the default is one thread (``--threads 1``) timed by the process's user CPU time
(``--clock user``): on a shared machine, OpenMP threads that wait for each other at barriers
make multi-threaded timings erratic, wall time counts whatever the OS gives to other
processes, and system time counts page faults, which were slow and erratic on the VM this
was written on; the ratios this benchmark reports need stable numbers. ``--threads 0
--clock wall`` measures the machine as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.allocator import keep_freed_memory  # noqa: E402

from reference.tiling import TilePlan
from torch_impl.models.resnet import resnet34_trunk
from torch_impl.streaming import StreamingTrunk, to_model_input

log = logging.getLogger("bench_streaming")

CPU_DEFAULTS = {
    "width": 8,
    "sizes": [2048, 3072],
    "tiles": [1600, 2048],
    "plain_max": 4096,
}
CUDA_DEFAULTS = {
    "width": 64,
    "sizes": [8192, 16384, 32768],
    "tiles": [5760, 2880],
    "plain_max": 16384,
}
CPU_CHECK = {"width": 8, "sizes": [2048], "tiles": [1280, 1600], "plain_max": 2048}
GiB = 2**30


# --------------------------------------------------------------------------- the image


class SyntheticSlide:
    """A lazy (3, H, W) uint8 image whose reads cost no copy: pixel (c, y, x) = buf[c, y skew + x].

    ``buf`` holds ``skew H + W`` random bytes per channel (25 MB for 65536^2 with the default
    skew 127), and ``read`` returns a strided view into it, so the benchmark measures the
    engine's own work per tile (one contiguous copy, pinning, the transfer, normalisation)
    rather than the cost of making up pixels. Row ``y + 1`` is row ``y`` shifted left by
    ``skew`` pixels: random along a row, streaked diagonally. It follows the lazy-source
    protocol of :class:`torch_impl.streaming.StreamingTrunk` (``.shape``, ``.read``).
    """

    def __init__(self, height: int, width: int, skew: int = 127, seed: int = 0):
        self.shape = (3, height, width)
        self.skew = skew
        rng = np.random.default_rng(seed)
        self.buf = rng.integers(0, 256, size=(3, skew * height + width), dtype=np.uint8)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y, y + h) x [x, x + w)`` as a read-only (3, h, w) uint8 view."""
        _, H, W = self.shape
        if not (0 <= y and y + h <= H and 0 <= x and x + w <= W):
            raise ValueError(
                f"region {h}x{w} at ({y}, {x}) is outside the {H}x{W} image"
            )
        start = self.buf[:, y * self.skew + x :]  # (3, ...), row y begins here
        c_stride = self.buf.strides[0]
        return np.lib.stride_tricks.as_strided(
            start, (3, h, w), (c_stride, self.skew, 1), writeable=False
        )


# --------------------------------------------------------------------------- one configuration


@dataclass
class Config:
    """One measurement: plain (``tile`` None) or streamed with the given tile sizes."""

    device: str
    dtype: str  # "fp32" or "bf16" (autocast)
    width: int
    size: int  # square image side H = W
    tile: int | None = None  # forward tile; None = plain
    backward_tile: int | None = None  # None = tile
    repeat: int = 3
    channels_last: bool = False
    threads: int = 1
    clock: str = "wall"  # a key of CLOCKS: "wall", "cpu" (user + system) or "user"
    seed: int = 0

    @property
    def label(self) -> str:
        if self.tile is None:
            return f"{self.size} plain"
        bwd = (
            "" if self.backward_tile in (None, self.tile) else f"/{self.backward_tile}"
        )
        return f"{self.size} tile {self.tile}{bwd}"


@dataclass
class Result:
    """What one configuration measured; times in seconds, memory in bytes."""

    config: Config
    status: str = "ok"  # "ok", "OOM", "skipped" or an error message
    step: float | None = None  # median forward + backward
    step_min: float | None = None
    forward: float | None = None  # median no-grad forward (plain only)
    # CUDA: max_memory_allocated; CPU: peak bytes of live torch tensors
    peak_alloc: int | None = None
    # CPU: peak resident set size above the baseline, during the first step
    peak_rss: int | None = None
    # "forward"/"backward": {"tiles": count, "shapes": [(h, w), ...], "overhead": float}
    plans: dict = field(default_factory=dict)

    @property
    def pixels(self) -> int:
        return self.config.size**2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(cfg: Config, device: torch.device) -> AbstractContextManager:
    if cfg.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _rss_now() -> int:
    """Current resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_oom(err: BaseException) -> bool:
    return (
        isinstance(err, torch.cuda.OutOfMemoryError)
        or "out of memory" in str(err).lower()
    )


def build_trunk(cfg: Config, device: torch.device) -> torch.nn.Module:
    """The ResNet-34 trunk (random weights, batch norm frozen) on ``device``."""
    torch.manual_seed(cfg.seed)
    trunk = resnet34_trunk(weights=None, width=cfg.width).to(device)
    if cfg.channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    return trunk


def user_time() -> float:
    """User-mode CPU seconds of this process, all threads (kernel work excluded)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


# "user" is the default for single-threaded CPU runs: on the shared 2-core VM these
# benchmarks were written on, one forward pass took 0.30 s of user time every time, while
# its system time (page faults) varied from 0.0 to 1.2 s and its wall time from 0.6 to 3.5 s.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "user": user_time}


def peak_tensor_bytes(fn: Callable[[], None]) -> int | None:
    """Run ``fn`` under the profiler; the peak bytes of torch tensors allocated during it and alive.

    Reads the profiler's allocation events (``profile_memory=True``) in time order. Tensors
    that existed before ``fn`` are not counted. None where this torch's profiler does not
    expose the events.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        deltas = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
        )
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in deltas:  # + for an allocation, - for a free
        live += nbytes
        peak = max(peak, live)
    return peak


def warm_up(step: Callable[[], None], device: torch.device) -> None:
    """The untimed first call, which pays for cuDNN autotuning, oneDNN primitive creation and
    allocator growth."""
    step()
    _sync(device)


def time_steps(
    step: Callable[[], None], cfg: Config, device: torch.device
) -> tuple[list[float], int | None]:
    """``cfg.repeat`` timed calls of ``step``; the times and, on CUDA, the peak allocated bytes."""
    now = CLOCKS[cfg.clock]
    times, peaks = [], []
    for _ in range(cfg.repeat):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = now()
        step()
        _sync(device)
        times.append(now() - t0)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))
    return times, max(peaks) if peaks else None


def _plan_facts(plan: TilePlan) -> dict:
    return {
        "tiles": len(plan),
        "shapes": sorted(plan.tile_shapes),
        "overhead": plan.overhead,
    }


def run_config(cfg: Config) -> Result:
    """Measure one configuration in this process.

    Order: build the trunk; (plain) put the whole image on the device; one warm-up step;
    on the CPU, read the peak RSS and run one step under the profiler for the peak of live
    tensors; then time ``cfg.repeat`` steps with freed memory kept by malloc
    (:func:`keep_freed_memory`), and for plain also the no-grad forward.
    """
    device = torch.device(cfg.device)
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        # autotune once per tile shape, in the warm-up
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()
    trunk = build_trunk(cfg, device)
    params = [p for p in trunk.parameters() if p.requires_grad]
    source = SyntheticSlide(cfg.size, cfg.size, seed=cfg.seed)
    baseline = _rss_now()
    result = Result(cfg)

    def zero_grads() -> None:
        for p in params:
            p.grad = None

    try:
        input_bytes = 0
        if cfg.tile is None:
            # the whole image on the device, untimed
            region = np.ascontiguousarray(source.read(0, 0, cfg.size, cfg.size))
            pixels = torch.from_numpy(region)[None]  # (1, 3, H, W) uint8
            x = to_model_input(pixels.to(device))  # (1, 3, H, W) float32
            del region, pixels
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # CUDA's peak counts the input; on the CPU it is added to the profiled peak
            input_bytes = x.nelement() * x.element_size()

            def forward() -> None:
                with torch.no_grad(), _autocast(cfg, device):
                    trunk(x)

            def step() -> None:
                zero_grads()
                with _autocast(cfg, device):
                    y = trunk(x)  # (1, 8 width, H/32, W/32)
                y.float().mean().backward()

        else:
            engine = StreamingTrunk(
                trunk, cfg.tile, cfg.backward_tile, channels_last=cfg.channels_last
            )
            image_size = (cfg.size, cfg.size)
            result.plans = {
                "forward": _plan_facts(engine.plan(image_size)),
                "backward": _plan_facts(engine.plan(image_size, backward=True)),
            }

            def step() -> None:
                zero_grads()
                with _autocast(cfg, device):
                    y = engine(source)  # (1, 8 width, H/32, W/32), tiles read on demand
                y.float().mean().backward()

        warm_up(step, device)
        if device.type == "cpu":  # no max_memory_allocated: RSS, then one profiled step
            result.peak_rss = _peak_rss() - baseline
            live = peak_tensor_bytes(step)
            result.peak_alloc = None if live is None else live + input_bytes
        keep_freed_memory()
        if cfg.tile is None:
            forward()  # untimed: the no-grad forward has first-call costs of its own
            _sync(device)
            result.forward = statistics.median(time_steps(forward, cfg, device)[0])
        times, cuda_peak = time_steps(step, cfg, device)
        result.step, result.step_min = statistics.median(times), min(times)
        if device.type == "cuda":
            result.peak_alloc = cuda_peak
    except (RuntimeError, MemoryError) as err:
        if not isinstance(err, MemoryError) and not _is_oom(err):
            raise
        result.status = "OOM"
    return result


# --------------------------------------------------------------------------- isolation


def run_isolated(cfg: Config, timeout: float | None) -> Result:
    """Run one configuration in a fresh Python process and read its result back.

    The worker starts with glibc's mmap threshold fixed at 1 MiB, so that freed tensors go
    back to the OS and its peak RSS follows the live memory; by default glibc raises the
    threshold as large blocks are freed and keeps them in a fragmented heap (a streamed
    3072^2 step then held ~650 MiB after it ended instead of ~110 MiB). Timing comes after,
    with freed memory kept (:func:`keep_freed_memory`).
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(asdict(cfg)),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return Result(cfg, status=f"timeout after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT ") :])
            data["config"] = Config(**data["config"])
            return Result(**data)
    if (
        proc.returncode < 0
    ):  # killed by a signal, typically the kernel's OOM killer (SIGKILL)
        return Result(
            cfg,
            status="OOM"
            if proc.returncode == -9
            else f"killed by signal {-proc.returncode}",
        )
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Result(cfg, status=f"failed: {tail}")


def worker_main(cfg_json: str) -> None:
    """``--worker``: measure one configuration and print it as one ``RESULT {json}`` line."""
    result = run_config(Config(**json.loads(cfg_json)))
    print("RESULT " + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------- the cost model


@dataclass(frozen=True)
class CostModel:
    """Per-pixel rates of the plain trunk, measured at one image size."""

    size: int
    r_fwd: float  # seconds per input pixel, no-grad forward
    r_step: float  # seconds per input pixel, forward + backward

    @classmethod
    def from_plain(cls, result: Result) -> CostModel:
        return cls(
            result.config.size,
            result.forward / result.pixels,
            result.step / result.pixels,
        )

    def predict(self, result: Result) -> float:
        """Predicted step seconds: the plain step, or the two streamed passes over their plans."""
        if result.config.tile is None:
            return self.r_step * result.pixels
        fwd, bwd = (
            result.plans["forward"]["overhead"],
            result.plans["backward"]["overhead"],
        )
        return (fwd * self.r_fwd + bwd * self.r_step) * result.pixels


# --------------------------------------------------------------------------- driver and report


def _gib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.0f} MiB"


def _mode(cfg: Config) -> str:
    if cfg.tile is None:
        return "plain"
    return f"tile {cfg.tile}" + (
        "" if cfg.backward_tile in (None, cfg.tile) else f"/{cfg.backward_tile}"
    )


def print_row(result: Result, model: CostModel | None) -> None:
    """One progress line per configuration, logged as soon as it is measured."""
    cfg = result.config
    if result.status != "ok":
        log.info("%-22s %s", cfg.label, result.status)
        return
    extra = (
        f", no-grad forward {result.forward:.3f} s"
        if result.forward is not None
        else ""
    )
    pred = f", predicted {model.predict(result):.3f} s" if model else ""
    rss = f", peak RSS {_gib(result.peak_rss)}" if result.peak_rss is not None else ""
    log.info(
        "%-22s step %.3f s (min %.3f)%s, peak alloc %s%s%s",
        cfg.label,
        result.step,
        result.step_min,
        extra,
        _gib(result.peak_alloc),
        rss,
        pred,
    )


def print_table(
    results: list[Result], model: CostModel | None, args: argparse.Namespace
) -> None:
    """The final table: one line per configuration, then the plans' tile shapes."""
    print(
        f"\n## ResNet-34 trunk, width {args.width}, {args.dtype}, device {args.device_name}, "
        f"threads {args.threads_used}, channels_last {args.channels_last}, {args.clock} clock, median of {args.repeat}"
    )
    if model:
        print(
            f"cost model from plain {model.size}^2: r_fwd {model.r_fwd * 1e9:.2f} ns/px, "
            f"r_step {model.r_step * 1e9:.2f} ns/px (no-grad forward = {model.r_fwd / model.r_step:.0%} of a step)"
        )
    if args.device == "cuda":
        print("peak alloc: torch.cuda.max_memory_allocated during a step")
    else:
        print(
            "peak alloc: peak bytes of live torch tensors during a step (profiler), plain's input "
            "included; peak RSS: process peak resident set above its baseline after the first step"
            + ("" if args.isolate else " (rough: configurations share one process)")
        )
    cpu = args.device != "cuda"
    print(
        f"{'image':>7} {'mode':<14}{'tiles f/b':>11}{'overhead f/b':>14}{'step s':>9}{'peak alloc':>12}"
        + (f"{'peak RSS':>11}" if cpu else "")
        + f"{'pred s':>9}{'meas/pred':>11}"
    )
    for r in results:
        cfg = r.config
        if r.status != "ok":
            print(f"{cfg.size:>7} {_mode(cfg):<14}{r.status:>11}")
            continue
        if cfg.tile is None:
            tiles, over = "1/1", "1.00/1.00"
        else:
            f, b = r.plans["forward"], r.plans["backward"]
            tiles, over = (
                f"{f['tiles']}/{b['tiles']}",
                f"{f['overhead']:.2f}/{b['overhead']:.2f}",
            )
        pred = model.predict(r) if model else math.nan
        print(
            f"{cfg.size:>7} {_mode(cfg):<14}{tiles:>11}{over:>14}{r.step:>9.3f}{_gib(r.peak_alloc):>12}"
            + (f"{_gib(r.peak_rss):>11}" if cpu else "")
            + f"{pred:>9.3f}{r.step / pred:>11.2f}"
        )
    shapes = {}
    for r in results:
        for name, plan in r.plans.items():
            tile = (
                r.config.tile
                if name == "forward"
                else (r.config.backward_tile or r.config.tile)
            )
            shapes[(r.config.size, name, tile)] = plan
    if shapes:
        print("tile shapes (h, w) per plan:")
        for (size, name, tile), plan in shapes.items():
            print(
                f"  {size}^2 {name:<8} tile {tile}: {plan['tiles']} tiles, shapes {[tuple(s) for s in plan['shapes']]}"
            )


def measure(cfg: Config, args: argparse.Namespace) -> Result:
    return run_isolated(cfg, args.timeout) if args.isolate else run_config(cfg)


def calibrate(results: list[Result], args: argparse.Namespace) -> CostModel | None:
    """The cost model from the plain run at the calibration size, halving it until one fits.

    Plain runs measured here go into ``results`` (replacing a "skipped" row of the same
    size), so that the table shows them.
    """
    size = args.calibrate
    while size >= 256:
        plain = next(
            (
                r
                for r in results
                if r.config.tile is None
                and r.config.size == size
                and r.status != "skipped"
            ),
            None,
        )
        if plain is None:  # not measured yet, or skipped by --plain-max: measure it now
            plain = measure(_config(args, size, None), args)
            print_row(plain, None)
            skipped = [r.config.size == size and r.config.tile is None for r in results]
            if any(skipped):
                results[skipped.index(True)] = plain  # its "skipped" row
            else:
                results.append(plain)
        if plain.status == "ok":
            return CostModel.from_plain(plain)
        size //= 2
    return None


def _config(args: argparse.Namespace, size: int, tile: int | None) -> Config:
    return Config(
        device=args.device,
        dtype=args.dtype,
        width=args.width,
        size=size,
        tile=tile,
        backward_tile=args.backward_tile if tile is not None else None,
        repeat=args.repeat,
        channels_last=args.channels_last,
        threads=args.threads,
        clock=args.clock,
        seed=args.seed,
    )


def run_all(args: argparse.Namespace) -> tuple[list[Result], CostModel | None]:
    """Plain runs (up to ``--plain-max``), the calibration, then every streamed configuration."""
    results: list[Result] = []
    for size in args.sizes:
        cfg = _config(args, size, None)
        result = (
            measure(cfg, args)
            if size <= args.plain_max
            else Result(cfg, status="skipped")
        )
        print_row(result, None)
        results.append(result)
    model = calibrate(results, args)
    for size in args.sizes:
        for tile in args.tiles:
            result = measure(_config(args, size, tile), args)
            print_row(result, model)
            results.append(result)
    return results, model


def cpu_check_summary(
    results: list[Result], model: CostModel | None, size: int
) -> None:
    """The one-line verdict of ``--cpu-check``."""
    streamed = [
        r
        for r in results
        if r.config.tile is not None and r.status == "ok" and r.config.size == size
    ]
    if model is None or not streamed:
        print("cpu-check: no streamed result or no cost model; nothing to compare")
        return
    worst = max(abs(r.step / model.predict(r) - 1) for r in streamed)
    tiles = ", ".join(
        f"tile {r.config.tile}: {r.step / model.predict(r):.2f}" for r in streamed
    )
    verdict = "met" if worst <= 0.25 else "NOT met"
    print(
        f"cpu-check: streamed step of a narrow ResNet-34 (width {streamed[0].config.width}) at "
        f"{size}x{size} is within {worst:.0%} of the cost model (measured/predicted {tiles}); "
        f"target 25%: {verdict}"
    )


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 = autocast; default fp32",
    )
    p.add_argument(
        "--sizes",
        type=_int_list,
        help="image sides; CPU 2048,3072, CUDA 8192,16384,32768",
    )
    p.add_argument(
        "--tiles",
        type=_int_list,
        help="forward tile sizes; CPU 1600,2048, CUDA 5760,2880",
    )
    p.add_argument(
        "--backward-tile",
        type=int,
        help="backward tile size (default: the forward tile)",
    )
    p.add_argument(
        "--width", type=int, help="layer1 planes; CPU 8, CUDA 64 (ResNet-34)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed steps per configuration (median); default 3",
    )
    p.add_argument(
        "--plain-max",
        type=int,
        help="skip plain runs above this side; CPU 4096, CUDA 16384",
    )
    p.add_argument(
        "--calibrate",
        type=int,
        help="image side of the cost model's plain run (default: smallest size)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="channels-last trunk and tiles"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (0 = torch's default); default 1",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu", "user"],
        help="wall time, the process's CPU time (user + system) or its user CPU time (default "
        "on a 1-thread CPU run: it ignores other processes and page-fault costs on a shared "
        "machine; it includes the tile-reading thread); CUDA runs use wall time",
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one fresh process per configuration (default on CPU, where it is the only way to "
        "read a configuration's peak memory; off on CUDA)",
    )
    p.add_argument("--timeout", type=float, help="seconds per isolated configuration")
    p.add_argument(
        "--cpu-check",
        action="store_true",
        help="CPU, width 8, 2048^2, tiles 1280,1600: one verdict line",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.cpu_check:
        args.device = "cpu"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    defaults = (
        CPU_CHECK
        if args.cpu_check
        else (CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None or args.cpu_check:
            setattr(args, name, value)
    if args.channels_last and args.device == "cpu" and args.width < 16:
        # torch 2.13.0+cpu (oneDNN) crashes (SIGSEGV / "double free") in the backward of a
        # channels-last 1x1 stride-2 convolution with few channels, e.g. Conv2d(4, 8, 1,
        # stride=2) on a (1, 4, 256, 256) input: ResNet-34's layer2 shortcut at width 4 or 8.
        p.error(
            "--channels-last on the CPU needs --width >= 16 (oneDNN crashes for narrower trunks)"
        )
    if args.isolate is None:
        args.isolate = args.device == "cpu"
    if args.calibrate is None:
        args.calibrate = min(args.sizes)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.clock is None:
        args.clock = (
            "user" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
        )
    if args.device == "cuda" and args.clock != "wall":
        p.error("CUDA runs are timed by wall time (--clock wall)")
    args.threads_used = torch.get_num_threads() if args.device == "cpu" else "-"
    args.device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    )
    return args


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return "cpu"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    # resnet34_trunk warns "no weights given": random weights are intended here
    logging.getLogger("torch_impl.models.resnet").setLevel(logging.ERROR)
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return
    args = parse_args(argv)
    log.info(
        "device %s, dtype %s, width %d, sizes %s, tiles %s, backward tile %s, isolate %s",
        args.device_name,
        args.dtype,
        args.width,
        args.sizes,
        args.tiles,
        args.backward_tile or "= tile",
        args.isolate,
    )
    results, model = run_all(args)
    print_table(results, model, args)
    if args.cpu_check:
        cpu_check_summary(results, model, args.sizes[0])


if __name__ == "__main__":
    main()
