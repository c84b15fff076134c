"""CalibrationCheckpoint: `last.ckpt` every N calibration batches and at the end, in a fixed folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class CalibrationCheckpoint(ModelCheckpoint):
    """Saves `<dirpath>/last.ckpt` every `every_n_batches` calibration batches and after the last one.

    ModelCheckpoint counts optimizer steps, and calibration takes none, so it would never fire
    mid-epoch. The folder defaults to `<default_root_dir>/checkpoints` (not a per-version logger
    folder) so that `fit --ckpt_path last` in a new process finds the checkpoint.
    """

    def __init__(self, every_n_batches: int = 50, dirpath: str | None = None) -> None:
        """
        Args:
            every_n_batches: write last.ckpt after every this many calibration batches (0 = only after the last).
            dirpath: checkpoint folder (None = <default_root_dir>/checkpoints).
        """
        if every_n_batches < 0:
            raise ValueError(
                f"--checkpoint.every_n_batches must be >= 1, or 0 for only at the end, got {every_n_batches}"
            )
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_batches = every_n_batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # Lightning resolves `fit(ckpt_path="last")` through this method *before* any callback's
        # setup runs: without the folder known here it searched a new logger version folder, found
        # nothing and silently started from zero.
        self._default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        completed, total = trainer.train_dataloader.completed, len(trainer.train_dataloader)
        if completed:
            rank_zero_info(f"resuming calibration after batch {completed} of {total}: the checkpoint holds the rest")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trainer.train_dataloader.mark_completed()  # this batch's statistics are in: a resume starts after it
        completed, total = trainer.train_dataloader.completed, len(trainer.train_dataloader)
        final = completed == total
        if final or (self.every_n_batches > 0 and completed % self.every_n_batches == 0):
            path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
            # Not through _save_checkpoint: that marks global step 0 as saved (calibration takes no
            # optimizer step), and ModelCheckpoint would then skip the checkpoint at the end.
            _write_atomically(trainer, path)
            if final:
                # The finished calibration is on disk before selection, validation and export run (in
                # on_train_end): a kill there resumes without recomputing a batch. ModelCheckpoint's own save
                # in on_train_end came only after the export, so the resume redid the batches since the last
                # mid-calibration checkpoint (all of them with every_n_batches 0); it now sees this one and skips.
                self._last_checkpoint_saved = path

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        _write_atomically(trainer, filepath)  # ModelCheckpoint's own end-of-calibration save
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


def _write_atomically(trainer: L.Trainer, filepath: str) -> None:
    """Writes the checkpoint to a sibling and renames it into place: a kill mid-write leaves the previous one whole.

    The name is the same on every rank; `save_checkpoint` writes on rank 0 and ends with a barrier.
    """
    tmp = f"{filepath}.tmp"
    trainer.save_checkpoint(tmp, weights_only=False)  # loop and callback state: resume needs them
    if trainer.is_global_zero:
        os.replace(tmp, filepath)
