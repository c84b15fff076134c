"""Feature selection (CorrSteer-S / -A / -P) and coefficients from per-layer correlation statistics.

Features are ranked by any ranking of `corrsteer_pl.calibration.rankings` (Pearson r by default); every
ranking keeps only features with r > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from corrsteer_pl.calibration.rankings import Ranking, check_ranking, score, steering_coefficient
from corrsteer_pl.calibration.significance import paired_improvement
from corrsteer_pl.calibration.stats import CorrelationStats


class TrialResult(Protocol):
    """What P needs of one validation condition (`evaluation.conditions.SplitResult` is one)."""

    accuracy: float
    valid_rate: float
    scores: list[float]


Variant = Literal["S", "A", "P"]
VARIANTS: tuple[Variant, ...] = ("S", "A", "P")
Evaluate = Callable[[dict[str, list["SelectedFeature"]]], Mapping[str, TrialResult]]


@dataclass(frozen=True)
class SelectedFeature:
    """One SAE feature chosen for steering, with the evidence for it."""

    layer: int
    feature: int
    r: float
    coefficient: float
    frequency: float
    score: float | None = None
    """The ranking's score it was chosen by (r for pearson); None where it was not ranked."""
    p_value: float | None = None
    """One-sided p-value of r > 0 (Student t on r with n - 2 degrees of freedom)."""
    q_value: float | None = None
    """Benjamini-Hochberg q-value of p over all features of all layers."""
    stability: float | None = None
    """Share of bootstrap replicates in which it is its layer's top-1 (for S: the overall top-1)."""


@dataclass
class Selection:
    """The features to steer, plus the per-layer candidates and validation scores behind the choice."""

    variant: Variant
    features: list[SelectedFeature]
    candidates: dict[int, list[SelectedFeature]] = field(default_factory=dict)
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    """P only: validation figures of "unsteered" and of each candidate "layer_{L}/{feature}" (accuracy, valid_rate,
    better, worse, p_value against unsteered, kept)."""
    ranking: Ranking = "pearson"


def rank_layer(
    stats: CorrelationStats,
    layer: int,
    top_k: int = 10,
    active_only: bool = False,
    ranking: Ranking = "pearson",
) -> list[SelectedFeature]:
    """The top-k features of one layer by `ranking`, best first, among those with r > 0 (negative r never steers).

    The coefficient is the mean activation over correct samples (the mean difference for caa); the run's scale
    multiplies it later, in one place (`corrsteer_pl.evaluation.validation.scale_features`).
    """
    scores = score(stats, ranking)
    k = min(top_k, int((scores > -torch.inf).sum()))
    if k == 0:
        return []
    values, ids = torch.topk(scores, k)
    r = stats.pearson()[ids]
    coefficients = steering_coefficient(stats, ranking, active_only)[ids]
    frequency = stats.frequency()[ids]
    return [
        SelectedFeature(layer, int(i), float(ri), float(c), float(f), float(v))
        for i, ri, c, f, v in zip(ids, r, coefficients, frequency, values, strict=True)
    ]


def ranked_layers(
    stats: Mapping[int, CorrelationStats], top_k: int = 10, active_only: bool = False, ranking: Ranking = "pearson"
) -> dict[int, list[SelectedFeature]]:
    """Every layer's top-k features by `ranking` (`rank_layer`), layers in ascending order."""
    return {layer: rank_layer(s, layer, top_k, active_only, ranking) for layer, s in sorted(stats.items())}


def select_features(
    stats: Mapping[int, CorrelationStats],
    variant: Variant = "A",
    top_k: int = 10,
    active_only: bool = False,
    evaluate: Evaluate | None = None,
    ranking: Ranking = "pearson",
    candidates: int = 1,
    alpha: float = 0.05,
) -> Selection:
    """Runs CorrSteer's selection, ranking features by `ranking` (see `corrsteer_pl.calibration.rankings`).

    S: the single best (layer, feature) over all layers. A: the top-1 feature of every layer.
    P: each layer's top `candidates` features are steered alone on validation by `evaluate` ({name: features} ->
    {name: per-item results}, one pass for all; "unsteered" maps to []). A layer keeps its most accurate candidate
    only if it beats the unsteered model by an exact one-sided paired sign test at `alpha`, so one item of
    difference never decides.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown selection variant '{variant}'; use one of {', '.join(VARIANTS)}")
    check_ranking(ranking)
    ranked = ranked_layers(stats, top_k, active_only, ranking)
    best = [c[0] for c in ranked.values() if c]
    if variant == "A":
        return Selection("A", best, ranked, ranking=ranking)
    if variant == "S":
        top = sorted(best, key=lambda f: -(f.r if f.score is None else f.score))[:1]
        return Selection("S", top, ranked, ranking=ranking)
    if evaluate is None:
        raise ValueError("variant P needs a validation scorer (evaluate); use S or A without one")
    kept, validation = validated_layers(ranked, evaluate, candidates, alpha)
    return Selection("P", kept, ranked, validation, ranking)


def validated_layers(
    ranked: Mapping[int, list[SelectedFeature]], evaluate: Evaluate, candidates: int, alpha: float
) -> tuple[list[SelectedFeature], dict[str, dict[str, float]]]:
    """CorrSteer-P's check: per layer, the most accurate of its top candidates if a paired test says it helps."""
    trials = {name: fs[0] for name, fs in validation_trials(ranked, candidates).items()}
    results = evaluate({"unsteered": []} | {name: [f] for name, f in trials.items()})
    base = results["unsteered"]
    validation = {"unsteered": {"accuracy": base.accuracy, "valid_rate": base.valid_rate}}
    kept = []
    for layer in ranked:
        names = [name for name, f in trials.items() if f.layer == layer]
        for name in names:
            test = paired_improvement(results[name].scores, base.scores, alpha)
            validation[name] = {
                "accuracy": results[name].accuracy,
                "valid_rate": results[name].valid_rate,
                "better": test.better,
                "worse": test.worse,
                "p_value": test.p_value,
                "kept": False,
            }
        if names:
            best = max(names, key=lambda name: (validation[name]["accuracy"], trials[name].r))
            if validation[best]["p_value"] < alpha:
                validation[best]["kept"] = True
                kept.append(trials[best])
    return kept, validation


def validation_trials(ranked: Mapping[int, list[SelectedFeature]], candidates: int) -> dict[str, list[SelectedFeature]]:
    """P's trials: each layer's top `candidates` features, each steered alone, named "layer_{L}/{feature}"."""
    return {f"layer_{f.layer}/{f.feature}": [f] for fs in ranked.values() for f in fs[:candidates]}
