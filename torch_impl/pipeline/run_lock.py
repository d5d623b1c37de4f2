"""One run folder, one writer: an advisory lock file naming its owner.

    RUN/.lock    {"pid": 4242, "host": "node7", "started": "2026-01-31T12:00:00Z"}

:class:`RunLock` takes the lock of a run folder for as long as a training run writes into
it; a second run on the same folder stops at once with :class:`RunLockedError`, naming the
owner's PID, host and start time.

How. The lock file is opened (created if needed) and ``fcntl.flock(LOCK_EX | LOCK_NB)``
taken on it: the operating system holds that lock for the process and drops it when the
process ends, however it ends (``kill -9`` included), so a lock is never left stale by a
dead run. The owner is then written into the file. A lock file that names an owner but
whose flock is free was left by a run that died: it is taken over, with a warning naming
the dead run. On a normal exit, and on an exception, the lock file is removed and the lock
released.

File systems without ``flock`` (some network file systems answer ``ENOLCK``): the lock
file is created exclusively instead (``O_CREAT | O_EXCL``). An existing lock file is then
stale when its PID is no live process on this host (taken over, with a warning); a lock of
another host cannot be checked from here and refuses the run, saying which file to delete
if that run is gone.

Within one process the lock is re-entrant: acquiring a folder this process holds already
only counts (a command may take it around a call of :func:`~torch_impl.pipeline.train.train`,
which takes it too). Under ``torchrun`` only rank 0 takes it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from .runtime import PipelineError, pid_alive

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "read_owner"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"

_held: dict[Path, RunLock] = {}  # lock file -> this process's lock of it (re-entrancy)
_held_guard = threading.Lock()


class RunLockedError(PipelineError):
    """The run folder is in use by another run (the message names its PID, host and start)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The owner recorded in ``folder``'s lock file ({"pid", "host", "started"}), or None
    when there is no lock file or it records nobody (empty, or not our JSON)."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
    return _parse_owner(text)


def _parse_owner(text: str) -> dict[str, Any] | None:
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    return owner


def _describe(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "another process (its owner is not recorded yet)"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"


class RunLock:
    """The lock of one run folder: ``with RunLock(folder): ...`` or ``acquire()`` / ``release()``.

    Args:
        folder: the run folder (created if needed; the lock file is ``folder/.lock``).
        purpose: recorded in the lock file (e.g. "train").

    Raises (on acquire):
        RunLockedError: another live process holds the folder.
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "train") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None
        self._count = 0
        self._owner = self  # the RunLock that really holds the file (self, or the re-entered one)

    # ------------------------------------------------------------------ public
    @property
    def held(self) -> bool:
        return self._owner._fd is not None or self._owner._count > 0

    def acquire(self) -> RunLock:
        """Take the lock (module docstring); returns ``self``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        with _held_guard:
            holder = _held.get(key)
            if holder is not None:  # this process holds it already: count
                holder._count += 1
                self._owner = holder
                return self
            try:
                self._take()
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                logger.warning(
                    "%s: this file system has no flock (%s); using an exclusive lock file instead", self.folder, e
                )
                self._take_without_flock()
            self._count = 1
            _held[key] = self
        return self

    def release(self) -> None:
        """Drop this hold; the last one removes the lock file and releases the lock."""
        owner = self._owner
        with _held_guard:
            if owner._count == 0:
                return
            owner._count -= 1
            if self is not owner:
                self._owner = self
            if owner._count > 0:
                return
            _held.pop(owner.path.resolve(), None)
            with contextlib.suppress(FileNotFoundError):
                owner.path.unlink()  # while still locked: a waiter then sees a new file, not this one
            if owner._fd is not None:
                os.close(owner._fd)  # closing the last descriptor drops the flock
                owner._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    # ------------------------------------------------------------------ flock
    def _take(self) -> None:
        import fcntl

        for _ in range(20):  # the file may be removed between our open and our flock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _parse_owner(_read_fd(fd))
                os.close(fd)
                raise RunLockedError(self._busy_message(owner)) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file while we waited on it
                os.close(fd)
                continue
            previous = _parse_owner(_read_fd(fd))
            if previous is not None and not self._is_me(previous):
                logger.warning(
                    "%s: taking over the lock of a run that ended without releasing it (%s; killed?)",
                    self.folder,
                    _describe(previous),
                )
            self._fd = fd
            self._write_owner(fd)
            return
        raise RunLockedError(f"{self.path}: could not take the lock (the file kept changing); try again")

    # ------------------------------------------------------------------ no flock
    def _take_without_flock(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = read_owner(self.folder)
                if owner is None or not self._stale(owner):
                    raise RunLockedError(self._busy_message(owner, flock=False)) from None
                logger.warning(
                    "%s: removing the stale lock of a run that is gone (%s: no such process on this host)",
                    self.folder,
                    _describe(owner),
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            self._write_owner(fd)
            os.close(fd)  # the file itself is the lock
            return
        raise RunLockedError(f"{self.path}: could not take the lock (the file kept changing); try again")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _is_me(owner: dict[str, Any]) -> bool:
        return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()

    @staticmethod
    def _stale(owner: dict[str, Any]) -> bool:
        """A recorded owner on this host whose process is gone."""
        return owner.get("host") == socket.gethostname() and not pid_alive(int(owner["pid"]))

    def _busy_message(self, owner: dict[str, Any] | None, flock: bool = True) -> str:
        text = (
            f"{self.folder} is in use by another run: {_describe(owner)} (lock file {self.path}). "
            f"Wait for it to finish or stop it, or choose another --out"
        )
        if not flock and owner is not None and owner.get("host") != socket.gethostname():
            text += f"; if that run is gone, delete {self.path}"
        return text

    def _write_owner(self, fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "purpose": self.purpose}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)


def _read_fd(fd: int) -> str:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")
