#!/usr/bin/env python
"""Figure 6: cost of the streaming bootstrap (B = 20 replicates) against the plain statistics and torchmetrics.

Update time of `BootstrapStats(F, 20).update(z, y, ids)` against `CorrelationStats(F).update(z, y)`
and `torchmetrics.regression.PearsonCorrCoef(num_outputs=F).update(z, y)` (float64 states, labels
expanded to [B, F] inside its timed call, as in figure 2), on the same batches in interleaved
rounds, for F = 26 x 16,384 features (Gemma-2-2B with 16k SAEs on all layers) and batch 32, each
feature firing on 1-3% of samples. Results: median over rounds of time(bootstrap) / time(plain),
goal <= 2; and of time(torchmetrics) / time(bootstrap), goal >= 10. The measured column also gives
what a fit with the bootstrap on pays per batch, plain + bootstrap, against each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import _common as C
from stats_vs_torchmetrics import sparse_batches

COST_GOAL = 2.0
SPEED_GOAL = 10.0
REPLICATES = 20

if TYPE_CHECKING:
    from corrsteer_pl.calibration.bootstrap import BootstrapStats
    from corrsteer_pl.calibration.stats import CorrelationStats


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--replicates", type=int, default=REPLICATES)
    p.add_argument("--distinct", type=int, default=4, help="distinct batches generated (cycled)")
    args = p.parse_args(argv)
    reps = C.setup(args)
    if args.smoke:
        args.layers, args.d_sae = 2, 1024

    import torch
    from torchmetrics.regression import PearsonCorrCoef

    from corrsteer_pl.calibration.bootstrap import BootstrapStats
    from corrsteer_pl.calibration.stats import CorrelationStats

    features = args.layers * args.d_sae
    batches = sparse_batches(args.distinct, args.batch, features)
    ids = [[f"batch{k}-item{i}" for i in range(args.batch)] for k in range(args.distinct)]
    plain = CorrelationStats(features)
    boot = BootstrapStats(features, args.replicates)
    metric = PearsonCorrCoef(num_outputs=features)
    metric.set_dtype(torch.float64)
    seen = {"plain": 0, "bootstrap": 0, "torchmetrics": 0}

    def next_batch(case: str) -> int:
        seen[case] += 1
        return (seen[case] - 1) % len(batches)

    def update_plain() -> None:
        plain.update(*batches[next_batch("plain")])

    def update_bootstrap() -> None:
        k = next_batch("bootstrap")
        boot.update(*batches[k], ids[k])

    def update_torchmetrics() -> None:
        z, y = batches[next_batch("torchmetrics")]
        metric.update(z.to(torch.float64), y[:, None].expand(-1, features))

    cases = {"plain": update_plain, "bootstrap": update_bootstrap, "torchmetrics": update_torchmetrics}
    times = C.interleaved(cases, reps)
    assert len(set(seen.values())) == 1, "all must have seen the same batches"
    _log_sanity(boot, plain)
    return _rows(args, times, features, seen["plain"] * args.batch)


def _log_sanity(boot: BootstrapStats, plain: CorrelationStats) -> None:
    """On stderr: the replicates' r scatter around the plain r (a bootstrap that did something)."""
    r_boot, r_plain = boot.pearson(), plain.pearson()
    spread = (r_boot - r_plain).abs().mean().item()
    top = int(r_plain.argmax())
    C.log(
        f"[bootstrap] {boot.replicates} replicates, {boot.num_samples} samples; mean |r_b - r| {spread:.4f}; "
        f"top feature {top}: r {r_plain[top].item():.3f}, replicates {r_boot[:, top].min().item():.3f}"
        f"..{r_boot[:, top].max().item():.3f}; state {boot.replicates * 3 * boot.num_features * 8 / 2**20:.0f} MiB"
    )


def _rows(args: argparse.Namespace, times: dict[str, list[float]], features: int, samples: int) -> list[str]:
    """The two table rows of figure 6 from the interleaved timings."""
    plain, boot, tm = times["plain"], times["bootstrap"], times["torchmetrics"]
    both = [p + b for p, b in zip(plain, boot, strict=True)]  # a fit with the bootstrap on
    cost = C.median_ratio(boot, plain)
    speedup = C.median_ratio(tm, boot)
    setting = (
        f"F = {args.layers} x {args.d_sae:,} = {features:,}, batch {args.batch}, 1-3% non-zero, "
        f"B = {args.replicates}, float64 states, {samples} samples"
    )
    timing = (
        f"update: plain {C.ms(plain)}, bootstrap {C.ms(boot)}, torchmetrics {C.ms(tm)} {C.CLOCK_NAME}; "
        f"{len(plain)} rounds"
    )
    return [
        C.row(
            "6a. bootstrap update cost vs plain update",
            setting,
            f"{timing}, {C.spread(boot, plain)}; plain + bootstrap = {C.median_ratio(both, plain):.2f}x plain",
            f"{cost:.2f}x",
            f"<= {COST_GOAL:g}x",
            cost <= COST_GOAL,
        ),
        C.row(
            "6b. bootstrap update speed vs torchmetrics",
            setting,
            f"{timing}, {C.spread(tm, boot)}; torchmetrics / (plain + bootstrap) = {C.median_ratio(tm, both):.1f}x",
            f"{speedup:.1f}x",
            f">= {SPEED_GOAL:g}x",
            speedup >= SPEED_GOAL,
        ),
    ]


if __name__ == "__main__":
    main(sys.argv[1:])
