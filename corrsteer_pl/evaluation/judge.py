"""The one way a batch's answers are judged: decode the new tokens, then the task scores and extracts each.

Calibration labels, P's validation trials, the scale grid, test conditions and the fine-tuning baseline all
go through `judge`, so a condition's accuracy means the same thing wherever it is reported. On multiple-choice
tasks one judgement carries two scores of the same pass: the generated answer's (does the text give the gold
letter?) and the choice-restricted one (is the gold letter the argmax of the letters' logits at the first answer
position, as lm-eval's multiple-choice metric?). The first rewards answering in the format; the second does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from corrsteer_pl.calibration.options import TARGETS, CalibrationOptions, Target, check_target
from corrsteer_pl.errors import OptionError
from corrsteer_pl.tasks.choice import ChoiceTokens


@dataclass(frozen=True)
class Judged:
    """Per item: score (float64), whether the answer was valid (bool), the extracted answer (None if invalid);
    on multiple-choice tasks also the choice-restricted score and letter. Unpacks as (scores, valid, answers)."""

    scores: Tensor
    valid: Tensor
    answers: list[str | None]
    choice_scores: Tensor | None = None
    """1.0 where the letter with the highest first-position logit among the item's options is the gold one."""
    choice_answers: list[str] | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.scores, self.valid, self.answers))

    def target(self, target: Target) -> Judged:
        """This judgement as `target` defines correct: with "choice", the choice-restricted answer (always valid)."""
        if target == "generated":
            return self
        if self.choice_scores is None:
            raise OptionError(CalibrationOptions, "target", "choice needs a multiple-choice task: use generated")
        valid = torch.ones_like(self.choice_scores, dtype=torch.bool)
        return Judged(
            self.choice_scores, valid, list(self.choice_answers or []), self.choice_scores, self.choice_answers
        )


def target_choices(target: Target, tokenizer: Any, examples: Sequence[Any]) -> ChoiceTokens | None:
    """The letters calibration must read the logits of: those of `examples`' options under target "choice"."""
    return ChoiceTokens.for_examples(tokenizer, examples) if target == "choice" else None


def judge(
    task: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    new_tokens: Tensor,
    choice_logits: Tensor | None = None,
) -> Judged:
    """Scores `new_tokens` (B, N) as the answers to `examples` by the task's own scorer and extractor; with
    `choice_logits` (B, K: the first position's logits restricted to `ChoiceTokens.for_examples(tokenizer,
    examples)`), the choice-restricted answers too."""
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    scores = [task.score(example, text) for example, text in zip(examples, texts, strict=True)]
    answers = [task.extract(example, text) for example, text in zip(examples, texts, strict=True)]
    valid = torch.tensor([a is not None for a in answers], dtype=torch.bool)
    scored = torch.tensor(scores, dtype=torch.float64)
    choice = ChoiceTokens.for_examples(tokenizer, examples) if choice_logits is not None else None
    if choice is None:
        return Judged(scored, valid, answers)
    letters = choice.answers(choice_logits, examples)
    right = torch.tensor([float(a == e.answer) for a, e in zip(letters, examples, strict=True)], dtype=torch.float64)
    return Judged(scored, valid, answers, right, letters)


__all__ = ["TARGETS", "Judged", "Target", "check_target", "judge", "target_choices"]
