"""The fine-tuning baseline: LoRA on the calibration split's gold answers, picked on validation, reported like steering.

`python -m corrsteer_pl.finetune fit --config configs/finetune.yaml` trains LoRA adapters on the task model with the
calibration prompts as inputs and the gold answers as targets, validates every `--trainer.val_check_interval` steps
on the validation split with the task's own scorer, keeps the checkpoint with the best validation accuracy, and then
compares it with the base model on the test split: `<default_root_dir>/finetune/report.{json,md}` (unsteered = base
model, steered = fine-tuned), with accuracy, valid-answer rate, answers changed better / worse and SER.

Why LoRA rather than full fine-tuning: on 2 CPU cores full fine-tuning of even SmolLM2-135M needs the weights'
gradients and two AdamW moments (4x the model's 540 MB, checkpoints of 1.6 GB each); LoRA (r 8 on q/k/v/o: 0.9M
trainable parameters, 0.7% of the model) needs neither, its checkpoints are ~11 MB, and like steering it leaves the
model unchanged but for a small delta that can be switched off (`disable_adapter`), so the base model of the report
is the same object. The paper's own baseline is full fine-tuning; this one is the cheaper, smaller-delta kind.

Targets: the gold answer as the model should continue its prompt. After a prompt that ends in a non-space
("...Answer:"), the target is " " + answer (" B": one SmolLM2 token, what greedy decoding emits there); after one
ending in whitespace (a chat template's "assistant\\n") it is the answer as it is. The end-of-sequence token follows
it, so that free-form answers stop. Every target is checked with the task's own scorer before training: a task whose
gold answer is not itself an accepted answer (refusal tasks, whose gold is "refuse") is refused with one line. The loss
is the mean cross-entropy over the batch's target tokens only (the prompt and the padding are masked out), computed in
micro-batches of at most `--model.optimizer.micro_batch_tokens` padded tokens whose gradients add up to the batch's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from corrsteer_pl.evaluation.columns import ConditionScores
from corrsteer_pl.evaluation.conditions import Answered, answered
from corrsteer_pl.evaluation.judge import Judged, judge
from corrsteer_pl.evaluation.markdown import difference_lines
from corrsteer_pl.evaluation.report import EvaluationReport
from corrsteer_pl.files.atomic import atomic_folder
from corrsteer_pl.files.safe_load import CKPT_FLAG, check_ckpt_path, load_checkpoint, with_safe_checkpoint_io
from corrsteer_pl.lightning.data import ShardedBatches, TaskDataModule
from corrsteer_pl.lightning.entry import run_cli
from corrsteer_pl.models.hooks import eos_ids, pad_id
from corrsteer_pl.models.loading import DTYPES
from corrsteer_pl.models.sources import TINY_RANDOM, load_pretrained, resolve_model
from corrsteer_pl.tasks import Example, Split, Task
from corrsteer_pl.tasks.choice import ChoiceTokens

FOLDER = "finetune"
"""Under --trainer.default_root_dir: `adapter/` (the artefact), `checkpoints/` (best.ckpt, last.ckpt: resume only)
and `report.{json,md}`."""
BEST, LAST = "best", "last"
ADAPTER = "adapter"
"""The best checkpoint's adapters as peft saves them (adapter_config.json + adapter_model.safetensors) and
SETTINGS_FILE: what `--comparison.finetune` and `load_finetuned` take. Loading it reads JSON and safetensors only."""
SETTINGS_FILE = "finetune.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", SETTINGS_FILE)
SETTINGS_FORMAT = "corrsteer-pl fine-tuning adapters"
FINETUNE_FLAG = "--comparison.finetune"
RESUME_FIX = (
    f"pass `last` or <default_root_dir>/{FOLDER}/checkpoints/{{best,last}}.ckpt written by "
    "`python -m corrsteer_pl.finetune fit`, or leave --ckpt_path out to start afresh"
)
IGNORE = -100  # label of a position outside the target: no loss
BUCKET_BATCHES = 16  # training batches are cut from groups of this many batches' examples sorted by length
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

CHECKPOINT_KEY = "finetune"
TRAINER_DEFAULTS = {
    "max_steps": 100,
    "check_val_every_n_epoch": None,  # validate every val_check_interval optimizer steps, across epochs
    "val_check_interval": 25,
    "num_sanity_val_steps": 0,
    "use_distributed_sampler": False,  # the batches shard themselves across ranks
    "enable_model_summary": False,
}


# -- options ------------------------------------------------------------------------------


@dataclass
class LoRAOptions:
    """Where the LoRA adapters go and how large they are."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_ATTENTION))
    """Module names to adapt (Llama-family attention q/k/v/o by default); ["all-linear"] adapts every linear layer
    but the output head (other architectures name theirs differently, e.g. GPT-2's c_attn)."""
    seed: int = 0
    """Seed of the adapters' initialisation (A random, B zero), whatever else drew random numbers before."""

    def __post_init__(self) -> None:
        """Refuses out-of-range options, naming the flag."""
        if self.r < 1:
            raise ValueError(f"--model.lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError('--model.lora.target_modules is empty: name modules such as q_proj, or ["all-linear"]')

    def peft_config(self) -> LoraConfig:
        """The peft configuration of these options."""
        targets: list[str] | str = self.target_modules
        if list(targets) == ["all-linear"]:
            targets = "all-linear"
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )


