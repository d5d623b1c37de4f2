"""Reliability: no silent wrong results, no lost runs, clean errors.

    the table      bad input -> exception type + the fragments its message must (and must not) hold
    the lock       a second run on a folder in use stops at once, naming the owner; a killed
                   owner's lock and temporary files do not block or litter the next run
    resume         a change of the network is refused before anything is written; a change
                   of the continuation is accepted, the previous config.json kept
    full disk      "no space left on device while writing <file>; the previous checkpoint is
                   intact", the temporary file gone, the previous file untouched
    test slides    a slide the reference CSV lists but the disk lacks is an error, or under
                   skip_bad_slides a warning naming it and a count in metrics.json
    stored paths   a checkpoint's splits_csv outside its run folder is never read

Oracles: the files themselves (bytes before and after), a second process holding the lock
(``subprocess``), ``kill -9`` for a dead owner, a file object that runs out of room the way
a full disk does (the real zip writer's error, raised while handling ``OSError(ENOSPC)``).
Training runs: the tiny synthetic data set of tests/test_train.py (1024 px slides at
0.25 um/px read at 1 um/px), a ResNet-34 of width 4 or 8, one or two epochs, one thread.
"""

from __future__ import annotations

import builtins
import errno
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.model_fixtures import tiny_train_config
from torch_impl.models.resnet import load_weights, resnet34
from torch_impl.pipeline import runtime
from torch_impl.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from torch_impl.pipeline.config import TrainConfig, load_config, smallest_tile_size, validate_config
from torch_impl.pipeline.evaluate import evaluate_run
from torch_impl.pipeline.heatmap import main_heatmap
from torch_impl.pipeline.predict import open_slide
from torch_impl.pipeline.run_lock import LOCK_FILE, RunLock, RunLockedError, read_owner
from torch_impl.pipeline.runtime import BadSlideError, DiskFullError, atomic_write, remove_stale_temp_files
from torch_impl.pipeline.train import TrainingError, train
from torch_impl.slides import NoTissueError, discover, make_demo_data, tissue_mask
from torch_impl.slides.synthetic import write_pyramid_tiff

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ============================================================================ fixtures
@dataclass
class World:
    """The module's files: data sets, a finished run, odd slides and files."""

    data: Path  # full CAMELYON16 layout: 3 + 3 training, 2 + 2 test slides, reference.csv
    train_data: Path  # the same slides without testing/reference.csv (training needs none)
    run: Path  # a finished 1-epoch run of width 8 on train_data
    config: TrainConfig  # its configuration
    gray: Path  # a grayscale slide with a dark object on it
    blank: Path  # a slide of blank glass
    text: Path  # a text file
    tmp: Path

    @property
    def checkpoint(self) -> Path:
        return self.run / "best.pt"


tiny_config = functools.partial(tiny_train_config, width=8)  # (data, out, **changes): 1 epoch, width 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("reliability")
    data = tmp / "data"
    make_demo_data(data, n_normal=3, n_tumor=3, n_test_normal=2, n_test_tumor=2, size=(1024, 1024), seed=3)
    train_data = tmp / "train_data"
    shutil.copytree(data, train_data)
    (train_data / "testing" / "reference.csv").unlink()
    config = tiny_config(train_data, tmp / "run")
    train(config)

    rng = np.random.default_rng(0)
    gray = np.full((512, 512), 235, np.uint8)
    yy, xx = np.mgrid[:512, :512]
    gray[(yy - 256) ** 2 + (xx - 256) ** 2 < 150**2] = 110  # a dark round "section", no colour
    gray = np.clip(gray + rng.integers(-6, 7, gray.shape), 0, 255).astype(np.uint8)
    write_pyramid_tiff(tmp / "gray.tif", np.repeat(gray[..., None], 3, axis=2), mpp=0.25)
    write_pyramid_tiff(tmp / "blank.tif", np.full((512, 512, 3), 242, np.uint8), mpp=0.25)
    (tmp / "notes.txt").write_text("these are not weights\n")
    return World(data, train_data, tmp / "run", config, tmp / "gray.tif", tmp / "blank.tif", tmp / "notes.txt", tmp)


