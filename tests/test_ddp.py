"""Data-parallel training: two processes (torchrun, Gloo, CPU) take the step of one process
that accumulates both slides.

The oracle is the single-process run: two slides, ``accumulate=2``, gradients averaged over
the two. Under ``torchrun --nproc_per_node 2`` each process trains on one of the two slides
(``accumulate=1``) and the gradients are averaged across processes before the step. Both
runs draw the same crops and augmentations (functions of seed, epoch and position in the
epoch order, not of the process), so the weights after the step must agree to rounding;
with one thread per process the arithmetic is the same and they agree exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torch_impl.pipeline.checkpoint import load_checkpoint
from torch_impl.pipeline.train import main_train
from torch_impl.slides import make_demo_data

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_two_processes_take_the_step_of_one_process_accumulating_both_slides(tmp_path):
    data = tmp_path / "data"
    make_demo_data(data, n_normal=1, n_tumor=1, n_test_normal=0, n_test_tumor=0, size=(1024, 1024), seed=5)
    # One epoch of the whole network (no head-only phase, batch-norm affines trainable too):
    # every trunk gradient is averaged. No validation slides; a large learning rate makes the
    # step visible.
    common = [
        "--data",
        str(data),
        "--epochs",
        "1",
        "--head-only-epochs",
        "0",
        "--width",
        "4",
        "--mpp",
        "1.0",
        "--tile-size",
        "1024",
        "--val-fraction",
        "0",
        "--lr",
        "0.01",
        "--no-freeze-bn-affine",
        "--quiet",
    ]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "torch_impl",
            "train",
            *common,
            "--out",
            str(tmp_path / "ddp"),
            "--accumulate",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]

    assert main_train([*common, "--out", str(tmp_path / "single"), "--accumulate", "2"]) == 0

    a = load_checkpoint(tmp_path / "ddp" / "last.pt")
    b = load_checkpoint(tmp_path / "single" / "last.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["history"][0]["train_slides"] == b["history"][0]["train_slides"] == 2
    steps = {int(s["step"]) for s in b["optimizer"]["state"].values()}
    assert steps == {1} and {int(s["step"]) for s in a["optimizer"]["state"].values()} == {1}
    assert a["model"].keys() == b["model"].keys()
    worst = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    assert worst <= 1e-6, f"DDP and accumulation differ by up to {worst}"
    # every parameter, the trunk's included, took the step (its gradient went through the reduction)
    n_params = sum(len(g["params"]) for g in a["optimizer"]["param_groups"])
    assert len(a["optimizer"]["state"]) == n_params > 100
