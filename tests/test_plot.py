"""`slimnp plot` and slimnp.plot: figures from hand-written results and metrics files."""
import json
import struct
import sys
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from slimnp import plot as P  # noqa: E402


def _model(k=None, output=True, mapping="shuffle"):
    """config.model of a row: dense without k, else slim input (and output) with K = k."""
    m = {"vocab_size": 100, "hidden": 200, "layers": 2, "input": "dense", "input_k": 1,
         "output": "full", "output_k": 1, "mapping": mapping}
    if k is not None:
        m.update(input="slim", input_k=k)
        if output:
            m.update(output="slim", output_k=k)
    return {"model": m, "train": {"epochs": 2}}


def _row(run, method, compression, ppl, k=None, output=True, mapping="shuffle"):
    return {"run": run, "method": method, "compression": compression, "test_ppl": ppl,
            "valid_ppl": ppl + 5, "config": _model(k, output, mapping), "epochs": 2,
            "history": [{"epoch": 1, "lr": 1.0, "train_ppl": 300.0, "valid_ppl": ppl * 1.5},
                        {"epoch": 2, "lr": 0.5, "train_ppl": 200.0, "valid_ppl": ppl + 5}]}


# SE at its main K = 8 over four compressions; its test PPL is not monotone in
# the file's order, so a line drawn in file order would be visibly wrong
SE = {2: 120.0, 32: 150.0, 8: 125.0, 128: 190.0}
ROWS = ([_row("uncompressed", "uncompressed", 1, 115.0)]
        + [_row(f"se-{c}", "SE", c, p, k=8) for c, p in SE.items()]
        + [_row(f"sm-{c}", "SM", c, p + 30) for c, p in SE.items()]
        + [_row(f"pm-{c}", "PM", c, p + 20) for c, p in SE.items()]
        + [_row(f"se-input-{c}", "SE input only", c, p - 3, k=8, output=False) for c, p in SE.items()]
        # the K sweep of Figure 5, all at 1/8: not on the SE line of the ratio plot
        + [_row("se-8-k1", "SE", 8, 140.0, k=1), _row("se-8-k4", "SE", 8, 128.0, k=4),
           _row("se-8-k40", "SE", 8, 124.0, k=40),
           _row("hashnet-8", "HashNet", 8, 135.0, k=200, mapping="hash"),
           # a run that never finished its test: no test_ppl
           {**_row("pm-512", "PM", 512, 0.0), "test_ppl": None}])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def results(tmp_path):
    return _write(tmp_path / "results.jsonl", ROWS)


@pytest.fixture
def metrics(tmp_path):
    recs = [{"event": "epoch", "epoch": e, "lr": 1.0, "train_ppl": 400.0 / e, "valid_ppl": 300.0 / e}
            for e in (1, 2, 3)]
    recs.insert(2, {"event": "interrupted", "epoch": 2, "segment": 10})
    recs.append({"event": "final", "finished": True, "test_ppl": 99.0})
    return _write(tmp_path / "se-8.metrics.jsonl", recs)


def run(*args):
    from slimnp.cli import main

    return CliRunner().invoke(main, ["plot", *(str(a) for a in args)])


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def one_error_line(r):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


# ---------------------------------------------------------------------------
# what is plotted
# ---------------------------------------------------------------------------
def test_ratio_points_se_line_sorted_and_without_k_sweep():
    lines, baseline = P.ratio_points(ROWS)
    xs, ys = lines["SE"]
    assert xs == sorted(SE) == [2, 8, 32, 128]
    assert ys == [SE[c] for c in xs]  # the K = 8 row at 1/8, not K = 1, 4 or 40
    assert baseline == 115.0
    assert "uncompressed" not in lines  # a horizontal line, not a point series
    assert lines["PM"][0] == [2, 8, 32, 128]  # the PM row without test_ppl is left out
    assert lines["SE input only"][1] == [SE[c] - 3 for c in xs]
    assert P.ratio_points(ROWS, "valid_ppl")[0]["SE"][1] == [SE[c] + 5 for c in xs]


