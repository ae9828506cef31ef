#!/usr/bin/env python
"""Evaluation throughput (tokens/s, no gradients) of slimnp vs PyTorch.

slimnp: ``model.nll(x, y, state)`` over a (T, B) segment, state carried.
PyTorch: the same Zaremba model under ``torch.inference_mode()``, summed
cross-entropy (``--variant adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss``).
Same configs, data and options as ``train_throughput.py``.

    python bench/eval_throughput.py --configs A,B
    python bench/eval_throughput.py --configs A --steps 3 --rounds 1 --json
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

KIND = "eval"


def slimnp_step(model, cfg, args):
    state = [model.zero_state(cfg["B"])]

    def step(x, y):
        nll, state[0] = model.nll(x, y, state[0])
        return float(nll.sum())

    return step


def torch_step(model, cfg, args):
    import torch

    model.eval()
    state = [common.torch_zero_state(cfg)]

    def step(x, y):
        xt, yt = common.torch_ids(x, y)
        with torch.inference_mode():
            nll, state[0] = model.nll_sum(xt, yt, state[0])
            return nll.item()

    return step


def main(argv=None):
    common.run(sys.modules[__name__], __doc__.split("\n\n")[0], os.path.abspath(__file__), argv)


if __name__ == "__main__":
    main()
