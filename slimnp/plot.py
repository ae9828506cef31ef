"""Figures from experiment results: ``slimnp plot``.

Three kinds of figure, after Li et al. (2018):

* ``ratio`` (the paper's Figures 2 and 4): perplexity against the compression
  of the embedding layers, one line per method, the uncompressed model as a
  dashed horizontal line;
* ``k`` (Figure 5): perplexity against K, the number of sub-vectors per word,
  at one compression ratio, HashNet annotated;
* ``curves``: validation perplexity against epoch, one line per run.

The inputs are the results files of ``slimnp experiment run`` (one JSON object
per finished run) and the ``*.metrics.jsonl`` files of ``slimnp train`` (one
JSON object per event).  Every error about the input is a :class:`PlotError`
whose message names the file (and the line, for a damaged one).

matplotlib is an optional extra (``pip install 'slimnp[plot]'``): it is
imported only when a figure is drawn, so the rest of slimnp never needs it.

Examples
--------
>>> from slimnp.plot import load_rows, plot_ratio          # doctest: +SKIP
>>> rows = load_rows(["experiments/results/sweeps-ptb.jsonl"])  # doctest: +SKIP
>>> plot_ratio(rows, "fig4.png", svg=True)                 # doctest: +SKIP
[PosixPath('fig4.png'), PosixPath('fig4.svg')]
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import results
from ._atomic import atomic_path

KINDS = ("ratio", "k", "curves", "auto")
METRICS = {"test_ppl": "test perplexity", "valid_ppl": "validation perplexity"}
# 6.4 x 4.0 inches at 150 dpi: 960 x 600 pixels, the width of a README column
FIGSIZE = (6.4, 4.0)
DPI = 150
NO_MATPLOTLIB = "plotting needs matplotlib: pip install 'slimnp[plot]'"
# methods of Figure 5: the K sweep of SE and its K = H end point
K_METHODS = ("SE", "HashNet")


class PlotError(ValueError):
    """Input that cannot be plotted; the message is one line naming the file
    (the command line prints it as ``Error: ...`` with exit code 1)."""


class NothingToPlot(PlotError):
    """The rows hold nothing for the figure asked for (e.g. no row has a
    compression); the command line prefixes the files' names."""


@dataclass
class Series:
    """One training curve: validation perplexity per epoch.

    Attributes
    ----------
    label : str
        The run's name (legend entry).
    epochs : list of int
        Epoch numbers, increasing.
    ppl : list of float
        Validation perplexity after each of ``epochs``.
    """

    label: str
    epochs: list = field(default_factory=list)
    ppl: list = field(default_factory=list)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def read_records(path) -> list:
    """The JSON objects of a JSON-lines file, one per non-blank line
    (:func:`slimnp.results.read_lines`).

    Parameters
    ----------
    path : str or Path
        A results file or a metrics file.

    Returns
    -------
    list of dict

    Raises
    ------
    PlotError
        The file is missing or unreadable, or a line is not a JSON object
        (the message gives ``file:line``).
    """
    try:
        return results.read_lines(path)
    except results.ResultsError as exc:
        raise PlotError(str(exc)) from None


def is_metrics(records) -> bool:
    """Whether records are a ``slimnp train`` metrics file (every line an event)."""
    return bool(records) and all("event" in r for r in records)


def _rows_of(path, records) -> list:
    """The results rows of one file (:func:`slimnp.results.by_run`): a run
    listed twice keeps its last line, as ``slimnp experiment`` reads it."""
    try:
        rows = results.by_run(records, path)
    except results.ResultsError as exc:
        raise PlotError(str(exc)) from None
    if not rows:
        hint = " (a training metrics file? use --kind curves)" if is_metrics(records) else ""
        raise PlotError(f"{path}: no results rows (JSON lines with a \"run\" name){hint}")
    return list(rows.values())


def load_rows(paths) -> list:
    """The rows of one or more results files of ``slimnp experiment run``.

    Parameters
    ----------
    paths : iterable of str or Path
        Results files; their rows are concatenated in order.

    Returns
    -------
    list of dict
        One row per run and file (a run listed twice in a file keeps its
        last line).

    Raises
    ------
    PlotError
        A file is missing, damaged, or holds no results rows.
    """
    return [row for p in paths for row in _rows_of(p, read_records(p))]


