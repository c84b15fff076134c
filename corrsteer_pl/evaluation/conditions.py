"""Answering the same prompts under several steering conditions.

With one-token answers and generation-position steering only the last prompt position differs
between conditions, so the prompt body runs once and its KV cache is reused by every condition
(controls, scale grid, P's per-layer candidates): the conditions' last positions then run together
as C query tokens of each row, instead of a full prefill per condition.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from corrsteer_pl.calibration.capture import generate_answers
from corrsteer_pl.evaluation.judge import Judged, Target, judge
from corrsteer_pl.models.hooks import LayerFn, LayerHooks, cache_keyword, eos_ids, pad_id, position_ids
from corrsteer_pl.models.layers import decoder_layers, hidden_size
from corrsteer_pl.steering.vectors import SteeringVectors, adder
from corrsteer_pl.tasks.choice import ChoiceTokens

Conditions = Mapping[str, SteeringVectors | None]


class Answered(NamedTuple):
    """One condition's answers to a batch."""

    tokens: Tensor
    """(B, N) new tokens, greedy."""
    choice_logits: Tensor | None
    """(B, K) the first answer position's logits restricted to the letters asked for (None when none were)."""


@torch.inference_mode()
def judge_conditions(
    model: nn.Module,
    tokenizer: Any,
    task: Any,
    batch: dict[str, Any],
    conditions: Conditions,
    prompt_caches: PromptCaches | None = None,
) -> dict[Any, Judged]:
    """Per condition: each item's score, whether its answer was valid, and the answer (with the choice-restricted
    ones on multiple choice). The one way a batch is answered and judged: P's trials, the scale grid, validate and
    test alike, greedy with the task's answer budget (one-token answers share `prompt_caches`)."""
    examples = batch["examples"]
    if not examples:
        return {}
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    eos, pad = eos_ids(model, tokenizer), pad_id(model, tokenizer)
    choice = ChoiceTokens.for_examples(tokenizer, examples)
    new = answered(model, ids, mask, conditions, task.max_new_tokens, eos, pad, prompt_caches, choice)
    return {name: judge(task, tokenizer, examples, a.tokens, a.choice_logits) for name, a in new.items()}


@torch.inference_mode()
def answered(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    conditions: Conditions,
    max_new_tokens: int,
    eos_token_ids: Iterable[int],
    pad_token_id: int,
    prompt_caches: PromptCaches | None = None,
    choice: ChoiceTokens | None = None,
) -> dict[str, Answered]:
    """Greedy answers under each condition (a steering, or None for the unsteered model): new tokens, and with
    `choice` the first position's logits restricted to its letters, read from the pass that produced the first
    token (no extra forward). Each condition's answers equal `generate_answers` under that steering.

    Generation-position steerings (and the unsteered model) share one pass over the prompt body, every position but
    the last: one-token answers then run their last positions together, longer answers decode together, each
    condition's rows continuing a copy of the body's cache. A steering of every position (positions="all") changes
    the prompt's cache, so it runs its own. With `prompt_caches`, the body's cache is kept there and a later pass
    over the same prompts starts from it.
    """
    eos = list(eos_token_ids)
    one_token = max_new_tokens == 1 and input_ids.shape[1] > 1
    shared = {n: s for n, s in conditions.items() if s is None or s.positions == "generation"}
    out = _one_token(model, input_ids, attention_mask, shared, prompt_caches, choice) if one_token and shared else {}
    reuse = not one_token and len(shared) > 1 and input_ids.shape[1] > 1 and _window_holds(model, input_ids.shape)
    if reuse:
        body = prompt_body_cache(model, input_ids, attention_mask, prompt_caches)
        out = _decoded_together(model, input_ids, attention_mask, shared, body, max_new_tokens, eos, pad_token_id,
                                choice)  # fmt: skip
    for name, steering in conditions.items():
        if name in out:
            continue
        with steering.apply(model) if steering is not None else nullcontext():  # positions="all": its own prefill
            tokens, _, restricted, _ = generate_answers(
                model, input_ids, attention_mask, max_new_tokens, eos_token_ids=eos, pad_token_id=pad_token_id,
                choice=choice,
            )  # fmt: skip
        out[name] = Answered(tokens, restricted)
    return {name: out[name] for name in conditions}


