"""Open generation under each condition: how the continuations of the shipped prompts change.

Per condition and rendering (raw, chat template): the share of continuations whose first tokens differ from the
unsteered ones, the mean NLL of the continuation under the unsteered model (fluency as the unsteered model judges
it), the share of repeated 2-grams, the length, the share that end at once, and the share the refusal phrase rule
calls a refusal (the prompts are harmless: over-refusal).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from corrsteer_pl.evaluation.conditions import Conditions, PromptCaches, answered, prompt_body_cache
from corrsteer_pl.models.hooks import cache_keyword, eos_ids, pad_id, position_ids
from corrsteer_pl.side_effects.prompts import open_examples
from corrsteer_pl.tasks.batching import ShardedBatches, rank_and_world
from corrsteer_pl.tasks.classifiers import phrase_refusal

CHANGED_WITHIN = 8
"""A continuation counts as changed when its first this many tokens differ from the unsteered one's."""
RENDERINGS = {"raw": False, "chat": True}
"""Rendering name -> chat template on."""


@dataclass(frozen=True)
class Continuation:
    """One prompt's continuation under one condition."""

    tokens: tuple[int, ...]
    """New tokens before the first end-of-sequence token."""
    ended: bool
    """Whether an end-of-sequence token came within the budget."""
    nll: float
    """Mean negative log-likelihood per token of the continuation (its end token included) under the unsteered
    model; 0.0 for an empty one that did not end."""
    text: str


@dataclass
class TextMeasures:
    """One condition's open-generation measures over a prompt set."""

    changed: float
    """Share of continuations whose first CHANGED_WITHIN tokens differ from the unsteered ones."""
    nll: float
    """Mean per-token NLL of the continuations under the unsteered model."""
    repeated: float
    """Mean share of repeated 2-grams in a continuation (1 - distinct-2)."""
    length: float
    """Mean tokens before the end."""
    immediate_end: float
    """Share of continuations that end at once (no token before the end)."""
    refusal: float
    """Share the refusal phrase rule calls a refusal."""

    @classmethod
    def of(cls, mine: list[Continuation], unsteered: list[Continuation]) -> TextMeasures:
        n = max(len(mine), 1)
        pairs = zip(mine, unsteered, strict=True)
        changed = sum(a.tokens[:CHANGED_WITHIN] != b.tokens[:CHANGED_WITHIN] for a, b in pairs)
        return cls(
            changed=changed / n,
            nll=sum(c.nll for c in mine) / n,
            repeated=sum(repeated(c.tokens) for c in mine) / n,
            length=sum(len(c.tokens) for c in mine) / n,
            immediate_end=sum(c.ended and not c.tokens for c in mine) / n,
            refusal=sum(phrase_refusal(c.text) for c in mine) / n,
        )


def repeated(tokens: tuple[int, ...]) -> float:
    """Share of a sequence's 2-grams that repeat an earlier one (0 for fewer than two tokens)."""
    grams = list(zip(tokens, tokens[1:], strict=False))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@torch.inference_mode()
def continue_prompts(
    model: nn.Module,
    tokenizer: Any,
    conditions: Conditions,
    tokens: int,
    chat_template: bool,
    batch_size: int = 16,
) -> dict[str, list[Continuation]]:
    """Every condition's greedy continuations of the shipped prompts (this rank's share, gathered over ranks), in
    the prompts' order. The unsteered model scores each continuation's NLL."""
    rank, world = rank_and_world()
    examples = open_examples()
    eos, pad = eos_ids(model, tokenizer), pad_id(model, tokenizer)
    mine: dict[str, dict[str, Continuation]] = {name: {} for name in conditions}
    for batch in ShardedBatches(examples, batch_size, tokenizer, rank, world, chat_template):
        if not batch["examples"]:
            continue
        ids, mask = batch["input_ids"].to(_device(model)), batch["attention_mask"].to(_device(model))
        caches = PromptCaches()  # this batch's prompt body: answered once, then every condition's NLL reuses it
        new = answered(model, ids, mask, conditions, tokens, eos, pad, caches)
        body = prompt_body_cache(model, ids, mask, caches)
        for name, a in new.items():
            cut = [_until_end(row, eos) for row in a.tokens.tolist()]
            nll = _nll(model, ids, mask, cut, eos, body)
            for example, (kept, ended), loss in zip(batch["examples"], cut, nll, strict=True):
                text = tokenizer.decode(list(kept), skip_special_tokens=True)
                mine[name][example.id] = Continuation(kept, ended, loss, text)
    merged = _gathered(mine)
    return {name: [merged[name][e.id] for e in examples] for name in conditions}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _until_end(row: list[int], eos: list[int]) -> tuple[tuple[int, ...], bool]:
    """The tokens before the first end token, and whether one came."""
    for i, token in enumerate(row):
        if token in eos:
            return tuple(row[:i]), True
    return tuple(row), False