def _series_of(path, records) -> list:
    """Curves of one file: a metrics file is one run; a results file gives
    one per row, from its ``history``."""
    path = Path(path)
    if is_metrics(records):
        name = path.name.removesuffix(".jsonl").removesuffix(".metrics")
        return [_curve(name, (r for r in records if r.get("event") == "epoch"))]
    return [_curve(row["run"], row.get("history") or []) for row in _rows_of(path, records)]


def _curve(label, epochs) -> Series:
    # keyed by epoch: a resumed run that logged an epoch twice keeps the later line
    points = {}
    for e in epochs:
        if isinstance(e, dict) and _number(e.get("epoch")) is not None \
                and _number(e.get("valid_ppl")) is not None:
            points[e["epoch"]] = e["valid_ppl"]
    ordered = sorted(points.items())
    return Series(label, [x for x, _ in ordered], [y for _, y in ordered])


def load_series(paths) -> list:
    """Training curves from metrics files and/or results files.

    Parameters
    ----------
    paths : iterable of str or Path
        ``*.metrics.jsonl`` files of ``slimnp train`` (one curve each, named
        after the file) or results files (one curve per run, from its
        ``history``).

    Returns
    -------
    list of Series
        Runs without a single epoch of validation perplexity are left out.

    Raises
    ------
    PlotError
        A file is missing or damaged, or no file has a curve.
    """
    paths = list(paths)
    series = [s for p in paths for s in _series_of(p, read_records(p)) if s.epochs]
    if not series:
        raise PlotError(f"{_names(paths)}: no epochs with a validation perplexity to plot")
    return series


def _names(paths) -> str:
    return ", ".join(str(p) for p in paths)


# ---------------------------------------------------------------------------
# from rows to points (no matplotlib)
# ---------------------------------------------------------------------------
def _number(x):
    """``x`` if it is a finite real number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return x


def method_of(row) -> str:
    """A row's method label; the run name when the plan gave none."""
    return row.get("method") or row["run"]


def k_of(row):
    """K of a row's slim layers: ``output_k`` when the output layer is slim,
    else ``input_k`` when the input layer is; None for a dense model."""
    model = (row.get("config") or {}).get("model") or {}
    if model.get("output") == "slim":
        return _number(model.get("output_k"))
    if model.get("input") == "slim":
        return _number(model.get("input_k"))
    return None


def _baseline(rows, metric):
    """The uncompressed model's value of ``metric`` (the last such row), or None."""
    values = [_number(r.get(metric)) for r in rows if method_of(r) == "uncompressed"]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def main_k(rows, method="SE"):
    """The K most rows of ``method`` have: the plan's main K, not its K sweep.

    Returns
    -------
    int or None
        None when no row of ``method`` has a K.
    """
    counts = Counter(k_of(r) for r in rows if method_of(r) == method and k_of(r) is not None)
    return counts.most_common(1)[0][0] if counts else None


def ratio_points(rows, metric="test_ppl"):
    """The points of a ratio figure (the paper's Figures 2 and 4).

    Parameters
    ----------
    rows : list of dict
        Results rows (:func:`load_rows`).
    metric : str
        The y value: ``test_ppl`` or ``valid_ppl``.

    Returns
    -------
    lines : dict
        ``method -> ([compression, ...], [metric, ...])``, sorted by
        compression; rows without a compression or a value are left out, and
        so are SE rows whose K is not the main K (:func:`main_k`), the K
        sweep of Figure 5, which would make the SE line zig-zag.  Several
        rows of one method at one compression (seeds) give their mean.
    baseline : float or None
        The uncompressed model's value, drawn as a horizontal line.
    """
    lines = {m: _unzip([(x, sum(ys) / len(ys)) for x, ys in sorted(by_x.items())])
             for m, by_x in _ratio_values(rows, metric).items()}
    return lines, _baseline(rows, metric)


def _ratio_values(rows, metric):
    """``method -> {compression: [metric of each row]}`` of a ratio figure."""
    keep_k = main_k(rows, "SE")
    values = {}
    for r in rows:
        method, x, y = method_of(r), _number(r.get("compression")), _number(r.get(metric))
        if method == "uncompressed" or x is None or x <= 0 or y is None:
            continue
        if method == "SE" and k_of(r) is not None and k_of(r) != keep_k:
            continue
        values.setdefault(method, {}).setdefault(x, []).append(y)
    return values


def ratio_spread(rows, metric="test_ppl") -> dict:
    """``method -> {compression: (lowest, highest, n)}`` of the ratio
    figure's points that several rows (seeds) make: drawn as error bars
    from the lowest to the highest value around the mean."""
    return {m: {x: (min(ys), max(ys), len(ys)) for x, ys in by_x.items() if len(ys) > 1}
            for m, by_x in _ratio_values(rows, metric).items()}


