"""When a side effect is a cost: the stated rule the verdict reads.

A side measure counts as a cost of the steering when it moves in its bad direction by more than the tolerance AND
by more than the tolerance beyond the furthest random control draw of the same per-layer norms (random features and
random directions alike): what any vector of the steering's size does is not charged to the steering, and a margin
of one prompt or item over a handful of draws is not read as a difference. An accuracy must also fall beyond its
paired 95% CI. Without controls, the tolerance (and the CI) alone decide, and the text says so. The served policy
(every position) is judged the same way against the steering as exported: what serving it that way adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corrsteer_pl.evaluation.paired import PairedAccuracy
from corrsteer_pl.side_effects.open_generation import TextMeasures


@dataclass(frozen=True)
class TextMeasure:
    """How one open-generation measure is read."""

    name: str
    label: str
    relative: bool
    """The tolerance is relative to the unsteered value (NLL, length), else in share points."""
    two_sided: bool = False
    """Either direction is bad (length: longer or shorter), else only a rise."""


TEXT_MEASURES = (
    TextMeasure("changed", "continuations changed", relative=False),
    TextMeasure("nll", "NLL under the unsteered model", relative=True),
    TextMeasure("repeated", "repeated 2-grams", relative=False),
    TextMeasure("length", "length (tokens)", relative=True, two_sided=True),
    TextMeasure("immediate_end", "immediate ends", relative=False),
    TextMeasure("refusal", "refusals of harmless prompts", relative=False),
)


def accuracy_cost(
    where: str, paired: PairedAccuracy, controls: Sequence[float], tolerance: float, against: str = "random controls"
) -> str | None:
    """The cost on a task's accuracy in words, or None when there is none by the rule above (`controls`: the
    accuracies it must fall below, `against` what they are)."""
    if paired.difference >= -tolerance or paired.ci_high >= 0:
        return None
    if controls and paired.accuracy >= min(controls) - tolerance:
        return None
    beyond = f", below {_all(controls, against)} (lowest {min(controls):.4f})" if controls else " (no controls ran)"
    return (
        f"{where}: accuracy {paired.unsteered:.4f} -> {paired.accuracy:.4f}, {paired.difference:+.4f} "
        f"[{paired.ci_low:+.4f}, {paired.ci_high:+.4f}]{beyond}"
    )


def _all(values: Sequence[float], against: str) -> str:
    return f"all {len(values)} {against}" if len(values) > 1 else against


def _change(measure: TextMeasure, value: float, base: float) -> float:
    return abs(value - base) if measure.two_sided else value - base


def text_costs(
    where: str,
    steered: TextMeasures,
    unsteered: TextMeasures,
    controls: Sequence[TextMeasures],
    tolerance: float,
    against: str = "random controls",
) -> list[str]:
    """The open-generation measures on which `steered` is a cost by the rule above, in words (`controls`: the
    measures it must go beyond, `against` what they are)."""
    costs = []
    for m in TEXT_MEASURES:
        value, base = getattr(steered, m.name), getattr(unsteered, m.name)
        change = _change(m, value, base)
        threshold = tolerance * abs(base) if m.relative else tolerance
        drawn = [_change(m, getattr(c, m.name), base) for c in controls]
        if change <= threshold or any(change <= d + threshold for d in drawn):
            continue
        beyond = f", beyond {_all(drawn, against)} (at most {max(drawn):+.3f})" if drawn else ""
        costs.append(f"{where}: {m.label} {base:.3f} -> {value:.3f}{beyond or ' (no controls ran)'}")
    return costs
