"""Answering the same prompts under several steering conditions.

With one-token answers and generation-position steering only the last prompt position differs
between conditions, so the prompt body runs once and its KV cache is reused by every condition
(controls, scale grid, P's per-layer candidates): one cheap forward per condition instead of a
full prefill.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from corrsteer_pl.capture import generate_with_features
from corrsteer_pl.steering import SteeringVectors

Conditions = Mapping[str, SteeringVectors | None]


@torch.inference_mode()
def answer_conditions(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    conditions: Conditions,
    max_new_tokens: int,
    eos_token_ids: Iterable[int],
    pad_token_id: int,
) -> dict[str, Tensor]:
    """New tokens (B, N) per condition, greedy; identical to `generate` under each steering."""
    eos = list(eos_token_ids)
    if max_new_tokens == 1 and input_ids.shape[1] > 1 and _positions_are_generation(conditions):
        return _one_token(model, input_ids, attention_mask, conditions)
    out = {}
    for name, steering in conditions.items():
        with steering.apply(model) if steering is not None else nullcontext():
            out[name], _ = generate_with_features(
                model, input_ids, attention_mask, max_new_tokens, eos_token_ids=eos, pad_token_id=pad_token_id
            )
    return out


def _positions_are_generation(conditions: Conditions) -> bool:
    return all(s is None or s.positions == "generation" for s in conditions.values())


def _one_token(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, conditions: Conditions) -> dict:
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() numbers left-padded rows
    prefix = model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
    )
    cache = prefix.past_key_values
    out = {}
    for name, steering in conditions.items():
        with steering.apply(model) if steering is not None else nullcontext():
            logits = model(
                input_ids=input_ids[:, -1:],
                attention_mask=attention_mask,
                position_ids=positions[:, -1:],
                past_key_values=cache,
                use_cache=True,
            ).logits
        cache.crop(-1)  # drop the last position again: the next condition starts from the prompt body
        out[name] = logits[:, -1].argmax(-1, keepdim=True)
    return out


@dataclass
class SplitResult:
    """One condition's answers on a split: what is needed to pick a scale or a layer."""

    correct: float = 0.0
    valid: int = 0
    n: int = 0
    answers: Counter = field(default_factory=Counter)

    def add(self, scores: Tensor, valid: Tensor, answers: list[str | None]) -> None:
        self.correct += float(scores.sum())
        self.valid += int(valid.sum())
        self.n += scores.numel()
        self.answers.update(a for a in answers if a is not None)

    @classmethod
    def merged(cls, parts: list[SplitResult]) -> SplitResult:
        out = cls()
        for part in parts:
            out.correct, out.valid, out.n = out.correct + part.correct, out.valid + part.valid, out.n + part.n
            out.answers.update(part.answers)
        return out

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    @property
    def top_answer_share(self) -> float:
        """Share of all items given the single most common answer (1.0 = collapsed to one answer)."""
        return max(self.answers.values(), default=0) / max(self.n, 1)
