"""The LightningCLI behind train.py: fit = calibrate -> select -> export; validate/test = compare."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import CalibrationCheckpoint, CorrelationCallback
from corrsteer_pl.data import TaskDataModule
from corrsteer_pl.module import CorrSteerModule
from corrsteer_pl.strategy import register

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the calibration split
    "use_distributed_sampler": False,  # TaskDataModule shards without repeating samples
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


class CorrSteerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CorrelationCallback, "calibration")
        parser.add_lightning_class_args(CalibrationCheckpoint, "checkpoint")
        parser.link_arguments("model.model", "data.tokenizer")


def main(args: list[str] | None = None) -> CorrSteerCLI | None:
    """Runs the CLI; a configuration mistake ends with one line naming it (CORRSTEER_TRACEBACK=1 for more)."""
    register()
    try:
        return CorrSteerCLI(
            CorrSteerModule,
            TaskDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        if os.environ.get("CORRSTEER_TRACEBACK"):
            raise
        sys.exit(f"error: {err} (CORRSTEER_TRACEBACK=1 shows where)")