def _decoded_together(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    conditions: Conditions,
    body: Any,
    max_new_tokens: int,
    eos: list[int],
    pad_token_id: int,
    choice: ChoiceTokens | None,
) -> dict[str, Answered]:
    """Longer answers of generation-position conditions, decoded as one batch over copies of the prompt body's cache:
    row b of condition j is row b * C + j, steered by its own vectors. A decoding step reads the weights once for
    all its rows, so C conditions cost less together than one after another (ten conditions on SmolLM2, one CPU
    thread: 1.84x, benchmarks/decode_together.py; more where a step is bandwidth-bound, as on a GPU). Each
    condition's answers still equal `generate_answers` under that steering alone."""
    names, out = list(conditions), {}
    per_pass = _conditions_per_decode(body, input_ids.shape, max_new_tokens, len(names))
    for start in range(0, len(names), per_pass):
        chunk = [conditions[n] for n in names[start : start + per_pass]]
        c = len(chunk)
        cache = copy.deepcopy(body)  # generate appends to it
        cache.batch_repeat_interleave(c)
        with LayerHooks(model, _row_adders(model, chunk, input_ids.shape[0]), positions="generation"):
            tokens, _, restricted, _ = generate_answers(
                model, input_ids.repeat_interleave(c, 0), attention_mask.repeat_interleave(c, 0), max_new_tokens,
                eos_token_ids=eos, pad_token_id=pad_token_id, choice=choice, prompt_cache=cache,
            )  # fmt: skip
        for j, name in enumerate(names[start : start + per_pass]):
            mine = restricted[j::c] if restricted is not None else None
            out[name] = Answered(_as_generated_alone(tokens[j::c], eos), mine)
    return out


def _row_adders(model: nn.Module, steerings: list[SteeringVectors | None], batch_size: int) -> dict[int, LayerFn]:
    """Per steered layer, a hook adding row b * C + j its condition j's vector at generation positions: the same
    sum as `SteeringVectors.apply`'s, with one vector per row (a zero vector leaves a row as it is)."""
    stacked = _stacked_vectors(model, steerings).items()
    return {layer: adder(vectors.repeat(batch_size, 1)[:, None], "generation") for layer, vectors in stacked}


def _stacked_vectors(model: nn.Module, steerings: list[SteeringVectors | None]) -> dict[int, Tensor]:
    """Per layer that any steering steers, its C vectors (C, d) on the layer's device and dtype; zero for a steering
    that does not steer the layer, or None (unsteered)."""
    for s in steerings:
        if s is not None:
            s.validate(model)
    modules, d_model = decoder_layers(model), hidden_size(model)
    out = {}
    for layer in sorted({layer for s in steerings if s is not None for layer in s.layers}):
        vectors = [s.layers[layer].vector if s and layer in s.layers else torch.zeros(d_model) for s in steerings]
        param = next(modules[layer].parameters())
        out[layer] = torch.stack(vectors).to(param.device, param.dtype)
    return out


def _as_generated_alone(tokens: Tensor, eos: list[int]) -> Tensor:
    """One condition's rows of a joint decode, cut where `generate` would have stopped them alone: after the step in
    which its last row produced an end token (the joint decode goes on while any other condition's row runs)."""
    if not eos:
        return tokens
    ends = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
    if not bool(ends.any(dim=1).all()):
        return tokens  # a row ran to the budget: alone, it would have too
    first_end = ends.int().argmax(dim=1)
    return tokens[:, : int(first_end.max()) + 1]


