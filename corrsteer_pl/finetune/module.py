"""FineTuneModule: fine-tuning of a causal LM on gold answers (fit), validation accuracy, base vs fine-tuned (test).

Two methods, one option (--model.method):
- `full` (the paper's and the reference code's baseline): AdamW on every weight of the model. The base model of the
  test's "unsteered" row is a second, frozen copy loaded on first use and kept out of the module's parameters,
  optimizer and checkpoints. On 2 CPU cores SmolLM2-135M in fp32 needs weights, gradients and two AdamW moments
  (~2.2 GB) and checkpoints of ~1.6 GB (weights and optimizer state).
- `lora`: AdamW on LoRA adapters (--model.lora; r 8 on q/k/v/o: 0.9M parameters, 0.7% of SmolLM2), the base weights
  frozen; the base model is the same object with the adapters switched off (`disable_adapter`), checkpoints ~11 MB.

The loss is the mean cross-entropy over the batch's target tokens only (the prompt and the padding are masked out),
computed in micro-batches of at most `--model.optimizer.micro_batch_tokens` padded tokens whose gradients add up to
the batch's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from functools import cached_property
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from corrsteer_pl.evaluation.choice_report import choice_scalars
from corrsteer_pl.evaluation.columns import ConditionScores
from corrsteer_pl.evaluation.conditions import Answered, answered
from corrsteer_pl.evaluation.judge import Judged, judge
from corrsteer_pl.finetune.data import IGNORE, micro_batches
from corrsteer_pl.finetune.options import (
    BEST,
    LoRAOptions,
    Method,
    OptimizerOptions,
    check_method,
    output_folder,
)
from corrsteer_pl.finetune.report import ItemScores, describe, finetune_markdown, finetune_report
from corrsteer_pl.lightning.data import TaskDataModule
from corrsteer_pl.models.hooks import eos_ids, pad_id
from corrsteer_pl.models.loading import DTYPES
from corrsteer_pl.models.sources import TINY_RANDOM, load_pretrained, resolve_model
from corrsteer_pl.tasks import Split, Task
from corrsteer_pl.tasks.choice import ChoiceTokens

CHECKPOINT_KEY = "finetune"


def _options(cls: type, value: Any) -> Any:
    """A dataclass option from the CLI (the object), a checkpoint's hyperparameters (a dict) or None (defaults)."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)


