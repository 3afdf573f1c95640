"""Atomic writes: a reader never sees a half-written file or results folder."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sim.errors import InputError

# Every results folder holds this file. A results folder is replaced whole, so only a folder that
# holds it (or an empty one) is: `--out .` or `--out ~` must not delete what the user keeps there.
MARK = ".servesim"

# What writing can meet once it has begun: a full disk or quota, a file past the size limit.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(InputError):
    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: cannot finish writing: {why} (left as it was)")
        self.why = why


def _stop_writing(path: Path, e: BaseException) -> None:
    """After cleaning up, raise one clear line for a full disk, naming what was being written (a
    results folder, not the file inside its temporary twin); let anything else through."""
    if isinstance(e, DiskFull):
        raise DiskFull(path, e.why) from None
    if isinstance(e, OSError) and e.errno in _FULL:
        raise DiskFull(path, e.strerror) from None


# A timeout's or a job scheduler's SIGTERM and a closed terminal's SIGHUP kill at once, without
# unwinding; Ctrl-C's SIGINT raises KeyboardInterrupt where it lands.
_KILLS = (signal.SIGTERM, signal.SIGHUP)


class _Killed(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only it may set handlers


@contextmanager
def _undone_if_killed() -> Iterator[None]:
    """While a write is in progress, a SIGTERM or SIGHUP raises, so that the write is undone as on
    any error (killing at once left the temporary twin beside its target); then it kills."""
    def kill(signum, frame):
        for s in caught:  # a second kill must not cut the undoing short
            signal.signal(s, signal.SIG_IGN)
        raise _Killed(signum)

    # Not where a handler is set: an outer write's, or SIG_IGN under nohup.
    caught = [s for s in _KILLS if _main_thread() and signal.getsignal(s) == signal.SIG_DFL]
    for s in caught:
        signal.signal(s, kill)
    try:
        yield
    except _Killed as e:
        signal.signal(e.signum, signal.SIG_DFL)
        signal.raise_signal(e.signum)
        raise  # not reached: the default action ends the process
    finally:
        for s in caught:
            signal.signal(s, signal.SIG_DFL)


@contextmanager
def _held() -> Iterator[None]:
    """Hold Ctrl-C and kills over the renames that replace a results folder, then let them act:
    between the two, acting at once left no results folder at all (the old one moved aside)."""
    if not _main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, *_KILLS)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file by renaming a finished temporary file over it."""
    path = Path(path)
    check_writable(path)
    with _undone_if_killed():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise InputError(f"{path}: cannot write a file here: {e.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            _stop_writing(path, e)
            raise


def _check_ancestor(path: Path) -> None:
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{ancestor}: not a folder; choose another --out")
    try:  # a trial file, not os.access: that says yes to root on a read-only mount or /proc
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as e:
        raise InputError(f"{ancestor}: cannot write here: {e.strerror}; choose another --out") from None


def check_writable(path: str | Path) -> None:
    """Raise InputError unless a file may be written at `path`. Commands that run for minutes
    call it first, so a bad --out fails before the work rather than after it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a file; choose another --out")
    if path.exists() and not path.is_file():  # the rename would put a file where /dev/null was
        raise InputError(f"{path}: not a regular file (a device, a pipe or a socket); choose another --out")
    _check_ancestor(path)


def check_replaceable(path: str | Path) -> None:
    """Raise InputError unless a results folder may be written at `path`: nothing there, an empty
    folder, or a results folder written before. Commands call it before their work, too."""
    path = Path(path)
    if path.is_dir():
        if any(path.iterdir()) and not (path / MARK).is_file():
            raise InputError(f"{path}: a folder servesim did not write, and a results folder is replaced "
                             "whole; choose another --out, or empty it")
    elif path.exists() or path.is_symlink():
        raise InputError(f"{path}: not a folder; choose another --out")
    _check_ancestor(path)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` whole, on error it vanishes."""
    path = Path(path)
    check_replaceable(path)
    with _undone_if_killed():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        except OSError as e:
            raise InputError(f"{path}: cannot write a results folder here: {e.strerror}") from None
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            (tmp / MARK).write_text("servesim results: the next run writing here replaces this folder whole\n",
                                    encoding="utf-8")
            with _held():
                if path.exists():
                    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
                    os.replace(path, old / "x")
                    os.replace(tmp, path)
                    shutil.rmtree(old)
                else:
                    os.replace(tmp, path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _stop_writing(path, e)
            raise
