#!/usr/bin/env python
"""Figure 3: memory of the statistics path does not grow with the number of samples.

Each measurement is a fresh subprocess (the two sizes of a round run side by side) that feeds one
`CorrelationStats` per layer with N samples (batches of the same shape, cycled from a fixed pool),
then computes what selection reads (r, positive means, frequencies), and reports
`resource.getrusage(RUSAGE_SELF).ru_maxrss`. Result: median over rounds of peak RSS(64k) / peak
RSS(1k), goal <= 1.02.

The child loads corrsteer_pl/calibration/stats.py on its own (it needs only torch and safetensors), so the
baseline is torch's footprint, not that of transformers and sae-lens, which would hide growth.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence

import _common as C

GOAL = 1.02


def child(samples: int, layers: int, d_sae: int, batch: int, distinct: int) -> None:
    """Runs the statistics path on `samples` samples; prints peak RSS, its growth after the first batch, samples."""
    import resource

    import torch

    torch.set_num_threads(1)
    path = C.REPO / "corrsteer_pl" / "calibration" / "stats.py"
    spec = importlib.util.spec_from_file_location("corrsteer_stats", path)
    stats_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats_module)
    g = torch.Generator().manual_seed(0)
    pool = []  # the same pool in every run, whatever the sample count
    for _ in range(distinct):
        fire = torch.rand(batch, d_sae, generator=g) < 0.02
        z = torch.empty(batch, d_sae).exponential_(generator=g) * fire  # (B, d_sae)
        pool.append((z, (torch.rand(batch, generator=g) < 0.3).to(torch.float64)))
    stats = [stats_module.CorrelationStats(d_sae) for _ in range(layers)]
    for layer_stats in stats:  # the first batch: its working buffers count in the baseline
        layer_stats.update(*pool[0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(1, samples // batch):
        z, y = pool[i % distinct]
        for layer_stats in stats:
            layer_stats.update(z, y)
    for layer_stats in stats:
        layer_stats.pearson(), layer_stats.positive_mean(), layer_stats.frequency()
    seen = stats[0].num_samples
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_kb": peak, "growth_kb": peak - before, "samples": seen}))


def start_child(samples: int, args) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(samples),
        "--layers",
        str(args.layers),
        "--d-sae",
        str(args.d_sae),
        "--batch",
        str(args.batch),
        "--distinct",
        str(args.distinct),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> tuple[int, int, int]:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed with exit code {proc.returncode}")
    data = json.loads(out.strip().splitlines()[-1])
    return data["maxrss_kb"], data["growth_kb"], data["samples"]


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--distinct", type=int, default=8, help="distinct batches in the pool (cycled)")
    p.add_argument("--small", type=int, default=1024)
    p.add_argument("--large", type=int, default=65536)
    p.add_argument("--child", type=int, default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child, args.layers, args.d_sae, args.batch, args.distinct)
        return []
    reps = C.setup(args, default_reps=5)
    if args.smoke and args.reps is None:
        reps = 1  # each round is two fresh interpreters
    if args.smoke:
        args.layers, args.d_sae, args.large = 1, 1024, 2048

    rss: dict[int, list[int]] = {args.small: [], args.large: []}
    growth: dict[int, list[int]] = {args.small: [], args.large: []}
    seen = {}
    for r in range(reps):
        # Both sizes at once: peak RSS is per process, so running them side by side changes nothing but
        # the wall time. The start order alternates.
        order = (args.small, args.large) if r % 2 == 0 else (args.large, args.small)
        procs = {samples: start_child(samples, args) for samples in order}
        for samples, proc in procs.items():
            kb, grown, seen[samples] = result(proc)
            rss[samples].append(kb)
            growth[samples].append(grown)
    ratio = C.median_ratio(rss[args.large], rss[args.small])
    C.log(f"[memory] peak RSS kB, {args.small} samples: {rss[args.small]}; {args.large} samples: {rss[args.large]}")
    C.log(f"[memory] peak growth after the first update, kB: {growth[args.small]} vs {growth[args.large]}")
    state_mb = args.layers * 9 * args.d_sae * 8 / 2**20  # shift_z + 8 sums: 9 float64 vectors of d_sae per layer
    setting = (
        f"{args.layers} layers x {args.d_sae:,} features (state {state_mb:.1f} MiB), batch {args.batch}, "
        f"{seen[args.small]:,} vs {seen[args.large]:,} samples, fresh subprocess each"
    )
    mib = lambda kb: f"{sorted(kb)[len(kb) // 2] / 1024:.1f} MiB"  # noqa: E731
    measured = (
        f"peak RSS {mib(rss[args.small])} vs {mib(rss[args.large])} (median); growth after the first update "
        f"{mib(growth[args.small])} vs {mib(growth[args.large])}; {reps} rounds"
    )
    return [C.row("3. peak RSS, 64k / 1k samples", setting, measured, f"{ratio:.4f}", f"<= {GOAL}", ratio <= GOAL)]


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main(sys.argv[1:])
