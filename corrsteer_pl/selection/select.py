"""`select`: CorrSteer's selection end to end, from a calibration to the features to steer with their evidence.

1. plan: every method's ranked candidates and, for P, its family of trials (`variants.plan`), plus the
   search-matched draws of P (`search.search_draws`);
2. run: P's trials and every draw's trials answered in one validation pass (`Validator.results`);
3. decide: each method's layers (`variants.decide`), each draw's (`variants.validated_layers`);
4. scale: every method's scale grid answered in a second pass, the scale chosen by `choose_scale`;
5. evidence: p, q, bootstrap stability and intervals (`evidence.annotate`), and the warnings in words.
`select` is one method; `select_many` is the paper's comparison (several rankings x variants, still two passes).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.diagnosis import budget_warning, selection_warnings
from corrsteer_pl.selection.evidence import annotate, significance_warning
from corrsteer_pl.selection.options import SelectionOptions
from corrsteer_pl.selection.search import random_families
from corrsteer_pl.selection.variants import (
    Plan,
    SelectedFeature,
    Selection,
    TrialResult,
    decide,
    feature_significance,
    plan,
    scale_features,
    validated_layers,
)

UNSTEERED = "unsteered"


class ScaleResult(TrialResult, Protocol):
    top_answer_share: float


class Validator(Protocol):
    """Answers candidate steerings on the validation split (`selection.validation.Validator` is one)."""

    multiple_choice: bool
    saes: Mapping[int, Any]

    def results(self, candidates: Mapping[Hashable, list[SelectedFeature]]) -> Mapping[Hashable, ScaleResult]:
        """Each candidate's answers (an empty one is the unsteered model), all in one pass over the split."""
        ...


@dataclass(frozen=True)
class TrialKey:
    """A trial of one pass: which method it belongs to, which of its searches (None: its own, i: draw i), and its
    name within that search ("layer_L/F")."""

    method: str
    draw: int | None
    name: str


def select(
    calibration: Any, options: SelectionOptions = SelectionOptions(), validator: Validator | None = None
) -> Selection:
    """The features CorrSteer steers with, from a `Calibration` (or per-layer `CorrelationStats`), under `options`.

    P needs a `validator` (`Validator.for_examples(model, tokenizer, saes, task, validation_examples)`), and so does
    a scale grid; S and A without a grid need none. The returned `Selection` carries the chosen features with their
    scaled coefficients, the scale, the grid's figures, P's validation figures, the search-matched draws, the
    evidence of every candidate and the warnings (an empty selection says why).

    Example:
        >>> selection = select(calibration, SelectionOptions(variant="A", require_significance=False))
        >>> steering = SteeringVectors.from_selection(selection, saes, model)
    """
    return select_many(calibration, {"selection": options}, validator)["selection"]


def select_many(
    calibration: Any, methods: Mapping[str, SelectionOptions], validator: Validator | None = None
) -> dict[str, Selection]:
    """`select` for several methods (method key -> options) from one calibration, in two validation passes."""
    stats, bootstrap = _parts(calibration)
    significance = feature_significance(stats)
    plans = {key: plan(stats, o, significance) for key, o in methods.items()}
    draws = {key: _draws(plans[key], o, stats, validator) for key, o in methods.items()}
    results = _run_trials(plans, draws, methods, validator)
    selections = {}
    for key, o in methods.items():
        selection = decide(plans[key], o, _search(results, key, None))
        selection.options = o
        selection.search_controls = [
            validated_layers(family, _search(results, key, i) or {}, o.alpha) for i, family in enumerate(draws[key])
        ]
        selections[key] = selection
    _pick_scales(selections, methods, validator)
    budget = budget_warning(
        getattr(calibration, "num_samples", 0), getattr(calibration, "cut", 0), getattr(calibration, "budget", 0)
    )
    for key, selection in selections.items():
        _explain(selection, stats, bootstrap, significance, methods[key].alpha)
        selection.warnings = selection.warnings + budget
    return selections


def _parts(calibration: Any) -> tuple[Mapping[int, CorrelationStats], Mapping[int, Any]]:
    """(statistics, bootstrap) of a `Calibration`, or of bare per-layer statistics (no bootstrap)."""
    if hasattr(calibration, "stats"):
        return calibration.stats, calibration.bootstrap
    return calibration, {}