class FineTuneModule(L.LightningModule):
    """Full or LoRA fine-tuning of a causal LM on gold answers (fit), accuracy on validation, base vs fine-tuned on
    test."""

    def __init__(
        self,
        model: str = TINY_RANDOM,
        method: Method = "lora",
        revision: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora: LoRAOptions | None = None,
        optimizer: OptimizerOptions | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: Hugging Face model id, local folder, smollm2-135m-instruct or tiny-random.
            method: full = AdamW on every weight of the model (the paper's baseline; artefact
                <default_root_dir>/finetune_full/model: config.json + model.safetensors); lora = AdamW on LoRA
                adapters only, the base weights frozen (artefact <default_root_dir>/finetune/adapter).
            revision: model revision on the hub (branch, tag or commit).
            dtype: model weights dtype (float32 on CPU).
            lora: the adapters (--model.method lora only): rank, alpha, dropout, target modules.
            optimizer: AdamW learning rate, weight decay, warm-up, gradient clipping and micro-batch size (the
                budget is --trainer.max_steps).
            max_new_tokens: tokens to generate per answer in validation and test (None = the task's own).
        """
        super().__init__()
        self.save_hyperparameters()
        self.method: Method = check_method(method)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"--model.max_new_tokens must be >= 1 (or null for the task's own), got {max_new_tokens}")
        self.lora = _options(LoRAOptions, lora)
        self.optim = _options(OptimizerOptions, optimizer)
        self.strict_loading = False  # LoRA checkpoints hold the adapters only; the base model reloads from its source
        self.automatic_optimization = False  # a step accumulates micro-batches (OptimizerOptions.micro_batch_tokens)
        self.lm: nn.Module | None = None  # the PeftModel (lora) or the transformers model itself (full)
        self.tokenizer: Any = None
        self.val_scores, self.test_scores = ConditionScores(), ConditionScores()
        self.val_accuracy: float | None = None
        self.checkpoint_info: dict[str, Any] | None = None  # what the loaded checkpoint says about itself

    # -- the model ---------------------------------------------------------------------------

    def configure_model(self) -> None:
        """The trainable model (unless one was set, e.g. by `load_finetuned`) and the tokenizer (left padding)."""
        if self.lm is None:
            self.lm = self.trainable(self.load_base())
        if self.tokenizer is None:
            path, revision = resolve_model(self.hparams.model), self.hparams.revision
            self.tokenizer = load_pretrained(
                AutoTokenizer.from_pretrained, path, revision=revision, padding_side="left"
            )
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token

    def load_base(self) -> nn.Module:
        """A fresh copy of the base model --model.model, in --model.dtype."""
        path, revision = resolve_model(self.hparams.model), self.hparams.revision
        return load_pretrained(
            AutoModelForCausalLM.from_pretrained, path, revision=revision, dtype=DTYPES[self.hparams.dtype]
        )

    def trainable(self, base: nn.Module) -> nn.Module:
        """`base` ready to train: every weight trainable (full), or wrapped with fresh LoRA adapters (seeded by
        --model.lora.seed) whose base weights are frozen."""
        if self.method == "full":
            return base.requires_grad_(True)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.lora.seed)
                return get_peft_model(base, self.lora.peft_config())
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"--model.lora.target_modules: {str(err).splitlines()[0]}") from None

    @property
    def inner(self) -> nn.Module:
        """The transformers model of the fine-tuned weights (with LoRA, the adapters injected): what `generate`
        and the answer passes call."""
        return self.lm.get_base_model() if isinstance(self.lm, PeftModel) else self.lm

    @cached_property
    def reference(self) -> nn.Module:
        """The base model, frozen (full fine-tuning's "unsteered" row): loaded on first use, stored outside the
        module's parameters (cached_property writes the instance dict), so never trained, optimized or saved."""
        return self.load_base().requires_grad_(False).eval()

    def answering(self, tuned: bool) -> tuple[nn.Module, AbstractContextManager[Any]]:
        """The model to answer with and the context to answer in: the fine-tuned one, or the base model (LoRA: the
        same model, adapters off; full: the frozen reference copy)."""
        if tuned:
            return self.inner, nullcontext()
        if isinstance(self.lm, PeftModel):
            return self.inner, self.lm.disable_adapter()
        return self.reference.to(self.device), nullcontext()

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
        """The model in training mode."""
        self.lm.train()  # from_pretrained leaves the model in eval mode: dropout would never act

    def on_train_start(self) -> None:
        """Says what trains and where a resumed run starts."""
        rank_zero_info(f"fine-tuning ({self.method}): {self.trainable_count():,} trainable weights")
        if self.global_step:
            rank_zero_info(f"fine-tuning resumes after step {self.global_step} of {self.trainer.max_steps}")

    def trainable_count(self) -> int:
        """How many weights the optimizer updates (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable weights; linear warm-up, then the constant learning rate until --trainer.max_steps."""
        check_budget(self.trainer)
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        warmup = self.optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- answering -------------------------------------------------------------------------

    def answer(self, batch: dict[str, Any], task: Task, tuned: bool = True) -> Answered:
        """Greedy new tokens (B, N) of the fine-tuned model, or of the base model with `tuned=False`, and (multiple
        choice) the first position's logits restricted to the options' letters."""
        model, context = self.answering(tuned)
        eos, pad = eos_ids(model, self.tokenizer), pad_id(model, self.tokenizer)
        steps = self.hparams.max_new_tokens or task.max_new_tokens
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        choice = ChoiceTokens.for_examples(self.tokenizer, batch["examples"])
        with context:
            return answered(model, ids, mask, {"answer": None}, steps, eos, pad, choice=choice)["answer"]

    def scored(self, batch: dict[str, Any], task: Task, tuned: bool = True) -> Judged:
        """(scores, valid, answers) of one batch by the task's own scorer, and the choice-restricted ones."""
        tokens, choice_logits = self.answer(batch, task, tuned)
        return judge(task, self.tokenizer, batch["examples"], tokens, choice_logits)

    @torch.inference_mode()
    def item_scores(self, data: TaskDataModule, split: Split = "test", tuned: bool = True) -> ItemScores:
        """Every item of a split (this process's share of it under DDP), in the data module's batch order."""
        ids, scores, valid, answers = [], [], [], []
        for batch in data.batches(split):
            if not batch["examples"]:
                continue
            s, v, a = self.scored(batch, data.task, tuned)
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
        """Refuses to compare the base model with an untrained copy of it."""
        if self.checkpoint_info is None:
            raise ValueError(
                "test compares the base model with a fine-tuned checkpoint: pass --ckpt_path "
                f"<default_root_dir>/{output_folder('', self.method)}/checkpoints/{BEST}.ckpt (written by fit)"
            )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Scores the base and the fine-tuned model on one batch (the same items, paired): columns base, fine-tuned
        and, on multiple choice, their choice-restricted scores (always valid)."""
        if not batch["examples"]:
            return
        base, tuned = self.scored(batch, self.task, tuned=False), self.scored(batch, self.task, tuned=True)
        scores, valid = [base.scores, tuned.scores], [base.valid, tuned.valid]
        if base.choice_scores is not None and tuned.choice_scores is not None:
            scores += [base.choice_scores, tuned.choice_scores]
            valid += [torch.ones_like(base.valid), torch.ones_like(tuned.valid)]
        self.test_scores.update(torch.stack(scores, 1).to(self.device), torch.stack(valid, 1).to(self.device))

    def on_test_epoch_end(self) -> None:
        """Logs the comparison; rank 0 writes <default_root_dir>/<method folder>/report.{json,md} and TensorBoard
        text."""
        scores, valid = self.test_scores.compute()  # (N, 2 or 4) over all ranks
        self.test_scores.reset()
        data = self.trainer.datamodule
        base, tuned = (scores[:, 0], valid[:, 0]), (scores[:, 1], valid[:, 1])
        if scores.shape[1] == 4:
            base, tuned = (*base, scores[:, 2]), (*tuned, scores[:, 3])
        report = finetune_report(base, tuned, data.task, "test", data.describe(), self.info())
        self.log_dict({f"test/{name}": float(value) for name, value in report.paired.as_report().items()})
        self.log_dict({f"test/{c.name}/valid_rate": c.valid_rate for c in report.conditions})
        if report.choice is not None:
            self.log_dict(choice_scalars(report.choice, "test"))
        if self.trainer.is_global_zero:
            markdown = finetune_markdown(report)
            report.save(output_folder(self.trainer.default_root_dir, self.method), markdown, stem="report")
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("test/finetune_report", markdown, self.global_step)

    def info(self) -> dict[str, Any]:
        """What the report says about the fine-tuned model."""
        saved = self.checkpoint_info or {}
        path = self.trainer.ckpt_path if self._trainer is not None else saved.get("path")
        info = {
            "method": self.method,
            "model": self.hparams.model,
            "checkpoint": str(path),
            "step": saved.get("step"),
            "val_accuracy": saved.get("val_accuracy") or 0.0,
            "trainable_parameters": self.trainable_count() if self.lm is not None else None,
            "lora": asdict(self.lora) if self.method == "lora" else None,
            "optimizer": asdict(self.optim),
        }
        return {**info, "description": describe(info) + " on the calibration split's gold answers"}

    # -- checkpoints ---------------------------------------------------------------------------

    def trainable_names(self) -> set[str]:
        """The trainable parameters' names (tied weights once): all a checkpoint holds."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def identity(self) -> dict[str, Any]:
        """What a checkpoint's weights must have been trained as to load here: model, method and (LoRA) shape."""
        shape = {"lora": self.lora.shape()} if self.method == "lora" else {}
        return {"model": self.hparams.model, "method": self.method, **shape}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps the trainable weights only (LoRA: the adapters; the frozen base reloads from --model.model) and
        what they were trained as."""
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_KEY] = {
            "model": self.hparams.model,
            "method": self.method,
            "lora": asdict(self.lora),
            "step": self.global_step,
            "val_accuracy": self.val_accuracy,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses weights trained for another model, method or LoRA shape (they would load partly, silently)."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("--ckpt_path: not a fine-tuning checkpoint: pass one written by this fit")
        method = saved.get("method", "lora")  # checkpoints written before --model.method were LoRA's
        theirs = {"model": saved["model"], "method": method}
        if method == "lora":
            theirs["lora"] = {k: saved["lora"][k] for k in LoRAOptions().shape()}
        ours = self.identity()
        if theirs != ours or set(checkpoint["state_dict"]) != self.trainable_names():
            raise ValueError(
                f"--ckpt_path: the checkpoint holds weights of {_said(theirs)}; this run has {_said(ours)}: use the "
                "same settings, or start afresh with another --trainer.default_root_dir"
            )
        self.checkpoint_info = dict(saved)


def _said(identity: dict[str, Any]) -> str:
    """A checkpoint identity as flags."""
    lora = f" --model.lora {identity['lora']}" if "lora" in identity else ""
    return f"--model.model {identity['model']} --model.method {identity['method']}{lora}"


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
