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
