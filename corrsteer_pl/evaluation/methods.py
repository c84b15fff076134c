"""The paper's comparison: every ranking x variant, selected from one calibration's statistics, side by side.

SPARE (mutual information), DSG (Fisher ratio) and CAA (mean difference) rank the same streaming statistics as
CorrSteer's Pearson r (`calibration.rankings`), so no second calibration runs. Every method goes through
`corrsteer_pl.select_many` under the run's own selection options: P's candidates and paired test, then the scale
grid, on the validation split; all methods' P trials are answered in one validation pass and all their scale
grids in a second one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor

from corrsteer_pl.calibration.rankings import Ranking, check_ranking
from corrsteer_pl.evaluation.controls import ConditionSet
from corrsteer_pl.evaluation.labels import method_key, method_label
from corrsteer_pl.evaluation.report import MethodRow
from corrsteer_pl.selection.options import VARIANTS, SelectionOptions, Variant
from corrsteer_pl.selection.select import select_many
from corrsteer_pl.selection.variants import Selection
from corrsteer_pl.steering.vectors import SteeringVectors


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
    calibration: Any, validator: Any, rankings: list[Ranking], variants: list[Variant], options: SelectionOptions
) -> dict[str, Selection]:
    """{method key: its selection, scaled} for every ranking x variant, each under the run's `options` with its own
    ranking and variant (`corrsteer_pl.select_many`: every P's trials in one validation pass, every grid in one).
    The comparison's methods run without search-matched draws: those are the export's own control."""
    methods = {
        method_key(ranking, variant): replace(options, ranking=ranking, variant=variant, search_draws=0)
        for ranking in rankings
        for variant in variants
    }
    return select_many(calibration, methods, validator)


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
