"""Feature rankings from one streaming pass: CorrSteer's Pearson r and the paper's three comparisons.

Each ranking is a pure function of a `CorrelationStats` state (O(F), no second pass over the data).
A sample is "correct" when its label y > 0 and "incorrect" when y <= 0, as `stats.n_pos` counts it
(labels may be real-valued rewards; the reference code calls only y == 0 incorrect).

- `pearson`: r(z, y), CorrSteer's own ranking.
- `mi` (SPARE-style): mutual information, in nats, between the binary events "feature active"
  (z > 0) and "correct" (y > 0), from the 2 x 2 table of counts the state already keeps, so it is
  exact and costs nothing. The reference code instead bins z into fixed log-spaced histogram bins
  (O(F * bins) state), and its edges are unsorted (10^0.75 followed by an appended 1.0), which
  `torch.bucketize` does not support. Active-vs-inactive is the coarsest such binning; it ignores
  how strongly a feature fires, which Pearson and CAA see.
- `fisher` (DSG-style): E[z² | correct] / max(E[z² | incorrect], 1e-12), as in the reference code.
  A feature that never fires on incorrect samples scores E[z² | correct] * 1e12.
- `caa`: |mean(z | correct) - mean(z | incorrect)|; its steering coefficient is the signed
  difference mean(z | correct) - mean(z | incorrect) (`caa_coefficient`).

The raw scores are finite for every feature; a ranking that needs both classes (mi, fisher, caa)
is 0 when one of them is empty. `score` applies the mask shared by all four, as the reference code
does: features with r <= 0 score -inf and are never selected. Constant labels give r = 0
everywhere, so nothing is selected under any ranking.
"""

from collections.abc import Callable
from typing import Literal, cast, get_args

import torch
from torch import Tensor

from corrsteer_pl.calibration.stats import CorrelationStats

Ranking = Literal["pearson", "mi", "fisher", "caa"]
RANKINGS: tuple[Ranking, ...] = get_args(Ranking)
FISHER_EPS = 1e-12  # the reference code's floor on E[z² | incorrect]


def _per_sample(total: Tensor, count: Tensor) -> Tensor:
    """total / count for non-negative integer counts, 0 where the count is 0."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def _class_sizes(stats: CorrelationStats) -> tuple[Tensor, Tensor]:
    """(number of correct samples, number of incorrect samples), as float64 scalars."""
    return stats.n_pos, stats.n - stats.n_pos


def _both_classes(stats: CorrelationStats) -> bool:
    """True when the state holds at least one correct and one incorrect sample."""
    n_pos, n_neg = _class_sizes(stats)
    return bool(n_pos > 0) and bool(n_neg > 0)


def pearson_score(stats: CorrelationStats) -> Tensor:
    """Pearson r per feature (float64, 0 for dead features or constant labels)."""
    return stats.pearson()


def _mi_cell(cell: Tensor, margin_active: Tensor, margin_label: Tensor, n: Tensor) -> Tensor:
    """One cell's term p(a, s) log(p(a, s) / (p(a) p(s))) of the 2 x 2 table; 0 for an empty cell."""
    ratio = cell * n / (margin_active * margin_label).clamp_min(1)
    return torch.where(cell > 0, cell / n * torch.log(torch.where(cell > 0, ratio, 1.0)), 0.0)


def mi_score(stats: CorrelationStats) -> Tensor:
    """Mutual information (nats) between 1[z > 0] and 1[y > 0] per feature, exact from the counts.

    In [0, ln 2]; 0 for dead features, always-active features and constant labels.
    """
    n = stats.n
    if n.item() == 0:
        return torch.zeros_like(stats.active)
    n_pos, n_neg = _class_sizes(stats)
    active, inactive = stats.active, n - stats.active
    active_pos = stats.active_pos  # (F,) active and correct
    active_neg = active - active_pos  # (F,) active and incorrect
    cells = (
        (active_pos, active, n_pos),
        (active_neg, active, n_neg),
        (n_pos - active_pos, inactive, n_pos),
        (n_neg - active_neg, inactive, n_neg),
    )
    mi = sum(_mi_cell(cell, margin_active, margin_label, n) for cell, margin_active, margin_label in cells)
    return mi.clamp_min(0.0)


