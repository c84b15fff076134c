"""`python -m corrsteer_pl.finetune fit|test`: the fine-tuning baseline's LightningCLI.

fit trains (--model.method full or lora) on the calibration split's gold answers, validates every
--trainer.val_check_interval steps with the task's own scorer, keeps the checkpoint with the best validation
accuracy, writes it as the artefact folder (finetune/adapter for LoRA, finetune_full/model for full) and then
compares it with the base model on the test split: report.{json,md} beside it (unsteered = base model, steered =
fine-tuned), with accuracy, valid-answer rate, choice-restricted accuracy, answers changed better / worse and SER.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from corrsteer_pl.files.safe_load import check_ckpt_path, with_safe_checkpoint_io
from corrsteer_pl.finetune.artefact import RESUME_FIX, export_finetuned
from corrsteer_pl.finetune.data import FineTuneData
from corrsteer_pl.finetune.module import CHECKPOINT_KEY, FineTuneModule
from corrsteer_pl.finetune.options import BEST, LAST, Method, artefact_folder, output_folder
from corrsteer_pl.lightning.entry import CONFIGS, run_cli

DEFAULT_CONFIG = CONFIGS / "finetune.yaml"
TRAINER_DEFAULTS = {
    "max_steps": 100,
    "check_val_every_n_epoch": None,  # validate every val_check_interval optimizer steps, across epochs
    "val_check_interval": 25,
    "num_sanity_val_steps": 0,
    "use_distributed_sampler": False,  # the batches shard themselves across ranks
    "enable_model_summary": False,
}


def checkpoint_callbacks(root: str | Path, method: Method = "lora") -> list[ModelCheckpoint]:
    """At every validation: <root>/<method folder>/checkpoints/best.ckpt when val/accuracy is the highest yet (ties
    keep the earlier), and last.ckpt always (`fit --ckpt_path last` resumes from it).

    Two callbacks, best first (`ckpt_path="best"` reads the first): Lightning 2.6 writes a callback's own last.ckpt
    only when its top-k file was written too, i.e. not after a validation that did not improve. The folder is fixed
    at construction: Lightning resolves `--ckpt_path last` before any callback's setup.
    """
    folder = output_folder(root, method) / "checkpoints"
    common = dict(dirpath=folder, save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    best = ModelCheckpoint(filename=BEST, monitor="val/accuracy", mode="max", **common)
    last = ModelCheckpoint(filename=LAST, monitor="step", mode="max", **common)  # the newest step is always top-1
    return [best, last]


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
        """The trainer with the checkpoint callbacks in <default_root_dir>/<method folder>/checkpoints, fixed at
        once."""
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        given = config.get("callbacks") or []
        callbacks = [*(given if isinstance(given, list) else [given]), *checkpoint_callbacks(root, self.model.method)]
        plugins = with_safe_checkpoint_io(config.get("plugins"), RESUME_FIX)
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)

    def after_fit(self) -> None:
        """Writes the best checkpoint's fine-tuned weights to the artefact folder, then compares the best
        checkpoint with the base model on the test split."""
        best = self.trainer.checkpoint_callback.best_model_path
        if not best:
            raise ValueError("no validation ran, so no checkpoint was picked: lower --trainer.val_check_interval")
        if self.trainer.is_global_zero:
            export_finetuned(self.model, best, artefact_folder(self.trainer.default_root_dir, self.model.method))
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


def command() -> None:
    """The `corrsteer-finetune` console script: `corrsteer-finetune fit --config configs/finetune_full.yaml`."""
    main()
