"""Format or knowledge: the choice-restricted accuracy beside the generated-answer accuracy, and which one moved.

The generated-answer accuracy counts an item right when the text the model writes gives the gold letter: a
steering that only makes the model answer with a letter at all raises it. The choice-restricted accuracy takes
the letter with the highest logit among the item's options at the first answer position (lm-eval's
multiple-choice metric, read from the same pass): every item has an answer, so format cannot move it. A gain in
the first alone is a format effect; a gain in the second is a change in which option the model ranks first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from corrsteer_pl.evaluation.control_summary import ControlSummary
from corrsteer_pl.evaluation.paired import ConditionResult, PairedAccuracy
from corrsteer_pl.evaluation.verdict import reading


@dataclass
class ChoiceReport:
    """The choice-restricted accuracy of the report's conditions on the same items, and the reading of both."""

    steered: PairedAccuracy
    controls: list[ControlSummary] = field(default_factory=list)  # the report's random / search-matched draws
    reading: str = ""  # in words: which of the two accuracies moved

    @classmethod
    def from_scores(
        cls,
        unsteered: Tensor,
        steered: Tensor,
        controls: Mapping[str, Tensor],
        generated: PairedAccuracy,
        conditions: Sequence[ConditionResult],
    ) -> ChoiceReport:
        """The choice-restricted figures of a report's items: per-item scores (N,) unsteered and steered, and
        kind -> (draws, N) for its controls; `generated` and `conditions` are the report's generated-answer
        figures (its `paired` and `conditions`), read beside them."""
        choice = PairedAccuracy.from_scores(unsteered, steered)
        summaries = [
            ControlSummary.from_scores(kind, steered, draws, torch.ones_like(draws, dtype=torch.bool))
            for kind, draws in controls.items()
        ]
        rates = {c.name: c for c in conditions}
        return cls(choice, summaries, reading(generated, choice, rates["unsteered"], rates["steered"]))


def choice_scalars(choice: ChoiceReport, stage: str) -> dict[str, float]:
    """The choice-restricted figures as `stage/choice/name` scalars (TensorBoard)."""
    out = {f"{stage}/choice/{k}": float(v) for k, v in choice.steered.as_report().items()}
    for k in choice.controls:
        prefix = f"{stage}/choice/{k.kind}"
        out |= {f"{prefix}/accuracy_mean": k.accuracy_mean, f"{prefix}/p_value": k.p_value}
    return out
