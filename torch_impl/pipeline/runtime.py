"""The pipeline's shared vocabulary: its errors, where it runs, mixed precision, atomic files.

One of each, used by training, evaluation, prediction and heatmaps alike:

    PipelineError, BadSlideError   what stops a command, and the one error of an unusable slide
    resolve_device                 "auto" | None | "cpu" | "cuda" | "cuda:N" -> torch.device
    AMP_CHOICES, autocast_dtype    mixed precision said one way: "auto" | "bf16" | "off"
    autocast                       the autocast context for that dtype (none for None)
    atomic_write                   write a file completely or not at all (DiskFullError when the disk is)
    remove_stale_temp_files        the temporary files of writers that died (killed mid-write)

Errors. :class:`BadSlideError` (missing, unreadable or corrupt file, no tissue, a
resolution the file cannot serve) is what ``skip_bad_slides`` skips, everywhere. It is a
:class:`PipelineError`, the base of every error that stops a pipeline command with a
message saying what to change; training's ``TrainingError`` is that same base under its
training name, so ``except TrainingError`` in training also catches unusable slides.

Temporary files. :func:`atomic_write` writes ``.NAME.PID.HEX.tmp`` beside ``NAME`` (PID: the
writing process). A process killed mid-write leaves that file behind; nothing else does
(every error path removes it). :func:`remove_stale_temp_files` removes such leftovers of a
folder whose PID is no live process on this host: training calls it on its run folder at
the start of every run (under the run lock) and before each checkpoint write. A leftover of
a live process (another command writing there now) is never touched.

Mixed precision. ``"auto"`` is bfloat16 autocast on CUDA and float32 elsewhere; ``"bf16"``
is bfloat16 autocast on any device (on a CPU torch emulates much of it, usually slower than
float32, so a warning says so once per device type); ``"off"`` is float32. Under autocast
only the trunk runs in bfloat16: the CLAM head always runs in float32
(:meth:`torch_impl.models.streaming_clam.StreamingCLAM.forward`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "AMP_CHOICES",
    "BadSlideError",
    "DiskFullError",
    "PipelineError",
    "atomic_write",
    "autocast",
    "autocast_dtype",
    "pid_alive",
    "remove_stale_temp_files",
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


class DiskFullError(PipelineError):
    """The disk (or the user's quota) filled up while writing a file; the previous version of
    the file is intact and no partial file is left behind."""


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
        logger.warning(
            "amp 'bf16' on %s: bfloat16 autocast runs there, but is usually slower than float32 "
            "without bf16 hardware; 'auto' uses it on CUDA only",
            device.type,
        )
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or a context that changes nothing for None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


#: errno values of a full disk: no space left, quota exceeded.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from or during) is a full disk.

    torch's zip writer reports a failed write as ``RuntimeError("[enforce fail at
    inline_container.cc:...] unexpected pos ...")`` raised while handling the ``OSError`` of
    the file object, so the errno is found on the exception's context chain.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, what: str = "file", **open_kwargs: Any) -> Iterator[IO]:
    """Write ``path`` completely or not at all: ``with atomic_write(p, "wb") as f: ...``.

    The file object writes to a new temporary file ``.NAME.PID.HEX.tmp`` beside ``path``
    (same folder, so the rename stays on one file system); when the block ends without an
    error the file is flushed and fsync'ed, ``os.replace`` puts it in place in one step, and
    the folder is fsync'ed so the rename survives a power cut. On any error the temporary
    file is removed and the error re-raised: an existing file at ``path`` is never touched
    before the new one is complete, and no partial file is left behind. The folder is
    created if needed; the new file gets the permissions of a plain ``open`` (the umask's).

    Args:
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        what: what the file is, for the message of a full disk ("checkpoint", ...).
        open_kwargs: passed to ``open`` (``newline=""`` for csv, ``encoding``, ...).

    Raises:
        DiskFullError: no space left on the device (or the quota is used up) while writing:
            "no space left on device while writing PATH; the previous WHAT is intact".
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
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, Exception) and _disk_full(e):
            kept = f"the previous {what} is intact" if path.exists() else f"no {what} was written"
            raise DiskFullError(
                f"no space left on device while writing {path}; {kept}. Free space on that "
                f"disk (or write elsewhere) and run again"
            ) from e
        raise
    _fsync_dir(path.parent)


#: atomic_write's temporary files (.NAME.PID.HEX.tmp) and the older .NAME.PID.tmp form.
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:\.[0-9a-f]+)?\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (``kill(pid, 0)``; another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left in ``folder``.

    A temporary file ``.NAME.PID[.HEX].tmp`` (:func:`atomic_write`'s) is stale when PID is no
    live process on this host (a process that died cannot finish its write). Files of live
    processes, and every other file, are left alone; subfolders are not searched.

    Args:
        name: only the leftovers of this file name (e.g. ``"last.pt"``); default all.

    Returns:
        the removed paths, sorted.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP_FILE.match(entry.name)
        if m is None or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file():
                entry.unlink()
                removed.append(entry)
    if removed:
        logger.info(
            "removed %d temporary file(s) left by killed writers in %s: %s",
            len(removed),
            folder,
            ", ".join(p.name for p in removed),
        )
    return removed


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