def default_k_ratio(rows):
    """The compression of Figure 5: of the compressions at which SE or HashNet
    rows have several distinct K, the one with the most rows (None if none)."""
    ks, counts = {}, Counter()
    for r in rows:
        x, k = _number(r.get("compression")), k_of(r)
        if method_of(r) in K_METHODS and x is not None and k is not None:
            ks.setdefault(x, set()).add(k)
            counts[x] += 1
    swept = [(n, x) for x, n in counts.items() if len(ks[x]) > 1]
    # max() keeps the first of equal counts: Counter preserves file order
    return max(swept, key=lambda t: t[0])[1] if swept else None


def k_points(rows, ratio=None, metric="test_ppl"):
    """The points of a K figure (the paper's Figure 5).

    Parameters
    ----------
    rows : list of dict
        Results rows (:func:`load_rows`).
    ratio : float, optional
        The compression reciprocal whose rows to plot (8 means 1/8); default
        :func:`default_k_ratio`.
    metric : str
        The y value: ``test_ppl`` or ``valid_ppl``.

    Returns
    -------
    ratio : float or None
        The compression plotted; None when there is nothing to choose from.
    lines : dict
        ``method -> ([K, ...], [metric, ...])`` for SE and HashNet, sorted by K.
    baseline : float or None
        The uncompressed model's value.
    """
    if ratio is None:
        ratio = default_k_ratio(rows)
    points = {}
    if ratio is not None:
        for r in rows:
            x, k, y = _number(r.get("compression")), k_of(r), _number(r.get(metric))
            if method_of(r) in K_METHODS and x is not None and math.isclose(x, ratio) \
                    and k is not None and k > 0 and y is not None:
                points.setdefault(method_of(r), []).append((k, y))
    return ratio, {m: _unzip(sorted(p)) for m, p in points.items()}, _baseline(rows, metric)


def _unzip(pairs):
    return [x for x, _ in pairs], [y for _, y in pairs]


def _unzip_n(rows, n):
    return tuple([r[i] for r in rows] for i in range(n))


def _count(lines, baseline) -> int:
    return sum(len(xs) for xs, _ in lines.values()) + (baseline is not None)


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------
def _matplotlib():
    """matplotlib's Figure class, or a one-line install hint."""
    try:
        # the top-level package first: a submodule still cached in
        # sys.modules must not hide a matplotlib that cannot be imported
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(NO_MATPLOTLIB) from None
    return Figure


def _fraction(x) -> str:
    """A compression reciprocal as the paper writes it: 1, 1/2, 1/8, ..."""
    return "1" if x == 1 else f"1/{x:g}"


