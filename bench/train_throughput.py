#!/usr/bin/env python
"""Training throughput (tokens/s) of slimnp vs the equivalent PyTorch model.

One training step, as ``slimnp.trainer`` does it: zero the gradients,
forward + BPTT over a (T, B) segment with the state carried from the previous
segment, global-norm clipping at 5 and a plain SGD update.  The PyTorch
reference does the same with ``nn.Embedding -> nn.LSTM -> nn.Linear``,
``cross_entropy(reduction='sum') / B``, ``clip_grad_norm_(5)`` and
``torch.optim.SGD``, detaching the hidden state between segments.

    python bench/train_throughput.py --configs A,B
    python bench/train_throughput.py --configs A --steps 3 --rounds 1 --json
    python bench/train_throughput.py --configs W --variant slim --loss is --samples 2000
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

KIND = "train"


def slimnp_step(model, cfg, args):
    from slimnp.backend import make_rng
    from slimnp.optim import SGD

    optimizer = SGD(clip=5.0)
    rng = make_rng(0)
    scale = 1.0 / cfg["B"]  # Zaremba: sum over time, mean over the batch
    state = [model.zero_state(cfg["B"])]
    sampled = None
    if args.loss != "softmax":  # noise: the smoothed Zipf(1) law of the data
        import numpy as np

        from slimnp.sampled_losses import Sampled, prepare_model
        from slimnp.alias_sampler import AliasSampler

        q = np.arange(1, cfg["V"] + 1, dtype=np.float64) ** -0.75
        sampled = Sampled(args.loss, args.samples, AliasSampler(q / q.sum()), rng)
        prepare_model(model, args.loss)

    def step(x, y):
        model.store.zero_grad(lazy=True)
        nll, new_state, _ = model.forward_backward(x, y, state[0], scale, rng, sampled=sampled)
        optimizer.step(model.store.data, model.store.grad, args.lr, model.store.segments())
        state[0] = new_state  # truncated BPTT: carried, no gradient across
        return nll

    return step


def torch_step(model, cfg, args):
    import torch
    import torch.nn.functional as F

    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=args.lr)
    B, V = cfg["B"], cfg["V"]
    state = [common.torch_zero_state(cfg)]

    def step(x, y):
        xt, yt = common.torch_ids(x, y)
        optimizer.zero_grad(set_to_none=True)
        logits, (h, c) = model(xt, state[0])
        loss = F.cross_entropy(logits.view(-1, V), yt.view(-1), reduction="sum") / B
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        state[0] = (h.detach(), c.detach())
        return loss.item() * B  # summed NLL of the segment, like slimnp's

    return step


def _extra(p):
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (both engines)")
    p.add_argument("--loss", choices=("softmax", "is", "nce"), default="softmax",
                   help="slimnp's training objective (PyTorch always runs the full softmax)")
    p.add_argument("--samples", type=int, default=2000, help="noise words per step for --loss is/nce")


def main(argv=None):
    common.run(sys.modules[__name__], __doc__.split("\n\n")[0], os.path.abspath(__file__),
               argv, extra=_extra, extra_keys=("lr", "loss", "samples"))


if __name__ == "__main__":
    main()
