"""Crash-safe file replacement, shared by every writer in slimnp.

Models, corpora, encoded ids and downloads are all written the same way: to
a hidden temporary file in the target's directory, synced to disk, then
renamed over the target.  A crash, Ctrl-C or full disk therefore never
leaves a half-written file under the real name and never damages the file
that was there before.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_path(path, directory: bool = False) -> None:
    """fsync a file (or a directory, to make a rename in it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    The body writes the temporary file (by any means: ``open``, h5py, ...).
    On a clean exit the file is fsync'ed and renamed onto ``path`` and the
    directory is fsync'ed; on any exception, ``KeyboardInterrupt`` included,
    the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fsync_path(path.parent, directory=True)
    except OSError:
        # some filesystems cannot fsync a directory: the file itself is
        # complete, only the durability of the rename is weaker
        pass
