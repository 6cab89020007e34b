"""The output folder of a run or a sweep: made and proven writable before any work, held by one
process at a time, and written file by file atomically.

``claim(out)`` creates the folder, takes an exclusive lock on ``OUT/.lock`` and proves that a
file can be written there. The lock is ``fcntl.flock``: the kernel drops it when its holder
dies, so the folder of a killed run is free for ``--resume`` at once, while a second live run
on the folder is refused. Temp files a killed writer left behind are removed then, since no
other writer can hold the folder.

``atomic_write(path, data)`` writes a temp file unique to the writer (pid and a random suffix)
next to ``path``, syncs it and renames it over ``path``: readers see the old file or the new
one, never half of one, and two writers never share a temp file. The temp file is removed on
any failure; a write that fails (a full disk) raises ``OutputError``, one line naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
from collections.abc import Callable
from typing import BinaryIO

LOCK = ".lock"
_TEMP = re.compile(r"\.\d+\.[0-9a-f]{8}\.tmp$")


class OutputError(OSError):
    """A file of the output folder could not be written (a full disk, a folder gone)."""


def _temp_name(path: str) -> str:
    return f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


class _Recording:
    """A binary file that keeps the OSError of a failed write: torch.save turns it into a
    RuntimeError, and the cause (a full disk) is what the user needs to see."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, b):
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: str, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a function writing to a binary file) to
    ``path`` atomically. OutputError when the file system refuses."""
    tmp = _temp_name(path)
    file = None
    try:
        with open(tmp, "xb") as f:
            file = _Recording(f)
            if callable(data):
                data(file)
            else:
                file.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = e if isinstance(e, OSError) else (file.error if file is not None else None)
        if cause is None:
            raise
        raise OutputError(f"--out: cannot write {path!r}: {cause.strerror or cause}") from None


class Claim:
    """The lock on an output folder, held until ``release`` (or the process ends)."""

    def __init__(self, out: str, fd: int):
        self.out = out
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _reason(e: OSError) -> str:
    return {errno.EEXIST: "it is a file, not a folder",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.ENAMETOOLONG: "the name is too long for the file system"}.get(
                e.errno, e.strerror or str(e))


def _missing(out: str) -> list[str]:
    """The folders of ``out`` that do not exist yet, innermost first."""
    missing, path = [], os.path.abspath(out)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def claim(out: str, option: str = "--out", what: str = "run") -> Claim:
    """Create ``out``, lock it for this process and prove it writable. ValueError naming
    ``option`` when it cannot be used (the folders it made are removed again) or another
    process holds it."""
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{option} must be valid UTF-8 text, got {out!r}") from None
    made = _missing(out)
    try:
        return _claim(out, option, what)
    except BaseException:
        if made:  # the folder is this call's: so is its lock file
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, LOCK))
        for path in made:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if empty: a folder another process wrote to stays
        raise


def _claim(out: str, option: str, what: str) -> Claim:
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ValueError(f"{option}: cannot use {out!r} as the output folder: {_reason(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ValueError(f"{option}: cannot lock {out!r}: {_reason(e)}") from None
        raise ValueError(f"{option}: {out!r} is in use by another {what}"
                         f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to "
                         f"finish or use another {option}") from None
    held = Claim(out, fd)
    probe = _temp_name(os.path.join(out, ".probe"))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for name in os.listdir(out):  # left by a writer that was killed mid-write
            if _TEMP.search(name):
                os.unlink(os.path.join(out, name))
        with open(probe, "xb") as f:  # a file can be made, written and synced
            f.write(b"probe")
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        held.release()
        raise ValueError(f"{option}: cannot write to {out!r}: {_reason(e)}") from None
    return held