@dataclass
class OptimizerOptions:
    """AdamW on the adapters, with a linear warm-up to a constant learning rate; the budget is --trainer.max_steps."""

    lr: float = 5e-4
    """Learning rate after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Optimizer steps over which the learning rate rises linearly to lr (step s uses lr * (s + 1) / (warmup + 1))."""
    clip_norm: float | None = 1.0
    """Clip the adapters' gradient to this global L2 norm (None = no clipping)."""
    micro_batch_tokens: int = 1024
    """A batch runs forward and backward in pieces of at most this many padded tokens (one row at least), their
    gradients summed into the whole batch's: the memory of a step is bounded, its result is the same. Training keeps
    every layer's activations for the backward pass: SmolLM2 took ~2.3 MB per token at 512-token prompts (a batch of
    8 such prompts peaked at 10 GB)."""

    def __post_init__(self) -> None:
        """Refuses out-of-range options, naming the flag."""
        if self.lr <= 0:
            raise ValueError(f"--model.optimizer.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--model.optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"--model.optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"--model.optimizer.clip_norm must be positive (or null), got {self.clip_norm}")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"--model.optimizer.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")


# -- data: prompts with their gold answers as targets ----------------------------------------


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


# -- scoring -------------------------------------------------------------------------------


@dataclass
class ItemScores:
    """One model's answers on a split, item by item: what a comparison table pairs with other methods by id."""

    ids: list[str]
    scores: Tensor  # (N,) float64
    valid: Tensor  # (N,) bool
    answers: list[str | None]

    def aligned(self, ids: list[str]) -> ItemScores:
        """The same results in the order of `ids` (e.g. another method's items); every id must be present."""
        where = {item: i for i, item in enumerate(self.ids)}
        missing = [item for item in ids if item not in where]
        if missing or len(ids) != len(self.ids):
            raise ValueError(f"the items differ: {len(missing)} of {len(ids)} ids not scored here (e.g. {missing[:3]})")
        index = [where[item] for item in ids]
        return ItemScores(list(ids), self.scores[index], self.valid[index], [self.answers[i] for i in index])

    @property
    def accuracy(self) -> float:
        """Mean score."""
        return float(self.scores.mean()) if self.scores.numel() else 0.0


# -- the report ------------------------------------------------------------------------------


