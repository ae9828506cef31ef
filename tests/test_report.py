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
