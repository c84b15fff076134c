"""Prompts as the model reads them: rendered (raw or in a chat template), left-padded into batches, sharded over
ranks without repeats, and checked for length. Used alike by a notebook's `calibrate` and the DataModule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from corrsteer_pl.tasks.base import Example


def render_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    """The text the model reads: the raw prompt (the paper's setting) or a one-turn chat."""
    if not chat_template:
        return prompt
    if not tokenizer.chat_template:
        raise ValueError("--data.chat_template is on but the tokenizer has no chat template: turn it off")
    chat = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def collate(tokenizer: Any, examples: list[Example], chat_template: bool, index: int = 0) -> dict[str, Any]:
    """A batch of `examples`: left-padded tokens of their rendered prompts; no examples give an empty batch."""
    if not examples:
        empty = torch.zeros(0, 1, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty, "examples": [], "texts": [], "index": index}
    prompts = [render_prompt(tokenizer, e.prompt, chat_template) for e in examples]
    # a chat template already holds its special tokens (BOS included); a raw prompt gets the tokenizer's own
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat_template)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "examples": examples,
        "texts": prompts,
        "index": index,
    }


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks under torch.distributed (0, 1 without it): a shard of its own for
    passes that run outside Lightning's loops."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedBatches:
    """This rank's batches of one split: every example exactly once over all ranks.

    Lightning's DistributedSampler pads by repeating examples, which would bias the statistics.
    Here rank r takes examples r, r+W, r+2W, ...; shorter shards get a final batch with one
    row fewer, but every rank yields the same number of batches (collectives stay in step).
    Within a shard, batches are cut from the examples sorted by prompt length, longest first:
    MMLU prompts run from 30 to 1,000+ tokens, and in given order 65% of a left-padded batch
    of 16 was padding (2,000 SmolLM2 prompts: 735k padded tokens for 256k real). Longest first
    also makes a batch that does not fit in memory fail at once, not at the end.
    Resumable: Lightning saves `state_dict()` in checkpoints; `completed` counts batches whose
    results were recorded (advanced by `mark_completed`), not batches prefetched.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        tokenizer: Any,
        rank: int = 0,
        world_size: int = 1,
        chat_template: bool = False,
    ):
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.shard = self.longest_first(examples[rank::world_size])
        self.num_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_size)
        self.completed = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(self.completed, self.num_batches):
            yield self.collate(self.shard[index * self.batch_size : (index + 1) * self.batch_size], index)

    def collate(self, examples: list[Example], index: int) -> dict[str, Any]:
        """Left-padded tokens; a rank whose shard ran out gets an empty batch (no rows)."""
        return collate(self.tokenizer, examples, self.chat_template, index)

    def longest_first(self, examples: list[Example]) -> list[Example]:
        """The examples by token count of their rendered prompt, longest first (ties keep their order)."""
        if len(examples) < 2:
            return list(examples)
        ids = self.tokenizer([self.render(e.prompt) for e in examples], add_special_tokens=False)["input_ids"]
        order = sorted(range(len(examples)), key=lambda i: -len(ids[i]))
        return [examples[i] for i in order]

    def render(self, prompt: str) -> str:
        return render_prompt(self.tokenizer, prompt, self.chat_template)

    def mark_completed(self) -> None:
        self.completed += 1

    def state_dict(self) -> dict[str, int]:
        return {"completed": self.completed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.completed = int(state["completed"])


def check_prompt_lengths(
    examples: list[Example], split: str, tokenizer: Any, limit: int, render: Callable[[str], str]
) -> None:
    """Refuses the first prompt over `limit` tokens, naming its item; huge prompts are caught before tokenizing."""
    texts = [render(e.prompt) for e in examples]
    # A token spells at most `longest` characters, so a text of more than limit * longest characters has more
    # than `limit` tokens: such a prompt is refused without tokenizing it (a 50 MB prompt took GBs to tokenize).
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    for example, text in zip(examples, texts, strict=True):
        if len(text) > limit * longest:
            _too_long(example, split, limit, f"{len(text):,} characters")
    for example, ids in zip(examples, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
        if len(ids) > limit:
            _too_long(example, split, limit, f"{len(ids):,} tokens")


def _too_long(example: Example, split: str, limit: int, size: str) -> None:
    raise ValueError(
        f"--data.max_prompt_tokens: {split} item '{example.id}' has a prompt of {size}, more than {limit:,} "
        "tokens: shorten or remove it, or raise --data.max_prompt_tokens"
    )
