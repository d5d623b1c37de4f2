"""Benchmark the NumPy reference: one convolution against torch, and streamed against full.

Part 1, convolution. ``reference.layers.Conv2d`` forward and backward against
``torch.nn.functional.conv2d`` forward and autograd backward on the same float64 input,
(N, C, H, W) = (1, 64, 256, 256) with a 3x3 kernel by default. Target: the reference within
5x of torch on the CPU.

Part 2, streaming. ``reference.streaming.stream_forward`` / ``stream_backward`` of the
narrow ResNet-34 trunk (``reference.nets.resnet34_trunk``) against ``net.forward`` /
``net.backward`` on the whole image, for a few tile sizes. Printed next to the measured
ratio streamed / full:

* ``plan``: ``TilePlan.overhead``, computed input pixels over image pixels;
* ``layers``: a finer prediction. Layer ``l`` computes ``A_l(tile)`` outputs per tile and
  ``A_l`` on the whole image; with ``t_l`` the time it took in the full run (measured there,
  forward and backward calls of that layer together) and ``t_rest`` the time outside the
  layers, the streamed time is predicted as
  ``sum_l t_l * sum_tiles A_l(tile) / A_l + t_rest * plan``, divided by the full time.
  Tiles start on multiples of the total stride, so every layer's tile grid is the input's
  scaled down and ``layers`` stays within a few percent of ``plan``; the two part where
  tile sides are not multiples of 32 and deep layers round their outputs up.

Target: the measured ratio within 25% of the plan's prediction.

Run from the repository root (numbers land in ``benchmarks/RESULTS.md``)::

    python benchmarks/bench_reference.py                  # both parts, defaults
    python benchmarks/bench_reference.py --skip-streaming # the convolution only
    python benchmarks/bench_reference.py --image 1536 --tiles 1280,1408 --repeat 1

``--threads`` (default 1) sets OpenBLAS's thread count for numpy and torch's intra-op
threads alike, so both sides of every ratio use the same cores. It must reach OpenBLAS
before numpy is loaded, hence the environment set-up ahead of the imports. With one thread
the default clock is the process's user CPU time (``--clock user``), which other processes
and page faults on a shared machine do not disturb; measurements are interleaved (one round
runs every measurement once) and the median of ``--repeat`` rounds is printed.
"""

from __future__ import annotations

import os
import sys


def _threads_from_argv(argv: list[str], default: int = 1) -> int:
    """The value of ``--threads N`` / ``--threads=N`` in ``argv`` (0 = libraries' default)."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


def _set_thread_env(threads: int) -> None:
    """Thread counts for OpenBLAS/OpenMP/MKL through the environment (0 = leave them)."""
    if threads > 0:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


if __name__ == "__main__":
    # OpenBLAS reads its thread count once, when numpy loads it: set it before the imports below.
    _set_thread_env(_threads_from_argv(sys.argv[1:]))

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.allocator import keep_freed_memory  # noqa: E402
from reference.layers import Conv2d, Layer, Residual, Sequential
from reference.nets import resnet34_trunk
from reference.streaming import plan_for, stream_backward, stream_forward
from reference.tiling import TilePlan

# --------------------------------------------------------------------------- timing


def user_time() -> float:
    """User-mode CPU seconds of this process, all threads (kernel work excluded)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


# "user" is the default for single-threaded CPU runs: on the shared 2-core VM these
# benchmarks were written on, one forward pass took 0.30 s of user time every time, while
# its system time (page faults) varied from 0.0 to 1.2 s and its wall time from 0.6 to 3.5 s.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "user": user_time}


def elapsed(fn: Callable[[], object], clock: str) -> Callable[[], float]:
    """A thunk that runs ``fn`` and returns the seconds it took on ``clock`` (a key of CLOCKS)."""
    now = CLOCKS[clock]

    def run() -> float:
        t0 = now()
        fn()
        return now() - t0

    return run


