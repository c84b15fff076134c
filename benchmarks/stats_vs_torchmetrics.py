#!/usr/bin/env python
"""Figure 2: CorrelationStats against torchmetrics' PearsonCorrCoef.

Update throughput of `CorrelationStats(F).update(z, y)` against
`torchmetrics.regression.PearsonCorrCoef(num_outputs=F).update(z, y)` (float64 states both, via
`metric.set_dtype(torch.float64)`), on the same batches in interleaved rounds, for F = 26 x 16,384
features (Gemma-2-2B with 16k SAEs on all layers) and batch 32. Activations are non-negative and
sparse: each feature fires on 1-3% of samples. torchmetrics gets what it needs to give the same
answer: float64 activations and the labels expanded to [B, F] (both made inside its timed call).
Results: median over rounds of time(torchmetrics) / time(CorrelationStats), goal >= 10; and the max
|r difference| over the features whose torchmetrics r is finite, goal <= 1e-6.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common as C

SPEED_GOAL = 10.0
DIFF_GOAL = 1e-6


def sparse_batches(num: int, batch: int, features: int, seed: int = 0) -> list[tuple[object, object]]:
    """`num` batches (z [B, F] float32, y [B] float64 in {0, 1}); each feature fires on 1-3% of samples.

    Values are exponential with a per-feature scale; the first 1% of features fire twice as often
    on positive samples, so some correlations are far from 0.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    rate = 0.01 + 0.02 * torch.rand(features, generator=g)  # (F,)
    scale = 0.5 + 4.5 * torch.rand(features, generator=g)  # (F,)
    planted = features // 100
    out = []
    for _ in range(num):
        y = (torch.rand(batch, generator=g) < 0.3).to(torch.float64)  # (B,)
        p = rate.expand(batch, features).clone()  # (B, F)
        p[:, :planted] *= 1 + y[:, None].float()
        fire = torch.rand(batch, features, generator=g) < p
        z = torch.empty(batch, features).exponential_(generator=g) * scale  # (B, F)
        out.append((z * fire, y))
    return out


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--distinct", type=int, default=4, help="distinct batches generated (cycled)")
    args = p.parse_args(argv)
    reps = C.setup(args)
    if args.smoke:
        args.layers, args.d_sae = 2, 1024
    features = args.layers * args.d_sae
    ours, metric, times, seen = time_updates(sparse_batches(args.distinct, args.batch, features), features, reps)
    speedup = C.median_ratio(times["torchmetrics"], times["ours"])
    diff, finite = r_difference(ours, metric, seen)

    setting = (
        f"F = {args.layers} x {args.d_sae:,} = {features:,}, batch {args.batch}, 1-3% non-zero, "
        f"float64 states, {seen * args.batch} samples"
    )
    rate = args.batch / min(times["ours"]), args.batch / min(times["torchmetrics"])
    measured = (
        f"update: ours {C.ms(times['ours'])}, torchmetrics {C.ms(times['torchmetrics'])} {C.CLOCK_NAME} "
        f"(best {rate[0]:,.0f} vs {rate[1]:,.0f} samples/s); {reps} rounds, "
        f"{C.spread(times['torchmetrics'], times['ours'])}"
    )
    speed = f"{speedup:.1f}x", f">= {SPEED_GOAL:g}x", speedup >= SPEED_GOAL
    return [
        C.row("2a. stats update speed vs torchmetrics", setting, measured, *speed),
        C.row(
            "2b. max |r difference| vs torchmetrics",
            setting,
            f"{finite:,} features with finite r",
            f"{diff:.1e}",
            f"<= {DIFF_GOAL:g}",
            diff <= DIFF_GOAL,
        ),
    ]


def time_updates(batches: list, features: int, reps: int) -> tuple[object, object, dict[str, list[float]], int]:
    """Both updates on the same batches in interleaved rounds: (ours, torchmetrics' metric, seconds per update of
    each, batches each has seen)."""
    import torch
    from torchmetrics.regression import PearsonCorrCoef

    from corrsteer_pl.calibration.stats import CorrelationStats

    ours = CorrelationStats(features)
    metric = PearsonCorrCoef(num_outputs=features)
    metric.set_dtype(torch.float64)
    step = {"i": 0, "j": 0}

    def update_ours() -> None:
        z, y = batches[step["i"] % len(batches)]
        step["i"] += 1
        ours.update(z, y)

    def update_torchmetrics() -> None:
        z, y = batches[step["j"] % len(batches)]
        step["j"] += 1
        metric.update(z.to(torch.float64), y[:, None].expand(-1, features))

    times = C.interleaved({"ours": update_ours, "torchmetrics": update_torchmetrics}, reps)
    assert step["i"] == step["j"], "both must have seen the same batches"
    return ours, metric, times, step["i"]


def r_difference(ours, metric, seen: int) -> tuple[float, int]:
    """The max |r difference| over the features whose torchmetrics r is finite, and how many those are."""
    import torch

    r_ours = ours.pearson()
    r_tm = metric.compute().to(torch.float64)
    finite = torch.isfinite(r_tm)
    diff = float((r_ours[finite] - r_tm[finite]).abs().max()) if finite.any() else float("nan")
    C.log(
        f"[stats] {seen} batches seen; torchmetrics r finite for {int(finite.sum())} of {len(r_tm)} "
        f"features; our r = 0 on the others: {bool((r_ours[~finite] == 0).all())}; "
        f"max |r| {float(r_ours.abs().max()):.3f}"
    )
    return diff, int(finite.sum())


if __name__ == "__main__":
    main(sys.argv[1:])
