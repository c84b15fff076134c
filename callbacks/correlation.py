"""CorrelationCallback: a `Calibration` kept over Lightning's training loop; at its end `select`, then export.

The callback holds no method of its own: each batch goes to `Calibration.update` (what `CorrSteerModule.training_step`
computed with `calibration_batch`), the end of calibration to `corrsteer_pl.select` and `export_selection`, the same
calls a notebook makes. What is Lightning's here: the DDP all-reduce, checkpoints and resume, logging.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from corrsteer_pl.api import export_selection
from corrsteer_pl.calibration.calibration import Calibration, CalibrationBatch
from corrsteer_pl.calibration.options import CalibrationOptions, check_target
from corrsteer_pl.evaluation.tensorboard import log_selection
from corrsteer_pl.files.atomic import check_writable
from corrsteer_pl.selection.evidence import read_selection
from corrsteer_pl.selection.options import SelectionOptions
from corrsteer_pl.selection.select import select
from corrsteer_pl.selection.variants import Selection
from corrsteer_pl.steering.export import ExportOptions


class CorrelationCallback(L.Callback):
    """Keeps the run's `Calibration` (one per rank, merged at the end); after the last calibration batch reduces it
    across ranks, selects features (`corrsteer_pl.select`) and exports the steering (`export_selection`)."""

    def __init__(
        self,
        calibration: CalibrationOptions = CalibrationOptions(),
        selection: SelectionOptions = SelectionOptions(),
        export: ExportOptions = ExportOptions(),
    ) -> None:
        self.options, self.selection_options, self.export_options = calibration, selection, export
        self.calibration: Calibration | None = None
        self.selection: Selection | None = None
        self.exported = False
        self.restored_complete = False  # resumed from a checkpoint written after the last calibration batch
        self._trainer: L.Trainer | None = None
        self._started, self._samples_at_start = 0.0, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.is_global_zero:  # fail now, not after an hour of calibration
            check_writable(pl_module.export_dir, "--model.steering_path")
        data = trainer.datamodule
        check_target(self.options.target, bool(data.examples("calibration")[0].choices), data.task.name)

    # -- calibration ----------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        if self.calibration is None:
            samples = len(trainer.datamodule.examples("calibration"))
            self.calibration = Calibration.for_saes(pl_module.saes, self.options, num_samples=samples)
        self.calibration.to(pl_module.device)
        self._started, self._samples_at_start = time.perf_counter(), self.calibration.num_samples

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        result: CalibrationBatch = outputs["batch"]
        self.calibration.update(result)
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        pl_module.log_dict(
            {
                "calibration/samples_seen": float(self.calibration.num_samples),
                "calibration/positive_rate": self.calibration.positive_rate,
                "samples_per_s": (self.calibration.num_samples - self._samples_at_start) / elapsed,
            },
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=len(result.ids) or 1,
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume from a checkpoint written after the last batch skips the training loop (and its
        # on_train_end): select and export from the checkpoint's statistics without recalibrating.
        # (Lightning restores the loops only after on_fit_start, so the callback's own state says it.)
        if self.restored_complete:
            rank_zero_info("the checkpoint holds a finished calibration: selecting and exporting from its statistics")
            self.calibration.to(pl_module.device)
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reduce the calibration over ranks, select features, export the steering."""
        if self.exported:
            return
        self.calibration.all_reduce()
        started = time.perf_counter()
        self.selection = select(self.calibration, self.selection_options, pl_module.validator())
        rank_zero_info(f"selection: {_described(self.selection)} in {time.perf_counter() - started:.0f} s")
        for warning in self.selection.warnings:
            rank_zero_warn(warning)
        if trainer.is_global_zero:
            self._export(trainer, pl_module)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.exported = True

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Writes the export folder whole or not at all: a failure leaves the previous export as it was."""
        folder, data = pl_module.export_dir, trainer.datamodule
        try:
            _, format_warnings = export_selection(
                folder,
                self.selection,
                self.calibration,
                pl_module.saes,
                pl_module.lm,
                tokenizer=pl_module.tokenizer,
                options=self.export_options,
                examples=data.examples("calibration"),
                task=data.task,
                chat_template=data.hparams.chat_template,
                answers=pl_module.answer_cache,
                sae_sources=pl_module.sae_sources,
                info={"task": data.task.name},
                note=rank_zero_info,
            )
        except OSError as err:
            raise OSError(
                f"could not write the export to {folder} ({err.strerror or err}); any previous export there is "
                "unchanged and the statistics are in checkpoints/last.ckpt: make room, then run "
                "`fit --ckpt_path last` to export without recalibrating"
            ) from None
        for warning in format_warnings:
            rank_zero_warn(f"--export.formats: {warning}")
        log_selection(trainer, self.calibration.stats, self.selection, read_selection(folder))
        rank_zero_info(f"exported the steering to {folder}")

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints hold the calibration summed over all ranks so far (rank 0 writes the file); on resume rank 0
        # restarts from that sum and the other ranks from zero, so the final all-reduce counts every sample once.
        if self.calibration is None:
            return {}
        device = next(iter(self.calibration.stats.values())).sum_z.device if self.calibration.stats else "cpu"
        reduced = Calibration.from_state_dict(self.calibration.state_dict(), device).all_reduce().state_dict()
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        complete = loader is not None and loader.completed >= len(loader)
        return {"calibration": reduced, "complete": complete}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "calibration" not in state_dict:
            raise ValueError(
                "cannot resume: the checkpoint's statistics are in an older layout; start afresh with a new "
                "--trainer.default_root_dir"
            )
        saved = Calibration.from_state_dict(state_dict["calibration"])
        for option in ("bootstrap", "top_examples"):
            before, now = getattr(saved.options, option), getattr(self.options, option)
            if before != now:
                raise ValueError(
                    f"cannot resume: --calibration.{option} {now} differs from the checkpoint's {before}; resume with "
                    "the original value, or start afresh with a new --trainer.default_root_dir"
                )
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.calibration = saved if rank == 0 else saved.zeros_like()
        self.restored_complete = bool(state_dict.get("complete", False))


def _described(selection: Selection) -> str:
    chosen = ", ".join(f"L{f.layer}#{f.feature}" for f in selection.features) or "nothing"
    draws = f", {len(selection.search_controls)} search-matched draws" if selection.search_controls else ""
    return f"{selection.variant} chose {chosen} at scale {selection.scale:g}{draws}"
