"""Training configuration: one typed dataclass, loaded from JSON, overridden by the CLI, validated.

    TrainConfig  (this module)                  what to train on, how long, how, where to write
      model: ModelConfig (models/streaming_clam.py)  what the network is made of

Each field is documented once, by its trailing comment: the command line's options are
generated from these dataclasses and the comments become their help
(:mod:`torch_impl.pipeline.options`); ``# --- title ---`` lines group the options.

A run folder holds the fully resolved configuration as ``config.json`` (written by
:func:`save_config`), so ``--resume`` and the evaluation read back exactly what was used.
JSON files may give any subset of the fields; ``"model"`` is a nested object of
:class:`~torch_impl.models.streaming_clam.ModelConfig` fields. Unknown keys and wrongly typed values raise
``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..models.streaming_clam import ModelConfig
from ..slides.camelyon import DEFAULT_EXCLUDE
from ..slides.crop_cache import MODES as CACHE_MODES
from .runtime import AMP_CHOICES, atomic_write
from .selection import LEGACY_SELECT_BY, SELECT_RULES

__all__ = [
    "CHOICES",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "load_run_config",
    "save_config",
    "smallest_tile_size",
    "validate_config",
]

CONFIG_FILE = "config.json"


@dataclass
class TrainConfig:
    """Everything a training run needs (defaults: the StreamingCLAM recipe at 0.5 um/px)."""

    data_dir: str = ""  # CAMELYON16 root (layout in torch_impl.slides.camelyon); required
    out_dir: str = ""  # run folder: config.json, splits.csv, metrics.csv, last.pt, best.pt; required
    model: ModelConfig = field(default_factory=ModelConfig)  # the network (width, head, tile sizes, ...)

    # --- data ---
    mpp: float = 0.5  # working resolution in micrometres per pixel (0.5 = "20x")
    max_size: int = 65536  # largest training crop side, working pixels (random window inside the tissue)
    val_fraction: float = 0.2  # fraction of each class's training slides held out for validation
    splits_csv: str | None = None  # slide,label,split file; None = <out_dir>/splits.csv (written once)
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))  # slide ids left out
    skip_bad_slides: bool = False  # skip missing/unreadable/tissue-less slides with a warning, not fail
    sampler: str = "balanced"  # "balanced" (each class drawn equally often per epoch) or "shuffle"
    max_slides_per_epoch: int | None = None  # cut each epoch's slide order to this length (quick runs)

    # --- optimisation ---
    seed: int = 0  # seeds the model's initialisation, the splits, slide orders, crops and augmentation
    epochs: int = 50  # total epochs, both phases
    head_only_epochs: int = 15  # phase 1: these first epochs train the head only (>= epochs: trunk never trained)
    lr: float = 2e-4  # Adam learning rate of the head
    trunk_lr_factor: float = 0.1  # phase 2: the trunk's learning rate is lr * trunk_lr_factor
    lr_schedule: str = "constant"  # "constant", or "cosine" (per epoch, from lr to 0 over all epochs)
    weight_decay: float = 1e-5  # Adam's L2 penalty
    accumulate: int = 1  # slides per optimizer step (batch size 1, gradients averaged); per process
    grad_clip: float | None = None  # clip the global gradient norm to this value; None = no clipping
    phase2_tile_size: int | None = None  # phase 2: recompute + backward tile side; None = the model's
    calibrate_bn: bool = True  # random trunk (model.weights None): frozen batch-norm statistics from training crops

    # --- model selection (best.pt; torch_impl.pipeline.selection) ---
    select_by: str = "val_loss"  # best.pt is the epoch with: "val_loss" the lowest validation loss, "val_auc" the highest validation AUC (ties: lower loss), or "last" the last epoch; without validation slides, the last
    select_after_epoch: int = 0  # epochs 1..N are never best.pt (N = head_only_epochs: a trained trunk); < epochs

    # --- augmentation (training slides only; lazy, see torch_impl.slides.augment) ---
    flip: bool = True  # random vertical and horizontal flips
    rot90: bool = True  # random rotation by a multiple of 90 degrees
    hue_shift: float = 0.02  # hue shifted by U(-a, a) turns (1 turn = 360 degrees); 0 = off
    saturation_scale: float = 0.1  # saturation multiplied by 1 + U(-a, a); 0 = off
    value_scale: float = 0.1  # value (brightness) multiplied by 1 + U(-a, a); 0 = off

    # --- hardware and bookkeeping ---
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu", "cuda", "cuda:1"
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA, off on CPU), "bf16" or "off"
    slide_cache: str = "auto"  # each training crop decoded once per step (each validation slide once), kept in: "device" memory, "host" memory, or "none" (tiles read from the file, host memory O(tile)); "auto": device if the crop fits half the free memory, else host, else none
    checkpoint_every: int = 0  # also write last.pt every this many slides (after a step); 0 = per epoch only
    progress: bool = True  # tqdm progress bars (shown only on a terminal)

    def resolved_splits_csv(self) -> Path:
        """Where the split assignment lives: ``splits_csv`` or ``<out_dir>/splits.csv``."""
        return Path(self.splits_csv) if self.splits_csv else Path(self.out_dir) / "splits.csv"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths are strings already; the model config nested)."""
        return asdict(self)


