"""Fill REPRODUCTION.rst's tables and figures from the results files.

    python experiments/report.py          # rewrites the generated blocks and figures

Every number between the ``.. BEGIN name`` / ``.. END name`` markers of
REPRODUCTION.rst and every figure under experiments/figures/ comes from the
results files in experiments/results/ (written by ``slimnp experiment run``
and experiments/compress-ptb.sh, read by slimnp.results); the paper's numbers
are those printed in Li et al. (2018), Table 2.  Runs not finished yet show as
"-" so the tables say what is missing.  Where an unfinished run stands is
the business of the machine that runs it (``slimnp experiment status PLAN``
there), with one exception: Table 3's rows take several sittings, and
experiments/progress/table3-ptb.jsonl is a committed snapshot of

    slimnp experiment status experiments/table3-ptb.toml --json > experiments/progress/table3-ptb.jsonl

(each run's state and its validation perplexity per epoch so far), which
this script turns into the epoch-by-epoch table under Table 3 and its
figure.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from slimnp import results  # noqa: E402
from slimnp.experiment import load_plan  # noqa: E402

DOC = ROOT / "REPRODUCTION.rst"
FIGURES = HERE / "figures"

# Li, Kang and Zhang (AAAI 2018), Table 2: PTB, 2x300, K = 10 (test PPL)
PAPER_TABLE2 = {"ne-d0": 89.54, "se-m10k-d0": 89.06, "se-m5k-d0": 89.54,
                "ne-d0.1": 88.56, "se-m10k-d0.1": 88.37}
TABLE2_ROWS = [("ne-d0", "NE", "0", "1"), ("se-m10k-d0", "SE (M=10K)", "0", "10%"),
               ("se-m5k-d0", "SE (M=5K)", "0", "5%"), ("ne-d0.1", "NE", "0.1", "1"),
               ("se-m10k-d0.1", "SE (M=10K)", "0.1", "10%")]
RATIOS = (2, 8, 32, 128)
# Table 3: PTB, 2x650, K = 10, input layer only (test PPL)
PAPER_TABLE3 = {"ne-d0": 85.33, "se-m10k-d0": 82.14, "se-m5k-d0": 82.41, "se-m1k-d0": 82.62,
                "ne-d0.1": 82.59, "se-m5k-d0.1": 81.14}
TABLE3_ROWS = [("ne-d0", "NE", "0", "1"), ("se-m10k-d0", "SE (M=10K)", "0", "10%"),
               ("se-m5k-d0", "SE (M=5K)", "0", "5%"), ("se-m1k-d0", "SE (M=1K)", "0", "1%"),
               ("ne-d0.1", "NE", "0.1", "1"), ("se-m5k-d0.1", "SE (M=5K)", "0.1", "5%")]
# SE - NE in Table 3: each slim row against the dense row of its dropout
TABLE3_PAIRS = (("ne-d0", "se-m1k-d0"), ("ne-d0", "se-m10k-d0"), ("ne-d0", "se-m5k-d0"),
                ("ne-d0.1", "se-m5k-d0.1"))
WT2_RATIOS = (8, 32, 128)


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _table(header, rows) -> str:
    """An RST simple table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(header), rule, *(line(r) for r in cells[1:]), rule])


def _minutes(rec) -> str:
    """Training minutes over every sitting (a resumed run's wall time covers one)."""
    return f"{rec['train_seconds'] / 60:.0f}" if rec and rec.get("train_seconds") else "-"


def _seeds(res: dict, name: str) -> list:
    """The finished runs of one point: ``name`` (seed 0) and ``name-s1``, ``name-s2``, ..."""
    out = [res[name]] if name in res else []
    i = 1
    while f"{name}-s{i}" in res:
        out.append(res[f"{name}-s{i}"])
        i += 1
    return out