def test_seeds_of_one_point_give_their_mean_and_range(tmp_path):
    """Several rows of one method at one compression (seeds): the line goes
    through their mean, the error bar spans their lowest to highest value."""
    seeds = [_row(f"sm-32-s{i}", "SM", 32, p) for i, p in enumerate((150.0, 147.0, 156.0))]
    rows = [r for r in ROWS if r["run"] != "sm-32"] + seeds
    lines, _ = P.ratio_points(rows)
    xs, ys = lines["SM"]
    assert ys[xs.index(32)] == pytest.approx(151.0)
    assert ys[xs.index(8)] == SE[8] + 30  # one row: itself
    spread = P.ratio_spread(rows)
    assert spread["SM"] == {32: (147.0, 156.0, 3)} and spread["SE"] == {}
    pytest.importorskip("matplotlib")
    paths = P.plot_ratio(rows, tmp_path / "bars.png")
    assert paths[0].stat().st_size > 0


def test_ratio_figure_draws_the_rows(tmp_path):
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    n = P.draw_ratio(ax, ROWS)
    drawn = {line.get_label(): line for line in ax.get_lines()}
    se = drawn["SE"]
    assert list(se.get_xdata()) == [2, 8, 32, 128]
    assert list(se.get_ydata()) == [SE[c] for c in (2, 8, 32, 128)]
    assert list(drawn["uncompressed"].get_ydata()) == [115.0, 115.0]
    assert {"SM", "PM", "SE input only", "HashNet"} <= set(drawn)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1/2", "1/8", "1/32", "1/128"]
    assert ax.get_xscale() == "log"
    assert n == 4 * 4 + 1 + 1  # SE, SM, PM, SE input only; HashNet; uncompressed


def test_k_points_default_ratio_and_values():
    assert P.default_k_ratio(ROWS) == 8
    ratio, lines, baseline = P.k_points(ROWS)
    assert ratio == 8 and baseline == 115.0
    assert lines["SE"] == ([1, 4, 8, 40], [140.0, 128.0, SE[8], 124.0])
    assert lines["HashNet"] == ([200], [135.0])  # K = H
    assert "SM" not in lines
    # another compression has one K only: the SE point there, nothing else
    assert P.k_points(ROWS, ratio=32)[1] == {"SE": ([8], [SE[32]])}


def test_k_of_reads_output_k_then_input_k():
    assert P.k_of(_row("a", "SE", 8, 1.0, k=4)) == 4
    assert P.k_of(_row("a", "SE input only", 8, 1.0, k=4, output=False)) == 4
    assert P.k_of(_row("a", "SM", 8, 1.0)) is None
    assert P.k_of({"run": "a"}) is None


def test_load_rows_concatenates_and_keeps_the_last_line_of_a_run(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_row("x", "SE", 2, 100.0), _row("x", "SE", 2, 90.0)])
    b = _write(tmp_path / "b.jsonl", [_row("y", "SM", 2, 110.0)])
    rows = P.load_rows([a, b])
    assert [(r["run"], r["test_ppl"]) for r in rows] == [("x", 90.0), ("y", 110.0)]


def test_load_series_from_metrics_and_results(metrics, results):
    (m,) = P.load_series([metrics])
    assert (m.label, m.epochs, m.ppl) == ("se-8", [1, 2, 3], [300.0, 150.0, 100.0])
    by_run = {s.label: s for s in P.load_series([results])}
    assert by_run["se-2"].epochs == [1, 2] and by_run["se-2"].ppl == [180.0, 125.0]


# ---------------------------------------------------------------------------
# files written
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ratio", "k", "curves"])
def test_each_kind_is_a_960x600_png(tmp_path, results, kind):
    from matplotlib.image import imread

    out = tmp_path / f"{kind}.png"
    r = run(results, "--kind", kind, "--out", out, "--title", "PTB")
    assert r.exit_code == 0, r.output
    assert png_size(out) == (960, 600)
    assert imread(out).shape[:2] == (600, 960)
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and str(out) in line and kind in line


def test_library_functions_write_png_and_svg(tmp_path, metrics):
    written = P.plot_ratio(ROWS, tmp_path / "fig4.png", svg=True, title="t")
    assert written == [tmp_path / "fig4.png", tmp_path / "fig4.svg"]
    assert png_size(written[0]) == (960, 600)
    assert ET.parse(written[1]).getroot().tag.endswith("svg")
    assert P.plot_k(ROWS, tmp_path / "fig5", ratio=8) == [tmp_path / "fig5.png"]
    assert P.plot_curves(P.load_series([metrics]), tmp_path / "c.png") == [tmp_path / "c.png"]