# ----------------------------------------------------------------------------- typing
def _allowed(annotation: Any) -> tuple[type, ...]:
    """Python types a JSON value may have for a field annotation (int counts as float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed(arg))
    if annotation is type(None):
        return (type(None),)
    if origin is list:
        return (list,)
    if annotation is float:
        return (float, int)
    return (annotation,)


def _check_fields(cls: type, values: dict[str, Any], where: str) -> None:
    """Raise ValueError for keys that are no field of ``cls`` or values of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    for key, value in values.items():
        if key == "model" and cls is TrainConfig:
            continue
        allowed = _allowed(hints[key])
        # bool is an int subclass in Python; a JSON true for an int field is a mistake.
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            names_ = " or ".join(sorted({t.__name__ for t in allowed}))
            raise ValueError(f"{where}: {key} must be {names_}, got {value!r} ({type(value).__name__})")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {key} must be a list of strings, got {value!r}")


def config_from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """A TrainConfig from a (possibly partial) dict such as ``json.load`` returns; not validated."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
    values = dict(values)
    _check_fields(TrainConfig, values, where)
    model = values.pop("model", {}) or {}
    if not isinstance(model, dict):
        raise ValueError(f"{where}: model must be an object of ModelConfig fields, got {model!r}")
    _check_fields(ModelConfig, model, f"{where}: model")
    if "exclude" in values:
        values["exclude"] = list(values["exclude"])
    return TrainConfig(model=ModelConfig(**model), **values)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a JSON configuration file (any subset of the fields); not validated yet."""
    path = Path(path)
    return config_from_dict(_read_json(path), where=str(path))


#: Fields added after run folders were written, with the value that a run whose config.json
#: lacks them had in effect (such a run resumes as it was trained; a new configuration file
#: that omits them gets the dataclass default instead).
LEGACY_DEFAULTS: dict[str, Any] = {"select_by": LEGACY_SELECT_BY, "select_after_epoch": 0}


def load_run_config(path: str | os.PathLike) -> TrainConfig:
    """Read a run folder's ``config.json`` (written by :func:`save_config`) for ``--resume``:
    like :func:`load_config`, but fields that an older version did not write take
    :data:`LEGACY_DEFAULTS`, the values that version used."""
    path = Path(path)
    values = _read_json(path)
    if isinstance(values, dict):
        values = {**LEGACY_DEFAULTS, **values}
    return config_from_dict(values, where=str(path))


