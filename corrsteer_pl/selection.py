"""Feature selection (CorrSteer-S / -A / -P) and coefficients from per-layer correlation statistics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from corrsteer_pl.stats import CorrelationStats

Variant = Literal["S", "A", "P"]
VARIANTS: tuple[Variant, ...] = ("S", "A", "P")


@dataclass(frozen=True)
class SelectedFeature:
    """One SAE feature chosen for steering, with the evidence for it."""

    layer: int
    feature: int
    r: float
    coefficient: float
    frequency: float


@dataclass
class Selection:
    """The features to steer, plus the per-layer candidates and validation scores behind the choice."""

    variant: Variant
    features: list[SelectedFeature]
    candidates: dict[int, list[SelectedFeature]] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)  # P only: "unsteered" and "layer_{L}"


def rank_layer(
    stats: CorrelationStats,
    layer: int,
    top_k: int = 10,
    active_only: bool = False,
    scale: float = 1.0,
) -> list[SelectedFeature]:
    """The top-k positively correlated features of one layer, best first (negative r never steers)."""
    r = stats.pearson()
    k = min(top_k, int((r > 0).sum()))
    if k == 0:
        return []
    values, ids = torch.topk(r, k)
    coefficients = stats.positive_mean(active_only=active_only)[ids] * scale
    frequency = stats.frequency()[ids]
    return [
        SelectedFeature(layer, int(i), float(v), float(c), float(f))
        for i, v, c, f in zip(ids, values, coefficients, frequency, strict=True)
    ]


def select_features(
    stats: Mapping[int, CorrelationStats],
    variant: Variant = "A",
    top_k: int = 10,
    active_only: bool = False,
    scale: float = 1.0,
    evaluate: Callable[[dict[str, list[SelectedFeature]]], dict[str, float]] | None = None,
) -> Selection:
    """Runs CorrSteer's selection.

    S: the single best (layer, feature) over all layers. A: the top-1 feature of every layer.
    P: a layer's top-1 is kept only if steering it alone scores above the unsteered model under
    `evaluate`, which scores several candidate steerings at once ({name: features} -> {name:
    validation accuracy}; "unsteered" maps to []), so one pass over the split serves them all.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown selection variant '{variant}'; use one of {', '.join(VARIANTS)}")
    candidates = {layer: rank_layer(s, layer, top_k, active_only, scale) for layer, s in sorted(stats.items())}
    best = [c[0] for c in candidates.values() if c]
    if variant == "A":
        return Selection("A", best, candidates)
    if variant == "S":
        return Selection("S", sorted(best, key=lambda f: -f.r)[:1], candidates)
    if evaluate is None:
        raise ValueError("variant P needs a validation scorer (evaluate); use S or A without one")
    validation = evaluate({"unsteered": []} | {f"layer_{f.layer}": [f] for f in best})
    kept = [f for f in best if validation[f"layer_{f.layer}"] > validation["unsteered"]]
    return Selection("P", kept, candidates, validation)