def test_svg_option(tmp_path, results):
    out = tmp_path / "sub" / "fig.png"
    r = run(results, "--out", out, "--svg")
    assert r.exit_code == 0, r.output
    root = ET.parse(out.with_suffix(".svg")).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert str(out.with_suffix(".svg")) in r.output
    assert "ratio plot of 18 rows" in r.output


def test_auto_picks_curves_for_metrics_files(tmp_path, metrics, results):
    r = run(metrics, "--out", tmp_path / "a.png")
    assert r.exit_code == 0 and "curves plot of 1 run" in r.output, r.output
    # a results file among them: a ratio plot, for which a metrics file has no rows
    r = run(metrics, results, "--out", tmp_path / "b.png", "--kind", "auto")
    assert r.exit_code == 1 and "no results rows" in r.output and str(metrics) in r.output
    r = run(results, "--out", tmp_path / "c.png")
    assert r.exit_code == 0 and "ratio plot" in r.output, r.output


def test_method_option_keeps_those_methods_and_the_baseline(tmp_path, results):
    """Figure 4 from a file that also holds Figure 2's rows: SE, SM, PM only."""
    r = run(results, "--method", "SE", "--method", "SM", "--method", "PM", "--out", tmp_path / "m.png")
    assert r.exit_code == 0, r.output
    # 4 each of SE (K = 8 only), SM and PM, and the uncompressed line
    assert "ratio plot of 13 rows" in r.output, r.output


def test_k_ratio_option(tmp_path, results):
    r = run(results, "--kind", "k", "--k-ratio", "1/8", "--out", tmp_path / "k.png")
    assert r.exit_code == 0 and "k plot of 6 rows" in r.output, r.output  # 4 SE, HashNet, uncompressed
    line = one_error_line(run(results, "--kind", "k", "--k-ratio", "3", "--out", tmp_path / "k.png"))
    assert str(results) in line and "1/3" in line


# ---------------------------------------------------------------------------
# errors: one line, exit code 1
# ---------------------------------------------------------------------------
def test_missing_file(tmp_path):
    line = one_error_line(run(tmp_path / "nope.jsonl", "--out", tmp_path / "x.png"))
    assert "nope.jsonl" in line and "no such file" in line


def test_line_that_is_not_json(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n\n{truncated\n")
    line = one_error_line(run(bad, "--out", tmp_path / "x.png"))
    assert f"{bad}:3: not a JSON line" in line


@pytest.mark.parametrize("records", [[], [{"note": "no run"}], [{"run": "a", "method": "SE"}]],
                         ids=["empty", "no-runs", "no-compression"])
def test_file_with_no_usable_rows(tmp_path, records):
    f = _write(tmp_path / "empty.jsonl", records)
    line = one_error_line(run(f, "--out", tmp_path / "x.png"))
    assert str(f) in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, words", [(["--kind", "bars"], "unknown --kind 'bars'"),
                                         (["--metric", "bleu"], "unknown --metric"),
                                         (["--k-ratio", "x"], "--k-ratio"),
                                         (["--out", "fig.jpg"], "*.png")])
def test_bad_options(tmp_path, results, args, words):
    assert words in one_error_line(run(results, "--out", tmp_path / "x.png", *args))
    assert not list(tmp_path.glob("*.png"))


def test_missing_matplotlib_gives_the_install_hint(tmp_path, results, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    line = one_error_line(run(results, "--out", tmp_path / "x.png"))
    assert line == "Error: plotting needs matplotlib: pip install 'slimnp[plot]'"
    with pytest.raises(P.PlotError, match="slimnp\\[plot\\]"):
        P.plot_ratio(ROWS, tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists()


def test_module_imports_without_matplotlib():
    # `slimnp --help` must work without the extra: nothing of matplotlib at import time
    src = open(P.__file__, encoding="utf-8").read()
    top = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert not any("matplotlib" in ln for ln in top)
