"""Expected errors at the command line: one line naming the file or option, exit status 2.

Every row below is a mistake a user makes (a missing folder or file, a checkpoint that is
no checkpoint, an out-of-range option, a slide that is not there): ``python -m torch_impl``
must answer with ``PROG COMMAND: error: ...`` naming the culprit, without a traceback, and
exit with status 2; ``-v`` or ``--debug`` adds the traceback. A genuine bug (an exception
that is not one of the expected kinds, or a ValueError from inside numpy) keeps its
traceback and is not turned into status 2.

Oracle: the rows name the file or option that is wrong; the answer must contain it. Data:
the tiny synthetic CAMELYON16 and the 2-channel-wide model of tests/model_fixtures.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import make_tiny_camelyon
from tests.model_fixtures import MPP, cpu_options, save_tiny_checkpoint, tiny_model
from torch_impl.pipeline import cli
from torch_impl.pipeline.predict import predict_file, save_prediction

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m torch_impl"

pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging for the process


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The inputs of the rows: good ones (data, a checkpoint, a saved attention map) and bad ones."""
    root = tmp_path_factory.mktemp("cli_errors")
    make_tiny_camelyon(root / "data")
    model = tiny_model()
    checkpoint = save_tiny_checkpoint(root / "model.pt", model)
    (root / "text.pt").write_text("not a checkpoint\n")
    data = checkpoint.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "empty").mkdir()
    (root / "a_file").write_text("a file where a folder should be\n")
    images = root / "data" / "testing" / "images"
    save_prediction(predict_file(model, images / "test_001.tif", MPP), root / "attention")
    return {
        "root": root,
        "data": root / "data",
        "checkpoint": checkpoint,
        "images": images,
        "attention_001": root / "attention" / "test_001.npy",
    }


def _evaluate(f, **changes) -> list[str]:
    args = {"--data": f["data"], "--checkpoint": f["checkpoint"], "--out": f["root"] / "eval", "--device": "cpu"}
    args.update(changes)
    return ["evaluate", *[str(x) for pair in args.items() for x in pair]]