def _conditions_per_decode(body: Any, shape: torch.Size, max_new_tokens: int, num_conditions: int) -> int:
    """How many conditions decode together: their caches (the body, grown by the answer) within a quarter of the free
    memory of the cache's device."""
    body_bytes = _cache_bytes(body)
    grown = body_bytes * (shape[1] - 1 + max_new_tokens) / max(shape[1] - 1, 1)
    budget = free_memory(body.layers[0].keys.device) // 4
    return max(1, min(num_conditions, int(budget // max(grown, 1))))


def _window_holds(model: nn.Module, shape: torch.Size) -> bool:
    """Whether a prompt-body cache can be reused as is: no sliding window, or prompts within it."""
    window = getattr(model.config, "sliding_window", None)
    return not window or shape[1] <= window


def prompt_body_cache(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_caches: PromptCaches | None = None
) -> Any:
    """The KV cache of every prompt position but the last (the same under every generation-position steering and
    unsteered), from `prompt_caches` when it holds this batch's, else one pass (kept there when given)."""
    cache = prompt_caches.get(input_ids, attention_mask) if prompt_caches is not None else None
    if cache is not None:
        return cache
    positions = position_ids(attention_mask)
    cache = model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        logits_to_keep=1,  # only the cache is wanted: full-vocabulary logits cost SmolLM2 a fifth of the pass
    ).past_key_values
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()  # sliding-window layers past their window may then be cropped back
    if prompt_caches is not None:
        prompt_caches.put(input_ids, attention_mask, cache)
    return cache


def _one_token(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    conditions: Conditions,
    prompt_caches: PromptCaches | None = None,
    choice: ChoiceTokens | None = None,
) -> dict[str, Answered]:
    positions = position_ids(attention_mask)
    cache = prompt_body_cache(model, input_ids, attention_mask, prompt_caches)
    names = list(conditions)
    per_pass = _conditions_per_pass(model, input_ids.shape, len(names))
    out = {}
    for start in range(0, len(names), per_pass):
        chunk = names[start : start + per_pass]
        steerings = [conditions[n] for n in chunk]
        logits = _last_positions(model, input_ids, attention_mask, positions, cache, steerings)  # (B, C, vocab)
        restricted = choice.restrict(logits) if choice is not None else None  # (B, C, K)
        tokens = logits.argmax(-1)
        for i, name in enumerate(chunk):
            out[name] = Answered(tokens[:, i : i + 1], restricted[:, i] if restricted is not None else None)
    if prompt_caches is not None:
        _compact(cache)  # once per batch, and only for a cache kept for a later pass
    return out


# The conditions' last positions run as C query tokens of each row over the one prompt cache, with a 4D mask in which
# each sees the prompt and itself: one pass reads the weights and the cache once for all C. (Growing the cache to
# B x C rows instead made the 42 conditions of a SmolLM2 test batch cost as much as its prompt: three C-fold copies.)
# The pass's attention scores (B x heads x C x T floats) are capped at this many bytes; longer prompts get fewer.
SCORE_BYTES_PER_PASS = 2**30
_CUSTOM_MASK_ATTENTION = ("sdpa", "eager")  # the implementations that take a prepared 4D mask as it is


def _conditions_per_pass(model: nn.Module, shape: torch.Size, num_conditions: int) -> int:
    """How many conditions share a pass: 1 where the model cannot take the 4D mask (then the plain mask serves)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "_attn_implementation", None) not in _CUSTOM_MASK_ATTENTION or (window and shape[1] > window):
        return 1  # flash / flex attention ignore a custom mask; the mask below has no sliding window
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    per_condition = shape[0] * heads * (shape[1] + num_conditions) * 4
    return max(1, min(num_conditions, SCORE_BYTES_PER_PASS // per_condition))


def _last_positions(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    cache: Any,
    steerings: list[SteeringVectors | None],
) -> Tensor:
    """Logits (B, C, vocab) at the last position, query j of every row steered by `steerings[j]` (None: unsteered).

    The C queries are appended to `cache` for the pass and cropped off after it: the next pass starts again from
    the prompt body, and no copy of the cache is kept beside it.
    """
    c = len(steerings)
    fns = {layer: _query_adder(v) for layer, v in _stacked_vectors(model, steerings).items()}  # query j gets row j
    cache_arg = cache_keyword(model)
    mask = attention_mask if c == 1 else _queries_mask(attention_mask[:, :-1].bool(), c, model)
    try:
        with LayerHooks(model, fns, positions="all"):  # every query is a generation position
            logits = model(
                input_ids=input_ids[:, -1:].expand(-1, c),
                attention_mask=mask,
                position_ids=positions[:, -1:].expand(-1, c),  # all C continue the prompt at its last position
                use_cache=True,
                logits_to_keep=c,
                **{cache_arg: cache},
            ).logits
    finally:
        cache.crop(-c)
    return logits


def _compact(cache: Any) -> None:
    """Gives each cropped layer its own storage: a crop is a view into the tensor that also held the queries, so a
    kept cache would otherwise grow by the last pass's C positions (and a `PromptCaches` budget undercount)."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and t.untyped_storage().nbytes() > t.numel() * t.element_size():
                setattr(layer, name, t.clone())


def _queries_mask(body: Tensor, c: int, model: nn.Module) -> Tensor:
    """(B, 1, C, T - 1 + C): query j attends to the prompt's real tokens and to itself, never to another query."""
    b = body.shape[0]
    own = torch.eye(c, dtype=torch.bool, device=body.device).expand(b, c, c)
    allowed = torch.cat([body[:, None, :].expand(b, c, body.shape[1]), own], dim=-1)[:, None]
    if model.config._attn_implementation == "sdpa":
        return allowed  # sdpa takes a boolean mask, True = attend
    dtype = next(model.parameters()).dtype  # eager adds the mask to the scores
    return torch.zeros(allowed.shape, dtype=dtype, device=body.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _query_adder(rows: Tensor) -> LayerFn:
    return lambda hidden, mask: hidden + rows


class PromptCaches:
    """Prompt-body KV caches kept across passes over the same batches, up to `max_bytes` in all.

    Variant P's per-layer check and the scale grid both answer the validation split: with these, the second
    pass costs only its conditions' last positions, not the prompts again. `max_bytes` None: a quarter of the
    memory free on the caches' device when the first one arrives (400 MMLU prompts of SmolLM2 take ~3.5 GB fp32).
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._caches: dict[bytes, Any] = {}

    def get(self, input_ids: Tensor, attention_mask: Tensor) -> Any | None:
        return self._caches.get(_batch_key(input_ids, attention_mask))

    def put(self, input_ids: Tensor, attention_mask: Tensor, cache: Any) -> None:
        size = _cache_bytes(cache)
        if self.max_bytes is None:
            self.max_bytes = free_memory(cache.layers[0].keys.device) // 4
        if self.bytes + size <= self.max_bytes:  # past the budget, later passes run those prompts again
            self._caches[_batch_key(input_ids, attention_mask)] = cache
            self.bytes += size

    def __len__(self) -> int:
        return len(self._caches)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's free memory, else the host's MemAvailable (Linux; 8 GiB where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return 8 * 2**30


def _batch_key(input_ids: Tensor, attention_mask: Tensor) -> bytes:
    digest = hashlib.blake2b(input_ids.cpu().numpy().tobytes(), digest_size=16)
    digest.update(attention_mask.cpu().numpy().tobytes())
    digest.update(str(tuple(input_ids.shape)).encode())
    return digest.digest()


def _cache_bytes(cache: Any) -> int:
    # storage, not view size: a cropped layer is a view into the tensor that also held the last pass's queries
    return sum(
        t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )


@dataclass
class SplitResult:
    """One condition's answers on a split: what is needed to pick a scale or a layer."""

    correct: float = 0.0
    valid: int = 0
    n: int = 0
    answers: Counter = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)
    """Per-item scores in the split's order, the same for every condition answered in one pass (paired tests)."""

    def add(self, scores: Tensor, valid: Tensor, answers: list[str | None]) -> None:
        self.correct += float(scores.sum())
        self.valid += int(valid.sum())
        self.n += scores.numel()
        self.answers.update(a for a in answers if a is not None)
        self.scores += scores.tolist()

    @classmethod
    def merged(cls, parts: list[SplitResult]) -> SplitResult:
        out = cls()
        for part in parts:
            out.correct, out.valid, out.n = out.correct + part.correct, out.valid + part.valid, out.n + part.n
            out.answers.update(part.answers)
            out.scores += part.scores
        return out

    @property
    def valid_rate(self) -> float:
        return self.valid / max(self.n, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    @property
    def top_answer_share(self) -> float:
        """Share of all items given the single most common answer (1.0 = collapsed to one answer)."""
        return max(self.answers.values(), default=0) / max(self.n, 1)


def evaluate_batches(
    batches: Iterable[dict[str, Any]],
    score: Callable[[dict[str, Any]], Mapping[str, Judged]],
    names: Iterable[str],
    target: Target = "generated",
) -> dict[str, SplitResult]:
    """Accuracy, valid rate and answer counts per condition (`names`) over `batches`, gathered over all ranks;
    correct as `target` (--calibration.target) defines it."""
    results = {name: SplitResult() for name in names}
    for batch in batches:
        for name, judged in score(batch).items():
            results[name].add(*judged.target(target))
    if dist.is_available() and dist.is_initialized():
        gathered: list[dict[str, SplitResult]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, results)
        results = {name: SplitResult.merged([part[name] for part in gathered]) for name in results}
    return results
