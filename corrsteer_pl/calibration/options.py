"""CalibrationOptions: what a calibration pass reads and keeps (`--calibration.*` on the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corrsteer_pl.errors import OptionError

Pooling = Literal["max", "mean"]
Target = Literal["generated", "choice"]
"""What correct means: the generated answer's score, or the choice-restricted answer's (multiple choice only)."""
TARGETS: tuple[Target, ...] = ("generated", "choice")

TOP_EXAMPLES_BUDGET = 2 * 2**30
"""Bytes the top-examples state may take over all layers (it is checkpointed every few batches)."""
TOP_SLOT_BYTES = 16  # a float32 activation, an int64 sample key and an int32 peak position per slot, padded


@dataclass(frozen=True)
class CalibrationOptions:
    """How calibration reads features and what it keeps besides the Pearson sums."""

    pooling: Pooling = "max"
    """How a feature's activations over an answer's generation positions become one number: max (the paper's
    default; mean collapsed on HarmBench in its ablation) or mean."""
    target: Target = "generated"
    """What counts as correct in calibration and validation: generated (the answer the model generated, the
    paper's) or choice (multiple choice only: the option letter with the highest logit, lm-eval's metric)."""
    bootstrap: int = 20
    """Poisson bootstrap replicates of r (0 = off): each candidate's stability and 90% interval of r."""
    top_examples: int = 5
    """Keep each feature's this-many top activating calibration examples (0 = off); capped at the number of
    calibration examples."""

    def __post_init__(self) -> None:
        if self.pooling not in ("max", "mean"):
            raise OptionError(self.__class__, "pooling", f"must be max or mean, got {self.pooling!r}")
        if self.target not in TARGETS:
            raise OptionError(self.__class__, "target", f"must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.bootstrap < 0:
            raise OptionError(self.__class__, "bootstrap", f"must be >= 0 replicates (0 = off), got {self.bootstrap}")
        if self.top_examples < 0:
            raise OptionError(self.__class__, "top_examples", f"must be >= 0 (0 = off), got {self.top_examples}")

    def top_examples_for(self, num_features: int, num_samples: int | None) -> int:
        """The top-examples slots per feature for `num_features` features over all layers and at most
        `num_samples` calibration examples: `top_examples`, capped at the samples; refused past the memory budget."""
        k = self.top_examples if num_samples is None else min(self.top_examples, num_samples)
        needed = k * num_features * TOP_SLOT_BYTES
        if needed > TOP_EXAMPLES_BUDGET:
            fits = TOP_EXAMPLES_BUDGET // (num_features * TOP_SLOT_BYTES)
            raise OptionError(
                self.__class__,
                "top_examples",
                f"{k} examples per feature for {num_features:,} features would keep {needed / 2**30:.1f} GiB of "
                f"state (written into every checkpoint); at most {fits} fit in {TOP_EXAMPLES_BUDGET // 2**30} GiB",
            )
        return k


def check_target(target: str, multiple_choice: bool, task: str) -> None:
    """Refuses "choice" on a task without options."""
    if target == "choice" and not multiple_choice:
        raise OptionError(
            CalibrationOptions,
            "target",
            f"choice needs a multiple-choice task; task {task} has free-form answers (no options to restrict the "
            "logits to): use target generated",
        )