def round_robin(thunks: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Median seconds per thunk over ``repeat`` rounds; each round runs every thunk once.

    Interleaving the measurements, instead of repeating one before the next, spreads the
    load of other processes on a shared machine over all of them alike, so ratios between
    them stay fair. Each thunk returns the seconds it measured.
    """
    times: dict[str, list[float]] = {name: [] for name in thunks}
    for _ in range(repeat):
        for name, thunk in thunks.items():
            times[name].append(thunk())
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------- part 1: one conv


@dataclass(frozen=True)
class ConvTimes:
    """Median seconds of one convolution; ``torch_bwd`` is autograd's backward alone."""

    ref_fwd: float
    ref_bwd: float
    torch_fwd: float
    torch_bwd: float


def bench_conv(args: argparse.Namespace) -> ConvTimes:
    """Time reference vs torch conv2d (stride 1, 'same' padding, float64) on one input.

    The reference backward returns dL/dx and dL/dw from x and dL/dy (it recomputes its
    windows, not the forward); torch's backward is timed after an untimed forward.
    """
    n, c, size, kernel = args.batch, args.channels, args.conv_size, args.kernel
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(n, c, size, size))  # (N, C_in, H, W)
    fan_in = c * kernel * kernel
    w = rng.normal(size=(c, c, kernel, kernel)) / np.sqrt(fan_in)  # (C_out, C_in, k, k)
    grad_y = rng.normal(size=(n, c, size, size))  # (N, C_out, H, W), 'same' padding
    pad = kernel // 2
    now = CLOCKS[args.clock]
    conv = Conv2d(w, None, padding=pad)

    x_t, w_t, g_t = (torch.from_numpy(a) for a in (x, w, grad_y))

    def torch_forward() -> None:
        with torch.no_grad():
            torch.nn.functional.conv2d(x_t, w_t, padding=pad)

    def torch_backward_time() -> float:
        xr, wr = x_t.clone().requires_grad_(True), w_t.clone().requires_grad_(True)
        y = torch.nn.functional.conv2d(xr, wr, padding=pad)
        t0 = now()
        y.backward(g_t)
        return now() - t0

    thunks = {
        "ref_fwd": elapsed(lambda: conv.forward(x), args.clock),
        "ref_bwd": elapsed(lambda: conv.backward(x, grad_y), args.clock),
        "torch_fwd": elapsed(torch_forward, args.clock),
        "torch_bwd": torch_backward_time,
    }
    round_robin(thunks, 1)  # untimed: first calls pay for allocation and library set-up
    return ConvTimes(**round_robin(thunks, args.repeat))


def print_conv(t: ConvTimes, args: argparse.Namespace) -> None:
    print(
        f"\n## Conv2d, float64, x ({args.batch}, {args.channels}, {args.conv_size}, {args.conv_size}), "
        f"{args.channels} -> {args.channels} channels, {args.kernel}x{args.kernel}, padding {args.kernel // 2}"
    )
    print(f"{'pass':<18}{'reference s':>12}{'torch s':>10}{'ref/torch':>11}")
    rows = [
        ("forward", t.ref_fwd, t.torch_fwd),
        ("backward", t.ref_bwd, t.torch_bwd),
        ("forward+backward", t.ref_fwd + t.ref_bwd, t.torch_fwd + t.torch_bwd),
    ]
    for name, ref, tor in rows:
        print(f"{name:<18}{ref:>12.3f}{tor:>10.3f}{ref / tor:>11.2f}")
    worst = max(ref / tor for _, ref, tor in rows)
    verdict = "met" if worst <= 5.0 else "NOT met"
    print(f"target reference within 5x of torch: {verdict} (worst ratio {worst:.2f})")


# --------------------------------------------------------------------------- part 2: streaming


def _children(layer: Layer) -> list[Layer] | None:
    """The sub-layers of a container (Sequential, Residual), or None for a leaf layer."""
    if isinstance(layer, Sequential):
        return list(layer.layers)
    if isinstance(layer, Residual):
        return [layer.main] + ([] if layer.shortcut is None else [layer.shortcut])
    return None


def leaves(layer: Layer) -> list[Layer]:
    """Every leaf layer (convolution, batch norm, ReLU, pooling) under ``layer``, in order."""
    kids = _children(layer)
    if kids is None:
        return [layer]
    return [leaf for kid in kids for leaf in leaves(kid)]


def leaf_output_areas(layer: Layer, h: int, w: int) -> tuple[dict[int, int], tuple[int, int]]:
    """Output pixels of every leaf for an (h, w) input, keyed by ``id(leaf)``; and the output size.

    Uses the leaves' per-axis ``output_size`` (torch's formula), so no array is computed.
    Sequential children chain; a residual block's branches both read the block's input.
    """
    if isinstance(layer, Sequential):
        areas: dict[int, int] = {}
        for child in layer.layers:
            child_areas, (h, w) = leaf_output_areas(child, h, w)
            areas.update(child_areas)
        return areas, (h, w)
    if isinstance(layer, Residual):
        areas, out = leaf_output_areas(layer.main, h, w)
        if layer.shortcut is not None:
            areas.update(leaf_output_areas(layer.shortcut, h, w)[0])
        return areas, out
    rows, cols = layer.geometry
    h_out, w_out = rows.output_size(h), cols.output_size(w)
    return {id(layer): h_out * w_out}, (h_out, w_out)


