#!/usr/bin/env python
"""Figure 8: how often the selection exports a steering on null data (no feature can help), before and after Holm.

Each null set is simulated at the default job's shapes (configs/default.yaml): 4 layers x 2,304 latents, 2,000
calibration items of which ~9% are correct, labels independent of every feature; per layer only 40-60 latents fire
at the answer position (a TopK-32 SAE: their frequencies sum to ~32 per item, log-normal weights, so a few fire on
most items and many on a handful), with log-normal magnitudes. Validation: 320 items (9% right unsteered); each trial
changes the answers of a few items (Poisson, mean drawn per trial from 2..30), each change better or worse by a fair
coin, so no trial truly helps. The project's real functions then select: `select_features` (ranking, q-values, P's
family, sign tests, Holm) with the simulated answers as its `evaluate`, and the rule before this change (P keeps a
layer when its most accurate of 3 candidates passes its own sign test at alpha; S and A always export) for
comparison. Result: the share of null sets that export a non-empty steering, with a Clopper-Pearson 95% interval;
goal <= alpha for the new rule.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import _common as C
import torch
from scipy.stats import beta

from corrsteer_pl.calibration.significance import paired_improvement
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.variants import (
    SelectedFeature,
    feature_significance,
    ranked_layers,
    select_features,
    validation_trials,
)


@dataclass(frozen=True)
class Shapes:
    """One null world's sizes (defaults: configs/default.yaml)."""

    layers: int = 4
    d_sae: int = 2304
    calibration: int = 2000
    positive_rate: float = 0.09
    firing: tuple[int, int] = (40, 60)
    k: int = 32
    validation: int = 320
    candidates: int = 3
    top_k: int = 10
    alpha: float = 0.05


SMOKE_SHAPES = Shapes(layers=2, d_sae=256, calibration=400, validation=120)


@dataclass(frozen=True)
class Answers:
    """One validation condition's per-item scores (what `select_features` needs of a result)."""

    scores: list[float]
    valid_rate: float = 1.0

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)


def null_stats(g: torch.Generator, shapes: Shapes) -> dict[int, CorrelationStats]:
    """Per layer, calibration statistics of sparse TopK-like activations and labels independent of them."""
    n = shapes.calibration
    y = (torch.rand(n, generator=g) < shapes.positive_rate).double()
    y[0], y[1] = 1.0, 0.0  # both classes occur
    out = {}
    for layer in range(shapes.layers):
        fire = int(torch.randint(shapes.firing[0], shapes.firing[1] + 1, (1,), generator=g))
        weights = torch.exp(1.5 * torch.randn(fire, generator=g, dtype=torch.float64))
        freq = _frequencies(weights, min(shapes.k, fire - 1))
        magnitude = torch.exp(1.0 + 0.5 * torch.randn(fire, generator=g, dtype=torch.float64))
        fires = torch.rand(n, fire, generator=g, dtype=torch.float64) < freq  # (n, fire)
        values = fires * magnitude * torch.exp(0.5 * torch.randn(n, fire, generator=g, dtype=torch.float64))
        z = torch.zeros(n, shapes.d_sae, dtype=torch.float32)  # (n, d_sae)
        z[:, torch.randperm(shapes.d_sae, generator=g)[:fire]] = values.float()
        stats = CorrelationStats(shapes.d_sae)
        stats.update(z, y)
        out[layer * 6 + 6] = stats
    return out


