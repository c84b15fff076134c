"""The search-matched control of CorrSteer-P: P's own search, run on random firing features.

A P steering was *searched for* on the validation items, so it had several chances to look good by luck. A draw
replaces every layer's trials by as many random features that fired during calibration, each scaled to the
decoder norm of the trial of the same rank, and goes through P's own plan -> trials -> decision
(`selection.variants.validated_layers`, Holm over its own trials). Random features are not filtered by calibration
q (almost none would pass): each draw keeps what Holm keeps. `corrsteer_pl.select` answers every draw's trials in
the same validation pass as P's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.vectors import decoder_vector


def firing_features(stats: CorrelationStats, excluded: list[SelectedFeature]) -> Tensor:
    """Features that fired on at least one calibration sample, minus `excluded`."""
    fired = stats.active > 0
    fired[[f.feature for f in excluded]] = False
    pool = fired.nonzero().flatten().cpu()
    if pool.numel() == 0:
        raise ValueError("no other SAE feature fired during calibration: random-feature controls are impossible")
    return pool


def random_families(
    family: Mapping[int, list[SelectedFeature]],
    stats: Mapping[int, CorrelationStats],
    saes: Mapping[int, object],
    draws: int,
    seed: int = 0,
) -> list[dict[int, list[SelectedFeature]]]:
    """`draws` stand-ins for P's family of trials: per layer as many random firing features as it has trials,
    norm-matched rank by rank (seeded); a layer without trials gets none."""
    g = torch.Generator().manual_seed(seed)
    return [random_family(family, stats, saes, g) for _ in range(draws)]


def random_family(
    family: Mapping[int, list[SelectedFeature]],
    stats: Mapping[int, CorrelationStats],
    saes: Mapping[int, object],
    g: torch.Generator,
) -> dict[int, list[SelectedFeature]]:
    """Per layer, random firing features in place of its trials, each with the decoder norm of the trial it
    replaces."""
    out = {}
    for layer, trials in family.items():
        if not trials:
            out[layer] = []
            continue
        pool = firing_features(stats[layer], trials)
        picks = pool[torch.randperm(len(pool), generator=g)[: len(trials)]]
        out[layer] = []
        for trial, feature in zip(trials, picks.tolist(), strict=False):
            target = decoder_vector(saes[layer], [trial]).norm()
            unit = decoder_vector(saes[layer], [SelectedFeature(layer, feature, 0.0, 1.0, 0.0)]).norm()
            coefficient = float(target / unit.clamp_min(1e-12))
            r, frequency = float(stats[layer].pearson()[feature]), float(stats[layer].frequency()[feature])
            out[layer].append(SelectedFeature(layer, feature, r, coefficient, frequency))
    return out
