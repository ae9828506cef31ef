"""The progress line: its ETA ignores the one-off cost of the first unit."""
import io

from slimnp import progress


def test_eta_from_the_rate_after_the_first_update(monkeypatch):
    clock = iter([0.0, 100.0, 101.0, 102.0])  # start; first update after a 100 s compile
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = progress.Progress(10, "epoch", stream=out, log_interval=0.0)
    p.update(1)  # t=100: no rate yet
    p.update(2)  # t=101: 1 unit/s since the first update, 8 units left
    p.update(3)  # t=102: still 1 unit/s, 7 left
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("ETA --:--")
    assert lines[1].endswith("ETA 0:08") and lines[2].endswith("ETA 0:07")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_with_block_ends_the_line_even_on_an_error():
    """A drawn terminal line is ended by the ``with`` block, also when the
    work inside raises (the error message then starts on a line of its own)."""
    out = _Tty()
    try:
        with progress.Progress(4, "k-means", stream=out, interval=0.0) as bar:
            bar.update(1, "pool 1/4")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert out.getvalue().startswith("\rk-means [") and out.getvalue().endswith("\n")
    quiet = _Tty()
    with progress.Progress(4, "k-means", stream=quiet, enabled=False) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""