def _frequencies(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Firing probabilities proportional to `weights`, summing to k, none above 0.98 (water-filling)."""
    freq = k * weights / weights.sum()
    for _ in range(50):
        capped = freq >= 0.98
        excess = float((freq[capped] - 0.98).sum())
        if excess < 1e-9:
            break
        freq = freq.clamp(max=0.98)
        free = ~capped
        freq[free] += excess * weights[free] / weights[free].sum()
    return freq


class NullValidation:
    """Simulated validation answers: fixed unsteered items; each trial (by name, drawn once, then remembered) changes
    a few items, each better or worse by a fair coin."""

    def __init__(self, g: torch.Generator, items: int, rate: float = 0.09) -> None:
        self.g = g
        self.unsteered = (torch.rand(items, generator=g) < rate).double()
        self.trials: dict[str, Answers] = {}

    def __call__(self, conditions: Mapping[str, list[SelectedFeature]]) -> dict[str, Answers]:
        return {name: self.answers(name) if features else self.base() for name, features in conditions.items()}

    def base(self) -> Answers:
        return Answers(self.unsteered.tolist())

    def answers(self, name: str) -> Answers:
        if name not in self.trials:
            mean = float(torch.empty(1).uniform_(2.0, 30.0, generator=self.g))
            changed = int(torch.poisson(torch.tensor([mean]), generator=self.g))
            better = int(torch.binomial(torch.tensor([float(changed)]), torch.tensor([0.5]), generator=self.g))
            scores = self.unsteered.clone()
            wrong, right = (scores == 0).nonzero().flatten(), (scores == 1).nonzero().flatten()
            scores[wrong[torch.randperm(len(wrong), generator=self.g)[:better]]] = 1.0
            scores[right[torch.randperm(len(right), generator=self.g)[: changed - better]]] = 0.0
            self.trials[name] = Answers(scores.tolist())
        return self.trials[name]


def old_p_rule(
    ranked: Mapping[int, list[SelectedFeature]], evaluate: NullValidation, candidates: int, alpha: float
) -> list[SelectedFeature]:
    """P before Holm (commit 2f9ba47's `validated_layers`): per layer, its most accurate of the top `candidates` is
    kept when its own sign test against unsteered has p < alpha; no multiplicity correction, no q filter."""
    trials = validation_trials({layer: fs[:candidates] for layer, fs in ranked.items()})
    results = evaluate({"unsteered": []} | trials)
    kept = []
    for layer, fs in ranked.items():
        names = [f"layer_{layer}/{f.feature}" for f in fs[:candidates]]
        if names:
            best = max(names, key=lambda n: (results[n].accuracy, trials[n][0].r))
            if paired_improvement(results[best].scores, results["unsteered"].scores, alpha).passes:
                kept.append(trials[best][0])
    return kept


RULES = (
    "P before (no correction)",
    "P, Holm only",
    "P, Holm + q < alpha",
    "S/A before",
    "S, q < alpha",
    "A, q < alpha",
)


def one_null_set(seed: int, shapes: Shapes) -> tuple[dict[str, bool], float]:
    """Whether each rule exports a non-empty steering on null set `seed`, and the set's smallest q."""
    g = torch.Generator().manual_seed(seed)
    stats = null_stats(g, shapes)
    evaluate = NullValidation(g, shapes.validation)
    sig = feature_significance(stats)
    o = {"top_k": shapes.top_k, "candidates": shapes.candidates, "alpha": shapes.alpha, "significance": sig}
    ranked = ranked_layers(stats, shapes.top_k, significance=sig)
    exports = {
        RULES[0]: bool(old_p_rule(ranked, evaluate, shapes.candidates, shapes.alpha)),
        RULES[1]: bool(select_features(stats, "P", evaluate=evaluate, require_significance=False, **o).features),
        RULES[2]: bool(select_features(stats, "P", evaluate=evaluate, **o).features),
        RULES[3]: any(ranked.values()),
        RULES[4]: bool(select_features(stats, "S", **o).features),
        RULES[5]: bool(select_features(stats, "A", **o).features),
    }
    smallest = min(float(q.min()) for q in sig[1].values())
    return exports, smallest


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a share k / n."""
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--sets", type=int, default=200, help="null data sets (default 200; smoke: 6)")
    p.add_argument("--seed", type=int, default=0, help="first set's seed; set i uses seed + i")
    args = p.parse_args(argv)
    C.setup(args, default_reps=1)
    shapes, sets = (SMOKE_SHAPES, 6) if args.smoke else (Shapes(), args.sets)
    counts, smallest_q = dict.fromkeys(RULES, 0), []
    started = C.CLOCK()
    for i in range(sets):
        exports, smallest = one_null_set(args.seed + i, shapes)
        smallest_q.append(smallest)
        for rule, exported in exports.items():
            counts[rule] += exported
    elapsed = C.CLOCK() - started
    C.log(f"null_selection: {sets} sets in {elapsed:.0f} s {C.CLOCK_NAME}; shapes {shapes}")
    C.log(f"smallest q per set: median {statistics.median(smallest_q):.3f}, min {min(smallest_q):.4f}")
    setting = (
        f"{sets} null sets: {shapes.layers} layers x {shapes.d_sae} latents ({shapes.firing[0]}-{shapes.firing[1]} "
        f"firing), {shapes.calibration} calibration items ({shapes.positive_rate:.0%} correct), {shapes.validation} "
        f"validation items, {shapes.candidates} candidates, alpha {shapes.alpha}"
    )
    rows = []
    for variant, before, after in (("P", RULES[0], RULES[2]), ("S", RULES[3], RULES[4]), ("A", RULES[3], RULES[5])):
        share = counts[after] / sets
        low, high = clopper_pearson(counts[after], sets)
        measured = f"before: {counts[before]} / {sets} ({counts[before] / sets:.3f})"
        if variant == "P":
            measured += f"; Holm alone: {counts[RULES[1]]} / {sets} ({counts[RULES[1]] / sets:.3f})"
        measured += f"; now: {counts[after]} / {sets}, 95% CI [{low:.3f}, {high:.3f}]"
        figure = f"8. null sets exporting a steering, variant {variant}"
        rows.append(C.row(figure, setting, measured, f"{share:.3f}", f"<= {shapes.alpha}", share <= shapes.alpha))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
