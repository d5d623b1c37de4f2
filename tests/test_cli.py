"""The command line: options generated from the config dataclasses, one logging set-up, the demo's summary.

Oracles: the dataclasses themselves (every field, its type, its default, its source
comment), configurations built directly in Python (what an option line must give), the
README's demo block (the demo's summary format), and files read back (train.log, slides).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from torch_impl.models.streaming_clam import ModelConfig
from torch_impl.pipeline import cli, logs
from torch_impl.pipeline.config import CHOICES, TrainConfig, save_config
from torch_impl.pipeline.demo import (
    SUMMARY_FORMAT,
    DemoOptions,
    MakeDemoDataOptions,
    format_summary,
    main_make_demo_data,
    run_demo,
)
from torch_impl.pipeline.evaluate import EvaluateOptions, evaluate_run
from torch_impl.pipeline.heatmap import HeatmapOptions
from torch_impl.pipeline.options import (
    OptionParser,
    add_dataclass_options,
    apply_options,
    build_options,
    field_docs,
    given_options,
    option,
)
from torch_impl.pipeline.predict import (
    BatchInferenceOptions,
    ComputeOptions,
    InferenceOptions,
    PredictOptions,
    predict_run,
)
from torch_impl.pipeline.train import _parser, config_from_args, main_train
from torch_impl.slides import Slide, discover, make_demo_data

REPO = Path(__file__).resolve().parents[1]

#: Every option of `train` before the options were generated (README, tests and users use them).
OLD_TRAIN_OPTIONS = (
    "--data --out --config --resume --epochs --head-only-epochs --lr --trunk-lr-factor --lr-schedule "
    "--weight-decay --accumulate --grad-clip --seed --mpp --max-size --val-fraction --splits-csv --exclude "
    "--sampler --max-slides-per-epoch --skip-bad-slides --width --weights --tile-size --backward-tile-size "
    "--phase2-tile-size --pool --pool-size --flip --no-flip --rot90 --no-rot90 --hue-shift --saturation-scale "
    "--value-scale --device --amp --checkpoint-every -q --quiet -v --verbose"
).split()


pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging for the process


def parse(*argv: str) -> TrainConfig:
    return config_from_args(_parser().parse_args(list(argv)))


def train_fields() -> list[tuple[str, dataclasses.Field]]:
    """(path, field) of every TrainConfig field and of every ModelConfig field ("model.NAME")."""
    out = [(f.name, f) for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    return out + [(f"model.{f.name}", f) for f in dataclasses.fields(ModelConfig)]


# ============================================================================ generated options
def test_every_config_field_has_an_option_with_help_and_default():
    parser = _parser()
    by_dest = {a.dest: a for a in parser._actions}
    renamed = {"data_dir": "--data", "out_dir": "--out"}
    for path, f in train_fields():
        action = by_dest.get(path)
        assert action is not None, f"no option for {path}"
        flag = renamed.get(path, "--" + f.name.replace("_", "-"))
        assert flag in action.option_strings, (path, action.option_strings)
        comment = re.sub(r" \(default: .*\)$", "", action.help)
        assert comment.strip(), f"{path}: empty help"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default == "":
            assert "required" in action.help, path
        else:
            assert "(default: " in action.help, path
    text = parser.format_help()
    for shown in (
        "--lr X",
        "Adam learning rate of the head (default: 0.0002)",
        "(default: 65536)",
        "(default: test_049)",
        "(default: --flip)",
        "(default: --no-skip-bad-slides)",
        "(default: none)",
        "--pool {max,avg,none}",
        "(default: max)",
    ):
        assert shown in " ".join(text.split()), shown


def test_every_option_of_before_still_exists():
    known = _parser()._option_string_actions
    assert [o for o in OLD_TRAIN_OPTIONS if o not in known] == []


def test_help_is_the_field_comment_in_the_source():
    docs = field_docs(TrainConfig)
    source = (REPO / "torch_impl" / "pipeline" / "config.py").read_text()
    for name in ("lr", "exclude", "device"):
        section, comment = docs[name]
        line = next(x for x in source.splitlines() if x.strip().startswith(f"{name}:"))
        assert line.split("  # ", 1)[1] == comment
    assert docs["lr"][0] == "optimisation" and docs["flip"][0].startswith("augmentation")
    assert set(field_docs(ModelConfig)) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_types_choices_and_none():
    config = parse(
        "--epochs",
        "3",
        "--lr",
        "1e-3",
        "--grad-clip",
        "2",
        "--amp",
        "bf16",
        "--sampler",
        "shuffle",
        "--exclude",
        "a",
        "b",
        "--pool",
        "avg",
        "--head",
        "mb",
        "--weights",
        "none",
        "--backward-tile-size",
        "512",
        "--splits-csv",
        "s.csv",
        "--dropout",
        "0.25",
    )
    expected = TrainConfig(
        epochs=3,
        lr=1e-3,
        grad_clip=2.0,
        amp="bf16",
        sampler="shuffle",
        exclude=["a", "b"],
        splits_csv="s.csv",
        model=ModelConfig(pool="avg", head="mb", weights=None, backward_tile_size=512, dropout=0.25),
    )
    assert config == expected
    assert type(config.epochs) is int and type(config.grad_clip) is float
    assert parse("--grad-clip", "none", "--pool", "none", "--phase2-tile-size", "None") == TrainConfig(
        grad_clip=None, phase2_tile_size=None, model=ModelConfig(pool=None)
    )
    assert parse("--exclude").exclude == []  # leave no slide out
    for bad in (
        ["--lr", "fast"],
        ["--epochs", "2.5"],
        ["--sampler", "random"],
        ["--pool", "min"],
        ["--amp", "fp16"],
        ["--head", "xb"],
        ["--epoch", "3x"],
    ):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)
    for path, choices in CHOICES.items():
        action = next(a for a in _parser()._actions if a.dest == path)
        assert tuple(action.choices) == choices


def test_bool_options():
    assert parse() == TrainConfig()
    config = parse("--no-flip", "--skip-bad-slides", "--no-calibrate-bn", "--channels-last", "--instance-loss")
    assert config == TrainConfig(
        flip=False, skip_bad_slides=True, calibrate_bn=False, model=ModelConfig(channels_last=True, instance_loss=True)
    )
    assert parse("--flip", "--no-skip-bad-slides") == TrainConfig()
    assert parse("--no-progress").progress is False and parse("-q").progress is False


def test_cli_overrides_config_file(tmp_path):  # moved from test_train.py
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 7, "lr": 0.5, "model": {"width": 4, "tile_size": 640}}))
    args = _parser().parse_args(
        [
            "--config",
            str(path),
            "--data",
            "D",
            "--out",
            "O",
            "--lr",
            "0.25",
            "--width",
            "2",
            "--no-flip",
            "--pool",
            "none",
            "--quiet",
        ]
    )
    config = config_from_args(args)
    assert (config.epochs, config.lr, config.data_dir, config.out_dir) == (7, 0.25, "D", "O")
    assert (config.model.width, config.model.tile_size, config.model.pool) == (2, 640, None)
    assert config.flip is False and config.rot90 is True and config.progress is False


def test_precedence_defaults_then_file_then_options(tmp_path):
    # the file sets values that differ from the defaults, booleans and None included
    stored = TrainConfig(
        data_dir="D",
        out_dir=str(tmp_path / "run"),
        epochs=7,
        flip=False,
        grad_clip=1.5,
        exclude=[],
        model=ModelConfig(width=4, pool=None),
    )
    save_config(stored, tmp_path / "file")
    from_file = parse("--config", str(tmp_path / "file" / "config.json"))
    assert from_file == stored  # options not given leave the file's values alone
    assert parse(
        "--config", str(tmp_path / "file" / "config.json"), "--flip", "--pool", "max", "--epochs", "9"
    ) == dataclasses.replace(stored, flip=True, epochs=9, model=ModelConfig(width=4, pool="max"))
    # --resume reads RUN/config.json when no --config is given
    save_config(stored, tmp_path / "run")
    assert parse("--resume", "--out", str(tmp_path / "run"), "--epochs", "12") == dataclasses.replace(stored, epochs=12)
    assert parse("--out", str(tmp_path / "run")) == TrainConfig(out_dir=str(tmp_path / "run"))  # no --resume


@dataclass
class Example:
    """A dataclass with every option kind (its comments are the test's help texts)."""

    name: str = ""  # who; required
    # --- numbers ---
    count: int = 3  # how many
    size: tuple[int, int] = (2, 5)  # height and width
    sizes: tuple[float, ...] = (0.5,)  # any number of scales
    mode: Literal["a", "b"] = "a"  # one of two
    limit: float | None = None  # at most this; none = no limit
    on: bool = True  # switch
    tags: list[str] = field(default_factory=list)  # labels


def test_generated_parser_for_every_annotation_kind():
    parser = argparse.ArgumentParser(prog="example")
    paths = add_dataclass_options(parser, Example, title="general")
    assert paths == [f.name for f in dataclasses.fields(Example)]
    args = parser.parse_args(
        ["--size", "4", "6", "--sizes", "1", "2.5", "--mode", "b", "--limit", "none", "--no-on", "--tags", "x", "y"]
    )
    assert apply_options(Example(), given_options(args, paths)) == Example(
        size=(4, 6), sizes=(1.0, 2.5), mode="b", limit=None, on=False, tags=["x", "y"]
    )
    assert apply_options(Example(limit=2.0), given_options(parser.parse_args([]), paths)) == Example(limit=2.0)
    help_text = " ".join(parser.format_help().split())
    for shown in (
        "numbers:",
        "--size N N",
        "height and width (default: 2 5)",
        "--mode {a,b}",
        "at most this; none = no limit (default: none)",
        "switch (default: --on)",
        "labels (default: none given)",
        "who; required",
        "--sizes X [X ...]",
    ):
        assert shown in help_text, shown
    for bad in (["--size", "4"], ["--mode", "c"], ["--count", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)

    @dataclass
    class Unsupported:
        both: int | str = 1  # a union

    with pytest.raises(TypeError, match="unions other than X | None"):
        add_dataclass_options(argparse.ArgumentParser(), Unsupported, title="x")


# ============================================================================ the top-level command
def test_program_name_in_usage(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/some/venv/bin/streamingclam", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: streamingclam ")
    monkeypatch.setattr(sys, "argv", ["/some/venv/bin/streamingclam", "train", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().out.startswith("usage: streamingclam train ")
    result = subprocess.run(
        [sys.executable, "-m", "torch_impl", "demo", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m torch_impl demo "), result.stderr


def test_cli_help_smoke():  # moved from test_train.py
    result = subprocess.run(
        [sys.executable, "-m", "torch_impl", "train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout and "--skip-bad-slides" in result.stdout


def test_cli_reports_invalid_configuration(capsys):  # moved from test_train.py
    with pytest.raises(ValueError, match="epochs must be >= 1"):  # the command raises; the CLI reports
        main_train(["--epochs", "0"])
    assert cli.main(["train", "--epochs", "0"], prog="streamingclam") == 2
    err = capsys.readouterr().err
    assert err.startswith("streamingclam train: error: invalid training configuration:")
    assert "epochs must be >= 1" in err and "data_dir is required" in err and "Traceback" not in err


def test_top_level_help_documents_exit_statuses_and_debug(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"], prog="streamingclam")
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--debug" in text
    shown = text.split("exit status:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in shown if line.strip()] == ["0", "1", "2"]
    for code, meaning in cli.EXIT_STATUS.items():
        assert f"  {code}  {meaning}" in text


def _console_level() -> int:
    return logs._console.level


@pytest.mark.parametrize(
    "flag, verbosity, level",
    [
        ("-q", logs.QUIET, logging.WARNING),
        ("--quiet", logs.QUIET, logging.WARNING),
        ("-v", logs.VERBOSE, logging.DEBUG),
        (None, logs.NORMAL, logging.INFO),
    ],
)
def test_quiet_and_verbose_mean_the_same_before_and_after_the_command(monkeypatch, flag, verbosity, level):
    seen = []

    def command(argv, prog):
        seen.append((list(argv), logs.verbosity(), _console_level()))
        return 0

    monkeypatch.setitem(cli.COMMANDS, "train", (command, "a stand-in"))
    flags = [flag] if flag else []
    assert cli.main([*flags, "train", "--epochs", "2"]) == 0
    assert cli.main(["train", "--epochs", "2", *flags]) == 0
    # the command gets its options without -q/-v and finds logging set up accordingly
    assert seen == [(["--epochs", "2"], verbosity, level)] * 2
    assert sum(h is logs._console for h in logging.getLogger().handlers) == 1  # one console handler
    with pytest.raises(SystemExit):
        cli.main(["-q", "train", "-v"])


def test_setup_logging_replaces_its_handler_and_quiets_other_ranks(monkeypatch):
    root = logging.getLogger()
    before = len(root.handlers)
    logs.setup_logging(logs.VERBOSE)
    logs.setup_logging(logs.NORMAL)
    assert len(root.handlers) == before + 1 and logs._console.level == logging.INFO
    monkeypatch.setenv("RANK", "1")
    logs.setup_logging(logs.VERBOSE)
    assert logs._console.level == logging.WARNING
    with pytest.raises(ValueError, match="verbosity must be"):
        logs.setup_logging(3)


@pytest.mark.parametrize("quiet", [False, True])
def test_train_command_writes_train_log_and_quiet_turns_progress_off(monkeypatch, tmp_path, quiet):
    runs = []

    def fake_train(config, resume=False):
        runs.append(config)
        logging.getLogger("torch_impl.pipeline.train").info("epoch 1/1 of a stand-in")
        return {"epochs": 1}

    monkeypatch.setattr("torch_impl.pipeline.train.train", fake_train)
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path), "--out", str(out), "--epochs", "1"]
    assert cli.main(["-q", *argv] if quiet else argv) == 0
    assert runs[0].progress is (not quiet)
    log = (out / "train.log").read_text()
    # INFO records reach the run's log even when the console shows warnings only
    assert "epoch 1/1 of a stand-in" in log and 'done: {"epochs": 1}' in log
    assert logging.getLogger().level == (logging.WARNING if quiet else logging.INFO)  # restored after the run


def test_make_demo_data_command_writes_layout(tmp_path):  # moved from test_data.py
    status = main_make_demo_data(
        [
            str(tmp_path),
            "--n-normal",
            "1",
            "--n-tumor",
            "1",
            "--n-test-normal",
            "0",
            "--n-test-tumor",
            "1",
            "--size",
            "512",
            "--seed",
            "3",
        ]
    )
    assert status == 0
    records = discover(tmp_path)
    assert [(r.slide_id, r.label) for r in records] == [("normal_001", 0), ("tumor_001", 1), ("test_001", 1)]
    with Slide(records[2].path, mpp=0.5) as s:
        assert s.level_count == 2 and s.shape == (3, 256, 256)
    assert (
        cli.main(
            [
                "make-demo-data",
                str(tmp_path / "again"),
                "--n-normal",
                "1",
                "--n-tumor",
                "0",
                "--n-test-normal",
                "0",
                "--n-test-tumor",
                "0",
                "--size",
                "256",
                "-q",
            ]
        )
        == 0
    )
    assert [r.slide_id for r in discover(tmp_path / "again")] == ["normal_001"]


# ============================================================================ the demo's summary
SUMMARY = {
    "auc": 1.0,
    "auc_ci95": [0.875, 1.0],
    "accuracy": 0.75,
    "n_test_slides": 8,
    "n_tumor": 4,
    "train_dir": "demo_run/train",
    "eval_dir": "demo_run/eval",
    "heatmap_dir": "demo_run/heatmaps",
    "attention_auc": {"test_004": 0.8541, "test_002": 0.99549, "test_007": None},
    "seconds": 80.44,
    "seconds_per_step": {"data": 10.2, "train": 63.0, "evaluate": 2.4, "heatmaps": 4.8},
}


def test_summary_format():
    assert format_summary(SUMMARY).splitlines() == [
        "demo finished in 80 s (data 10 s, training 63 s, evaluation 2 s, heatmaps 5 s)",
        "test AUC 1.000 (95% CI 0.875-1.000), accuracy 0.750 on 8 slides (4 tumour)",
        "attention AUC, lesion vs other tissue: test_002 0.995, test_004 0.854, test_007 undefined",
        "run folder: demo_run/train (config.json, splits.csv, metrics.csv, train.log, last.pt, best.pt)",
        "evaluation: demo_run/eval (predictions.csv, metrics.json, roc.png, attention/)",
        "heatmaps: demo_run/heatmaps (<slide>_heatmap.png, <slide>_attention.tif, <slide>_attention.geojson)",
    ]
    undefined = {**SUMMARY, "auc": None, "auc_ci95": None, "accuracy": None, "attention_auc": {}}
    assert format_summary(undefined).splitlines()[1:3] == [
        "test AUC undefined (95% CI undefined), accuracy undefined on 8 slides (4 tumour)",
        "attention AUC, lesion vs other tissue: none",
    ]


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{[^}]*\}", template)
    return re.compile("(.+?)".join(re.escape(p) for p in parts))


def test_readme_shows_the_demo_summary_in_its_current_format():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
    start = SUMMARY_FORMAT[0].split("{")[0]
    shown = [b.splitlines() for b in blocks if b.startswith(start)]
    assert len(shown) == 1, f"README.md: expected one ``` block that starts with {start!r} (the demo's summary)"
    lines = shown[0]
    assert len(lines) == len(SUMMARY_FORMAT), lines
    for line, template in zip(lines, SUMMARY_FORMAT):
        assert _template_regex(template).fullmatch(line), f"README line {line!r} is not of the form {template!r}"


def test_run_demo_writes_train_log_and_returns_the_summary(monkeypatch, tmp_path):
    """The demo's wiring with stand-ins for training, evaluation and heatmaps (the real run takes minutes)."""
    data = tmp_path / "data"
    records = make_demo_data(data, n_normal=1, n_tumor=1, n_test_normal=1, n_test_tumor=1, size=256)
    test_ids = sorted(r.slide_id for r in records if r.split == "test")

    def fake_train(config, resume=False):
        logging.getLogger("torch_impl.pipeline.train").info("stand-in training of %s", config.out_dir)
        return {}

    def fake_evaluate(checkpoint, data_dir, out_dir, **kw):
        (Path(out_dir) / "attention").mkdir(parents=True)
        for slide_id in test_ids:  # the saved predictions the heatmaps are drawn from
            (Path(out_dir) / "attention" / f"{slide_id}.npy").touch()
        return {"auc": 1.0, "auc_ci95": [1.0, 1.0], "accuracy": 1.0, "n_slides": 2, "n_tumor": 1}

    def fake_load_prediction(path):
        return Path(path).stem  # stands in for the SlidePrediction of that slide

    def fake_heatmap(prediction, out_dir, annotation=None, **kw):
        result = {"slide_id": prediction, "png": str(Path(out_dir) / f"{prediction}_heatmap.png")}
        return {**result, "attention_auc": 0.9} if annotation is not None else result

    monkeypatch.setattr("torch_impl.pipeline.train.train", fake_train)
    monkeypatch.setattr("torch_impl.pipeline.evaluate.evaluate_run", fake_evaluate)
    monkeypatch.setattr("torch_impl.pipeline.predict.load_prediction", fake_load_prediction)
    monkeypatch.setattr("torch_impl.pipeline.heatmap.write_heatmap", fake_heatmap)
    summary = run_demo(tmp_path / "out", data, device="cpu", progress=False)
    log = (tmp_path / "out" / "train" / "train.log").read_text()
    assert f"stand-in training of {tmp_path / 'out' / 'train'}" in log
    annotated = [r.slide_id for r in records if r.split == "test" and r.annotation_path is not None]
    assert summary["attention_auc"] == {s: 0.9 for s in annotated} and len(annotated) == 1
    assert [Path(p).name for p in summary["heatmaps"]] == [f"{s}_heatmap.png" for s in test_ids]
    lines = format_summary(summary).splitlines()
    assert all(_template_regex(t).fullmatch(line) for t, line in zip(SUMMARY_FORMAT, lines, strict=True))
    assert lines[2] == f"attention AUC, lesion vs other tissue: {annotated[0]} 0.900"


def test_option_types_follow_the_annotations():
    hints = {
        **typing.get_type_hints(TrainConfig),
        **{f"model.{k}": v for k, v in typing.get_type_hints(ModelConfig).items()},
    }
    by_dest = {a.dest: a for a in _parser()._actions}
    for path, _ in train_fields():
        hint, action = hints[path], by_dest[path]
        if hint is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), path
        else:
            kinds = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
            assert action.type.kind in kinds, path


# ============================================================================ options of the other commands
@dataclass(frozen=True, kw_only=True)
class Base:
    """A base whose fields (and comments) a command's options inherit."""

    where: str = option("here", metavar="PLACE")  # where to look
    out: Path = option(flag="--to", metavar="DIR")  # output folder

    def __post_init__(self) -> None:
        if self.where == "nowhere":
            raise ValueError("--where must be somewhere")


@dataclass(frozen=True, kw_only=True)
class Command(Base):
    """A command's options: a positional list, a Path that may be None, choices on the field."""

    inputs: list[Path] = option(positional=True, metavar="INPUT")  # files to read
    extra: Path | None = None  # an optional file
    mode: str = option("fast", choices=("fast", "slow"))  # how to go
    out: Path = option(Path("o"), flag="--to", metavar="DIR")  # output folder, with a default here


def test_option_parser_builds_the_dataclass(capsys):
    parser = OptionParser(Command, prog="cmd")
    assert parser.parse(["a.tif", "b"]) == Command(inputs=[Path("a.tif"), Path("b")])
    got = parser.parse(["--to", "x", "a", "--extra", "e.xml", "--mode", "slow", "--where", "there"])
    assert got == Command(inputs=[Path("a")], out=Path("x"), extra=Path("e.xml"), mode="slow", where="there")
    assert type(got.out) is PosixPathType and parser.parse(["a", "--extra", "none"]).extra is None
    help_text = " ".join(parser.format_help().split())
    for shown in (
        "usage: cmd [-h] [--where PLACE] [--to DIR] [--extra PATH] [--mode {fast,slow}] INPUT [INPUT ...]",
        "INPUT files to read",
        "--where PLACE where to look (default: here)",  # the base's comment
        "--to DIR output folder, with a default here (default: o)",
        "(default: none)",
    ):
        assert shown in help_text, shown
    for argv, message in (
        (["--mode", "slow"], "the following arguments are required: INPUT"),
        (["a", "--mode", "medium"], "invalid choice: 'medium'"),
        (["a", "--where", "nowhere"], "--where must be somewhere"),
    ):  # __post_init__'s check
        with pytest.raises(SystemExit) as e:
            parser.parse(argv)
        lines = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(lines) == 2 and lines[0].startswith("cmd: error: ") and message in lines[0]
        assert lines[1] == "('cmd --help' lists the options)"
    base = OptionParser(Base, prog="base")
    assert "--to DIR output folder (required)" in " ".join(base.format_help().split())
    assert base.parse(["--to", "d"]) == Base(out=Path("d"))
    with pytest.raises(SystemExit):
        base.parse([])  # --to is required there
    capsys.readouterr()
    assert build_options(Command, {"inputs": ["a"], "mode": "slow"}) == Command(inputs=["a"], mode="slow")


PosixPathType = type(Path("."))

#: The options and defaults of the commands before their options were generated (README,
#: tutorial 05, tests and users rely on them): (command, options, the minimal arguments, the
#: old parser's values for them, as {options field: value}).
OLD_COMMANDS = [
    (
        "evaluate",
        "--data --checkpoint --out --mpp --device --split --splits --skip-bad-slides --amp --bootstrap --seed -q -v"
        " --slide-cache",
        ["--data", "D", "--checkpoint", "C.pt", "--out", "O"],
        dict(
            data_dir=Path("D"),
            checkpoint=Path("C.pt"),
            out_dir=Path("O"),
            mpp=None,
            device="auto",
            split="test",
            splits_csv=None,
            skip_bad_slides=False,
            amp="auto",
            n_bootstrap=2000,
            seed=0,
            slide_cache="auto",
        ),
    ),
    (
        "predict",
        "--checkpoint --out --mpp --device --amp --heatmaps --skip-bad-slides --slide-cache",
        ["s1.tif", "folder", "--checkpoint", "C.pt", "--out", "O"],
        dict(
            slides=[Path("s1.tif"), Path("folder")],
            checkpoint=Path("C.pt"),
            out_dir=Path("O"),
            mpp=None,
            device="auto",
            amp="auto",
            heatmaps=False,
            skip_bad_slides=False,
            slide_cache="auto",
        ),
    ),
    (
        "heatmap",
        "--slide --checkpoint --out --annotation --mpp --device --attention --thumbnail-size --tiff-downsample --amp"
        " --slide-cache",
        ["--slide", "S.tif", "--out", "O", "--attention", "A.npy"],
        dict(
            slide=Path("S.tif"),
            checkpoint=None,
            out_dir=Path("O"),
            annotation=None,
            mpp=None,
            device="auto",
            attention=Path("A.npy"),
            thumbnail_size=1024,
            tiff_downsample=None,
            amp="auto",
            slide_cache="auto",
        ),
    ),
    ("demo", "--out --data --device -q -v", [], dict(out_dir=Path("demo_run"), data_dir=None, device="auto")),
    (
        "make-demo-data",
        "--n-normal --n-tumor --n-test-normal --n-test-tumor --size --mpp --seed -q -v",
        ["R"],
        dict(
            root=Path("R"),
            n_normal=6,
            n_tumor=6,
            n_test_normal=4,
            n_test_tumor=4,
            size=(2048, 2048),
            mpp=0.25,
            seed=0,
            difficulty="demo",  # added with the camelyon difficulty; the demo's values are filled in as before
        ),
    ),
]


def _command_parser(monkeypatch, command: str) -> OptionParser:
    """The parser a command builds (caught where the command parses its arguments)."""
    built = []

    def parse_args(self, args=None, namespace=None):
        built.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(OptionParser, "parse_args", parse_args)
    with pytest.raises(SystemExit):
        cli.COMMANDS[command][0]([], f"python -m torch_impl {command}")
    monkeypatch.undo()
    return built[0]


@pytest.mark.parametrize("command, options, argv, old", OLD_COMMANDS, ids=[c[0] for c in OLD_COMMANDS])
def test_every_option_and_default_of_before_still_exists(monkeypatch, command, options, argv, old):
    parser = _command_parser(monkeypatch, command)
    known = parser._option_string_actions
    assert [o for o in options.split() if o not in known] == []
    assert dataclasses.asdict(parser.parse(argv)) == old
    for action in parser._actions:  # every generated option has its field's comment as help
        if action.dest in parser.option_paths:
            assert re.sub(r" \((default: .*|required)\)$", "", action.help).strip(), action.dest


@pytest.mark.parametrize(
    "run, options",
    [
        (evaluate_run, EvaluateOptions),
        (predict_run, PredictOptions),
        (run_demo, DemoOptions),
        (make_demo_data, MakeDemoDataOptions),
    ],
)
def test_run_functions_take_their_commands_options(run, options):
    """The function behind a command has the options' fields as arguments, with the same defaults
    (its docstring points at the options for their meaning; extra arguments have defaults)."""
    params = inspect.signature(run).parameters
    for f in dataclasses.fields(options):
        assert f.name in params, f.name
        default = params[f.name].default
        if f.default is dataclasses.MISSING:
            assert default is inspect.Parameter.empty or f.name == "slides", f.name
        elif isinstance(f.default, Path):
            assert Path(default) == f.default, f.name  # the function also takes a str
        else:
            assert default == f.default, f.name
    assert all(
        p.default is not inspect.Parameter.empty
        for n, p in params.items()
        if n not in {f.name for f in dataclasses.fields(options)}
    )


def test_shared_options_are_written_once():
    """--device, --checkpoint, --out, --mpp, --amp, --skip-bad-slides: one field each, inherited."""
    for cls in (EvaluateOptions, PredictOptions, HeatmapOptions):
        assert issubclass(cls, InferenceOptions)
    for cls in (EvaluateOptions, PredictOptions):
        assert issubclass(cls, BatchInferenceOptions)
    assert issubclass(DemoOptions, ComputeOptions) and issubclass(InferenceOptions, ComputeOptions)
    shared = {f.name for f in dataclasses.fields(BatchInferenceOptions)}
    declared = {
        cls: set(cls.__dict__.get("__annotations__", {})) & shared  # fields written in the class body
        for cls in (EvaluateOptions, PredictOptions, HeatmapOptions, DemoOptions)
    }
    # heatmap's --checkpoint is optional (it can draw a saved map); demo's --out has a default
    assert declared == {
        EvaluateOptions: set(),
        PredictOptions: set(),
        HeatmapOptions: {"checkpoint"},
        DemoOptions: {"out_dir"},
    }


def test_demo_never_writes_into_a_data_folder_it_did_not_make(tmp_path):
    """A named data folder that is not empty and not a complete data set is refused untouched;
    the demo's own folder with a partial set (a killed demo) is rewritten."""
    from torch_impl.pipeline.demo import _has_data
    from torch_impl.pipeline.runtime import PipelineError

    mine = tmp_path / "my_slides"
    mine.mkdir()
    (mine / "notes.txt").write_text("not slides")
    with pytest.raises(PipelineError, match="new or empty folder"):
        _has_data(mine, own=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert _has_data(mine, own=True) is False  # the demo's own folder: written again

    partial = tmp_path / "partial"
    make_demo_data(partial, n_normal=1, n_tumor=1, n_test_normal=0, n_test_tumor=0, size=256)
    with pytest.raises(PipelineError, match="training and test slides"):
        _has_data(partial, own=False)
    assert _has_data(tmp_path / "missing", own=False) is False
    assert _has_data(tmp_path / "empty", own=False) is False