def class_mean_squares(stats: CorrelationStats) -> tuple[Tensor, Tensor]:
    """(E[z² | correct], E[z² | incorrect]) per feature; 0 for an empty class.

    Raises a ValueError that says to recalibrate when the state lacks the per-class Σz²
    (statistics saved by a version before they were kept; loaded as NaN).
    """
    if not stats.has_class_squares:
        where = f"the statistics file {stats.source}" if stats.source else "this statistics state"
        raise ValueError(
            f"the fisher ranking needs per-class sums of z² (sum_zz_pos, sum_zz_neg), which {where} lacks: "
            "it was written before they were kept. Recalibrate (run the calibration again) to rank by fisher, "
            "or choose --selection.ranking pearson, mi or caa, which these statistics support"
        )
    n_pos, n_neg = _class_sizes(stats)
    return _per_sample(stats.sum_zz_pos, n_pos), _per_sample(stats.sum_zz_neg, n_neg)


def fisher_score(stats: CorrelationStats) -> Tensor:
    """E[z² | correct] / max(E[z² | incorrect], 1e-12) per feature; 0 when a class is empty."""
    pos_sq, neg_sq = class_mean_squares(stats)
    if not _both_classes(stats):
        return torch.zeros_like(pos_sq)
    return pos_sq / neg_sq.clamp_min(FISHER_EPS)


def class_means(stats: CorrelationStats, active_only: bool = False) -> tuple[Tensor, Tensor]:
    """(mean(z | correct), mean(z | incorrect)) per feature; 0 for an empty class.

    With active_only, each mean is over the samples of its class where the feature fires (z > 0),
    as `stats.positive_mean(active_only=True)` is (meant for non-negative SAE codes).
    """
    total = stats.n * stats.shift_z + stats.sum_z  # (F,) Σz over all samples
    sum_pos, sum_neg = stats.sum_z_pos, total - stats.sum_z_pos
    if active_only:
        count_pos, count_neg = stats.active_pos, stats.active - stats.active_pos
    else:
        count_pos, count_neg = _class_sizes(stats)
    return _per_sample(sum_pos, count_pos), _per_sample(sum_neg, count_neg)


def caa_coefficient(stats: CorrelationStats, active_only: bool = False) -> Tensor:
    """mean(z | correct) - mean(z | incorrect) per feature, CAA's steering coefficient; 0 when a class is empty."""
    mean_pos, mean_neg = class_means(stats, active_only)
    if not _both_classes(stats):
        return torch.zeros_like(mean_pos)
    return mean_pos - mean_neg


def caa_score(stats: CorrelationStats) -> Tensor:
    """|mean(z | correct) - mean(z | incorrect)| per feature; 0 when a class is empty."""
    return caa_coefficient(stats).abs()


_SCORES: dict[str, Callable[[CorrelationStats], Tensor]] = {
    "pearson": pearson_score,
    "mi": mi_score,
    "fisher": fisher_score,
    "caa": caa_score,
}


def check_ranking(ranking: str) -> Ranking:
    """Return `ranking` if it names a ranking, else raise a ValueError naming the option and the choices."""
    if ranking not in _SCORES:
        raise ValueError(f"unknown ranking '{ranking}' (--selection.ranking); use one of {', '.join(RANKINGS)}")
    return cast(Ranking, ranking)


def score(stats: CorrelationStats, ranking: Ranking = "pearson") -> Tensor:
    """The ranking's score per feature, -inf where r <= 0 (never selected, as in the reference code)."""
    raw = _SCORES[check_ranking(ranking)](stats)
    r = raw if ranking == "pearson" else stats.pearson()
    return torch.where(r > 0, raw, -torch.inf)


def steering_coefficient(stats: CorrelationStats, ranking: Ranking = "pearson", active_only: bool = False) -> Tensor:
    """Unscaled coefficient per feature: the mean difference for caa, else the mean over correct samples."""
    if check_ranking(ranking) == "caa":
        return caa_coefficient(stats, active_only)
    return stats.positive_mean(active_only=active_only)