def _nll(
    model: nn.Module, ids: Tensor, mask: Tensor, cut: list[tuple[tuple[int, ...], bool]], eos: list[int], body: Any
) -> list[float]:
    """Per row, the unsteered model's mean NLL of its continuation (the end token included when it came): the last
    prompt position and the continuation, right-padded, run over a copy of the prompt body's cache `body`."""
    targets = [list(kept) + ([eos[0]] if ended else []) for kept, ended in cut]
    width = max((len(t) for t in targets), default=0)
    if width == 0:
        return [0.0] * len(cut)
    cont = torch.zeros(len(targets), width, dtype=ids.dtype, device=ids.device)
    cont_mask = torch.zeros_like(cont)
    for i, t in enumerate(targets):
        cont[i, : len(t)] = torch.tensor(t, dtype=ids.dtype)
        cont_mask[i, : len(t)] = 1
    full_mask = torch.cat([mask, cont_mask], dim=1)
    positions = position_ids(full_mask)[:, -(width + 1) :]
    logits = model(
        input_ids=torch.cat([ids[:, -1:], cont], dim=1), attention_mask=full_mask, position_ids=positions,
        use_cache=True, **{cache_keyword(model): copy.deepcopy(body)},
    ).logits[:, :-1].float()  # fmt: skip
    losses = F.cross_entropy(logits.transpose(1, 2), cont, reduction="none") * cont_mask
    counts = cont_mask.sum(1).clamp_min(1)
    return (losses.sum(1) / counts).tolist()


def _gathered(mine: dict[str, dict[str, Continuation]]) -> dict[str, dict[str, Continuation]]:
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    parts: list[dict[str, dict[str, Continuation]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, mine)
    return {name: {k: v for part in parts for k, v in part[name].items()} for name in mine}


@dataclass
class OpenGeneration:
    """Open-generation measures per rendering ("raw", "chat"): each named condition's, each control draw's, and a
    few continuations the steering changed (prompt, unsteered, steered)."""

    measures: dict[str, dict[str, TextMeasures]]
    """rendering -> condition (unsteered, steered, served, scale=...) -> measures."""
    controls: dict[str, dict[str, list[TextMeasures]]]
    """rendering -> control kind -> one measures per draw."""
    examples: dict[str, list[dict[str, str]]]
    """rendering -> up to EXAMPLES changed continuations."""
    prompts: int
    tokens: int


EXAMPLES = 3


def open_generation(
    model: nn.Module,
    tokenizer: Any,
    named: Mapping[str, Any],
    controls: Mapping[str, list[Any]],
    tokens: int,
    batch_size: int = 16,
) -> OpenGeneration:
    """The open-generation measures of `named` conditions (with "unsteered": None among them) and of every control
    draw, raw and (when the tokenizer has one) in the chat template."""
    conditions = dict(named) | {f"{kind}/{i}": s for kind, draws in controls.items() for i, s in enumerate(draws)}
    renderings = {k: v for k, v in RENDERINGS.items() if not v or getattr(tokenizer, "chat_template", None)}
    measures, drawn, shown = {}, {}, {}
    for rendering, chat in renderings.items():
        out = continue_prompts(model, tokenizer, conditions, tokens, chat, batch_size)
        base = out["unsteered"]
        measures[rendering] = {name: TextMeasures.of(out[name], base) for name in named}
        drawn[rendering] = {
            kind: [TextMeasures.of(out[f"{kind}/{i}"], base) for i in range(len(draws))]
            for kind, draws in controls.items()
        }
        shown[rendering] = _changed_examples(base, out.get("steered", base))
    return OpenGeneration(measures, drawn, shown, len(open_examples()), tokens)


def _changed_examples(base: list[Continuation], steered: list[Continuation]) -> list[dict[str, str]]:
    prompts = [e.prompt for e in open_examples()]
    changed = [
        {"prompt": p, "unsteered": b.text, "steered": s.text}
        for p, b, s in zip(prompts, base, steered, strict=True)
        if b.tokens[:CHANGED_WITHIN] != s.tokens[:CHANGED_WITHIN]
    ]
    return changed[:EXAMPLES]