def _mean_sd(xs) -> tuple:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def _pm(xs, fmt="{:.2f}") -> str:
    """``mean +- sd (n)`` of several seeds, the value alone for one, ``-`` for none."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    m, sd = _mean_sd(xs)
    return f"{fmt.format(m)} +- {sd:.2f} (n={len(xs)})"


def _paper_table(res: dict, paper: dict, rows_spec, pairs) -> str:
    """Table 2 or 3: each row beside the paper's number (mean +- sd where a
    row has several seeds; train minutes per seed), then SE - NE beside the
    paper's difference (paired by seed where both rows have several)."""
    rows = []
    for name, model, drop, size in rows_spec:
        runs = _seeds(res, name)
        ppl = [r["test_ppl"] for r in runs]
        mean = sum(ppl) / len(ppl) if ppl else None
        rows.append([model, drop, size, _f(paper[name]), _pm(ppl),
                     _f(mean - paper[name], "{:+.2f}") if ppl else "-",
                     _pm([r["valid_ppl"] for r in runs]), runs[0]["epochs"] if runs else "-",
                     ", ".join(_minutes(r) for r in runs) if runs else "-"])
    out = _table(["model", "input dropout", "size", "paper", "slimnp", "diff", "valid",
                  "epochs", "train minutes"], rows)
    diffs = []
    for ne, se in pairs:
        a, b = [r["test_ppl"] for r in _seeds(res, ne)], [r["test_ppl"] for r in _seeds(res, se)]
        if a and b:
            ours = sum(b) / len(b) - sum(a) / len(a)
            p = paper[se] - paper[ne]
            if len(a) == len(b) > 1:  # seed i of SE against seed i of NE
                paired = [y - x for x, y in zip(a, b)]
                seeds = (f" (paired by seed: {_pm(paired, '{:+.2f}')}; per seed "
                         f"{', '.join(f'{m:+.2f}' for m in paired)})")
            else:
                seeds = f" (means of {len(b)} and {len(a)} seeds)" if len(a) > 1 or len(b) > 1 else ""
            diffs.append(f"- SE - NE ({se} - {ne}): slimnp {ours:+.2f}{seeds}, paper {p:+.2f}, "
                         f"difference {ours - p:+.2f}")
    return out + ("\n\n" + "\n".join(diffs) if diffs else "")


def table2(res: dict) -> str:
    return _paper_table(res, PAPER_TABLE2, TABLE2_ROWS,
                        (("ne-d0", "se-m10k-d0"), ("ne-d0", "se-m5k-d0"), ("ne-d0.1", "se-m10k-d0.1")))


def table3(res: dict) -> str:
    return _paper_table(res, PAPER_TABLE3, TABLE3_ROWS, TABLE3_PAIRS)


TABLE3_PROGRESS = HERE / "progress" / "table3-ptb.jsonl"


def table3_progress(rows: dict) -> str:
    """Table 3's runs epoch by epoch, from a snapshot of ``slimnp experiment
    status --json`` (``rows``: by run, as :func:`results.read` gives them):
    each started run's state (a finished one's test perplexity), then
    validation perplexity per epoch (``h`` marks the first epoch at a halved
    learning rate) and, where both have reached an epoch, SE - NE."""
    labels = {name: f"{model} d{drop}" for name, model, drop, _ in TABLE3_ROWS}
    runs = [name for name, *_ in TABLE3_ROWS if name in rows and rows[name].get("history")]
    if not runs:
        return "No run has started."
    valid = {n: {e["epoch"]: e for e in rows[n]["history"] if e.get("valid_ppl") is not None} for n in runs}
    pairs = [(ne, se) for ne, se in TABLE3_PAIRS if ne in runs and se in runs]

    def cell(n, ep):
        e = valid[n].get(ep)
        if e is None:
            return "-"
        before = valid[n].get(ep - 1)
        return f"{e['valid_ppl']:.2f}" + (" h" if before and e["lr"] < before["lr"] else "")

    def state(n):
        test = rows[n].get("test_ppl")
        return f"finished, test {test:.2f}" if test is not None else rows[n]["state"]

    epochs = sorted({ep for v in valid.values() for ep in v})
    table = _table(["epoch", *(labels[n] for n in runs), *(f"{labels[se]} - {labels[ne]}" for ne, se in pairs)],
                   [[ep, *(cell(n, ep) for n in runs),
                     *(_f(valid[se][ep]["valid_ppl"] - valid[ne][ep]["valid_ppl"], "{:+.2f}")
                       if ep in valid[se] and ep in valid[ne] else "-" for ne, se in pairs)]
                    for ep in epochs])
    states = "; ".join(f"{labels[n]} ({n}): {state(n)}" for n in runs)
    fig = FIGURES / "table3-ptb-progress.png"
    return (f"Where the runs stood at the snapshot: {states}.\n\n" + table
            + (f"\n\n.. image:: {fig.relative_to(ROOT).as_posix()}" if fig.exists() else ""))


