"""Crash-safe file replacement, shared by every writer in slimnp.

Models, corpora, encoded ids and downloads are all written the same way: to
a hidden temporary file in the target's directory, synced to disk, then
renamed over the target.  A crash, Ctrl-C or full disk therefore never
leaves a half-written file under the real name and never damages the file
that was there before.

A failed write raises :class:`slimnp.errors.WriteError`, an ``OSError`` whose
message is one line naming the target (never the temporary file), the cause
in words and what was kept (``cannot write m.h5: no space left on device
(about 64.6 MB needed, 1.2 MB free in runs); the previous m.h5 is unchanged``).

Two helpers every command that writes or checks files needs live here too,
below all of them: :func:`check_output` (can this path be written? asked
before hours of work) and :func:`file_sha256` (a file's digest, recorded to
recognise a training text or a source model later).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from .errors import WriteError, write_error


def fsync_path(path, directory: bool = False) -> None:
    """fsync a file (or a directory, to make a rename in it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_special(path) -> bool:
    """True for an existing target that is not a regular file (``/dev/null``,
    ``/dev/stdout``, a FIFO): written in place, never renamed over."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def temp_name(path) -> Path:
    """The hidden temporary file :func:`atomic_path` writes before renaming."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temps(path) -> None:
    """Delete temporary files of ``path`` left by writers that no longer run
    (a ``kill -9`` during a checkpoint write leaves its temporary file)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        names = [p for p in folder.glob(f".{path.name}.tmp-*")]
    except OSError:
        return
    for p in names:
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # gone: its file is garbage
            with contextlib.suppress(OSError):
                p.unlink()
        except OSError:  # alive (another user's): leave it
            pass


@contextlib.contextmanager
def atomic_path(path, needed: int | None = None):
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    The body writes the temporary file (by any means: ``open``, h5py, ...).
    On a clean exit the file is fsync'ed and renamed onto ``path`` and the
    directory is fsync'ed; on any exception, ``KeyboardInterrupt`` included,
    the temporary file is removed and ``path`` is left untouched.  An
    ``OSError`` (the body's or the rename's) becomes a
    :class:`~slimnp.errors.WriteError`; ``needed``, the file's expected size
    in bytes, is quoted when the disk is full.

    A target that exists and is not a regular file (``--best /dev/null``, a
    FIFO) is yielded itself and written in place: renaming over it would
    replace the device with a plain file (as root, for every process).
    """
    path = Path(path)
    if is_special(path):
        try:
            yield path
        except OSError as exc:
            raise write_error(exc, path, existed=False, needed=needed) from exc
        return
    tmp = temp_name(path)
    existed = path.exists()
    remove_stale_temps(path)
    try:
        try:
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(exc, path, existed=existed, needed=needed) from exc
    try:
        fsync_path(path.parent, directory=True)
    except OSError:
        # some filesystems cannot fsync a directory: the file itself is
        # complete, only the durability of the rename is weaker
        pass


def append_line(path, line: str) -> None:
    """Add ``line`` (and a newline) to the text file ``path`` atomically.

    The file is rewritten whole through :func:`atomic_path` (a log of a few
    hundred lines): a full disk leaves the previous lines intact instead of a
    torn last line that readers would choke on.
    """
    path = Path(path)
    if is_special(path):
        with atomic_path(path) as target, open(target, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        return
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    except OSError as exc:
        raise write_error(exc, path, existed=True) from exc
    data = old + line.encode("utf-8") + b"\n"
    with atomic_path(path, needed=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def check_output(out, *, what: str = "--out") -> None:
    """Fail in seconds, not after an epoch, when ``out`` cannot be written:
    its folder must exist and take a new file (a probe file is created and
    removed there), and it must not be a folder.  Raises
    :class:`slimnp.errors.WriteError` (one line)."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if is_special(out):  # /dev/null, a FIFO: written in place
        return
    if out.is_dir():
        raise WriteError(f"cannot write {out} ({what}): it is a folder; give a file name", filename=out)
    if not folder.exists():
        raise WriteError(f"cannot write {out} ({what}): folder {folder} does not exist; "
                         "create it first (nothing was done)", filename=out)
    if not folder.is_dir():
        raise WriteError(f"cannot write {out} ({what}): {folder} is not a folder", filename=out)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.probe-")
    except OSError as exc:
        err = write_error(exc, out, existed=out.exists())
        cause = err.message.split(";")[0].removeprefix(f"cannot write {out}: ")
        raise WriteError(f"cannot write {out} ({what}): {cause}; nothing was done", err.errno,
                         out) from None
    os.close(fd)
    os.unlink(probe)


def file_sha256(path) -> str:
    """The hex sha256 of the file ``path`` (read in 4 MB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