def finetune_markdown(report: EvaluationReport) -> str:
    """The fine-tuning report as Markdown (unsteered = the base model, steered = the fine-tuned one; `steering`
    holds the run's settings): base vs fine-tuned, their paired difference, the answers that changed, SER."""
    info = report.steering
    base, tuned = report.conditions
    lines = [
        f"# Fine-tuning baseline: {report.task} ({report.split} split, {report.samples} items)",
        "",
        f"LoRA adapters (r {info['lora']['r']}, alpha {info['lora']['alpha']}, on "
        f"{', '.join(info['lora']['target_modules'])}) trained on the calibration split's gold answers; "
        f"checkpoint {info['checkpoint']} (step {info['step']}, validation accuracy {info['val_accuracy']:.4f}), "
        "picked by validation accuracy.",
        "",
        f"Judge: {report.judge}",
        "",
        *([f"Data: {report.data}", ""] if report.data else []),
        "| model | accuracy | valid-answer rate | accuracy among valid |",
        "|---|---|---|---|",
        f"| base (unsteered) | {base.accuracy:.4f} | {base.valid_rate:.4f} | {base.accuracy_valid:.4f} |",
        f"| fine-tuned (steered) | {tuned.accuracy:.4f} | {tuned.valid_rate:.4f} | {tuned.accuracy_valid:.4f} |",
        *difference_lines(report.paired, "Fine-tuned - base"),
    ]
    return "\n".join(lines) + "\n"


def finetune_report(
    base: tuple[Tensor, Tensor], tuned: tuple[Tensor, Tensor], task: Task, split: str, data: str, info: dict[str, Any]
) -> EvaluationReport:
    """The report from paired per-item (scores, valid) of the base and the fine-tuned model on the same items
    (`finetune_markdown` renders it)."""
    return EvaluationReport.from_scores(
        base[0],
        tuned[0],
        task=task.name,
        split=split,
        judge=task.judge_name,
        valid={"unsteered": base[1], "steered": tuned[1]},
        steering=info,
        data=data,
    )


# -- the LightningModule -------------------------------------------------------------------


