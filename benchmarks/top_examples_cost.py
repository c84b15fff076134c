#!/usr/bin/env python
"""Figure 9: cost of the streamed top-k examples (k = 5) on top of the plain statistics update.

Per batch: `CorrelationStats(F).update(z, y)` alone, against it followed by `top_examples_update` (k = 5, with
peak positions) on the same batch, for F = 26 x 16,384 features (Gemma-2-2B with 16k SAEs on all layers) and
batch 32, each feature firing on 1-3% of samples (figure 2's batches). Every batch is new to the top-k state:
figure 2's distinct batches are cycled, each time with a fresh per-feature scale in [0.5, 1.5) and fresh sample
ids (made outside the timed calls), so activations do not repeat. The first batches fill the slots (every
feature that fires is new); afterwards only features whose batch maximum beats their k-th kept value are sorted.
Result: median over the batches after the first `--warmup` of (plain + top-k) / plain, goal <= 1.2; the
measured column also gives the whole run's total ratio, warm-up included.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence

import _common as C
from stats_vs_torchmetrics import sparse_batches

COST_GOAL = 1.2
K = 5


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=64, help="batches streamed (2,048 samples at batch 32)")
    p.add_argument("--warmup", type=int, default=16, help="batches before the steady-state median")
    p.add_argument("--distinct", type=int, default=4, help="distinct batches generated (cycled, rescaled)")
    args = p.parse_args(argv)
    C.setup(args)
    if args.smoke:
        args.layers, args.d_sae, args.batches, args.warmup = 2, 1024, 8, 2
    features = args.layers * args.d_sae
    plain, topk = time_stream(sparse_batches(args.distinct, args.batch, features), features, args.batches, args.batch)
    steady = [(a + b) / a for a, b in zip(plain[args.warmup :], topk[args.warmup :], strict=True)]
    ratio = statistics.median(steady)
    total = (sum(plain) + sum(topk)) / sum(plain)
    setting = f"F = {args.layers} x {args.d_sae:,} = {features:,}, batch {args.batch}, k = {K}, 1-3% non-zero"
    measured = (
        f"plain {C.ms(plain[args.warmup :])}, top-k {C.ms(topk[args.warmup :])} per batch {C.CLOCK_NAME} after "
        f"{args.warmup * args.batch:,} samples; whole run of {args.batches * args.batch:,} samples "
        f"(slot filling included) {total:.2f}x; per-batch {min(steady):.3f}-{max(steady):.3f}"
    )
    return [C.row("9. top-k examples: (plain + top-k) / plain update", setting, measured, f"{ratio:.3f}x",
                  f"<= {COST_GOAL:g}x", ratio <= COST_GOAL)]  # fmt: skip


def time_stream(batches: list, features: int, num: int, batch: int) -> tuple[list[float], list[float]]:
    """Seconds of the plain update and of the top-k update for each of `num` streamed batches."""
    import torch

    from corrsteer_pl.calibration.stats import CorrelationStats
    from corrsteer_pl.calibration.top_examples import TopState, example_keys, top_examples_update

    stats, state = CorrelationStats(features), TopState.empty(features, K)
    g = torch.Generator().manual_seed(1)
    plain, topk = [], []
    for j in range(num):
        base, y = batches[j % len(batches)]
        z = base * (0.5 + torch.rand(features, generator=g))  # (B, F), new activations
        ids = example_keys([f"batch{j}-item{i}" for i in range(batch)])
        peaks = torch.randint(0, 4, (batch, features), generator=g, dtype=torch.int32)
        start = C.CLOCK()
        stats.update(z, y)
        middle = C.CLOCK()
        top_examples_update(state, z, ids, peaks)
        plain.append(middle - start)
        topk.append(C.CLOCK() - middle)
    filled = int((state.values[:, -1] > 0).sum())
    C.log(f"[top-k] {num} batches; features with all {K} slots filled: {filled:,} of {features:,}")
    return plain, topk


if __name__ == "__main__":
    main(sys.argv[1:])