#: (row id, the arguments of `python -m torch_impl` from the files, what the message must name).
ROWS = [
    ("evaluate: missing --data folder", lambda f: _evaluate(f, **{"--data": f["root"] / "no_data"}), "no_data"),
    (
        "evaluate: missing checkpoint",
        lambda f: _evaluate(f, **{"--checkpoint": f["root"] / "missing.pt"}),
        "missing.pt",
    ),
    (
        "evaluate: checkpoint is a text file",
        lambda f: _evaluate(f, **{"--checkpoint": f["root"] / "text.pt"}),
        "text.pt",
    ),
    (
        "evaluate: truncated checkpoint",
        lambda f: _evaluate(f, **{"--checkpoint": f["root"] / "truncated.pt"}),
        "truncated.pt",
    ),
    ("evaluate: --mpp 0", lambda f: _evaluate(f, **{"--mpp": 0}), "--mpp"),
    ("evaluate: --mpp -1", lambda f: _evaluate(f, **{"--mpp": -1}), "--mpp"),
    ("evaluate: --out is a file (an OSError)", lambda f: _evaluate(f, **{"--out": f["root"] / "a_file"}), "a_file"),
    (
        "evaluate: --split val without a splits CSV",
        lambda f: _evaluate(f, **{"--split": "val", "--splits": f["root"] / "no_splits.csv"}),
        "no_splits.csv",
    ),
    (
        "predict: --mpp -1",
        lambda f: [
            "predict",
            str(f["images"]),
            *cpu_options(f["checkpoint"], f["root"] / "p"),
            "--mpp",
            "-1",
        ],
        "--mpp",
    ),
    (
        "predict: an empty folder",
        lambda f: [
            "predict",
            str(f["root"] / "empty"),
            *cpu_options(f["checkpoint"], f["root"] / "p"),
        ],
        "empty",
    ),
    (
        "heatmap: missing slide",
        lambda f: [
            "heatmap",
            "--slide",
            str(f["images"] / "test_404.tif"),
            *cpu_options(f["checkpoint"], f["root"] / "h"),
        ],
        "test_404.tif",
    ),
    (
        "heatmap: another slide's attention map",
        lambda f: [
            "heatmap",
            "--slide",
            str(f["images"] / "test_003.tif"),
            "--attention",
            str(f["attention_001"]),
            "--out",
            str(f["root"] / "h"),
        ],
        "test_001",
    ),
    (
        "heatmap: --mpp 0",
        lambda f: [
            "heatmap",
            "--slide",
            str(f["images"] / "test_001.tif"),
            "--attention",
            str(f["attention_001"]),
            "--out",
            str(f["root"] / "h"),
            "--mpp",
            "0",
        ],
        "--mpp",
    ),
    (
        "train: missing data dir",
        lambda f: [
            "train",
            "--data",
            str(f["root"] / "no_train_data"),
            "--out",
            str(f["root"] / "run"),
            "--device",
            "cpu",
        ],
        "no_train_data",
    ),
    (
        "train: missing --config file",
        lambda f: ["train", "--config", str(f["root"] / "no_config.json"), "--out", str(f["root"] / "run2")],
        "no_config.json",
    ),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``python -m torch_impl ARGV``; usage errors exit through SystemExit."""
    try:
        status = cli.main(argv, prog=PROG)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("make_args, names", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_expected_error_is_one_line_naming_the_culprit(files, capsys, make_args, names):
    argv = make_args(files)
    status, err = _run(["-q", *argv], capsys)  # -q: no progress records, warnings and errors only
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 2, err
    message = next(line for line in lines if line.startswith(f"{PROG} {argv[0]}: error: "))
    assert names in message, err


@pytest.mark.parametrize("flags", [["-v"], ["--debug"], ["-q", "--debug"]])
def test_verbose_or_debug_adds_the_traceback(files, capsys, flags):
    row = next(r for r in ROWS if r[0] == "evaluate: missing checkpoint")
    argv = row[1](files)
    for placed in ([*flags, *argv], [*argv, *flags]):  # before the command or among its options
        status, err = _run(placed, capsys)
        assert status == 2
        assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err, err
        assert (
            err.strip().splitlines()[-1] == f"{PROG} evaluate: error: checkpoint not found: "
            f"{files['root'] / 'missing.pt'}"
        )


def _numpy_bug(argv, prog):
    return int(np.zeros(2) + np.zeros(3))  # ValueError from inside numpy: a bug, not a check


def _own_value_error(argv, prog):
    raise ValueError("raised by a test, outside torch_impl")


def _key_error(argv, prog):
    return {}["missing"]


@pytest.mark.parametrize(
    "runner, error", [(_numpy_bug, ValueError), (_own_value_error, ValueError), (_key_error, KeyError)]
)
def test_unexpected_errors_keep_their_traceback(monkeypatch, capsys, runner, error):
    monkeypatch.setitem(cli.COMMANDS, "evaluate", (runner, "a stand-in"))
    with pytest.raises(error):
        cli.main(["-q", "evaluate"], prog=PROG)
    assert "error:" not in capsys.readouterr().err  # not reported as an expected error


def test_usage_errors_are_one_line_with_a_pointer_to_help(files, capsys):
    cases = [
        (["heatmap", "--slide", "s.tif", "--out", "o"], "--checkpoint"),  # neither --checkpoint nor --attention
        (_evaluate(files, **{"--bootstrap": 0}), "--bootstrap"),
        (_evaluate(files, **{"--device": "tpu9"}), "--device"),
        (["make-demo-data", str(files["root"] / "md"), "--size", "256", "256", "256"], "--size"),
        (["evaluate", "--data", "d"], "--checkpoint"),  # required options missing
        (["train", "--epochs", "three"], "--epochs"),
    ]
    for argv, names in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv, prog=PROG)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert exit_.value.code == 2, err
        assert len(lines) == 2 and lines[0].startswith(f"{PROG} {argv[0]}: error: ") and names in lines[0], err
        assert lines[1] == f"('{PROG} {argv[0]} --help' lists the options)"


def test_a_real_process_exits_with_status_2_and_one_line(files):
    argv = _evaluate(files, **{"--checkpoint": files["root"] / "text.pt"})
    done = subprocess.run(
        [sys.executable, "-m", "torch_impl", "-q", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{PROG} evaluate: error: {files['root'] / 'text.pt'}: "), lines


def test_train_log_records_why_a_run_stopped(files, capsys):
    out = files["root"] / "stopped_run"
    status, err = _run(["-q", "train", "--data", str(files["root"] / "gone"), "--out", str(out)], capsys)
    assert status == 2 and "Traceback" not in err
    log = (out / "train.log").read_text()
    assert f"training stopped: CAMELYON16 root not found: {files['root'] / 'gone'}" in log