def seeds_line(res: dict, se: str, sm: str) -> str:
    """Figure 4's seeds at one point: SE and SM as mean +- sd, and the margin
    SM - SE paired by seed (seed i of SM against seed i of SE)."""
    a, b = _seeds(res, se), _seeds(res, sm)
    if len(a) < 2 and len(b) < 2:
        return f"Seeds of {se} / {sm}: one each so far."
    margins = [y["test_ppl"] - x["test_ppl"] for x, y in zip(a, b)]
    return (f"Seeds at 1/{se.rsplit('-', 1)[1]} (test PPL, mean +- sample sd): "
            f"SE {_pm([r['test_ppl'] for r in a])}, SM {_pm([r['test_ppl'] for r in b])}; "
            f"SM - SE paired by seed {_pm(margins, '{:+.2f}')}"
            f" (per seed: {', '.join(f'{m:+.2f}' for m in margins)}).")


def fig4(res: dict) -> str:
    base = res.get("uncompressed")
    rows = []
    for c in RATIOS:
        se, sm, pm = res.get(f"se-{c}"), res.get(f"sm-{c}"), res.get(f"pm-{c}")
        ppl = lambda r: r and r["test_ppl"]  # noqa: E731
        margin = lambda r: _f(ppl(r) - ppl(se), "{:+.2f}") if ppl(r) and ppl(se) else "-"  # noqa: E731
        size = lambda r, k: (str(r["matched"]["value"]) if r and r.get("matched") else "-")  # noqa: E731
        rows.append([f"1/{c}", _f(ppl(se)), _f(ppl(sm)), _f(ppl(pm)), margin(sm), margin(pm),
                     f"{se['parameters']:,}" if se else "-", size(sm, "hidden"),
                     size(pm, "embedding_size")])
    head = (f"Uncompressed (2x200, {base['parameters']:,} parameters): test {base['test_ppl']:.2f}, "
            f"valid {base['valid_ppl']:.2f}.\n\n" if base else "Uncompressed: not run yet.\n\n")
    table = _table(["compression", "SE", "SM", "PM", "SM - SE", "PM - SE", "SE parameters",
                    "SM hidden", "PM E"], rows)
    return head + table + "\n\n" + seeds_line(res, "se-32", "sm-32")


def _second_seed(how: str, res: dict, runs, extra=None) -> str:
    """The line under a table comparing runs ``name`` (seed 0) with their
    ``name-s1`` twins: ``runs`` is ``[(label, name), ...]``; ``extra(r)`` adds
    text after a seed-1 number."""
    pairs = [(label, res.get(name), res.get(f"{name}-s1")) for label, name in runs]
    if not all(r0 and r1 for _, r0, r1 in pairs):
        return f"\n\nSecond seed at 1/32 ({how}): not run yet."
    return f"\n\nSecond seed at 1/32 ({how}): " + ", ".join(
        f"{label}{r1['test_ppl']:.2f}{extra(r1) if extra else ''} (seed 0: {r0['test_ppl']:.2f})"
        for label, r0, r1 in pairs) + "."


