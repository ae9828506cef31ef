#!/usr/bin/env python
"""Training throughput (tokens/s) of slimnp vs the equivalent PyTorch model.

One training step, ``slimnp.trainer.Trainer.step`` itself: zero the
gradients, forward + BPTT over a (T, B) segment with the state carried from
the previous segment, global-norm clipping at 5 and a plain SGD update.  The
PyTorch reference does the same with ``nn.Embedding -> nn.LSTM -> nn.Linear``,
``cross_entropy(reduction='sum') / B``, ``clip_grad_norm_(5)`` and
``torch.optim.SGD``, detaching the hidden state between segments; for
``--variant adaptive`` ``nn.AdaptiveLogSoftmaxWithLoss`` with the same
cutoffs and div_value in place of the Linear and the cross-entropy.

    python bench/train_throughput.py --configs A,B
    python bench/train_throughput.py --configs A --steps 3 --rounds 1 --json
    python bench/train_throughput.py --configs W --variant slim --loss is --samples 2000
    python bench/train_throughput.py --configs D --variant adaptive
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

KIND = "train"


def slimnp_step(model, cfg, args):
    """The trainer's own step (:meth:`slimnp.trainer.Trainer.step`): SGD at
    ``--lr``, clipping at 5, the state carried from segment to segment."""
    sampled = None
    if args.loss != "softmax":  # noise: the smoothed Zipf(1) law of the data
        import numpy as np

        from slimnp.alias_sampler import AliasSampler
        from slimnp.backend import make_rng
        from slimnp.sampled_losses import Sampled, prepare_model

        q = np.arange(1, cfg["V"] + 1, dtype=np.float64) ** -0.75
        sampled = Sampled(args.loss, args.samples, AliasSampler(q / q.sum()), make_rng(0))
        prepare_model(model, args.loss)
    trainer = common.slimnp_trainer(model, cfg["B"], lr=args.lr, sampled=sampled)

    def step(x, y):
        return trainer.step(x, y).nll  # summed NLL of the segment

    return step


def torch_step(model, cfg, args):
    import torch

    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=args.lr)
    B = cfg["B"]
    state = [common.torch_zero_state(cfg)]

    def step(x, y):
        xt, yt = common.torch_ids(x, y)
        optimizer.zero_grad(set_to_none=True)
        nll, (h, c) = model.nll_sum(xt, yt, state[0])  # the adaptive variant: its own NLL
        loss = nll / B
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
