"""The pipeline's shared vocabulary: its errors, where it runs, mixed precision, atomic files.

One of each, used by training, evaluation, prediction and heatmaps alike:

    PipelineError, BadSlideError   what stops a command, and the one error of an unusable slide
    resolve_device                 "auto" | None | "cpu" | "cuda" | "cuda:N" -> torch.device
    AMP_CHOICES, autocast_dtype    mixed precision said one way: "auto" | "bf16" | "off"
    autocast                       the autocast context for that dtype (none for None)
    atomic_write                   write a file completely or not at all

Errors. :class:`BadSlideError` (missing, unreadable or corrupt file, no tissue, a
resolution the file cannot serve) is what ``skip_bad_slides`` skips, everywhere. It is a
:class:`PipelineError`, the base of every error that stops a pipeline command with a
message saying what to change; training's ``TrainingError`` is that same base under its
training name, so ``except TrainingError`` in training also catches unusable slides.

Mixed precision. ``"auto"`` is bfloat16 autocast on CUDA and float32 elsewhere; ``"bf16"``
is bfloat16 autocast on any device (on a CPU torch emulates much of it, usually slower than
float32, so a warning says so once per device type); ``"off"`` is float32. Under autocast
only the trunk runs in bfloat16: the CLAM head always runs in float32
(:meth:`torch_impl.models.streaming_clam.StreamingCLAM.forward`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "AMP_CHOICES",
    "BadSlideError",
    "PipelineError",
    "atomic_write",
    "autocast",
    "autocast_dtype",
    "resolve_device",
]

logger = logging.getLogger(__name__)

#: The values of every ``amp`` setting and ``--amp`` option.
AMP_CHOICES = ("auto", "bf16", "off")

_warned_bf16_on: set[str] = set()  # device types already warned about bf16 autocast


class PipelineError(RuntimeError):
    """A pipeline command cannot go on (the message says why and what to change)."""


class BadSlideError(PipelineError):
    """A slide is missing, unreadable, corrupt, holds no tissue, or cannot be served at the
    working resolution; ``skip_bad_slides`` (``--skip-bad-slides``) skips it with a warning."""


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The device to compute on.

    Args:
        device: ``"auto"`` or None: ``cuda:local_rank`` when CUDA is available, else the CPU;
            ``"cuda"``: ``cuda:local_rank``; anything else (``"cpu"``, ``"cuda:1"``, a
            ``torch.device``) as given.
        local_rank: this process's GPU on its host under ``torchrun`` (0 otherwise).

    Raises:
        RuntimeError: a CUDA device is asked for but CUDA is unavailable or has no such GPU.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on ``device`` (module docstring), None for float32.

    Raises:
        ValueError: ``amp`` is not one of :data:`AMP_CHOICES`.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {list(AMP_CHOICES)}, got {amp!r}")
    device = torch.device(device)
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and device.type not in _warned_bf16_on:
        _warned_bf16_on.add(device.type)
        logger.warning("amp 'bf16' on %s: bfloat16 autocast runs there, but is usually slower than float32 "
                       "without bf16 hardware; 'auto' uses it on CUDA only", device.type)
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or a context that changes nothing for None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Write ``path`` completely or not at all: ``with atomic_write(p, "wb") as f: ...``.

    The file object writes to a new temporary file beside ``path`` (same folder, so the
    rename stays on one file system); when the block ends without an error the file is
    flushed and fsync'ed, ``os.replace`` puts it in place in one step, and the folder is
    fsync'ed so the rename survives a power cut. On any error the temporary file is removed
    and the error re-raised: an existing file at ``path`` is never touched before the new
    one is complete, and no partial file is left behind. The folder is created if needed;
    the new file gets the permissions of a plain ``open`` (the umask's).

    Args:
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        open_kwargs: passed to ``open`` (``newline=""`` for csv, ``encoding``, ...).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """fsync a directory so a rename in it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