def fig4_wt2(res: dict) -> str:
    """Figure 4 on WikiText-2: SE (shuffle), SE learned, SM, PM per ratio, and the margins."""
    base = res.get("uncompressed")
    ppl = lambda r: r and r["test_ppl"]  # noqa: E731
    rows = []
    for c in WT2_RATIOS:
        se, le, sm, pm = (res.get(f"{m}-{c}") for m in ("se", "learned", "sm", "pm"))
        margin = lambda r, ref: _f(ppl(r) - ppl(ref), "{:+.2f}") if ppl(r) and ppl(ref) else "-"  # noqa: E731
        rows.append([f"1/{c}", _f(ppl(se)), _f(ppl(le)), _f(ppl(sm)), _f(ppl(pm)), margin(sm, se),
                     margin(pm, se), margin(le, se), margin(sm, le),
                     f"{se['parameters']:,}" if se else "-"])
    head = (f"Uncompressed (2x200, V = {base['config']['model']['vocab_size']:,}, "
            f"{base['parameters']:,} parameters): test {base['test_ppl']:.2f}, valid "
            f"{base['valid_ppl']:.2f}.\n\n" if base else "Uncompressed: not run yet.\n\n")
    table = _table(["compression", "SE", "SE learned", "SM", "PM", "SM - SE", "PM - SE",
                    "learned - SE", "SM - learned", "SE parameters"], rows)
    fig = FIGURES / "fig4-wt2.png"
    return (head + table + "\n\n" + seeds_line(res, "se-32", "sm-32")
            + (f"\n\n.. image:: {fig.relative_to(ROOT).as_posix()}" if fig.exists() else ""))


ADAPTIVE_METHODS = (("SE", "se"), ("SE learned", "learned"), ("SM", "sm"), ("PM", "pm"),
                    ("adaptive tied", "adaptive-tied"),
                    ("adaptive tied + slim tails", "adaptive-slim"))


def adaptive_table(corpora) -> str:
    """Slim layers against the adaptive softmax with tied adaptive input
    embeddings (and with slim tail clusters) at SE's sizes where an adaptive
    run is, per corpus: ``corpora`` is ``[(name, results by run), ...]``;
    seeds as mean +- sd."""
    rows = []
    for corpus, res in corpora:
        for c in RATIOS:
            if not any(_seeds(res, f"{stem}-{c}") for _, stem in ADAPTIVE_METHODS if "adaptive" in stem):
                continue
            se = [r["test_ppl"] for r in _seeds(res, f"se-{c}")]
            for label, stem in ADAPTIVE_METHODS:
                runs = _seeds(res, f"{stem}-{c}")
                ppl = [r["test_ppl"] for r in runs]
                diff = (_f(sum(ppl) / len(ppl) - sum(se) / len(se), "{:+.2f}")
                        if ppl and se and stem != "se" else "-")
                rows.append([corpus, f"1/{c}", label, _pm(ppl), diff,
                             f"{runs[0]['parameters']:,}" if runs else "-",
                             f"{runs[0]['tokens_per_s']:,.0f}" if runs else "-"])
    return _table(["corpus", "SE point", "method", "test PPL", "- SE", "parameters",
                   "train tok/s"], rows)


def fig2(res: dict) -> str:
    base = res.get("uncompressed")
    rows = []
    for c in RATIOS:
        r = res.get(f"se-input-{c}")
        rel = (f"{(r['test_ppl'] / base['test_ppl'] - 1) * 100:+.1f}%" if r and base else "-")
        rows.append([f"1/{c}", _f(r and r["test_ppl"]), rel, f"{r['parameters']:,}" if r else "-"])
    vs = (lambda r: f", {(r['test_ppl'] / base['test_ppl'] - 1) * 100:+.1f}%") if base else None
    return (_table(["input compression", "SE test PPL", "vs uncompressed", "parameters"], rows)
            + _second_seed("seed 1, shuffle table seed 1", res, [("", "se-input-32")], vs))