def _draws(
    p: Plan, options: SelectionOptions, stats: Mapping[int, CorrelationStats], validator: Validator | None
) -> list[dict[int, list[SelectedFeature]]]:
    """P's search-matched draws (none for S and A, for a P without trials, or without a validator's SAEs)."""
    if options.variant != "P" or not options.search_draws or not any(p.family.values()) or validator is None:
        return []
    return random_families(p.family, stats, validator.saes, options.search_draws)


def _run_trials(
    plans: Mapping[str, Plan],
    draws: Mapping[str, list[dict[int, list[SelectedFeature]]]],
    methods: Mapping[str, SelectionOptions],
    validator: Validator | None,
) -> Mapping[Hashable, TrialResult]:
    """Every P's trials and every draw's, at its method's scale, answered in one pass (no pass without a trial)."""
    trials: dict[Hashable, list[SelectedFeature]] = {}
    for key, o in methods.items():
        searches = [(None, plans[key].family)] + list(enumerate(draws[key]))
        for draw, family in searches:
            for name, features in Plan({}, dict(family)).trials.items():
                trials[TrialKey(key, draw, name)] = scale_features(features, o.scale)
    if not trials:
        return {}
    if validator is None:
        raise ValueError("variant P needs its trials answered on validation: pass validator=")
    return validator.results({UNSTEERED: []} | trials)


def _search(results: Mapping[Hashable, TrialResult], method: str, draw: int | None) -> dict[str, TrialResult] | None:
    """One search's results under their own names, with the unsteered model's (None when nothing was answered)."""
    if not results:
        return None
    mine = {
        key.name: r
        for key, r in results.items()
        if isinstance(key, TrialKey) and (key.method, key.draw) == (method, draw)
    }
    return {UNSTEERED: results[UNSTEERED]} | mine


def _pick_scales(
    selections: Mapping[str, Selection], methods: Mapping[str, SelectionOptions], validator: Validator | None
) -> None:
    """Every method's scale from its grid (all grids in one pass), then its features and draws scaled by it."""
    grids = {key: o.scale_grid for key, o in methods.items() if o.scale_grid and selections[key].features}
    if grids and validator is None:
        raise ValueError("scale_grid needs a validator to answer the grid on validation: pass validator=")
    candidates = {(key, s): scale_features(selections[key].features, s) for key, grid in grids.items() for s in grid}
    results = validator.results(candidates) if candidates else {}
    for key, selection in selections.items():
        o, selection.scale = methods[key], methods[key].scale
        if key in grids:
            by_scale = {f"{s:g}": results[(key, s)] for s in grids[key]}
            multiple_choice = validator.multiple_choice
            selection.scale, selection.scale_grid = choose_scale(by_scale, multiple_choice, o.max_answer_share, o.scale)
        selection.features = scale_features(selection.features, selection.scale)
        selection.search_controls = [
            (scale_features(kept, selection.scale), figures) for kept, figures in selection.search_controls
        ]


def choose_scale(
    results: Mapping[str, ScaleResult], multiple_choice: bool, max_answer_share: float, default: float
) -> tuple[float, dict[str, dict[str, float]]]:
    """The best scale of {scale as "%g": its validation results}, and the grid's figures.

    On multiple-choice tasks a scale is rejected when one answer takes more than `max_answer_share` of all
    items ("always A" scores the share of gold A). Ties go to the smaller scale; `default` stands when every
    scale is rejected.
    """
    refused = {name: multiple_choice and r.top_answer_share > max_answer_share for name, r in results.items()}
    table = {
        name: {
            "accuracy": r.accuracy,
            "valid_rate": r.valid_rate,
            "top_answer_share": r.top_answer_share,
            "refused": refused[name],
        }
        for name, r in results.items()
    }
    allowed = [name for name in results if not refused[name]]
    if not allowed:
        return default, table
    best = max(allowed, key=lambda name: (results[name].accuracy, -float(name)))
    return float(best), table


def _explain(
    selection: Selection,
    stats: Mapping[int, CorrelationStats],
    bootstrap: Mapping[int, Any],
    significance: Any,
    alpha: float,
) -> None:
    """Fills every candidate's evidence into `selection` and says what is wrong with it, if anything."""
    selection.evidence = annotate(selection, stats, bootstrap, significance=significance)
    warnings = selection_warnings(stats, selection)
    if selection.features:
        warnings += significance_warning(selection.evidence, alpha)
    selection.warnings = warnings
