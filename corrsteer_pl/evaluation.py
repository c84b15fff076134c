"""Answering the same prompts under several steering conditions.

With one-token answers and generation-position steering only the last prompt position differs
between conditions, so the prompt body runs once and its KV cache is reused by every condition
(controls, scale grid, P's per-layer candidates): the conditions' last positions then run together
as one batch, instead of a full prefill per condition.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from corrsteer_pl.capture import generate_with_features
from corrsteer_pl.hooks import LayerFn, LayerHooks
from corrsteer_pl.layers import decoder_layers, hidden_size
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
        logits_to_keep=1,  # only the cache is wanted: full-vocabulary logits cost SmolLM2 a fifth of the pass
    )
    cache = prefix.past_key_values
    names = list(conditions)
    per_pass = max(1, min(len(names), CACHE_BYTES_PER_PASS // max(_cache_bytes(cache), 1)))
    out = {}
    for start in range(0, len(names), per_pass):
        chunk = names[start : start + per_pass]
        tokens = _last_position(model, input_ids, attention_mask, positions, cache, [conditions[n] for n in chunk])
        out.update({name: tokens[:, i : i + 1] for i, name in enumerate(chunk)})
    return out


# The conditions' last positions run together, as one batch of B x C rows over the prompt cache grown to C copies:
# one pass reads the weights once for all C (a pass per condition made the 42 conditions of a SmolLM2 test batch
# cost more than its prompt). The grown cache is capped at this many bytes; long prompts get fewer per pass.
CACHE_BYTES_PER_PASS = 2**31


def _cache_bytes(cache: Any) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def _last_position(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    cache: Any,
    steerings: list[SteeringVectors | None],
) -> Tensor:
    """Greedy tokens (B, C) at the last position, row block c steered by `steerings[c]` (None: unsteered).

    Grows `cache` to B x C rows (row b * C + j continues prompt b under condition j) and shrinks it back to the
    prompt body afterwards: no copy of the cache is kept beside it.
    """
    for s in steerings:
        if s is not None:
            s.validate(model)
    b, c = input_ids.shape[0], len(steerings)
    modules, d_model = decoder_layers(model), hidden_size(model)
    fns = {}
    for layer in sorted({layer for s in steerings if s is not None for layer in s.layers}):
        vectors = [s.layers[layer].vector if s and layer in s.layers else torch.zeros(d_model) for s in steerings]
        param = next(modules[layer].parameters())
        rows = torch.stack(vectors).to(param.device, param.dtype)  # (C, d)
        fns[layer] = _row_adder(rows.repeat(b, 1))  # (B * C, d): row b * C + j gets rows[j]
    # transformers 5.x renamed the forward argument `past_key_values` to `cache` (the old name warns)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if c > 1:
        cache.batch_repeat_interleave(c)
    try:
        with LayerHooks(model, fns, positions="generation"):
            logits = model(
                input_ids=input_ids[:, -1:].repeat_interleave(c, 0),
                attention_mask=attention_mask.repeat_interleave(c, 0),
                position_ids=positions[:, -1:].repeat_interleave(c, 0),
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            ).logits
    finally:
        if c > 1:
            cache.batch_select_indices(torch.arange(0, b * c, c, device=input_ids.device))
        cache.crop(-1)  # drop the last position again: the next pass starts from the prompt body
    return logits[:, -1].argmax(-1).view(b, c)


def _row_adder(rows: Tensor) -> LayerFn:
    return lambda hidden, mask: hidden + mask.unsqueeze(-1).to(hidden.dtype) * rows.unsqueeze(1)


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
