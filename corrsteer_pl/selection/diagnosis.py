"""Why a selection came out empty, in words a user can act on: said in the console, the export and the report."""

from __future__ import annotations

from collections.abc import Mapping

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.variants import Selection


def budget_warning(answers: int, cut: int, budget: int) -> list[str]:
    """A warning when every free-form calibration answer ran the whole answer budget without ending: the
    scores then judge cut answers (a one-token budget on a free-form task makes every answer wrong)."""
    if answers == 0 or cut < answers:
        return []
    return [
        f"{cut} of {answers} calibration answers used the whole answer budget of {budget} new tokens without "
        "ending, so their scores judge cut answers: raise the task's max_new_tokens (--data.task.max_new_tokens)"
    ]


def selection_warnings(stats: Mapping[int, CorrelationStats], selection: Selection) -> list[str]:
    """One sentence per reason the selection is empty or suspect; an empty list when all is well."""
    if not stats:
        return ["nothing was calibrated: no SAE layer was read; configure --model.saes or --model.train_saes"]
    first = next(iter(stats.values()))
    n, correct = first.num_samples, int(first.n_pos.item())
    if n == 0:
        return ["calibration saw no samples: check --data.limit_calibration and the task's calibration split"]
    if correct == 0 or correct == n:
        which = "wrong" if correct == 0 else "right"
        return [
            f"every calibration answer was {which} ({correct} of {n} correct), so no feature can correlate with "
            "success: use a task the model sometimes gets right, more calibration items "
            "(--data.limit_calibration), or another prompt format (--data.chat_template)"
        ]
    if not any(selection.candidates.values()):
        return [
            f"no SAE feature correlates positively with success on any layer ({n} samples, {correct} correct): "
            "try more calibration items (--data.limit_calibration) or SAEs on other layers"
        ]
    if selection.withheld:
        return [_not_significant(selection)]
    if not selection.features and selection.variant == "P":
        return [_p_kept_nothing(selection)]
    return []


def _not_significant(selection: Selection) -> str:
    chosen = ", ".join(f"L{f.layer}#{f.feature} (q {_q(f.q_value)})" for f in selection.withheld)
    return (
        f"variant {selection.variant}'s choice {chosen} is not significant: no chosen feature has a calibration "
        f"q-value below alpha {selection.alpha}, so nothing is exported; use more calibration items "
        "(--data.limit_calibration), or --selection.require_significance false to export it anyway"
    )


def _p_kept_nothing(selection: Selection) -> str:
    validation = selection.validation
    trials = {name: v for name, v in validation.items() if name != "unsteered"}
    if not trials:
        qs = [f.q_value for fs in selection.candidates.values() for f in fs if f.q_value is not None]
        smallest = min(qs, default=None)
        return (
            f"variant P tried no candidate: no layer's top features have a calibration q-value below alpha "
            f"{selection.alpha} (smallest {_q(smallest)}), so nothing is exported; use more calibration items "
            "(--data.limit_calibration), or --selection.require_significance false to try them anyway"
        )
    best = max(trials, key=lambda name: trials[name]["accuracy"])
    v, unsteered = trials[best], validation["unsteered"]["accuracy"]
    holm = f", Holm-adjusted p = {v['p_holm']:.3f}" if "p_holm" in v else ""
    return (
        f"variant P kept no layer: no candidate beat the unsteered model on validation by the paired test with "
        f"Holm's correction over its {len(trials)} trials at alpha {selection.alpha} (unsteered {unsteered:.3f}; best "
        f"{best}: {v['accuracy']:.3f}, {v['better']} items better, {v['worse']} worse, p = {v['p_value']:.3f}{holm}); "
        "try more validation items (--data.limit_validation), fewer --selection.candidates, or "
        "--selection.variant A"
    )


def _q(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}"


def nothing_steered(warnings: list[str]) -> str:
    """The headline of an empty steering."""
    return "nothing was steered: " + ("; ".join(warnings) if warnings else "the selection is empty")