def _options(cls: type, value: Any) -> Any:
    """A dataclass option from the CLI (the object), a checkpoint's hyperparameters (a dict) or None (defaults)."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)


class FineTuneModule(L.LightningModule):
    """LoRA fine-tuning of a causal LM on gold answers (fit), accuracy on validation, base vs fine-tuned on test."""

    def __init__(
        self,
        model: str = TINY_RANDOM,
        revision: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora: LoRAOptions | None = None,
        optimizer: OptimizerOptions | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: Hugging Face model id, local folder, smollm2-135m-instruct or tiny-random.
            revision: model revision on the hub (branch, tag or commit).
            dtype: model weights dtype (float32 on CPU).
            lora: the adapters: rank, alpha, dropout, target modules.
            optimizer: AdamW learning rate, weight decay, warm-up, gradient clipping and micro-batch size (the
                budget is --trainer.max_steps).
            max_new_tokens: tokens to generate per answer in validation and test (None = the task's own).
        """
        super().__init__()
        self.save_hyperparameters()
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"--model.max_new_tokens must be >= 1 (or null for the task's own), got {max_new_tokens}")
        self.lora = _options(LoRAOptions, lora)
        self.optim = _options(OptimizerOptions, optimizer)
        self.strict_loading = False  # checkpoints hold the adapters only; the base model reloads from its source
        self.automatic_optimization = False  # a step accumulates micro-batches (OptimizerOptions.micro_batch_tokens)
        self.lm: PeftModel | None = None
        self.tokenizer: Any = None
        self.val_scores, self.test_scores = ConditionScores(), ConditionScores()
        self.val_accuracy: float | None = None
        self.checkpoint_info: dict[str, Any] | None = None  # what the loaded checkpoint says about itself
        self.adapter_folder: Path | None = None  # adapters to load (load_finetuned) instead of fresh ones

    def configure_model(self) -> None:
        """Loads the base model, wraps it with fresh LoRA adapters (base weights frozen) or those of
        `adapter_folder` (peft's from_pretrained: JSON and safetensors), and its tokenizer."""
        if self.lm is not None:
            return
        path, revision = resolve_model(self.hparams.model), self.hparams.revision
        dtype = DTYPES[self.hparams.dtype]
        base = load_pretrained(AutoModelForCausalLM.from_pretrained, path, revision=revision, dtype=dtype)
        if self.adapter_folder is not None:
            self.lm = load_adapters(base, self.adapter_folder)
        else:
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.lora.seed)
                    self.lm = get_peft_model(base, self.lora.peft_config())
            except ValueError as err:  # peft: "Target modules {...} not found in the base model"
                raise ValueError(f"--model.lora.target_modules: {str(err).splitlines()[0]}") from None
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, revision=revision, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def inner(self) -> nn.Module:
        """The transformers model with the adapters injected (what `generate` and the answer passes call)."""
        return self.lm.get_base_model()

    @property
    def task(self) -> Task:
        """The data module's task (its scorer judges every answer)."""
        return self.trainer.datamodule.task

    # -- training ---------------------------------------------------------------------------

    def answer_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Summed cross-entropy of the target tokens given the prompt; logits only at the last positions."""
        width = int((batch["labels"] != IGNORE).sum(-1).max())  # the longest target: targets end every row
        logits = self.inner(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
            logits_to_keep=width + 1,
        ).logits  # (B, width + 1, V): position t predicts token t + 1
        gold = batch["labels"][:, -width:]  # (B, width)
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), gold.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One optimizer step on the batch's mean answer loss, accumulated over its micro-batches; logs it and lr."""
        opt, schedule = self.optimizers(), self.lr_schedulers()
        targets = int((batch["labels"] != IGNORE).sum())
        loss = torch.zeros((), device=self.device)
        for piece in micro_batches(batch, self.optim.micro_batch_tokens):
            part = self.answer_loss(piece) / targets  # the pieces' parts sum to the batch's mean
            self.manual_backward(part)
            loss += part.detach()
        if self.optim.clip_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.optim.clip_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        schedule.step()
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lr", schedule.get_last_lr()[0], batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Advances the data position that checkpoints save."""
        self.trainer.train_dataloader.mark_completed()  # this step is done: a resume starts after it

    def on_fit_start(self) -> None:
        """Adapters in training mode."""
        self.lm.train()  # from_pretrained leaves the model in eval mode: LoRA dropout would never act

    def on_train_start(self) -> None:
        """Says where a resumed run starts."""
        if self.global_step:
            rank_zero_info(f"fine-tuning resumes after step {self.global_step} of {self.trainer.max_steps}")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the adapters; linear warm-up, then the constant learning rate until --trainer.max_steps."""
        check_budget(self.trainer)
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        warmup = self.optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- answering -------------------------------------------------------------------------

    def answer(self, batch: dict[str, Any], task: Task, adapter: bool = True) -> Answered:
        """Greedy new tokens (B, N) of the fine-tuned model, or of the base model with `adapter=False`, and (multiple
        choice) the first position's logits restricted to the options' letters."""
        eos, pad = eos_ids(self.inner, self.tokenizer), pad_id(self.inner, self.tokenizer)
        steps = self.hparams.max_new_tokens or task.max_new_tokens
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        choice = ChoiceTokens.for_examples(self.tokenizer, batch["examples"])
        with nullcontext() if adapter else self.lm.disable_adapter():
            return answered(self.inner, ids, mask, {"answer": None}, steps, eos, pad, choice=choice)["answer"]

    def scored(self, batch: dict[str, Any], task: Task, adapter: bool = True) -> Judged:
        """(scores, valid, answers) of one batch by the task's own scorer, and the choice-restricted ones."""
        tokens, choice_logits = self.answer(batch, task, adapter)
        return judge(task, self.tokenizer, batch["examples"], tokens, choice_logits)

    @torch.inference_mode()
    def item_scores(self, data: TaskDataModule, split: Split = "test", adapter: bool = True) -> ItemScores:
        """Every item of a split (this process's share of it under DDP), in the data module's batch order."""
        ids, scores, valid, answers = [], [], [], []
        for batch in data.batches(split):
            if not batch["examples"]:
                continue
            s, v, a = self.scored(batch, data.task, adapter)
            ids += [e.id for e in batch["examples"]]
            scores.append(s)
            valid.append(v)
            answers += a
        return ItemScores(ids, torch.cat(scores), torch.cat(valid), answers)

    # -- validation and test ---------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Scores the fine-tuned model's answers to one batch."""
        if batch["examples"]:
            scores, valid, _ = self.scored(batch, self.task)
            self.val_scores.update(scores[:, None].to(self.device), valid[:, None].to(self.device))

    def on_validation_epoch_end(self) -> None:
        """Logs val/accuracy (what picks the checkpoint), val/valid_rate and val/accuracy_valid."""
        scores, valid = self.val_scores.compute()  # (N, 1) over all ranks
        self.val_scores.reset()
        scores, valid = scores[:, 0], valid[:, 0]
        n_valid = int(valid.sum())
        self.val_accuracy = float(scores.mean()) if scores.numel() else 0.0
        self.log_dict(
            {
                "val/accuracy": self.val_accuracy,
                "val/valid_rate": float(valid.double().mean()) if valid.numel() else 0.0,
                "val/accuracy_valid": float(scores[valid].sum()) / n_valid if n_valid else 0.0,
            }
        )

    def on_test_start(self) -> None:
        """Refuses to compare the base model with untrained adapters (which equal it)."""
        if self.checkpoint_info is None:
            raise ValueError(
                "test compares the base model with a fine-tuned checkpoint: pass --ckpt_path "
                f"<default_root_dir>/{FOLDER}/checkpoints/{BEST}.ckpt (written by fit)"
            )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Scores the base and the fine-tuned model on one batch (the same items, paired)."""
        if not batch["examples"]:
            return
        base_scores, base_valid, _ = self.scored(batch, self.task, adapter=False)
        tuned_scores, tuned_valid, _ = self.scored(batch, self.task, adapter=True)
        scores = torch.stack([base_scores, tuned_scores], 1)  # (B, 2): base, fine-tuned
        self.test_scores.update(scores.to(self.device), torch.stack([base_valid, tuned_valid], 1).to(self.device))

    def on_test_epoch_end(self) -> None:
        """Logs the comparison; rank 0 writes <default_root_dir>/finetune/report.{json,md} and TensorBoard text."""
        scores, valid = self.test_scores.compute()  # (N, 2) over all ranks
        self.test_scores.reset()
        data = self.trainer.datamodule
        report = finetune_report(
            (scores[:, 0], valid[:, 0]), (scores[:, 1], valid[:, 1]), data.task, "test", data.describe(), self.info()
        )
        self.log_dict({f"test/{name}": float(value) for name, value in report.paired.as_report().items()})
        self.log_dict({f"test/{c.name}/valid_rate": c.valid_rate for c in report.conditions})
        if self.trainer.is_global_zero:
            markdown = finetune_markdown(report)
            report.save(Path(self.trainer.default_root_dir) / FOLDER, markdown, stem="report")
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("test/finetune_report", markdown, self.global_step)

    def info(self) -> dict[str, Any]:
        """What the report says about the fine-tuned model."""
        saved = self.checkpoint_info or {}
        path = self.trainer.ckpt_path if self._trainer is not None else saved.get("path")
        return {
            "method": "LoRA fine-tuning on the calibration split's gold answers",
            "model": self.hparams.model,
            "checkpoint": str(path),
            "step": saved.get("step"),
            "val_accuracy": saved.get("val_accuracy") or 0.0,
            "lora": asdict(self.lora),
            "optimizer": asdict(self.optim),
        }

    # -- checkpoints ---------------------------------------------------------------------------

    def trainable_names(self) -> set[str]:
        """The adapters' parameter names: all a checkpoint holds."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps the adapters only (the frozen base model reloads from --model.model) and what they were trained as."""
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_KEY] = {
            "model": self.hparams.model,
            "lora": asdict(self.lora),
            "step": self.global_step,
            "val_accuracy": self.val_accuracy,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses adapters trained for another model or LoRA shape (they would load partly, silently)."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("--ckpt_path: not a fine-tuning checkpoint (no adapters): pass one written by this fit")
        shape = ("r", "alpha", "target_modules")  # what the adapters' weights mean; dropout and seed act in training
        theirs, ours = {k: saved["lora"][k] for k in shape}, {k: getattr(self.lora, k) for k in shape}
        same = saved["model"] == self.hparams.model and theirs == ours
        if not same or set(checkpoint["state_dict"]) != self.trainable_names():
            raise ValueError(
                f"--ckpt_path: the checkpoint holds adapters for --model.model {saved['model']} with --model.lora "
                f"{theirs}; this run has {self.hparams.model} with {ours}: use the same settings, "
                "or start afresh with another --trainer.default_root_dir"
            )
        self.checkpoint_info = dict(saved)


def check_budget(trainer: L.Trainer) -> None:
    """Refuses an unbounded run, and steps after the last validation (they could never be picked)."""
    steps, every = trainer.max_steps, trainer.val_check_interval
    if steps is None or steps < 1:
        raise ValueError(f"--trainer.max_steps must be set to the step budget (e.g. 100), got {steps}")
    if isinstance(every, int) and trainer.check_val_every_n_epoch is None and steps % every:
        raise ValueError(
            f"--trainer.max_steps {steps} is not a multiple of --trainer.val_check_interval {every}: the last "
            f"{steps % every} steps would never be validated; change either"
        )


# -- the API for comparison tables ---------------------------------------------------------------


def export_adapters(module: FineTuneModule, checkpoint: str | Path, folder: str | Path) -> Path:
    """Writes the adapters of `checkpoint` (a fit's best.ckpt, read weights-only) into `folder` whole: peft's
    adapter_config.json + adapter_model.safetensors, and SETTINGS_FILE (the run's settings, JSON)."""
    state = load_checkpoint(checkpoint, CKPT_FLAG, RESUME_FIX)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=False)
    settings = {
        "format": SETTINGS_FORMAT,
        "model": module.hparams.model,
        "revision": module.hparams.revision,
        "dtype": module.hparams.dtype,
        "max_new_tokens": module.hparams.max_new_tokens,
        "lora": asdict(module.lora),
        "optimizer": asdict(module.optim),
        "step": state.get("global_step"),
        "val_accuracy": module.checkpoint_info.get("val_accuracy"),
        "checkpoint": str(checkpoint),
    }
    with atomic_folder(folder) as tmp:
        module.lm.save_pretrained(tmp, safe_serialization=True)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    rank_zero_info(f"fine-tuned adapters of {checkpoint} written to {folder} (pass it to {FINETUNE_FLAG})")
    return Path(folder)