@dataclass
class LeafStats:
    """What :func:`timed_leaves` records, keyed by ``id(leaf)``."""

    seconds: dict[int, float]  # in its forward and backward calls, on the chosen clock
    forward_calls: dict[int, int]  # how often its forward ran


@contextmanager
def timed_leaves(net: Layer, stats: LeafStats, now: Callable[[], float]) -> Iterator[LeafStats]:
    """Add the time (on the clock ``now``) of every leaf's ``forward`` and ``backward`` calls,
    and the number of forward calls, to ``stats``.

    The leaves' methods are shadowed by wrappers (instance attributes, which
    ``Layer.__call__`` and the containers look up per call) while the block runs, and
    restored afterwards, so ``net`` is unchanged.
    """

    def wrap(key: int, method: Callable, is_forward: bool) -> Callable:
        def timed(*args, **kwargs):
            if is_forward:
                stats.forward_calls[key] = stats.forward_calls.get(key, 0) + 1
            t0 = now()
            try:
                return method(*args, **kwargs)
            finally:
                stats.seconds[key] = stats.seconds.get(key, 0.0) + now() - t0

        return timed

    wrapped = leaves(net)
    for leaf in wrapped:
        leaf.forward = wrap(id(leaf), leaf.forward, True)
        leaf.backward = wrap(id(leaf), leaf.backward, False)
    try:
        yield stats
    finally:
        for leaf in wrapped:
            del leaf.forward, leaf.backward


def layer_weighted_overhead(net: Layer, plan: TilePlan, spent: dict[int, float], total: float) -> float:
    """Predicted streamed / full time from per-leaf output areas weighted by per-leaf time.

    ``sum_l t_l * (sum over tiles of A_l(tile)) / A_l(image) + t_rest * plan.overhead``, all
    over ``total``; ``t_rest`` is the full run's time outside the leaves.
    """
    full_areas, _ = leaf_output_areas(net, *plan.image_size)
    tile_areas: dict[int, int] = {}
    for tile in plan.tiles:
        areas, _ = leaf_output_areas(net, *tile.shape)
        for key, area in areas.items():
            tile_areas[key] = tile_areas.get(key, 0) + area
    in_leaves = sum(spent.values())
    predicted = sum(t * tile_areas[key] / full_areas[key] for key, t in spent.items())
    predicted += max(total - in_leaves, 0.0) * plan.overhead
    return predicted / total


@dataclass(frozen=True)
class StreamRow:
    """One tile size: plan facts, measured ratios and predictions."""

    tile: int
    tiles: int
    shapes: int
    plan: float
    fwd_layers: float
    bwd_layers: float
    fwd_time: float
    bwd_time: float
    fwd_ratio: float
    bwd_ratio: float


def bench_streaming(
    args: argparse.Namespace,
) -> tuple[float, float, list[StreamRow], float]:
    """Full and streamed forward/backward of the narrow ResNet-34 trunk.

    Returns (full forward s, full backward s, one row per tile size, forward calls per leaf
    in one full backward).
    """
    rng = np.random.default_rng(args.seed)
    net = resnet34_trunk(rng, widths=args.widths)
    x = rng.normal(size=(1, 3, args.image, args.image))  # (1, 3, H, W)
    y = net.forward(x)
    grad_y = rng.normal(size=y.shape)  # (1, C_out, ceil(H/32), ceil(W/32))

    stats_fwd, stats_bwd = LeafStats({}, {}), LeafStats({}, {})

    def full_forward() -> None:
        with timed_leaves(net, stats_fwd, CLOCKS[args.clock]):
            net.forward(x)

    def full_backward() -> None:
        with timed_leaves(net, stats_bwd, CLOCKS[args.clock]):
            net.backward(x, grad_y)

    thunks = {
        "full_fwd": elapsed(full_forward, args.clock),
        "full_bwd": elapsed(full_backward, args.clock),
    }
    for tile in args.tiles:
        thunks[f"fwd_{tile}"] = elapsed(lambda tile=tile: stream_forward(net, x, tile), args.clock)
        thunks[f"bwd_{tile}"] = elapsed(lambda tile=tile: stream_backward(net, x, grad_y, tile), args.clock)
    t = round_robin(thunks, args.repeat)

    # the leaf wrappers summed over all rounds; scale to one run
    spent_fwd = {k: v / args.repeat for k, v in stats_fwd.seconds.items()}
    spent_bwd = {k: v / args.repeat for k, v in stats_bwd.seconds.items()}
    calls = sum(stats_bwd.forward_calls.values()) / args.repeat / len(stats_bwd.forward_calls)
    rows = []
    for tile in args.tiles:
        plan = plan_for(net, x, tile)
        rows.append(
            StreamRow(
                tile=tile,
                tiles=len(plan),
                shapes=len(plan.tile_shapes),
                plan=plan.overhead,
                fwd_layers=layer_weighted_overhead(net, plan, spent_fwd, t["full_fwd"]),
                bwd_layers=layer_weighted_overhead(net, plan, spent_bwd, t["full_bwd"]),
                fwd_time=t[f"fwd_{tile}"],
                bwd_time=t[f"bwd_{tile}"],
                fwd_ratio=t[f"fwd_{tile}"] / t["full_fwd"],
                bwd_ratio=t[f"bwd_{tile}"] / t["full_bwd"],
            )
        )
    return t["full_fwd"], t["full_bwd"], rows, calls


