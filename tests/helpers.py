"""Small corpora, settings and data paths shared by the tests."""
from pathlib import Path

import pytest

from slimnp.synthetic import HMMSpec, write_corpus

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: ``slimnp train`` options of a seconds-long run (one layer of 16 units, one epoch).
TINY_TRAIN = ["--layers", "1", "--hidden", "16", "--epochs", "1", "--bptt", "10", "--batch-size", "8",
              "-q", "--threads", "1"]

TINY_HP = dict(layers=2, hidden=16, dropout=0.1, init_scale=0.1, epochs=2, bptt=7, batch_size=4,
               lr=1.0, schedule="epoch", lr_decay=0.5, decay_start=1, decay_threshold=1.0, clip=5.0)


def shared_data(*parts) -> Path:
    """A path under ``../shared/data`` (real corpora); skips the test if absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


def tiny_corpus(d: Path, tokens=6000, vocab=100, seed=0) -> dict:
    spec = HMMSpec(vocab=vocab, states=8, seed=seed, support=min(20, vocab - 1))
    info = write_corpus(d, spec, tokens, 600, 600)
    return {s: d / f"{s}.txt" for s in ("train", "valid", "test")}, info


def run_cli(*args, **kw):
    """``slimnp ARGS`` in this process (each argument ``str()``-ed); click's ``Result``."""
    from click.testing import CliRunner

    from slimnp.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def trained_tiny(d: Path):
    """A tiny corpus in ``d/corpus`` and a model trained on it with ``--json``:
    ``d/m.h5``, ``d/m.best.h5``, ``d/m.metrics.jsonl``.  Returns ``(d, files)``."""
    files, _ = tiny_corpus(d / "corpus", tokens=4000)
    r = run_cli("train", "--data", d / "corpus", "--out", d / "m.h5", "--json", *TINY_TRAIN)
    assert r.exit_code == 0, r.output
    return d, files


def cycle_losses(model, steps=150, lr=0.5):
    """Train ``model`` on a deterministic 10-word cycle; per-token loss at the first and last step."""
    import numpy as np

    from slimnp.optim import SGD

    pattern = np.tile(np.arange(10, dtype=np.int32), 6)
    x = np.ascontiguousarray(np.stack([pattern[:-1]] * 2, axis=1)[:20])  # (T, B)
    y = np.ascontiguousarray(np.stack([pattern[1:]] * 2, axis=1)[:20])
    opt, losses = SGD(clip=5.0), []
    for _ in range(steps):
        model.store.zero_grad()
        nll, _, _ = model.forward_backward(x, y, model.zero_state(2))
        opt.step(model.store.data, model.store.grad, lr, model.store.segments())
        losses.append(nll / x.size)
    return losses[0], losses[-1]