def read_settings(folder: str | Path, flag: str = FINETUNE_FLAG) -> dict[str, Any]:
    """The settings of an adapter folder written by `export_adapters`, or one line naming `flag` and the fix."""
    folder, fix = Path(folder), f"pass the <default_root_dir>/{FOLDER}/{ADAPTER} folder written by fit"
    if folder.is_file():
        raise ValueError(
            f"{flag}: {folder} is a file; it takes the adapter folder <default_root_dir>/{FOLDER}/{ADAPTER} written "
            "by `python -m corrsteer_pl.finetune fit` (its .ckpt files are for --ckpt_path resume only)"
        )
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{flag}: {folder} is not a fine-tuning adapter folder ({', '.join(missing)} missing); {fix}")
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag}: {folder / SETTINGS_FILE} is not valid JSON ({err}); {fix}") from None
    if not isinstance(settings, dict) or settings.get("format") != SETTINGS_FORMAT:
        raise ValueError(f"{flag}: {folder / SETTINGS_FILE} was not written by corrsteer-pl's fine-tune; {fix}")
    return settings


def load_adapters(base: nn.Module, folder: Path) -> PeftModel:
    """peft's PeftModel.from_pretrained on a checked folder (safetensors weights: no pickle is read)."""
    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    except Exception as err:  # noqa: BLE001 - corrupt safetensors, shapes of another model: one line naming the flag
        lines = str(err).strip().splitlines()
        raise ValueError(
            f"{FINETUNE_FLAG}: cannot load the adapters in {folder} ({type(err).__name__}: "
            f"{lines[0] if lines else ''}); pass an adapter folder fine-tuned on this --model.model"
        ) from None


