"""Training checkpoints: atomic save, safe load, and the model from a checkpoint.

A checkpoint is one ``torch.save``'d dict that ``torch.load(..., weights_only=True)`` can
read (tensors, numbers, strings, lists, dicts, tuples only; no pickled classes):

    model            model.state_dict()
    model_config     dataclasses.asdict(ModelConfig)
    train_config     dataclasses.asdict(TrainConfig), paths as str
    optimizer        optimizer.state_dict()
    scheduler        None (the learning rate is a pure function of the epoch, see train.py)
    epoch            completed epochs
    slide_index      positions of the current epoch's slide order already consumed (0 at an epoch boundary)
    order            the current epoch's slide order (slide ids), for an exact mid-epoch resume
    world_size       processes that trained (a mid-epoch resume needs the same number)
    rng              {"python", "numpy", "torch", "cuda"} generator states
    best_val_auc, best_val_loss, history, epoch_loss_sum, epoch_slides, ...

Saving is atomic (:func:`torch_impl.pipeline.runtime.atomic_write`): the bytes go to a
temporary file in the same folder, are flushed and fsync'ed, then ``os.replace`` puts the
file in place in one step. A crash or a failed write leaves the previous checkpoint
untouched and no partial file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..models.streaming_clam import ModelConfig, StreamingCLAM, build_model
from .runtime import atomic_write

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "read_train_config",
    "trained_mpp",
    "quiet_random_init",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (corrupt, truncated, not a checkpoint)."""


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Write ``state`` (the keys in the module docstring) to ``path`` atomically
    (:func:`~torch_impl.pipeline.runtime.atomic_write`).

    Returns the path. On any failure the temporary file is removed and the error re-raised;
    an existing file at ``path`` is never touched before the new one is complete.
    """
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is corrupt, truncated or not a checkpoint dict (the message
            names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint (corrupt or truncated file?): {e}") from e
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not a StreamingCLAM checkpoint (no 'model' / 'model_config' entries)")
    return state


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init() -> Iterator[None]:
    """Hide the trunk's "no weights given" warning: the weights come from the checkpoint."""
    resnet_logger = logging.getLogger("torch_impl.models.resnet")
    f = _DropMessage("no weights given")
    resnet_logger.addFilter(f)
    try:
        yield
    finally:
        resnet_logger.removeFilter(f)


def model_config_from_dict(values: dict[str, Any], where: str = "checkpoint") -> ModelConfig:
    """A ModelConfig from a stored dict; unknown keys raise CheckpointError naming ``where``."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{where}: model_config has unknown keys {unknown} (written by another version?)")
    return ModelConfig(**values)


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any
) -> tuple[StreamingCLAM, ModelConfig]:
    """The trained model of a checkpoint, on ``device``, and its ModelConfig.

    ``overrides`` replace settings that do not change the weights, e.g.
    ``load_model(path, tile_size=8192, backward_tile_size=2880)`` for another GPU.

    The network is built from the stored ``model_config`` with ``weights=None`` (no weight
    file is needed, and the random-initialisation warning is suppressed since every weight
    is then loaded from the checkpoint). The returned ModelConfig is the stored one
    (``weights`` as trained). The model is in training mode as ``nn.Module``s come; call
    ``.eval()`` for inference (batch norm is frozen either way).
    """
    state = load_checkpoint(path)
    config = model_config_from_dict(dict(state["model_config"]), where=str(path))
    if overrides:
        config = dataclasses.replace(config, **overrides)
    with quiet_random_init():
        model = build_model(dataclasses.replace(config, weights=None))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the stored weights do not fit the stored model_config: {e}") from e
    return model.to(device), config


def read_train_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``train_config`` dict stored in a checkpoint (memory-mapped, tensors not read)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint (corrupt or truncated file?): {e}") from e
    config = state.get("train_config") if isinstance(state, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no 'train_config' dict; is it a StreamingCLAM checkpoint?")
    return config


def trained_mpp(checkpoint: str | os.PathLike, mpp: float | None = None) -> float:
    """The working resolution (um/px) to run a checkpoint at: ``mpp`` if given, else the
    ``train_config["mpp"]`` it was trained at."""
    if mpp is not None:
        return float(mpp)
    config = read_train_config(checkpoint)
    if "mpp" not in config:
        raise ValueError(f"{checkpoint}: train_config has no 'mpp'; pass mpp (--mpp) explicitly")
    return float(config["mpp"])


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch (CPU, every CUDA device) generator states,
    as weights_only-loadable values."""
    np_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, ...}
    np_state = {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}}
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": np_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only if the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
