"""The validation split as a judge of candidate steerings: P's trials, its search-matched draws, the scale grid.

Every candidate steering is answered through one `evaluate` function over the validation split, sharing the
prompts' caches (`PromptCaches`), so the prompts run once for the layer check and the scale grid together.
`corrsteer_pl.select` decides from the results (`selection/select.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from corrsteer_pl.calibration.options import Target
from corrsteer_pl.evaluation.conditions import Conditions, PromptCaches, SplitResult, evaluate_batches, judge_conditions
from corrsteer_pl.selection.select import choose_scale
from corrsteer_pl.selection.variants import SelectedFeature, scale_features
from corrsteer_pl.steering.vectors import SteeringVectors
from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.batching import ShardedBatches

Evaluate = Callable[[Conditions, PromptCaches], Mapping[Hashable, SplitResult]]
Build = Callable[[list[SelectedFeature]], SteeringVectors]


@dataclass
class Validator:
    """Scores candidate steerings on the validation split.

    `evaluate` answers {name: steering or None} over the split; `build` turns features into a steering (with
    `saes`, which also norm-match P's search-matched draws); `multiple_choice` turns on the scale grid's collapse
    guard.
    """

    evaluate: Evaluate
    build: Build
    multiple_choice: bool
    saes: Mapping[int, Any] = field(default_factory=dict)
    caches: PromptCaches = field(default_factory=PromptCaches)

    @classmethod
    def for_examples(
        cls,
        model: nn.Module,
        tokenizer: Any,
        saes: Mapping[int, Any],
        task: Any,
        examples: list[Example],
        *,
        target: Target = "generated",
        batch_size: int = 8,
        chat_template: bool = False,
    ) -> Validator:
        """A validator over `examples` (a task's validation split) in one process: what `select` needs for P and
        a scale grid in a notebook. Answers are greedy with the task's answer budget, judged by the task."""
        batches = ShardedBatches(examples, batch_size, tokenizer, chat_template=chat_template)

        def evaluate(conditions: Conditions, caches: PromptCaches) -> Mapping[Hashable, SplitResult]:
            score = lambda batch: judge_conditions(model, tokenizer, task, batch, conditions, caches)  # noqa: E731
            return evaluate_batches(batches, score, conditions, target)

        build = lambda features: SteeringVectors.from_selection(features, saes, model)  # noqa: E731
        return cls(evaluate, build, bool(examples and examples[0].choices), dict(saes))

    def results(self, candidates: Mapping[Hashable, list[SelectedFeature]]) -> Mapping[Hashable, SplitResult]:
        """Each candidate's answers, all in one pass over the split; an empty candidate is the unsteered model."""
        conditions = {name: self.build(features) if features else None for name, features in candidates.items()}
        return self.evaluate(conditions, self.caches)

    def pick_scale(
        self, features: list[SelectedFeature], grid: list[float], max_answer_share: float, default: float
    ) -> tuple[float, dict[str, dict[str, float]]]:
        """The grid scale with the best validation accuracy whose answers did not collapse (`choose_scale`)."""
        results = self.results({f"{s:g}": scale_features(features, s) for s in grid})
        return choose_scale(results, self.multiple_choice, max_answer_share, default)


__all__ = ["Validator", "choose_scale", "scale_features"]