def fig5(res: dict) -> str:
    rows = []
    for k, name in ((1, "se-8-k1"), (4, "se-8-k4"), (8, "se-8"), (40, "se-8-k40"), (200, "hashnet-8")):
        r = res.get(name)
        rows.append([str(k), "HashNet (hash mapping)" if k == 200 else "SE (shuffle)",
                     _f(r and r["test_ppl"]), _f(r and r["valid_ppl"])])
    return _table(["K", "model", "test PPL", "valid PPL"], rows)


def compress_table(path: Path) -> str:
    """Issue 18's compression target from experiments/compress-ptb.sh's lines
    (one per command; the last of each)."""
    steps = results.read(path)
    if not steps:
        return "Not run yet."
    dense = steps.get("dense-test", {}).get("test_ppl")
    comp = steps.get("compressed-test", {}).get("test_ppl")
    tuned = steps.get("fine-tune", {}).get("test_ppl")
    rep = steps.get("compress", {}).get("output", {})
    rows = [["dense (uncompressed run of the sweeps)", _f(dense), "1", "-",
             f"{rep['parameters']['before']:,}" if rep else "-"],
            ["compressed, K = 10 at 1/8 both layers, no fine-tuning", _f(comp),
             _f(comp / dense, "{:.3f}") if comp and dense else "-", "<= 1.25",
             f"{rep['parameters']['after']:,}" if rep else "-"],
            ["after 2 epochs of fine-tuning (lr 0.25)", _f(tuned),
             _f(tuned / dense, "{:.3f}") if tuned and dense else "-", "<= 1.05",
             f"{rep['parameters']['after']:,}" if rep else "-"]]
    out = _table(["model", "test PPL", "vs dense", "target", "parameters"], rows)
    if rep:
        out += (f"\n\nk-means took {rep['seconds']:.0f} s on one core (relative distortion of the "
                f"rebuilt matrices: output {rep['output']['distortion']:.3f}, input "
                f"{rep['input']['distortion']:.3f}).")
    return out


def learned_table(sweeps: dict, learned: dict) -> str:
    rows = []
    for c in RATIOS:
        se, le = sweeps.get(f"se-{c}"), learned.get(f"learned-{c}")
        gain = (f"{(1 - le['test_ppl'] / se['test_ppl']) * 100:+.1f}%" if se and le else "-")
        rows.append([f"1/{c}", _f(se and se["test_ppl"]), _f(le and le["test_ppl"]), gain])
    return _table(["compression", "SE shuffle (paper)", "SE learned", "learned better by"], rows)


def figures(sweeps: Path) -> list:
    """The sweep figures (needs matplotlib); returns the paths written."""
    try:
        from slimnp.plot import NothingToPlot, load_rows, load_series, plot_curves, plot_k, plot_ratio
    except ImportError:
        return []
    learned = HERE / "results" / "learned-ptb.jsonl"
    adaptive = HERE / "results" / "adaptive-ptb.jsonl"
    rows = load_rows([p for p in (sweeps, learned, adaptive) if p.exists()])
    wt2 = HERE / "results" / "fig4-wt2.jsonl"
    wt2_rows = load_rows([wt2]) if wt2.exists() else []
    FIGURES.mkdir(exist_ok=True)
    keep = lambda *m: [r for r in rows if r.get("method") in (*m, "uncompressed")]  # noqa: E731
    out = []
    for name, draw in (
            ("fig4-ptb", lambda: plot_ratio(keep("SE", "SM", "PM", "SE learned", "adaptive tied",
                                                 "adaptive tied + slim tails"), FIGURES / "fig4-ptb.png",
                                            title="Figure 4 on PTB: both layers, K = 8")),
            ("fig2-ptb", lambda: plot_ratio(keep("SE input only"), FIGURES / "fig2-ptb.png",
                                            title="Figure 2 on PTB: input layer only, K = 8")),
            ("fig5-ptb", lambda: plot_k(keep("SE", "HashNet"), FIGURES / "fig5-ptb.png", ratio=8,
                                        title="Figure 5 on PTB: both layers at 1/8")),
            ("fig4-wt2", lambda: plot_ratio(wt2_rows, FIGURES / "fig4-wt2.png",
                                            title="Figure 4 on WikiText-2: both layers, K = 8"))):
        try:
            out += draw()
        except (NothingToPlot, KeyError):  # nothing (or no baseline) to draw yet
            pass
    table2 = HERE / "results" / "table2-ptb.jsonl"
    if table2.exists():  # validation perplexity per epoch of Table 2's finished rows
        out += plot_curves(load_series([table2]), FIGURES / "table2-ptb-curves.png",
                           title="Table 2 on PTB: validation perplexity per epoch")
    if any(r.get("history") for r in results.read(TABLE3_PROGRESS).values()):  # Table 3 so far
        out += plot_curves(load_series([TABLE3_PROGRESS]), FIGURES / "table3-ptb-progress.png",
                           title="Table 3 on PTB (2x650): validation perplexity per epoch so far")
    return out


