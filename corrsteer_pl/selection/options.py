"""SelectionOptions: how features are ranked, validated, scaled and chosen (`--selection.*` on the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corrsteer_pl.calibration.rankings import RANKINGS, Ranking
from corrsteer_pl.errors import OptionError

Variant = Literal["S", "A", "P"]
VARIANTS: tuple[Variant, ...] = ("S", "A", "P")


@dataclass(frozen=True)
class SelectionOptions:
    """CorrSteer's selection: one variant, one ranking, and the evidence a steering must have to be exported."""

    variant: Variant = "A"
    """S (the single best feature), A (the top feature of every layer) or P (the layers whose top feature beats the
    unsteered model on validation)."""
    ranking: Ranking = "pearson"
    """pearson (CorrSteer), mi (SPARE), fisher (DSG) or caa (mean difference); every ranking keeps r > 0 only."""
    top_k: int = 10
    """Candidates kept per layer for the record and the report."""
    candidates: int = 3
    """P tries each layer's top this-many features alone on validation (SmolLM2's top three r lay within one
    standard error of each other)."""
    alpha: float = 0.05
    """Level of the q-values (Benjamini-Hochberg over all features) and of P's paired sign tests against unsteered,
    Holm-corrected over all of P's trials as one family."""
    require_significance: bool = True
    """P tries only candidates with q < alpha; S and A export nothing unless a chosen feature has q < alpha (the
    reason is said). False: try and export them anyway."""
    active_only: bool = False
    """Coefficient = mean activation over the correct answers where the feature fired (default: over all correct
    answers, zeros included)."""
    scale: float = 1.0
    """Multiplier of the coefficients (> 0: a negative one subtracts the features, which the paper reports
    collapses accuracy); P's trials run at it; the grid's pick replaces it."""
    scale_grid: tuple[float, ...] | None = None
    """Pick the scale from these values (each > 0) by validation accuracy, e.g. [0.5, 1, 2, 4]."""
    max_answer_share: float = 0.6
    """Multiple choice: a grid scale is refused when one answer is over this share of all answers (1 = off)."""
    search_draws: int = 10
    """P only: repeat P's search on random firing features this many times (trials, norms, test and Holm as P's):
    the search-matched control that had the same chances to get lucky (0 = off)."""

    def __post_init__(self) -> None:
        if self.scale_grid is not None:
            object.__setattr__(self, "scale_grid", tuple(float(s) for s in self.scale_grid))
        for problem in _problems(self):
            raise OptionError(self.__class__, *problem)


def _problems(o: SelectionOptions) -> list[tuple[str, str]]:
    """(argument, what is wrong) of every option that would silently do something else than asked."""
    checks = [
        ("variant", o.variant in VARIANTS, f"must be one of {', '.join(VARIANTS)}, got {o.variant!r}"),
        ("ranking", o.ranking in RANKINGS, f"must be one of {', '.join(RANKINGS)}, got {o.ranking!r}"),
        ("top_k", o.top_k >= 1, f"must be >= 1 (candidates kept per layer), got {o.top_k}"),
        ("candidates", 1 <= o.candidates <= o.top_k, f"must lie in 1..top_k ({o.top_k}), got {o.candidates}"),
        ("alpha", 0 < o.alpha < 1, f"must lie in (0, 1), got {o.alpha}"),
        ("scale", o.scale > 0, f"must be > 0, got {o.scale}: a negative scale subtracts the features"),
        ("scale_grid", o.scale_grid is None or (o.scale_grid and all(s > 0 for s in o.scale_grid)),
         f"must list scales > 0 (or be null), got {o.scale_grid}"),
        ("max_answer_share", 0 < o.max_answer_share <= 1,
         f"must lie in (0, 1] (1 turns the collapse guard off), got {o.max_answer_share}"),
        ("search_draws", o.search_draws >= 0, f"must be >= 0 (0 turns it off), got {o.search_draws}"),
    ]  # fmt: skip
    return [(name, problem) for name, ok, problem in checks if not ok]
