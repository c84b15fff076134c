"""The paper's comparison: every ranking x variant, selected from one calibration's statistics, side by side.

SPARE (mutual information), DSG (Fisher ratio) and CAA (mean difference) rank the same streaming statistics as
CorrSteer's Pearson r (`calibration.rankings`), so no second calibration runs. Every method goes through the
run's own selection options: P's candidates and paired test, then the scale grid, on the validation split. All
methods' P trials are answered in one validation pass and all their scale grids in a second one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from corrsteer_pl.calibration.rankings import Ranking, check_ranking
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.evaluation.controls import ConditionSet
from corrsteer_pl.evaluation.report import MethodRow
from corrsteer_pl.evaluation.validation import Validator, choose_scale, group, grouped, scale_features
from corrsteer_pl.selection.variants import (
    VARIANTS,
    Selection,
    Significance,
    Variant,
    feature_significance,
    ranked_layers,
    select_features,
    trial_family,
    validation_trials,
)
from corrsteer_pl.steering.vectors import SteeringVectors

METHOD_NAMES: dict[str, str] = {"pearson": "CorrSteer", "mi": "SPARE (MI)", "fisher": "DSG (Fisher)", "caa": "CAA"}
"""What the paper calls each ranking's method."""


@dataclass(frozen=True)
class SelectionOptions:
    """The run's selection options (`--calibration.*`), applied alike to every method."""

    top_k: int = 10
    active_only: bool = False
    candidates: int = 3
    alpha: float = 0.05
    scale: float = 1.0
    scale_grid: tuple[float, ...] | None = None
    max_answer_share: float = 0.6
    require_significance: bool = True


def method_key(ranking: str, variant: str) -> str:
    """A method's key, e.g. "mi-A" (TensorBoard tags, report keys)."""
    return f"{ranking}-{variant}"


def method_label(key: str) -> str:
    """A method's name in tables, e.g. "SPARE (MI)-A"."""
    ranking, variant = key.rsplit("-", 1)
    return f"{METHOD_NAMES.get(ranking, ranking)}-{variant}"


def check_methods(rankings: list[str], variants: list[str]) -> None:
    """Refuses an unknown ranking or variant of a comparison, naming the flag."""
    for ranking in rankings:
        try:
            check_ranking(ranking)
        except ValueError as err:
            raise ValueError(f"--comparison.rankings: {err}") from None
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--comparison.variants must name variants from {', '.join(VARIANTS)}; got {unknown}")


def method_selections(
    stats: Mapping[int, CorrelationStats],
    validator: Validator,
    rankings: list[Ranking],
    variants: list[Variant],
    options: SelectionOptions,
) -> dict[str, tuple[Selection, float]]:
    """{method key: (its selection with scaled coefficients, its scale)} for every ranking x variant."""
    selections = {
        method_key(ranking, variant): selection
        for ranking, by_variant in _selections(stats, validator, rankings, variants, options).items()
        for variant, selection in by_variant.items()
    }
    scales = _scales(selections, validator, options)
    for key, selection in selections.items():
        selection.features = scale_features(selection.features, scales[key])
    return {key: (selection, scales[key]) for key, selection in selections.items()}


def _selections(
    stats: Mapping[int, CorrelationStats],
    validator: Validator,
    rankings: list[Ranking],
    variants: list[Variant],
    options: SelectionOptions,
) -> dict[str, dict[str, Selection]]:
    """Each ranking's S / A / P; every ranking's P trials in one validation pass, at --calibration.scale."""
    o = options
    results, significance = {}, feature_significance(stats)
    if "P" in variants:
        trials = {r: _p_trials(stats, r, o, significance) for r in rankings}
        if any(trials.values()):
            results = validator.results_at({"unsteered": []} | grouped(trials), o.scale)
    out: dict[str, dict[str, Selection]] = {}
    for ranking in rankings:
        mine = {"unsteered": results["unsteered"]} | group(results, ranking) if results else {}
        out[ranking] = {
            variant: select_features(
                stats,
                variant,
                o.top_k,
                o.active_only,
                (lambda _, mine=mine: mine) if variant == "P" else None,
                ranking,
                o.candidates,
                o.alpha,
                o.require_significance,
                significance,
            )  # fmt: skip
            for variant in variants
        }
    return out


def _p_trials(
    stats: Mapping[int, CorrelationStats], ranking: Ranking, o: SelectionOptions, significance: Significance
) -> dict[str, list]:
    """One ranking's P trials: its family (`trial_family`) by name."""
    ranked = ranked_layers(stats, o.top_k, o.active_only, ranking, significance)
    return validation_trials(trial_family(ranked, o.candidates, o.alpha, o.require_significance), o.candidates)


def _scales(selections: Mapping[str, Selection], validator: Validator, options: SelectionOptions) -> dict[str, float]:
    """Each method's scale by the run's grid rule (`choose_scale`), all grids in one validation pass."""
    grid = options.scale_grid
    if not grid:
        return dict.fromkeys(selections, options.scale)
    named = {key: {f"{s:g}": scale_features(sel.features, s) for s in grid} for key, sel in selections.items()}
    conditions = grouped({key: c for key, c in named.items() if selections[key].features})
    results = validator.results(conditions) if conditions else {}
    scales = {}
    for key, selection in selections.items():
        if not selection.features:
            scales[key] = options.scale
            continue
        scales[key], _ = choose_scale(
            group(results, key), validator.multiple_choice, options.max_answer_share, options.scale
        )
    return scales


def method_rows(
    conditions: ConditionSet,
    scores: Mapping[str, Tensor],
    valid: Mapping[str, Tensor],
    controls: Mapping[str, Tensor],
    choice: Mapping[str, Tensor] | None = None,
) -> list[MethodRow]:
    """The comparison table's rows (none without a comparison): unsteered, the export, each method, each baseline.

    `scores` / `valid`: per-item columns by name (`ConditionSet.columns`); `controls`: kind -> (draws, n) scores;
    `choice`: the choice-restricted per-item columns by name (multiple choice; empty or None otherwise).
    """
    if not conditions.methods and not conditions.baselines:
        return []
    info = conditions.steered.info
    own = method_key(info.get("ranking", "pearson"), info.get("variant", "?"))
    steerings = {"steered": conditions.steered} | conditions.methods
    labels = {"unsteered": "unsteered", "steered": f"{method_label(own)} (export)"}
    labels |= {key: s.info.get("label") or method_label(key) for key, s in conditions.methods.items()}
    labels |= {key: conditions.labels.get(key, key) for key in conditions.baselines}
    return [
        MethodRow.from_scores(
            name,
            label,
            scores["unsteered"],
            scores[name],
            valid[name],
            dict(controls),
            *_described(steerings.get(name)),
            choice=(choice["unsteered"], choice[name]) if choice else None,
        )
        for name, label in labels.items()
    ]


def _described(steering: SteeringVectors | None) -> tuple[list[str] | None, float | None]:
    if steering is None:
        return None, None
    features = [f"L{f.layer}/{f.feature}" for layer in steering.layers.values() for f in layer.features]
    scale: Any = steering.info.get("scale")
    return features, float(scale) if scale is not None else None
