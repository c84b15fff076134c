"""Why a selection came out empty, in words a user can act on: said in the console, the export and the report."""

from __future__ import annotations

from collections.abc import Mapping

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.variants import Selection


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
    if not selection.features and selection.variant == "P":
        return [_p_kept_nothing(selection.validation)]
    return []


def _p_kept_nothing(validation: Mapping[str, Mapping[str, float]]) -> str:
    trials = {name: v for name, v in validation.items() if name != "unsteered"}
    best = max(trials, key=lambda name: trials[name]["accuracy"], default=None)
    unsteered = validation.get("unsteered", {}).get("accuracy", float("nan"))
    figures = (
        f"best {best}: {trials[best]['accuracy']:.3f}, {trials[best]['better']} items better, "
        f"{trials[best]['worse']} worse, p = {trials[best]['p_value']:.3f}"
        if best
        else "no candidate"
    )
    return (
        f"variant P kept no layer: no candidate beat the unsteered model on validation by the paired test "
        f"(unsteered {unsteered:.3f}; {figures}); try more validation items (--data.limit_validation), more "
        "--calibration.candidates, or --calibration.variant A"
    )


def nothing_steered(warnings: list[str]) -> str:
    """The headline of an empty steering."""
    return "nothing was steered: " + ("; ".join(warnings) if warnings else "the selection is empty")