def print_streaming(full_fwd: float, full_bwd: float, rows: list[StreamRow], calls: float, args) -> None:
    print(f"\n## Narrow ResNet-34 trunk (widths {args.widths}), float64, image 1x3x{args.image}x{args.image}")
    print(
        f"full forward {full_fwd:.2f} s, full backward {full_bwd:.2f} s "
        f"(the backward calls each leaf's forward {calls:.1f} times on average)"
    )
    print(
        f"{'tile':>6}{'tiles':>7}{'shapes':>8}{'plan':>7}{'fwd s':>8}{'fwd ratio':>11}{'fwd layers':>12}"
        f"{'bwd s':>8}{'bwd ratio':>11}{'bwd layers':>12}{'fwd/plan':>10}{'bwd/plan':>10}"
    )
    met = True
    for r in rows:
        fwd_rel, bwd_rel = r.fwd_ratio / r.plan, r.bwd_ratio / r.plan
        met &= abs(fwd_rel - 1) <= 0.25 and abs(bwd_rel - 1) <= 0.25
        print(
            f"{r.tile:>6}{r.tiles:>7}{r.shapes:>8}{r.plan:>7.2f}{r.fwd_time:>8.2f}{r.fwd_ratio:>11.2f}"
            f"{r.fwd_layers:>12.2f}{r.bwd_time:>8.2f}{r.bwd_ratio:>11.2f}{r.bwd_layers:>12.2f}"
            f"{fwd_rel:>10.2f}{bwd_rel:>10.2f}"
        )
    print(f"target measured ratio within 25% of the plan's overhead: {'met' if met else 'NOT met'}")


# --------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/torch threads (0 = library default); default 1",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed runs per measurement (median); default 3",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu", "user"],
        help="wall time, the process's CPU time (user + system) or its user CPU time; default "
        "user with --threads 1 (it ignores other processes and page-fault costs on a shared "
        "machine), else wall",
    )
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("convolution")
    g.add_argument("--batch", type=int, default=1, help="N; default 1")
    g.add_argument("--channels", type=int, default=64, help="channels in and out; default 64")
    g.add_argument("--conv-size", type=int, default=256, help="H = W; default 256")
    g.add_argument("--kernel", type=int, default=3, help="square kernel, 'same' padding; default 3")
    g.add_argument("--skip-conv", action="store_true")
    g = p.add_argument_group("streaming")
    g.add_argument("--image", type=int, default=2048, help="square image side; default 2048")
    g.add_argument(
        "--tiles",
        type=_int_list,
        default=[1280, 1600],
        help="comma-separated tile sizes; default 1280,1600 (the smallest tile that holds the halo is 930)",
    )
    g.add_argument(
        "--widths",
        type=_int_list,
        default=[4, 8, 16, 32],
        help="layer1..4 channels; default 4,8,16,32",
    )
    g.add_argument("--skip-streaming", action="store_true")
    args = p.parse_args(argv)
    args.widths = tuple(args.widths)
    if args.clock is None:
        args.clock = "user" if args.threads == 1 else "wall"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    print(
        f"# bench_reference: torch {torch.__version__}, numpy {np.__version__}, "
        f"torch threads {torch.get_num_threads()}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"{args.clock} clock, median of {args.repeat} interleaved rounds, malloc keeps freed memory: {kept}"
    )
    if not args.skip_conv:
        t = bench_conv(args)
        print_conv(t, args)
    if not args.skip_streaming:
        print_streaming(*bench_streaming(args), args)


if __name__ == "__main__":
    main()