def _fixed_ticks(axis, values, label):
    """Ticks at exactly ``values`` (the settings plotted), no minor ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.set_major_locator(FixedLocator(sorted(set(values))))
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))
    axis.set_minor_locator(NullLocator())


def _draw_baseline(ax, baseline):
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="0.4", linewidth=1.2, label="uncompressed")


def draw_ratio(ax, rows, metric="test_ppl") -> int:
    """Draw a ratio figure (:func:`ratio_points`) on a matplotlib Axes.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    rows : list of dict
        Results rows.
    metric : str
        ``test_ppl`` or ``valid_ppl``.

    Returns
    -------
    int
        Rows plotted (the uncompressed line counts as one).

    Raises
    ------
    PlotError
        No row has a compression and a value of ``metric``.
    """
    lines, baseline = ratio_points(rows, metric)
    if not lines:
        raise NothingToPlot(f"no rows with a compression and a {metric} to plot")
    spread = ratio_spread(rows, metric)
    for method, (xs, ys) in lines.items():
        (line,) = ax.plot(xs, ys, marker="o", label=method)
        bars = [(x, y, *spread[method][x][:2]) for x, y in zip(xs, ys) if x in spread.get(method, {})]
        if bars:  # several seeds: the range of their values around the mean
            bx, by, lo, hi = _unzip_n(bars, 4)
            ax.errorbar(bx, by, yerr=[[y - a for y, a in zip(by, lo)], [b - y for y, b in zip(by, hi)]],
                        fmt="none", ecolor=line.get_color(), capsize=3)
    _draw_baseline(ax, baseline)
    ax.set_xscale("log", base=2)
    _fixed_ticks(ax.xaxis, [x for xs, _ in lines.values() for x in xs], _fraction)
    ax.set_xlabel("compression of the embedding layers")
    ax.set_ylabel(METRICS.get(metric, metric))
    return _count(lines, baseline)


def draw_k(ax, rows, ratio=None, metric="test_ppl") -> int:
    """Draw a K figure (:func:`k_points`) on a matplotlib Axes.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    rows : list of dict
        Results rows.
    ratio : float, optional
        The compression reciprocal to plot; default :func:`default_k_ratio`.
    metric : str
        ``test_ppl`` or ``valid_ppl``.

    Returns
    -------
    int
        Rows plotted (the uncompressed line counts as one).

    Raises
    ------
    PlotError
        No compression has several K (and ``ratio`` was not given), or no SE
        or HashNet row is at ``ratio``.
    """
    ratio, lines, baseline = k_points(rows, ratio, metric)
    if ratio is None:
        raise NothingToPlot("no compression at which SE or HashNet rows have several K; give --k-ratio")
    if not lines:
        raise NothingToPlot(f"no SE or HashNet rows with a K and a {metric} at compression {_fraction(ratio)}")
    for method, (ks, ys) in lines.items():
        ax.plot(ks, ys, marker="o", label=method)
    if "HashNet" in lines:
        # the paper marks HashNet as the K = H end of the sweep
        for k, y in zip(*lines["HashNet"]):
            ax.annotate("HashNet", (k, y), textcoords="offset points", xytext=(0, 8), ha="center")
    _draw_baseline(ax, baseline)
    ax.set_xscale("log")
    _fixed_ticks(ax.xaxis, [k for ks, _ in lines.values() for k in ks], lambda v: f"{v:g}")
    ax.set_xlabel("sub-vectors per word K")
    ax.set_ylabel(METRICS.get(metric, metric))
    ax.set_title(f"compression {_fraction(ratio)}")
    return _count(lines, baseline)


def draw_curves(ax, series) -> int:
    """Draw training curves (validation perplexity per epoch) on a matplotlib Axes.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    series : list of Series
        From :func:`load_series`.

    Returns
    -------
    int
        Curves drawn.

    Raises
    ------
    PlotError
        No series has a point.
    """
    from matplotlib.ticker import LogFormatter, MaxNLocator

    series = [s for s in series if s.epochs]
    if not series:
        raise NothingToPlot("no epochs with a validation perplexity to plot")
    for s in series:
        ax.plot(s.epochs, s.ppl, marker="." if len(s.epochs) < 30 else None, label=s.label)
    ax.set_yscale("log")
    # plain numbers (150, 200, 300), not powers of ten: perplexities of one
    # run rarely span a whole decade
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    first = min(s.epochs[0] for s in series)
    last = max(s.epochs[-1] for s in series)
    if first == last:
        # one epoch only: widen the axis, or its ticks would be fractions of an epoch
        ax.set_xlim(first - 1, last + 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity")
    return len(series)


def _legend(ax, rows_per_column=8):
    """A legend that stays inside the README-sized plot: a long one (a
    curve per run of a plan) goes into columns in a smaller font."""
    n = len(ax.get_legend_handles_labels()[1])
    columns = max(1, math.ceil(n / rows_per_column))
    # `ncol`, not `ncols`: the older name works on every matplotlib >= 3.5
    ax.legend(fontsize="small" if columns == 1 else "x-small", ncol=columns)


def _png_path(out) -> Path:
    out = Path(out)
    if out.suffix == "":
        return out.with_suffix(".png")
    if out.suffix.lower() != ".png":
        raise PlotError(f"{out}: the output is a PNG, name it *.png (--svg adds an SVG beside it)")
    return out


def _render(draw, out, title=None, svg=False):
    """A README-sized figure drawn by ``draw(ax) -> rows``, saved as PNG (and SVG).

    Returns ``(paths written, rows plotted)``.
    """
    Figure = _matplotlib()
    out = _png_path(out)
    # a Figure without pyplot: no global backend switch and no figure left
    # open in the caller's session; it renders with Agg, so no display is needed
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    n = draw(ax)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    paths = [out] + ([out.with_suffix(".svg")] if svg else [])
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                # no bbox_inches="tight": it would change the pixel size
                fig.savefig(tmp, format=path.suffix[1:], dpi=DPI)
        except OSError as exc:
            raise PlotError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return paths, n


def plot_ratio(rows, out, metric="test_ppl", title=None, svg=False) -> list:
    """Perplexity against embedding compression, one line per method (Figures 2 and 4).

    Parameters
    ----------
    rows : list of dict
        Results rows (:func:`load_rows`).
    out : str or Path
        The PNG to write (960 x 600 pixels).
    metric : str
        ``test_ppl`` (default) or ``valid_ppl``.
    title : str, optional
        A title above the plot.
    svg : bool
        Also write the figure as SVG beside the PNG.

    Returns
    -------
    list of Path
        The files written.
    """
    return _render(lambda ax: draw_ratio(ax, rows, metric), out, title, svg)[0]


def plot_k(rows, out, ratio=None, metric="test_ppl", title=None, svg=False) -> list:
    """Perplexity against K at one compression, SE and HashNet (Figure 5).

    Parameters
    ----------
    rows : list of dict
        Results rows (:func:`load_rows`).
    out : str or Path
        The PNG to write (960 x 600 pixels).
    ratio : float, optional
        The compression reciprocal to plot (8 means 1/8); default
        :func:`default_k_ratio`.
    metric : str
        ``test_ppl`` (default) or ``valid_ppl``.
    title : str, optional
        A title above the plot (default: the compression).
    svg : bool
        Also write the figure as SVG beside the PNG.

    Returns
    -------
    list of Path
        The files written.
    """
    return _render(lambda ax: draw_k(ax, rows, ratio, metric), out, title, svg)[0]


def plot_curves(series, out, title=None, svg=False) -> list:
    """Validation perplexity against epoch, one line per run (log y axis).

    Parameters
    ----------
    series : list of Series
        From :func:`load_series`.
    out : str or Path
        The PNG to write (960 x 600 pixels).
    title : str, optional
        A title above the plot.
    svg : bool
        Also write the figure as SVG beside the PNG.

    Returns
    -------
    list of Path
        The files written.
    """
    return _render(lambda ax: draw_curves(ax, series), out, title, svg)[0]


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
def _parse_ratio(text):
    """``--k-ratio``: ``8`` or ``1/8`` (both mean 1/8)."""
    if text is None:
        return None
    s = text.strip()
    try:
        value = float(s[2:] if s.startswith("1/") else s)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise PlotError(f"--k-ratio expects a compression such as 8 or 1/8, got {text!r}")
    return value


def plot_files(files, out, kind="auto", svg=False, title=None, metric="test_ppl", k_ratio=None,
               methods=()) -> str:
    """``slimnp plot``: draw the results or metrics ``files`` into the PNG
    ``out`` (and an SVG beside it with ``svg``); returns the line to print.

    ``kind``: one of :data:`KINDS`; ``metric``: a key of :data:`METRICS`;
    ``k_ratio``: the compression of a ``k`` plot (``"8"`` or ``"1/8"``);
    ``methods``: only rows of these methods (the uncompressed baseline stays).
    """
    # options are checked by hand, not with click.Choice: a wrong value is
    # then one "Error:" line like every other input error of this command
    kind = kind.lower()
    if kind not in KINDS:
        raise PlotError(f"unknown --kind {kind!r} (choose {', '.join(KINDS)})")
    if metric not in METRICS:
        raise PlotError(f"unknown --metric {metric!r} (choose {', '.join(METRICS)})")
    ratio = _parse_ratio(k_ratio)
    _matplotlib()  # the install hint before any file is read
    records = [(p, read_records(p)) for p in files]
    if kind == "auto":
        kind = "curves" if all(is_metrics(r) for _, r in records) else "ratio"
    if kind == "curves":
        series = [s for p, r in records for s in _series_of(p, r)]
        draw, what = (lambda ax: draw_curves(ax, series)), "run"
    else:
        rows = [row for p, r in records for row in _rows_of(p, r)]
        if methods:
            rows = [row for row in rows
                    if method_of(row) in methods or method_of(row) == "uncompressed"]
        draw = (lambda ax: draw_ratio(ax, rows, metric)) if kind == "ratio" \
            else (lambda ax: draw_k(ax, rows, ratio, metric))
        what = "row"
    try:
        paths, n = _render(draw, out, title, svg)
    except NothingToPlot as exc:
        # the drawing functions see rows, not files: name the files here
        raise PlotError(f"{_names(files)}: {exc}") from None
    return f"wrote {' and '.join(str(p) for p in paths)}: {kind} plot of {n} {what}{'s' * (n != 1)}"
