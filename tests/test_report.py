"""experiments/report.py, the script that writes REPRODUCTION.rst's tables:
a row with several seeds shows mean +- sample sd, and SE - NE is paired seed
by seed where both rows have several."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "report.py"


@pytest.fixture(scope="module")
def report():
    if not SCRIPT.exists():
        pytest.skip("experiments/report.py is not in this tree")
    spec = importlib.util.spec_from_file_location("slimnp_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(test, valid, minutes):
    return {"test_ppl": test, "valid_ppl": valid, "epochs": 25, "train_seconds": minutes * 60}


def test_table2_means_seeds_and_pairs_se_minus_ne(report):
    res = {"ne-d0": _run(87.0, 91.0, 300), "ne-d0-s1": _run(88.0, 92.0, 100),
           "se-m5k-d0": _run(89.0, 93.0, 200), "se-m5k-d0-s1": _run(91.0, 94.0, 110),
           "se-m10k-d0": _run(88.5, 92.5, 250)}
    text = report.table2(res)
    ne = next(ln for ln in text.splitlines() if ln.startswith("NE   ") and " 0  " in ln)
    # mean 87.5, sample sd of (87, 88) = 0.7071; minutes per seed
    assert "87.50 +- 0.71 (n=2)" in ne and "-2.04" in ne and "300, 100" in ne
    lines = {ln.split("(")[1].split(")")[0]: ln for ln in text.splitlines() if ln.startswith("- SE - NE")}
    # M=5K: seed 0 +2.00, seed 1 +3.00 -> +2.50 +- 0.71; the paper's difference is 0.00
    assert lines["se-m5k-d0 - ne-d0"] == (
        "- SE - NE (se-m5k-d0 - ne-d0): slimnp +2.50 (paired by seed: +2.50 +- 0.71 (n=2); "
        "per seed +2.00, +3.00), paper +0.00, difference +2.50")
    # M=10K has one seed: the difference of the means, not paired
    assert lines["se-m10k-d0 - ne-d0"].startswith(
        "- SE - NE (se-m10k-d0 - ne-d0): slimnp +1.00 (means of 1 and 2 seeds), paper -0.48")
    assert "ne-d0.1" not in "".join(lines)  # no run of either: no line


def _epochs(*valid, halve_at=None):
    return [{"epoch": i + 1, "lr": 0.5 if halve_at and i + 1 >= halve_at else 1.0, "train_ppl": v * 0.8,
             "valid_ppl": v} for i, v in enumerate(valid)]


def test_table3_progress_compares_runs_epoch_by_epoch(report):
    rows = {"ne-d0": {"run": "ne-d0", "state": "epoch 4/25, segment 10", "test_ppl": None,
                      "history": _epochs(200.0, 150.0, 130.0, halve_at=3)},
            "se-m1k-d0": {"run": "se-m1k-d0", "state": "epoch 3/25, segment 1", "test_ppl": None,
                          "history": _epochs(199.0, 152.5)},
            "se-m10k-d0": {"run": "se-m10k-d0", "state": "new", "test_ppl": None, "history": []},
            "se-m5k-d0": {"run": "se-m5k-d0", "state": "done", "test_ppl": 82.0,
                          "history": _epochs(190.0)},
            "ne-d0.1": {"run": "ne-d0.1", "state": "new", "test_ppl": None, "history": []}}
    text = report.table3_progress(rows)
    assert text.startswith("Where the runs stood at the snapshot: NE d0 (ne-d0): epoch 4/25, "
                           "segment 10; SE (M=5K) d0 (se-m5k-d0): finished, test 82.00; "
                           "SE (M=1K) d0 (se-m1k-d0): epoch 3/25, segment 1.")
    table = [ln.split() for ln in text.splitlines() if ln[:1].isdigit()]
    # NE d0, SE (M=5K) d0 (finished: its history stays), SE (M=1K) d0, then SE - NE for
    # M=1K and M=5K (TABLE3_PAIRS' order); epoch 3 is NE's first at the halved rate
    assert table == [["1", "200.00", "190.00", "199.00", "-1.00", "-10.00"],
                     ["2", "150.00", "-", "152.50", "+2.50", "-"],
                     ["3", "130.00", "h", "-", "-", "-", "-"]]
    header = next(ln for ln in text.splitlines() if ln.startswith("epoch"))
    assert "SE (M=10K)" not in header and "NE d0.1" not in header  # not started
    assert report.table3_progress({}) == "No run has started."
