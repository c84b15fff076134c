"""Feature selection (CorrSteer-S / -A / -P) and coefficients from per-layer correlation statistics.

Features are ranked by any ranking of `corrsteer_pl.calibration.rankings` (Pearson r by default); every
ranking keeps only features with r > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from corrsteer_pl.calibration.rankings import Ranking, check_ranking, score, steering_coefficient
from corrsteer_pl.calibration.significance import holm_adjusted, layer_p_values, paired_improvement, pooled_q_values
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.options import VARIANTS, SelectionOptions, Variant


class TrialResult(Protocol):
    """What P needs of one validation condition (`evaluation.conditions.SplitResult` is one)."""

    accuracy: float
    valid_rate: float
    scores: list[float]


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
    """P only: validation figures of "unsteered" and of each trial "layer_{L}/{feature}" (accuracy, valid_rate,
    better, worse, p_value against unsteered, p_holm over all trials, kept)."""
    ranking: Ranking = "pearson"
    withheld: list[SelectedFeature] = field(default_factory=list)
    """S and A: what the variant chose but did not export, because none of it had a calibration q below alpha."""
    alpha: float = 0.05
    require_significance: bool = True
    scale: float = 1.0
    """The multiplier already applied to `features`' coefficients (`corrsteer_pl.select`: the grid's pick)."""
    scale_grid: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each grid scale's validation figures (accuracy, valid_rate, top_answer_share, refused)."""
    search_controls: list[tuple[list[SelectedFeature], dict[str, dict[str, float]]]] = field(default_factory=list)
    """P's search-matched draws: per draw, the random features P's search kept and its validation figures."""
    evidence: Any = None
    """`selection.evidence.Evidence`: every candidate's bootstrap interval, the smallest q (set by `select`)."""
    warnings: list[str] = field(default_factory=list)
    """Why the selection is empty or suspect, in words a user can act on (set by `select`)."""
    options: SelectionOptions | None = None
    """The options it was selected under (set by `select`)."""


Significance = tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]
"""Per layer, every feature's one-sided p of r > 0 and its q (Benjamini-Hochberg over all features of all layers)."""


def feature_significance(stats: Mapping[int, CorrelationStats]) -> Significance:
    """(p, q) of every feature of every layer; q pools all layers, the family variant S chooses from."""
    p = layer_p_values(stats)
    return p, pooled_q_values(p)


def rank_layer(
    stats: CorrelationStats,
    layer: int,
    top_k: int = 10,
    active_only: bool = False,
    ranking: Ranking = "pearson",
) -> list[SelectedFeature]:
    """The top-k features of one layer by `ranking`, best first, among those with r > 0 (negative r never steers).

    The coefficient is the mean activation over correct samples (the mean difference for caa); the run's scale
    multiplies it later, in one place (`corrsteer_pl.selection.validation.scale_features`).
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
    stats: Mapping[int, CorrelationStats],
    top_k: int = 10,
    active_only: bool = False,
    ranking: Ranking = "pearson",
    significance: Significance | None = None,
) -> dict[int, list[SelectedFeature]]:
    """Every layer's top-k features by `ranking` (`rank_layer`), layers in ascending order, each with its p and q
    (`feature_significance`, computed here unless given)."""
    p, q = significance if significance is not None else feature_significance(stats)
    return {
        layer: [
            replace(f, p_value=float(p[layer][f.feature]), q_value=float(q[layer][f.feature]))
            for f in rank_layer(s, layer, top_k, active_only, ranking)
        ]
        for layer, s in sorted(stats.items())
    }


def is_significant(f: SelectedFeature, alpha: float) -> bool:
    """Its calibration q-value is below alpha (a feature without one is not)."""
    return f.q_value is not None and f.q_value < alpha


def trial_family(
    ranked: Mapping[int, list[SelectedFeature]], candidates: int, alpha: float, require_significance: bool = True
) -> dict[int, list[SelectedFeature]]:
    """P's family of trials: per layer its top `candidates` eligible features, eligible meaning calibration q < alpha
    (every ranked feature when `require_significance` is off). The family depends on calibration only."""
    return {
        layer: [f for f in fs if not require_significance or is_significant(f, alpha)][:candidates]
        for layer, fs in ranked.items()
    }


@dataclass(frozen=True)
class Plan:
    """What a selection needs before any validation: every layer's ranked candidates and, for P, its trials."""

    ranked: dict[int, list[SelectedFeature]]
    family: dict[int, list[SelectedFeature]]
    """P's family of trials (`trial_family`); empty for S and A."""

    @property
    def trials(self) -> dict[str, list[SelectedFeature]]:
        """P's trials by name, each steered alone (none for S and A)."""
        return validation_trials(self.family)


def plan(
    stats: Mapping[int, CorrelationStats], options: SelectionOptions, significance: Significance | None = None
) -> Plan:
    """Ranks every layer's features by `options.ranking` and, for P, fixes its family of trials."""
    check_ranking(options.ranking)
    o = options
    ranked = ranked_layers(stats, o.top_k, o.active_only, o.ranking, significance)
    family = trial_family(ranked, o.candidates, o.alpha, o.require_significance) if o.variant == "P" else {}
    return Plan(ranked, family)


