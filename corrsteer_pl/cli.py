"""The LightningCLI behind train.py: fit = calibrate -> select -> export; validate/test = compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import CalibrationCheckpoint, ComparisonCallback, CorrelationCallback
from corrsteer_pl.data import TaskDataModule
from corrsteer_pl.entry import run_cli
from corrsteer_pl.module import CorrSteerModule
from corrsteer_pl.recovery import IDENTITY_KEY
from corrsteer_pl.safe_load import check_ckpt_path, with_safe_checkpoint_io
from corrsteer_pl.strategy import register

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the calibration split
    "use_distributed_sampler": False,  # TaskDataModule shards without repeating samples
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
RESUME_FIX = (
    "pass `last` or <default_root_dir>/checkpoints/last.ckpt written by `train.py fit`, or leave --ckpt_path out "
    "to start afresh"
)


class CorrSteerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CorrelationCallback, "calibration")
        parser.add_lightning_class_args(CalibrationCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ComparisonCallback, "comparison")
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="after fit, evaluate the export on the test split"
        )

    def _parse_ckpt_path(self) -> None:
        check_ckpt_path(self.config, IDENTITY_KEY, "a calibration checkpoint of `train.py fit`", RESUME_FIX)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, reading --ckpt_path weights-only (SafeCheckpointIO)."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        return super().instantiate_trainer(plugins=with_safe_checkpoint_io(plugins, RESUME_FIX), **kwargs)

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: list[str] | None = None) -> CorrSteerCLI | None:
    """Runs the CLI (`python train.py fit`: the offline default job); a configuration mistake ends in one line."""
    register()
    return run_cli(
        CorrSteerCLI,
        DEFAULT_CONFIG,
        args,
        flags_change_default=True,  # `train.py fit --calibration.target choice`: the default job, one flag changed
        model_class=CorrSteerModule,
        datamodule_class=TaskDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