def save_config(config: TrainConfig, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` (the full resolved configuration) into ``folder`` atomically."""
    path = Path(folder) / CONFIG_FILE
    with atomic_write(path) as f:
        f.write(json.dumps(config.to_dict(), indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- values
#: The values a field may take, by path ("model.NAME" for ModelConfig fields): checked by
#: validate_config, offered as the command line's choices.
CHOICES: dict[str, tuple[str | None, ...]] = {
    "sampler": ("balanced", "shuffle"),
    "lr_schedule": ("constant", "cosine"),
    "amp": AMP_CHOICES,
    "slide_cache": CACHE_MODES,
    "select_by": SELECT_RULES,
    "model.head": ("sb", "mb"),
    "model.pool": ("max", "avg", None),
}


@functools.lru_cache(maxsize=1)
def smallest_tile_size() -> int:
    """The smallest tile side (pixels) that the streamed ResNet-34 trunk accepts on a large slide.

    A tile must hold the trunk's halo (:func:`reference.tiling.min_tile_size`: one receptive
    field plus the offset rounded up to the stride; 930 for ResNet-34). Smaller tiles work
    only on images no larger than the tile (one tile), so a setting below this fails on the
    first large slide: :func:`validate_config` refuses it at the start instead. The geometry
    does not depend on the width: it is read off a width-1 trunk.
    """
    from reference.tiling import min_tile_size

    from ..models.resnet import freeze_batchnorm, resnet34, trunk
    from ..streaming import module_geometry

    rows, cols = module_geometry(freeze_batchnorm(trunk(resnet34(width=1))))
    large = 2**31  # any axis longer than one receptive field gives the same answer
    return max(min_tile_size(rows, large), min_tile_size(cols, large))


def validate_config(config: TrainConfig) -> TrainConfig:
    """Check types and ranges; raise ValueError with every problem listed. Returns ``config``.

    Each problem names the setting as a field and as its command-line option. Beyond the
    ranges: every float must be finite, and the tile sizes must hold the trunk's halo
    (:func:`smallest_tile_size`), so a bad setting stops the run before anything is written.
    """
    _check_fields(TrainConfig, {k: v for k, v in asdict(config).items() if k != "model"}, "config")
    _check_fields(ModelConfig, asdict(config.model), "config: model")
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    floats = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(TrainConfig)]
    floats += [(f"model.{f.name}", getattr(config.model, f.name)) for f in dataclasses.fields(ModelConfig)]
    bad_floats = {name for name, value in floats if isinstance(value, float) and not math.isfinite(value)}
    for name in sorted(bad_floats):
        problems.append(f"{name} ({_option(name)}) must be a finite number, got {getattr_path(config, name)}")

    need(bool(config.data_dir), "data_dir is required (--data DIR)")
    need(bool(config.out_dir), "out_dir is required (--out DIR)")
    if "mpp" not in bad_floats:
        need(config.mpp > 0, f"mpp must be > 0 micrometres per pixel (--mpp, e.g. 0.5), got {config.mpp}")
    need(config.max_size >= 32, f"max_size must be >= 32 pixels, got {config.max_size}")
    need(0.0 <= config.val_fraction < 1.0, f"val_fraction must lie in [0, 1), got {config.val_fraction}")
    need(config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}")
    need(config.head_only_epochs >= 0, f"head_only_epochs must be >= 0, got {config.head_only_epochs}")
    need(config.lr > 0, f"lr must be > 0, got {config.lr}")
    need(config.trunk_lr_factor >= 0, f"trunk_lr_factor must be >= 0, got {config.trunk_lr_factor}")
    need(config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}")
    need(config.accumulate >= 1, f"accumulate must be >= 1, got {config.accumulate}")
    need(config.grad_clip is None or config.grad_clip > 0, f"grad_clip must be > 0 or null, got {config.grad_clip}")
    need(
        config.max_slides_per_epoch is None or config.max_slides_per_epoch >= 1,
        f"max_slides_per_epoch must be >= 1 or null, got {config.max_slides_per_epoch}",
    )
    need(0.0 <= config.hue_shift <= 0.5, f"hue_shift must lie in [0, 0.5] turns, got {config.hue_shift}")
    need(0.0 <= config.saturation_scale < 1.0, f"saturation_scale must lie in [0, 1), got {config.saturation_scale}")
    need(0.0 <= config.value_scale < 1.0, f"value_scale must lie in [0, 1), got {config.value_scale}")
    need(config.select_after_epoch >= 0, f"select_after_epoch must be >= 0 epochs, got {config.select_after_epoch}")
    need(
        config.select_after_epoch < max(config.epochs, 1),
        f"select_after_epoch (--select-after-epoch) {config.select_after_epoch} must be < epochs ({config.epochs}): "
        f"epochs 1..{config.select_after_epoch} are never selected, so no epoch could become best.pt",
    )
    need(config.checkpoint_every >= 0, f"checkpoint_every must be >= 0 slides, got {config.checkpoint_every}")
    need(
        config.device == "auto" or config.device == "cpu" or config.device.startswith("cuda"),
        f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {config.device!r}",
    )
    for path, choices in CHOICES.items():
        value = getattr_path(config, path)
        need(value in choices, f"{path} must be one of {list(choices)}, got {value!r}")
    m = config.model
    need(m.width >= 1, f"model.width must be >= 1, got {m.width}")
    smallest = smallest_tile_size()
    for name, value, optional in (
        ("model.tile_size", m.tile_size, False),
        ("model.backward_tile_size", m.backward_tile_size, True),
        ("phase2_tile_size", config.phase2_tile_size, True),
    ):
        if value is None and optional:
            continue
        need(
            value >= smallest,
            f"{name} ({_option(name)}) {value} is smaller than the smallest tile the ResNet-34 trunk accepts: "
            f"a tile must hold the network's halo; use {smallest} pixels or more",
        )
    need(m.weights is None or Path(m.weights).is_file(), f"model.weights file not found: {m.weights}")
    if problems:
        raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))
    return config


def getattr_path(config: TrainConfig, path: str) -> Any:
    """The value of a field path such as ``"lr"`` or ``"model.width"``."""
    value: Any = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


#: Options named unlike their fields (train's command line).
_OPTION_NAMES = {"data_dir": "--data", "out_dir": "--out"}


def _option(path: str) -> str:
    """The command-line option of a field path: ``model.tile_size`` -> ``--tile-size``."""
    name = path.rsplit(".", 1)[-1]
    return _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