def decide(plan: Plan, options: SelectionOptions, results: Mapping[str, TrialResult] | None = None) -> Selection:
    """The selection of `plan` under `options`; P decides from `results` ("unsteered" and each of `plan.trials`,
    answered on the validation split; none are needed when P has no trial)."""
    o = options
    settings = {"ranking": o.ranking, "alpha": o.alpha, "require_significance": o.require_significance}
    if o.variant == "P":
        if plan.trials and results is None:
            raise ValueError("variant P needs its trials answered on validation: pass a validator (or use S or A)")
        kept, validation = validated_layers(plan.family, results or {}, o.alpha)
        return Selection("P", kept, plan.ranked, validation, **settings)
    best = [c[0] for c in plan.ranked.values() if c]
    if o.variant == "S":
        best = sorted(best, key=lambda f: -(f.r if f.score is None else f.score))[:1]
    if o.require_significance and best and not any(is_significant(f, o.alpha) for f in best):
        return Selection(o.variant, [], plan.ranked, withheld=best, **settings)
    return Selection(o.variant, best, plan.ranked, **settings)


def select_features(
    stats: Mapping[int, CorrelationStats],
    variant: Variant = SelectionOptions.variant,
    top_k: int = SelectionOptions.top_k,
    active_only: bool = SelectionOptions.active_only,
    evaluate: Evaluate | None = None,
    ranking: Ranking = SelectionOptions.ranking,
    candidates: int = SelectionOptions.candidates,
    alpha: float = SelectionOptions.alpha,
    require_significance: bool = SelectionOptions.require_significance,
    significance: Significance | None = None,
) -> Selection:
    """Runs CorrSteer's selection on statistics alone (`plan`, then `decide`), ranking by `ranking`.

    S: the single best (layer, feature) over all layers. A: the top-1 feature of every layer. With
    `require_significance`, S and A export nothing (their choice is kept in `withheld`) when no chosen feature has a
    calibration q below `alpha`.
    P: each layer's top `candidates` eligible features (`trial_family`) are steered alone on validation by
    `evaluate` ({name: features} -> {name: per-item results}, one pass for all; "unsteered" maps to []); a layer
    keeps its most accurate trial among those that beat the unsteered model by an exact one-sided paired sign test
    with Holm's correction over all trials of all layers at `alpha` (`validated_layers`).
    `corrsteer_pl.select` adds the scale grid, the search-matched draws and the evidence on top of this.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown selection variant '{variant}'; use one of {', '.join(VARIANTS)}")
    check_ranking(ranking)
    if variant == "P" and evaluate is None:
        raise ValueError("variant P needs a validation scorer (evaluate); use S or A without one")
    options = SelectionOptions(
        variant=variant,
        ranking=ranking,
        top_k=top_k,
        candidates=min(candidates, top_k),
        alpha=alpha,
        require_significance=require_significance,
        active_only=active_only,
    )
    chosen = plan(stats, options, significance)
    trials = chosen.trials
    results = evaluate({"unsteered": []} | trials) if variant == "P" and trials else None
    return decide(chosen, options, results)


def validated_layers(
    family: Mapping[int, list[SelectedFeature]], results: Mapping[str, TrialResult], alpha: float
) -> tuple[list[SelectedFeature], dict[str, dict[str, float]]]:
    """CorrSteer-P's decision on a family of trials (each steered alone), from their validation `results`.

    1. Every trial (`validation_trials(family)`, named as there) gets an exact one-sided paired sign test against
       `results["unsteered"]`; 2. Holm's correction over all trials of all layers at `alpha` keeps the chance that
       any layer is kept by luck at most alpha; 3. each layer keeps its most accurate trial (ties: higher r) among
       those whose Holm-adjusted p is below alpha. No trial: nothing kept, no figures.
    """
    trials = {name: fs[0] for name, fs in validation_trials(family).items()}
    if not trials:
        return [], {}
    base = results["unsteered"]
    validation = {"unsteered": {"accuracy": base.accuracy, "valid_rate": base.valid_rate}}
    for name in trials:
        test = paired_improvement(results[name].scores, base.scores, alpha)
        validation[name] = {
            "accuracy": results[name].accuracy,
            "valid_rate": results[name].valid_rate,
            "better": test.better,
            "worse": test.worse,
            "p_value": test.p_value,
        }
    names = list(trials)
    for name, adjusted in zip(names, holm_adjusted([validation[n]["p_value"] for n in names]), strict=True):
        validation[name] |= {"p_holm": adjusted, "kept": False}
    kept = []
    for layer in family:
        passed = [n for n in names if trials[n].layer == layer and validation[n]["p_holm"] < alpha]
        if passed:
            best = max(passed, key=lambda n: (validation[n]["accuracy"], trials[n].r))
            validation[best]["kept"] = True
            kept.append(trials[best])
    return kept, validation


def validation_trials(family: Mapping[int, list[SelectedFeature]]) -> dict[str, list[SelectedFeature]]:
    """P's trials: every feature of its family (`trial_family`), each steered alone, named "layer_{L}/{feature}"."""
    return {f"layer_{f.layer}/{f.feature}": [f] for fs in family.values() for f in fs}


def scale_features(features: list[SelectedFeature], scale: float) -> list[SelectedFeature]:
    """The features with their coefficients times `scale`: the one place a scale acts on a steering."""
    return [replace(f, coefficient=f.coefficient * scale) for f in features]