def fill(doc: str, name: str, body: str) -> str:
    pat = re.compile(rf"(\.\. BEGIN {name}\n)(.*?)(\n\.\. END {name})", re.S)
    if not pat.search(doc):
        raise SystemExit(f"{DOC}: no '.. BEGIN {name}' / '.. END {name}' block")
    return pat.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(3), doc)


def main() -> None:
    sweeps = HERE / "results" / "sweeps-ptb.jsonl"
    res = results.read(HERE / "results" / "table2-ptb.jsonl")
    sw = results.read(sweeps)
    written = figures(sweeps)  # first: the tables link the figures that exist
    doc = DOC.read_text(encoding="utf-8")
    doc = fill(doc, "table2", table2(res))
    doc = fill(doc, "fig4", fig4(sw))
    doc = fill(doc, "fig2", fig2(sw))
    doc = fill(doc, "fig5", fig5(sw))
    doc = fill(doc, "compress", compress_table(HERE / "results" / "compress-ptb.jsonl"))
    learned = results.read(HERE / "results" / "learned-ptb.jsonl")
    doc = fill(doc, "learned", learned_table(sw, learned))
    t3 = results.read(HERE / "results" / "table3-ptb.jsonl")
    doc = fill(doc, "table3", table3(t3))
    doc = fill(doc, "table3-progress", table3_progress(results.read(TABLE3_PROGRESS)))
    wt2 = results.read(HERE / "results" / "fig4-wt2.jsonl")
    doc = fill(doc, "fig4-wt2", fig4_wt2(wt2))
    adaptive = results.read(HERE / "results" / "adaptive-ptb.jsonl")
    doc = fill(doc, "adaptive", adaptive_table((("PTB", {**sw, **learned, **adaptive}),
                                                       ("WikiText-2", wt2))))
    plans = (("sweeps-ptb", sw, "the sweeps plan"), ("table2-ptb", res, "Table 2's"),
             ("learned-ptb", learned, "the learned-assignment plan"), ("table3-ptb", t3, "Table 3's"),
             ("fig4-wt2", wt2, "Figure 4 on WikiText-2"),
             ("adaptive-ptb", adaptive, "the adaptive plan on PTB"))
    done = sum(len(r) for _, r, _ in plans)
    doc = fill(doc, "status", "Runs finished: " + ", ".join(
        f"{len(r)} of {len(load_plan(HERE / f'{name}.toml').runs)} in {what}" for name, r, what in plans) + ".")
    DOC.write_text(doc, encoding="utf-8")
    print(f"{DOC}: {done} results; figures: {', '.join(str(p.relative_to(ROOT)) for p in written) or 'none'}")


if __name__ == "__main__":
    main()
