"""The LightningCLI behind train.py: fit = calibrate -> select -> export; validate/test = compare."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import CalibrationCheckpoint, ComparisonCallback, CorrelationCallback
from corrsteer_pl.data import TaskDataModule
from corrsteer_pl.module import CorrSteerModule
from corrsteer_pl.strategy import register

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the calibration split
    "use_distributed_sampler": False,  # TaskDataModule shards without repeating samples
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test")


class CorrSteerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CorrelationCallback, "calibration")
        parser.add_lightning_class_args(CalibrationCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ComparisonCallback, "comparison")
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="after fit, evaluate the export on the test split"
        )

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: list[str] | None = None) -> CorrSteerCLI | None:
    """Runs the CLI; a configuration mistake ends with one line naming it (CORRSTEER_TRACEBACK=1 for more)."""
    register()
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the docstring under each option is its help
    given = sys.argv if args is None else args  # LightningCLI reads sys.argv itself when args is None
    if len(given) == (2 if args is None else 1) and given[-1] in SUBCOMMANDS:
        given.extend(["--config", str(DEFAULT_CONFIG)])  # `python train.py fit`: the offline default job
    try:
        return CorrSteerCLI(
            CorrSteerModule,
            TaskDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except (ValueError, OSError, ModuleNotFoundError) as err:  # OSError: unreadable input, full disk
        if os.environ.get("CORRSTEER_TRACEBACK"):
            raise
        sys.exit(f"error: {err} (CORRSTEER_TRACEBACK=1 shows where)")
