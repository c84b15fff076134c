"""CalibrationCheckpoint: `last.ckpt` every N calibration batches and at the end, in a fixed folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class CalibrationCheckpoint(ModelCheckpoint):
    """Saves `<dirpath>/last.ckpt` every `every_n_batches` calibration batches.

    ModelCheckpoint counts optimizer steps, and calibration takes none, so it would never fire
    mid-epoch. The folder defaults to `<default_root_dir>/checkpoints` (not a per-version logger
    folder) so that `fit --ckpt_path last` in a new process finds the checkpoint.
    """

    def __init__(self, every_n_batches: int = 50, dirpath: str | None = None) -> None:
        """
        Args:
            every_n_batches: write last.ckpt after every this many calibration batches (0 = only at the end).
            dirpath: checkpoint folder (None = <default_root_dir>/checkpoints).
        """
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_batches = every_n_batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        completed = trainer.train_dataloader.completed
        if (
            self.every_n_batches > 0
            and completed % self.every_n_batches == 0
            and completed < len(trainer.train_dataloader)
        ):
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path, weights_only=False)  # loop and callback state: resume needs them
