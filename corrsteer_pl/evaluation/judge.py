"""The one way a batch's answers are judged: decode the new tokens, then the task scores and extracts each.

Calibration labels, P's validation trials, the scale grid, test conditions and the fine-tuning baseline all
go through `judge`, so a condition's accuracy means the same thing wherever it is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from corrsteer_pl.models.hooks import eos_ids

Judged = tuple[Tensor, Tensor, list[str | None]]
"""Per item: score (float64), whether the answer was valid (bool), and the extracted answer (None if invalid)."""


def judge(task: Any, tokenizer: Any, examples: Sequence[Any], new_tokens: Tensor) -> Judged:
    """Scores `new_tokens` (B, N) as the answers to `examples` by the task's own scorer and extractor."""
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    scores = [task.score(example, text) for example, text in zip(examples, texts, strict=True)]
    answers = [task.extract(example, text) for example, text in zip(examples, texts, strict=True)]
    valid = torch.tensor([a is not None for a in answers], dtype=torch.bool)
    return torch.tensor(scores, dtype=torch.float64), valid, answers


def pad_id(model: nn.Module, tokenizer: Any) -> int:
    """The id that fills finished rows: the tokenizer's pad token, else the first EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids(model, tokenizer)[0]
