"""The fine-tuning baseline's data: calibration prompts with their gold answers as targets, in shuffled, resumable,
length-bucketed batches; validation and test are TaskDataModule's.

Targets: the gold answer as the model should continue its prompt. After a prompt that ends in a non-space
("...Answer:"), the target is " " + answer (" B": one SmolLM2 token, what greedy decoding emits there); after one
ending in whitespace (a chat template's "assistant\\n") it is the answer as it is. The end-of-sequence token follows
it, so that free-form answers stop. Every target is checked with the task's own scorer before training: a task whose
gold answer is not itself an accepted answer (refusal tasks, whose gold is "refuse") is refused with one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from corrsteer_pl.lightning.data import ShardedBatches, TaskDataModule
from corrsteer_pl.tasks import Example, Task

IGNORE = -100  # label of a position outside the target: no loss
BUCKET_BATCHES = 16  # training batches are cut from groups of this many batches' examples sorted by length


def answer_target(example: Example, prompt: str, task: Task) -> str:
    """The gold answer as text continuing `prompt` (see the module docstring); refused unless the task accepts it."""
    target = example.answer if not prompt or prompt[-1].isspace() else " " + example.answer
    if task.score(example, target) != 1.0:
        raise ValueError(
            f"--data.task {task.name}: item '{example.id}' has gold answer {example.answer!r}, which the task's own "
            "scorer does not accept as an answer; the fine-tuning baseline needs a task whose gold answer is the "
            "expected generation (multiple choice, short answers)"
        )
    return target


class TrainBatches:
    """Shuffled training batches of (prompt tokens, target tokens), left-padded, with labels on the targets only.

    Each epoch is a seeded permutation (seed + epoch), shared by all ranks, of which rank r takes r, r+W, ...;
    then groups of BUCKET_BATCHES batches are sorted by length before they are cut, so a batch holds prompts of
    similar length (MMLU prompts run from 30 to 1,000 tokens: random batches of 8 were mostly padding), and the
    batches of a group are shuffled again. The last partial batch of an epoch is dropped: every rank takes the same
    number of full batches. Resumable: `completed` (batches whose optimizer step is done, advanced by
    `mark_completed`) and `epoch` are what Lightning saves in checkpoints.
    """

    def __init__(
        self, rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int, rank: int, world: int
    ) -> None:
        self.rows, self.batch_size, self.pad_id, self.seed = rows, batch_size, pad_id, seed
        self.rank, self.world = rank, world
        self.num_batches = len(rows) // world // batch_size
        if self.num_batches < 1:
            raise ValueError(
                f"--data.batch_size {batch_size}: the calibration split has {len(rows)} items, fewer than one batch "
                f"per device ({world}); lower --data.batch_size or raise --data.limit_calibration"
            )
        self.epoch, self.completed = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self.epoch_order(self.epoch)
        for index in range(self.completed, self.num_batches):
            yield collate_targets([self.rows[i] for i in order[index]], self.pad_id)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The row indices of each of this rank's batches in `epoch`."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        mine = torch.randperm(len(self.rows), generator=g).tolist()[self.rank :: self.world]
        mine = mine[: self.num_batches * self.batch_size]
        size, batches = self.batch_size * BUCKET_BATCHES, []
        for start in range(0, len(mine), size):
            group = sorted(mine[start : start + size], key=lambda i: len(self.rows[i][0]) + len(self.rows[i][1]))
            cut = [group[j : j + self.batch_size] for j in range(0, len(group), self.batch_size)]
            batches += [cut[j] for j in torch.randperm(len(cut), generator=g).tolist()]
        return batches

    def mark_completed(self) -> None:
        """One more optimizer step done; the last batch of an epoch starts the next epoch."""
        self.completed += 1
        if self.completed == self.num_batches:
            self.epoch, self.completed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where the data stands: Lightning saves it in checkpoints."""
        return {"epoch": self.epoch, "completed": self.completed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resumes at the saved epoch and batch."""
        self.epoch, self.completed = int(state["epoch"]), int(state["completed"])


def collate_targets(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Left-padded prompt + target rows: input_ids, attention_mask, position_ids (B, T); labels (B, T), IGNORE but
    on the target tokens (the last ones of each row)."""
    longest = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        n = len(prompt) + len(target)
        input_ids[i, longest - n :] = torch.tensor(prompt + target)
        mask[i, longest - n :] = 1
        labels[i, longest - len(target) :] = torch.tensor(target)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generation numbers left-padded rows
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def micro_batches(batch: dict[str, Tensor], max_tokens: int) -> list[dict[str, Tensor]]:
    """Consecutive rows of a left-padded batch in pieces of at most `max_tokens` padded tokens (at least one row),
    each cut to its own longest row. Rows come sorted by length (TrainBatches), so pieces waste little padding."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    pieces, start = [], 0
    while start < len(lengths):
        stop = start + 1
        while stop < len(lengths) and (stop + 1 - start) * max(lengths[start : stop + 1]) <= max_tokens:
            stop += 1
        width = int(max(lengths[start:stop]))
        pieces.append({key: value[start:stop, -width:] for key, value in batch.items()})
        start = stop
    return pieces


class FineTuneData(TaskDataModule):
    """TaskDataModule whose fit trains on the calibration split's prompts with their gold answers and validates
    on the validation split (the CorrSteer data module leaves validation out of fit); test is unchanged."""

    def __init__(self, *args: Any, max_train_tokens: int | None = None, **kwargs: Any) -> None:
        """
        Args:
            max_train_tokens: calibration items whose prompt + answer run over this many tokens are not trained on
                (None = all). Training keeps every layer's activations of a batch for the backward pass: SmolLM2
                needs ~1.2 MB per token, so a batch of 8 MMLU prompts of 1,000 tokens took 12 GB.
            *args: TaskDataModule's arguments.
            **kwargs: TaskDataModule's arguments.
        """
        super().__init__(*args, **kwargs)
        if max_train_tokens is not None and max_train_tokens < 2:
            raise ValueError(
                f"--data.max_train_tokens must be >= 2 (a prompt token and an answer), got {max_train_tokens}"
            )
        self.max_train_tokens = max_train_tokens

    def target_rows(self) -> list[tuple[list[int], list[int]]]:
        """(prompt tokens as the evaluation tokenizes them, target tokens + EOS) per calibration example."""
        tokenizer, special = self.tokenizer, not self.hparams.chat_template
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"--model.model: the tokenizer of {self.hparams.tokenizer} has no EOS token")
        rows, limit = [], self.max_train_tokens or math.inf
        for example in self.examples("calibration"):
            prompt = self.render(example.prompt)
            target = answer_target(example, prompt, self.task)
            prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
            target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
            if prompt_ids and len(prompt_ids) + len(target_ids) <= limit:
                rows.append((prompt_ids, target_ids))
        skipped = len(self.examples("calibration")) - len(rows)
        if skipped:
            rank_zero_info(f"fine-tuning leaves out {skipped} calibration items longer than --data.max_train_tokens")
        return rows

    def train_dataloader(self) -> TrainBatches:
        """This rank's shuffled training batches of the calibration split."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        pad = self.tokenizer.pad_token_id
        return TrainBatches(self.target_rows(), self.hparams.batch_size, pad, self.hparams.seed, rank, world)

    def val_dataloader(self) -> ShardedBatches:
        """The validation split's batches, in fit too."""
        return self.batches("validation")