def load_finetuned(folder: str | Path) -> FineTuneModule:
    """The fine-tuned model of an adapter folder written by fit (base model from its settings), in eval mode."""
    settings = read_settings(folder)
    try:
        module = FineTuneModule(
            model=settings["model"],
            revision=settings["revision"],
            dtype=settings["dtype"],
            lora=LoRAOptions(**settings["lora"]),
            max_new_tokens=settings["max_new_tokens"],
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{FINETUNE_FLAG}: {Path(folder) / SETTINGS_FILE} lacks or mistypes {err}") from None
    module.adapter_folder = Path(folder)
    module.configure_model()
    module.checkpoint_info = {**settings, "path": str(folder)}
    return module.eval()


def finetuned_scores(folder: str | Path, data: TaskDataModule, split: Split = "test", base: bool = False) -> ItemScores:
    """Per-item scores of the fine-tuned model of an adapter folder (or of its base model, `base=True`) on a split.

    `data` is the data module of the comparison (its tokenizer must be the checkpoint's model); the items come in
    its batch order with their ids: `ItemScores.aligned(ids)` pairs them with another method's results.
    """
    return load_finetuned(folder).item_scores(data, split, adapter=not base)


def checkpoint_callbacks(root: str | Path) -> list[ModelCheckpoint]:
    """At every validation: <root>/finetune/checkpoints/best.ckpt when val/accuracy is the highest yet (ties keep
    the earlier), and last.ckpt always (`fit --ckpt_path last` resumes from it).

    Two callbacks, best first (`ckpt_path="best"` reads the first): Lightning 2.6 writes a callback's own last.ckpt
    only when its top-k file was written too, i.e. not after a validation that did not improve. The folder is fixed
    at construction: Lightning resolves `--ckpt_path last` before any callback's setup.
    """
    folder = Path(root) / FOLDER / "checkpoints"
    common = dict(dirpath=folder, save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    best = ModelCheckpoint(filename=BEST, monitor="val/accuracy", mode="max", **common)
    last = ModelCheckpoint(filename=LAST, monitor="step", mode="max", **common)  # the newest step is always top-1
    return [best, last]


# -- command line ----------------------------------------------------------------------------


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"


class FineTuneCLI(LightningCLI):
    """fit = train and pick on validation (then test unless --test_after_fit false); test = base vs --ckpt_path."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Links the tokenizer to the model; adds --test_after_fit."""
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="after fit, compare the best checkpoint with the base"
        )

    def _parse_ckpt_path(self) -> None:
        check_ckpt_path(self.config, CHECKPOINT_KEY, "a fine-tuning checkpoint of this fit", RESUME_FIX)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer with the checkpoint callbacks in <default_root_dir>/finetune/checkpoints, fixed at once."""
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        given = config.get("callbacks") or []
        callbacks = [*(given if isinstance(given, list) else [given]), *checkpoint_callbacks(root)]
        plugins = with_safe_checkpoint_io(config.get("plugins"), RESUME_FIX)
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)

    def after_fit(self) -> None:
        """Writes the best checkpoint's adapters to <default_root_dir>/finetune/adapter, then compares the best
        checkpoint with the base model on the test split."""
        best = self.trainer.checkpoint_callback.best_model_path
        if not best:
            raise ValueError("no validation ran, so no checkpoint was picked: lower --trainer.val_check_interval")
        if self.trainer.is_global_zero:
            export_adapters(self.model, best, Path(self.trainer.default_root_dir) / FOLDER / ADAPTER)
        self.trainer.strategy.barrier()
        if not self.config.fit.get("test_after_fit"):
            return
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)


def main(args: list[str] | None = None) -> FineTuneCLI | None:
    """Runs the CLI (`python -m corrsteer_pl.finetune fit`: the offline default); a configuration mistake ends in
    one line."""
    return run_cli(
        FineTuneCLI,
        DEFAULT_CONFIG,
        args,
        model_class=FineTuneModule,
        datamodule_class=FineTuneData,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


__all__ = [
    "FineTuneCLI",
    "FineTuneData",
    "FineTuneModule",
    "ItemScores",
    "LoRAOptions",
    "OptimizerOptions",
    "checkpoint_callbacks",
    "export_adapters",
    "finetune_markdown",
    "finetune_report",
    "finetuned_scores",
    "load_adapters",
    "load_finetuned",
    "main",
    "read_settings",
]

if __name__ == "__main__":
    main()
