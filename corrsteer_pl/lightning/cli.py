"""The LightningCLI behind train.py: fit = calibrate -> select -> export; validate/test = compare."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import CalibrationCheckpoint, ComparisonCallback, CorrelationCallback
from corrsteer_pl.calibration.options import CalibrationOptions
from corrsteer_pl.evaluation.export_pass import console_summary
from corrsteer_pl.files.safe_load import check_ckpt_path, with_safe_checkpoint_io
from corrsteer_pl.lightning.data import TaskDataModule
from corrsteer_pl.lightning.entry import CONFIGS, run_cli
from corrsteer_pl.lightning.module import CorrSteerModule
from corrsteer_pl.lightning.recovery import IDENTITY_KEY
from corrsteer_pl.lightning.strategy import register
from corrsteer_pl.selection.options import SelectionOptions
from corrsteer_pl.side_effects.options import SideEffectsOptions
from corrsteer_pl.steering.export import ExportOptions

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # one pass over the calibration split
    "use_distributed_sampler": False,  # TaskDataModule shards without repeating samples
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


DEFAULT_CONFIG = CONFIGS / "default.yaml"
OPTION_GROUPS = {
    CalibrationOptions: "calibration",
    SelectionOptions: "selection",
    ExportOptions: "export",
    SideEffectsOptions: "side_effects",
}
"""Each option group's flag prefix: `--selection.top_k` is `SelectionOptions.top_k`."""
FLAGS = {
    **{f"{cls.__name__}.{{}}": f"--{group}.{{}}" for cls, group in OPTION_GROUPS.items()},
    "load_model.name": "--model.model",
    "SAESpec.source": "--model.saes",
    "SAESpec.sae_id": "--model.saes",
}
"""The flag of each library argument an `OptionError` names (`{}`: any argument of that owner)."""
MOVED = {
    **{
        f"calibration.{name}": f"selection.{name}"
        for name in (
            "variant",
            "ranking",
            "top_k",
            "candidates",
            "alpha",
            "require_significance",
            "active_only",
            "scale",
            "scale_grid",
            "max_answer_share",
            "search_draws",
        )
    },
    "calibration.export_formats": "export.formats",
    "calibration.include_model": "export.include_model",
    "model.pooling": "calibration.pooling",
    "comparison.all_positions": "side_effects.served",
    "model.max_new_tokens": "data.task.max_new_tokens (a task's option: --data.task Custom ...max_new_tokens 8)",
}
"""Flags that moved to their option group's owner: the old name fails in one line that gives the new one."""
RESUME_FIX = (
    "pass `last` or <default_root_dir>/checkpoints/last.ckpt written by `train.py fit`, or leave --ckpt_path out "
    "to start afresh"
)


class CorrSteerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for options, group in OPTION_GROUPS.items():
            parser.add_class_arguments(options, group)
        parser.add_lightning_class_args(CalibrationCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ComparisonCallback, "comparison")
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("calibration", "model.calibration", apply_on="instantiate")
        parser.link_arguments("side_effects", "model.side_effects", apply_on="instantiate")
        parser.link_arguments("selection", "comparison.selection", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="after fit, evaluate the export on the test split"
        )

    def _parse_ckpt_path(self) -> None:
        check_ckpt_path(self.config, IDENTITY_KEY, "a calibration checkpoint of `train.py fit`", RESUME_FIX)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, reading --ckpt_path weights-only (SafeCheckpointIO), with the calibration callback built
        from the option groups."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        return super().instantiate_trainer(plugins=with_safe_checkpoint_io(plugins, RESUME_FIX), **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        groups = ("calibration", "selection", "export")  # the calibration callback's; side_effects is the module's
        options = {group: self._get(self.config_init, group) for group in groups}
        return super()._instantiate_trainer(config, [CorrelationCallback(**options), *callbacks])

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """validate / test default to --verbose false: no metric table, the run ends with `after_test`'s summary
        (the figures are in report.json and TensorBoard)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "verbose" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(verbose=False)
        return parser

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self.after_test()

    def after_test(self) -> None:
        """Ends with the comparison, the verdict, the reading and where report.md is (rank 0)."""
        if self.model.report is not None and self.trainer.is_global_zero:
            print(console_summary(self.model.report, self.model.export_dir))

    after_validate = after_test


def main(args: list[str] | None = None) -> CorrSteerCLI | None:
    """Runs the CLI (`python train.py fit`: the offline default job); a configuration mistake ends in one line."""
    register()
    return run_cli(
        CorrSteerCLI,
        DEFAULT_CONFIG,
        args,
        flags=FLAGS,
        moved=MOVED,
        model_class=CorrSteerModule,
        datamodule_class=TaskDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def command() -> None:
    """The `corrsteer` console script: `corrsteer fit --config <file>`, as `python train.py fit ...`."""
    main()


if __name__ == "__main__":
    command()