def copy_run(world: World, dest: Path) -> TrainConfig:
    """A copy of the finished run in ``dest``; returns its config (out_dir = dest)."""
    shutil.copytree(world.run, dest)
    config = replace(world.config, out_dir=str(dest))
    (dest / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return config


# ============================================================================ the table
@dataclass(frozen=True)
class Case:
    """One bad input: ``make(world, tmp_path)`` returns the call that must fail."""

    make: Callable[[World, Path], Callable[[], object]]
    error: type[BaseException]
    fragments: tuple[str, ...]  # each must appear in the message ({tmp}: the test's tmp_path, {w}: world.tmp)
    absent: tuple[str, ...] = ()  # none may appear


def _config(**changes) -> Callable[[World, Path], Callable[[], object]]:
    model = changes.pop("model", {})

    def make(world: World, tmp: Path) -> Callable[[], object]:
        c = tiny_config(world.train_data, tmp / "run", **changes)
        return lambda: validate_config(replace(c, model=replace(c.model, **model)))

    return make


def _evaluate(**kwargs) -> Callable[[World, Path], Callable[[], object]]:
    return lambda world, tmp: (
        lambda: evaluate_run(world.checkpoint, world.data, tmp / "eval", device="cpu", n_bootstrap=20, **kwargs)
    )


def _train_with_weights(kind: str) -> Callable[[World, Path], Callable[[], object]]:
    def make(world: World, tmp: Path) -> Callable[[], object]:
        weights = world.checkpoint if kind == "checkpoint" else world.text
        return lambda: train(
            tiny_config(
                world.train_data,
                tmp / "run",
                model=replace(tiny_config(world.train_data, tmp).model, weights=str(weights)),
            )
        )

    return make


def _missing_test_slide(world: World, tmp: Path) -> Callable[[], object]:
    data = tmp / "data"
    shutil.copytree(world.data, data)
    (data / "testing" / "images" / "test_002.tif").unlink()
    return lambda: evaluate_run(world.checkpoint, data, tmp / "eval", device="cpu", n_bootstrap=20)


def _crafted_splits_csv(world: World, tmp: Path) -> Callable[[], object]:
    secret = tmp / "secret.txt"
    secret.write_text("TOP-SECRET-FIRST-LINE\nmore\n")
    crafted = tmp / "crafted" / "best.pt"
    crafted.parent.mkdir()
    state = load_checkpoint(world.checkpoint)
    state["train_config"]["splits_csv"] = str(secret)
    torch.save(state, crafted)
    return lambda: evaluate_run(crafted, world.train_data, tmp / "eval", split="val", device="cpu", n_bootstrap=20)


def _symlinked_splits_csv(world: World, tmp: Path) -> Callable[[], object]:
    secret = tmp / "secret.txt"
    secret.write_text("TOP-SECRET-FIRST-LINE\n")
    run = tmp / "crafted"
    run.mkdir()
    shutil.copy(world.checkpoint, run / "best.pt")
    (run / "splits.csv").symlink_to(secret)  # the default name, but pointing out of the run folder
    state = load_checkpoint(run / "best.pt")
    state["train_config"]["splits_csv"] = str(run / "splits.csv")
    torch.save(state, run / "best.pt")
    return lambda: evaluate_run(run / "best.pt", world.train_data, tmp / "eval", split="val", device="cpu")


def _heatmap(slide: str) -> Callable[[World, Path], Callable[[], object]]:
    return lambda world, tmp: (
        lambda: main_heatmap(
            [
                "--slide",
                str(getattr(world, slide)),
                "--checkpoint",
                str(world.checkpoint),
                "--out",
                str(tmp / "h"),
                "--device",
                "cpu",
                "--amp",
                "off",
            ]
        )
    )


CASES: dict[str, Case] = {
    # configuration: checked at the start, each problem naming the field and its option
    "mpp inf": Case(
        _config(mpp=float("inf")), ValueError, ("mpp (--mpp) must be a finite number", "inf"), ("max_size",)
    ),
    "mpp nan": Case(_config(mpp=float("nan")), ValueError, ("mpp (--mpp) must be a finite number",)),
    "mpp 0": Case(_config(mpp=0.0), ValueError, ("mpp must be > 0", "--mpp")),
    "lr inf": Case(_config(lr=float("inf")), ValueError, ("lr (--lr) must be a finite number",)),
    "tile size 100": Case(
        _config(model={"tile_size": 100}), ValueError, ("model.tile_size (--tile-size) 100", "use 930 pixels or more")
    ),
    "backward tile size 500": Case(
        _config(model={"backward_tile_size": 500}),
        ValueError,
        ("model.backward_tile_size (--backward-tile-size) 500", "930"),
    ),
    "phase-2 tile size 256": Case(
        _config(phase2_tile_size=256), ValueError, ("phase2_tile_size (--phase2-tile-size) 256", "930")
    ),
    # evaluation: a bad --mpp is the option's fault, not the first slide's
    "evaluate mpp 0": Case(
        _evaluate(mpp=0.0), ValueError, ("--mpp must be a finite number", "got 0.0"), ("test_001", "slide")
    ),
    "evaluate mpp inf": Case(_evaluate(mpp=float("inf")), ValueError, ("--mpp", "got inf"), ("max_size",)),
    "evaluate mpp -1": Case(_evaluate(mpp=-1.0), ValueError, ("--mpp", "got -1.0")),
    # weights: the path named, and what the file is
    "weights are text": Case(
        lambda w, t: lambda: load_weights(resnet34(width=8), w.text),
        ValueError,
        ("{w}/notes.txt", "not a torch weight file"),
    ),
    "weights are a training checkpoint": Case(
        lambda w, t: lambda: load_weights(resnet34(width=8), w.checkpoint),
        ValueError,
        ("{w}/run/best.pt", "training checkpoint", "--resume"),
    ),
    "train --weights training checkpoint": Case(
        _train_with_weights("checkpoint"), ValueError, ("{w}/run/best.pt", "training checkpoint")
    ),
    "train --weights text": Case(_train_with_weights("text"), ValueError, ("{w}/notes.txt", "not a torch weight")),
    # slides: named, and why
    "grayscale slide": Case(
        lambda w, t: lambda: open_slide(w.gray, 1.0),
        BadSlideError,
        ("gray.tif", "no colour saturation", "grayscale"),
        ("tissue mask is empty",),
    ),
    "grayscale thumbnail": Case(
        lambda w, t: (
            lambda: tissue_mask(np.repeat(np.linspace(60, 250, 64 * 64).reshape(64, 64, 1), 3, axis=2).astype(np.uint8))
        ),
        NoTissueError,
        ("no colour saturation",),
    ),
    "heatmap of a tissue-free slide": Case(_heatmap("blank"), BadSlideError, ("blank.tif", "slide blank")),
    "heatmap of a grayscale slide": Case(_heatmap("gray"), BadSlideError, ("gray.tif", "no colour saturation")),
    # test slides listed but absent
    "test slide listed but missing": Case(
        _missing_test_slide, BadSlideError, ("test_002", "--skip-bad-slides", "1 test slide(s)")
    ),
    # paths stored in a checkpoint
    "stored splits_csv outside the run": Case(
        _crafted_splits_csv,
        CheckpointError,
        ("{tmp}/secret.txt", "outside its run folder", "--splits FILE"),
        ("TOP-SECRET",),
    ),
    "stored splits_csv symlinked out": Case(
        _symlinked_splits_csv, CheckpointError, ("outside its run folder",), ("TOP-SECRET",)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_a_clear_error(name, world, tmp_path):
    case = CASES[name]
    call = case.make(world, tmp_path)
    with pytest.raises(case.error) as info:
        call()
    message = str(info.value)
    for fragment in case.fragments:
        fragment = fragment.replace("{tmp}", str(tmp_path)).replace("{w}", str(world.tmp))
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for fragment in case.absent:
        assert fragment not in message, f"{fragment!r} in {message!r}"


def test_smallest_tile_is_the_planners():
    """930 for ResNet-34 (tutorial 04), and the planner really refuses 929 on a large axis."""
    from reference.tiling import plan_axis
    from torch_impl.models.resnet import freeze_batchnorm, trunk
    from torch_impl.streaming import module_geometry

    assert smallest_tile_size() == 930
    rows, _ = module_geometry(freeze_batchnorm(trunk(resnet34(width=2))))
    plan_axis(rows, 5000, 930)
    with pytest.raises(ValueError, match="at least 930"):
        plan_axis(rows, 5000, 929)


def test_blank_glass_is_still_an_empty_mask_not_an_error():
    assert not tissue_mask(np.full((50, 50, 3), 240, np.uint8)).any()


# ============================================================================ training needs no test labels
def test_training_needs_no_reference_csv(world):
    assert list((world.train_data / "testing" / "images").glob("test_*.tif"))  # test slides, no labels
    with pytest.raises(FileNotFoundError, match="reference CSV"):
        discover(world.train_data)  # the whole data set needs them...
    assert load_checkpoint(world.run / "last.pt")["epoch"] == 1  # ...training did not
    # nor does evaluating the run's own validation slides
    metrics = evaluate_run(
        world.checkpoint, world.train_data, world.tmp / "val_eval", split="val", device="cpu", n_bootstrap=20
    )
    assert metrics["n_slides"] == 2


# ============================================================================ missing test slides
def test_missing_listed_test_slides_are_skipped_with_a_warning_and_counted(world, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(world.data, data)
    (data / "testing" / "images" / "test_002.tif").unlink()
    caplog.set_level(logging.WARNING)
    metrics = evaluate_run(
        world.checkpoint, data, tmp_path / "eval", device="cpu", skip_bad_slides=True, n_bootstrap=20
    )
    assert metrics["n_slides"] == 3 and metrics["n_missing"] == 1 and metrics["n_skipped"] == 1
    assert [s["slide_id"] for s in metrics["skipped"]] == ["test_002"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_missing"] == 1
    assert "test_002" in caplog.text and "skipping" in caplog.text


# ============================================================================ the run lock
_HOLDER = """
import json, pathlib, sys, time
from torch_impl.pipeline.config import config_from_dict
from torch_impl.pipeline.train import train
config = config_from_dict(json.loads(sys.argv[1]))
flag = pathlib.Path(sys.argv[2])
def hold(event):  # the first slide is trained: announce, then hold the run folder until killed
    flag.write_text(json.dumps(event))
    time.sleep(600)
train(config, on_slide=hold)
"""


def _python_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_second_run_on_a_folder_in_use_stops_and_a_killed_owner_does_not_block(world, tmp_path, caplog):
    out = tmp_path / "run"
    config = tiny_config(world.train_data, out)
    flag = tmp_path / "started"
    with open(tmp_path / "holder.log", "w") as log:
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, json.dumps(config.to_dict()), str(flag)],
            cwd=ROOT,
            env=_python_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert holder.poll() is None, (tmp_path / "holder.log").read_text()
            assert time.monotonic() < deadline, "the first run never reached its first slide"
            time.sleep(0.2)
        config_bytes = (out / "config.json").read_bytes()
        splits_bytes = (out / "splits.csv").read_bytes()

        with pytest.raises(RunLockedError) as info:  # a second run, same folder
            train(config)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
        assert str(out) in message and "another --out" in message
        with pytest.raises(RunLockedError):  # --resume too
            train(config, resume=True)
        assert (out / "config.json").read_bytes() == config_bytes  # nothing of the owner's touched
        assert (out / "splits.csv").read_bytes() == splits_bytes
        assert read_owner(out)["pid"] == holder.pid  # the owner's lock stays
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()

    # kill -9 left its lock file and (say) a checkpoint write half done
    assert read_owner(out)["pid"] == holder.pid
    dead = [
        out / f".last.pt.{holder.pid}.0badc0de.tmp",
        out / f".splits.csv.{holder.pid}.tmp",
        out / f".metrics.csv.{holder.pid}.12345678.tmp",
    ]
    for p in dead:
        p.touch()
    live = out / f".best.pt.{os.getpid()}.89abcdef.tmp"  # a live process's write in progress: kept
    live.touch()
    caplog.set_level(logging.INFO)
    result = train(config)
    assert result["epochs"] == 1
    assert "taking over the lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert not any(p.exists() for p in dead)
    assert live.exists()
    assert not (out / LOCK_FILE).exists()  # released on a normal exit


def test_lock_is_released_on_an_exception_and_is_reentrant(world, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(world.train_data, out)

    class Stop(Exception):
        pass

    def stop(event):
        assert read_owner(out)["pid"] == os.getpid()
        raise Stop

    with pytest.raises(Stop):
        train(config, on_slide=stop)
    assert not (out / LOCK_FILE).exists()
    with RunLock(out) as outer:  # a command may hold it around train(), which takes it again
        with RunLock(out):
            assert read_owner(out)["pid"] == os.getpid()
        assert (out / LOCK_FILE).exists() and outer.held
    assert not (out / LOCK_FILE).exists()


def _without_flock(monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)


def test_lock_without_flock_detects_live_dead_and_foreign_owners(tmp_path, monkeypatch, caplog):
    _without_flock(monkeypatch)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        lock_file = tmp_path / LOCK_FILE
        owner = {"pid": sleeper.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00Z"}
        lock_file.write_text(json.dumps(owner))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid} on host"):
            RunLock(tmp_path).acquire()

        lock_file.write_text(json.dumps({**owner, "host": "another-host"}))
        with pytest.raises(RunLockedError, match=f"delete {lock_file}"):
            RunLock(tmp_path).acquire()

        lock_file.write_text(json.dumps({**owner, "pid": gone.pid}))
        caplog.set_level(logging.WARNING)
        with RunLock(tmp_path):
            assert read_owner(tmp_path)["pid"] == os.getpid()
            with pytest.raises(RunLockedError):  # held by this process: another process would be refused
                subprocess_lock_attempt(tmp_path)
        assert f"pid {gone.pid}" in caplog.text and "stale" in caplog.text
        assert not lock_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def subprocess_lock_attempt(folder: Path) -> None:
    """Try the lock from a fresh process (flock-less mode there too); re-raise its refusal here."""
    code = (
        "import errno, fcntl, sys\n"
        "def no(fd, op): raise OSError(errno.ENOLCK, 'No locks available')\n"
        "fcntl.flock = no\n"
        "from torch_impl.pipeline.run_lock import RunLock, RunLockedError\n"
        "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunLockedError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        cwd=ROOT,
        env=_python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 3:
        raise RunLockedError(done.stdout.strip())
    assert done.returncode == 0, done.stderr


# ============================================================================ resume
def test_resume_refuses_a_new_architecture_before_writing_anything(world, tmp_path, caplog):
    out = tmp_path / "run"
    config = copy_run(world, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    narrow = replace(config, epochs=2, model=replace(config.model, width=4, pool="max"))
    with pytest.raises(TrainingError) as info:
        train(narrow, resume=True)
    message = str(info.value)
    assert "model.width (--width) 8 -> 4" in message and "model.pool (--pool) None -> 'max'" in message
    assert "Nothing was written" in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # config.json included

    # the command line: refused with both widths named, config.json unchanged ...
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch_impl", "-q", "train", "--resume", "--out", str(out), *args],
            cwd=ROOT,
            env=_python_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    refused = cli("--width", "4")
    assert refused.returncode != 0
    assert "model.width (--width) 8 -> 4" in refused.stderr, refused.stderr
    assert (out / "config.json").read_bytes() == before["config.json"]
    # ... and a plain --resume still works afterwards (the one epoch is done: nothing to do)
    plain = cli()
    assert plain.returncode == 0, plain.stderr

    # a change of the continuation only: accepted with the warning, the previous config kept
    caplog.set_level(logging.WARNING)
    result = train(replace(config, epochs=2, lr=1e-2), resume=True)
    assert result["epochs"] == 2
    assert "no longer an exact continuation" in caplog.text and "lr: 0.003 -> 0.01" in caplog.text
    kept = sorted(out.glob("config.previous-*.json"))
    assert len(kept) == 1 and kept[0].read_bytes() == before["config.json"]
    assert load_config(out / "config.json") == replace(config, epochs=2, lr=1e-2)


# ============================================================================ full disk, killed writers
class SmallDisk:
    """A file with ``room`` bytes left: a write past it fails like a full disk (ENOSPC)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room, self.used = f, room, 0

    def write(self, data) -> int:
        if self.used + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.used += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def fill_disk(monkeypatch, room: int, only: str = "") -> None:
    """atomic_write's files whose name contains ``only`` get ``room`` bytes."""

    def small_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return SmallDisk(f, room) if only in Path(path).name else f

    monkeypatch.setattr(runtime, "open", small_open, raising=False)


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model={"w": torch.arange(4.0)}, model_config={}, epoch=1)
    before = path.read_bytes()
    fill_disk(monkeypatch, room=1000)
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(path, model={"w": torch.zeros(100_000)}, model_config={}, epoch=2)
    assert str(info.value).startswith(
        f"no space left on device while writing {path}; the previous checkpoint is intact"
    )
    assert "unexpected pos" in str(info.value.__cause__)  # what torch's zip writer said
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

    with pytest.raises(DiskFullError, match="while writing .*new.json; no file was written"):
        with atomic_write(tmp_path / "new.json") as f:
            f.write("x" * 100_000)
            f.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_full_disk_during_training_stops_with_the_previous_checkpoint_intact(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = tiny_config(world.train_data, out, epochs=2)
    saved = {}

    def on_slide(event):
        if event["epoch"] == 1 and not saved:  # epoch 1's checkpoint is on disk: now the disk fills
            saved["last"] = (out / "last.pt").read_bytes()
            fill_disk(monkeypatch, room=4096, only=".last.pt.")

    with pytest.raises(DiskFullError, match=f"while writing {out / 'last.pt'}; the previous checkpoint is intact"):
        train(config, on_slide=on_slide)
    assert (out / "last.pt").read_bytes() == saved["last"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / LOCK_FILE).exists()


def test_stale_temp_files_are_those_of_dead_writers(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = [tmp_path / f".last.pt.{gone.pid}.0a1b2c3d.tmp", tmp_path / f".splits.csv.{gone.pid}.tmp"]
    kept = [
        tmp_path / f".last.pt.{os.getpid()}.0a1b2c3d.tmp",
        tmp_path / "last.pt",
        tmp_path / ".last.pt.tmp",
        tmp_path / f"notes.{gone.pid}.tmp",
    ]
    for p in dead + kept:
        p.touch()
    assert remove_stale_temp_files(tmp_path, "splits.csv") == [dead[1]]
    assert remove_stale_temp_files(tmp_path) == [dead[0]]
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    # a checkpoint save clears the leftovers of its own file
    dead[0].touch()
    save_checkpoint(tmp_path / "last.pt", model={}, model_config={})
    assert not dead[0].exists() and kept[0].exists()
