"""One-line I/O errors and strict JSON: what the user sees when a file fails.

Every file slimnp writes goes through :func:`slimnp._atomic.atomic_path`, which
turns an ``OSError`` of the writer (Python's, or HDF5's through h5py, whose
text names the hidden temporary file and C-level details) into a
:class:`WriteError`.  Its message is one line: the file the user named, the
cause in words, the space needed where known, and what was kept::

    cannot write ptb.h5: no space left on device (about 64.6 MB needed, 1.2 MB
    free in runs); the previous ptb.h5 is unchanged

:func:`os_error_line` does the same for a failed read (``slimnp.cli`` uses it
for every other ``OSError``).

:func:`json_dumps` is the only JSON writer of ``--json`` outputs: a NaN or an
infinity (a perplexity of no tokens, a best validation perplexity before the
first epoch ends) becomes ``null`` with a ``<key>_reason`` field beside it, so
``jq`` and ``JSON.parse`` accept every line.
"""
from __future__ import annotations

import errno as _errno
import json
import math
import os
import re
from pathlib import Path

#: The cause of an errno in words (what a user can act on).
CAUSES = {
    _errno.ENOSPC: "no space left on device",
    _errno.EDQUOT: "disk quota exceeded",
    _errno.EACCES: "permission denied",
    _errno.EPERM: "permission denied",
    _errno.EROFS: "read-only file system",
    _errno.EFBIG: "file too large for the file system",
    _errno.EIO: "input/output error (a failing disk or network file system?)",
    _errno.ENAMETOOLONG: "file name too long",
    _errno.EMFILE: "too many open files",
}


class WriteError(OSError):
    """Writing a file failed; ``str()`` is the one-line message for the user.

    ``errno`` is the OS error number where one is known, ``filename`` the
    path the user named (never the temporary file).
    """

    def __init__(self, message: str, errno: int | None = None, filename=None):
        super().__init__(errno, message)
        self.message = message
        self.filename = None if filename is None else str(filename)

    def __str__(self) -> str:
        return self.message


def error_number(exc: BaseException) -> int | None:
    """The errno of an ``OSError``; h5py often leaves ``errno`` unset and only
    writes ``errno = 28`` into its text, which is read back here."""
    n = getattr(exc, "errno", None)
    if isinstance(n, int) and n > 0:
        return n
    m = re.search(r"errno\s*=\s*(\d+)", str(exc))
    if m and int(m.group(1)) > 0:
        return int(m.group(1))
    text = str(exc).lower()
    for code, words in ((_errno.ENOSPC, "no space left"), (_errno.EROFS, "read-only file system"),
                        (_errno.EACCES, "permission denied"), (_errno.EDQUOT, "quota exceeded")):
        if words in text:
            return code
    return None


def _first_words(exc: BaseException) -> str:
    """A foreign error's text without HDF5's parenthesised internals."""
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    text = re.sub(r"^\[Errno \d+\]\s*", "", text)
    return text.split(" (")[0].rstrip(":; ") or type(exc).__name__


def human_bytes(n: float) -> str:
    """``"64.6 MB"``, ``"1.20 GB"`` (decimal units, as ``df -H``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(folder) -> int | None:
    """Bytes an unprivileged writer may still use in ``folder`` (None if unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _folder(path: Path) -> str:
    return str(path.parent) if str(path.parent) not in ("", ".") else "the current folder"


def cause_of(exc: BaseException, path, *, writing: bool = True) -> tuple[int | None, str]:
    """``(errno, cause in words)`` of a failed read or write of ``path``."""
    path = Path(path)
    n = error_number(exc)
    if n == _errno.ENOENT:
        if writing or not path.parent.is_dir():
            parent = path.parent
            return n, (f"folder {parent} does not exist" if str(parent) not in ("", ".")
                       else "no such file or folder")
        return n, "no such file"
    if n == _errno.ENOTDIR:
        return n, f"{path.parent} is not a folder"
    if n == _errno.EISDIR:
        return n, "it is a folder"
    if n in CAUSES:
        return n, CAUSES[n]
    if n is not None:
        return n, os.strerror(n).lower()
    return None, _first_words(exc)


def write_error(exc: BaseException, path, *, existed: bool, needed: int | None = None) -> WriteError:
    """The :class:`WriteError` for ``exc``, raised while writing ``path``.

    ``existed``: whether ``path`` was there before (and so is kept unchanged);
    ``needed``: the file's expected size in bytes, if known (said with a full
    disk, beside the free space).
    """
    path = Path(path)
    n, cause = cause_of(exc, path)
    if n in (_errno.ENOSPC, _errno.EDQUOT):
        free = free_bytes(path.parent if str(path.parent) else ".")
        parts = []
        if needed:
            parts.append(f"about {human_bytes(needed)} needed")
        if free is not None:
            parts.append(f"{human_bytes(free)} free in {_folder(path)}")
        if parts:
            cause += f" ({', '.join(parts)})"
    elif n in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        cause += f" (folder {_folder(path)})" if str(path.parent) not in ("", ".") else \
            " (the current folder)"
    kept = f"the previous {path} is unchanged" if existed else f"no {path} was written"
    return WriteError(f"cannot write {path}: {cause}; {kept}", n, path)


def os_error_line(exc: OSError) -> str:
    """One line for an ``OSError`` that reached the command line (a failed
    read, most often): ``"<file>: permission denied"``."""
    if isinstance(exc, WriteError):
        return str(exc)
    name = exc.filename
    if name is None:
        text = re.sub(r"^\[Errno \d+\]\s*", "", " ".join(str(exc).split()))
        if "errno =" in text:  # HDF5's internals: its first words and the cause
            n = error_number(exc)
            return _first_words(exc) + (f": {CAUSES.get(n) or os.strerror(n).lower()}" if n else "")
        return text or type(exc).__name__
    _, cause = cause_of(exc, name, writing=False)
    return f"{name}: {cause}"


# ---------------------------------------------------------------------------
# strict JSON
# ---------------------------------------------------------------------------
def _non_finite_reason(value: float) -> str:
    return "not a number" if math.isnan(value) else "infinite"


def strict(obj, reasons: dict | None = None):
    """``obj`` with every NaN/infinite float replaced by None.

    In a dict, the key ``k`` of such a value gets a sibling ``k + "_reason"``:
    ``reasons[k]`` where the caller knows why (``{"perplexity": "no
    tokens"}``), else ``"not a number"`` / ``"infinite"``.  NumPy scalars
    count as floats.
    """
    reasons = reasons or {}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if _is_float(v) and not math.isfinite(float(v)):
                out[k] = None
                out.setdefault(f"{k}_reason", reasons.get(k, _non_finite_reason(float(v))))
            else:
                out[k] = strict(v, reasons)
        return out
    if isinstance(obj, (list, tuple)):
        return [None if _is_float(v) and not math.isfinite(float(v)) else strict(v, reasons)
                for v in obj]
    if _is_float(obj) and not math.isfinite(float(obj)):
        return None
    return obj


def _is_float(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, float):
        return True
    try:
        import numpy as np

        return isinstance(v, np.floating)
    except ImportError:  # pragma: no cover
        return False


def _default(obj):
    try:
        return obj.item()  # NumPy scalars
    except AttributeError:
        return str(obj)


def json_dumps(obj, reasons: dict | None = None, **kw) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict`); never NaN/Infinity."""
    return json.dumps(strict(obj, reasons), allow_nan=False, default=_default, **kw)
