"""Test-only callbacks for subprocess runs: one records each computed calibration batch, and can SIGKILL its own
process at the first batch after a checkpoint was written; the other SIGKILLs it at a chosen point of the validation
or export after calibration. Deterministic crashes, whatever the CPU's speed: no timer decides when."""

import os
import signal
from pathlib import Path

import lightning as L


class BatchRecorder(L.Callback):
    def __init__(self, log: str, kill_after_checkpoint: bool = False) -> None:
        self.path = Path(log)
        self.kill_after_checkpoint = kill_after_checkpoint

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        checkpoint = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        if self.kill_after_checkpoint and checkpoint.exists():
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        with self.path.open("a") as f:
            f.write(f"{os.getpid()} {batch['index']}\n")


KILL_POINTS = ("validation", "export_first_file", "export_before_rename")


class KillDuringSelection(L.Callback):
    """SIGKILLs its own process at one point after calibration, where fit validates and exports:

    - validation: after P's validation pass (or the scale grid) answered its first batch;
    - export_first_file: when the export's temporary folder holds its first files (the steering), before the
      statistics and the selection are written;
    - export_before_rename: when the temporary folder is complete and synced, before it is renamed into place.
    """

    def __init__(self, at: str) -> None:
        if at not in KILL_POINTS:
            raise ValueError(f"at must be one of {KILL_POINTS}, got {at!r}")
        self.at = at

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.at == "validation":
            score = pl_module.score_conditions

            def answered_then_killed(*args, **kwargs):
                score(*args, **kwargs)
                _kill()

            pl_module.score_conditions = answered_then_killed  # during fit only validation choices answer batches
        elif self.at == "export_first_file":
            import corrsteer_pl.steering.export

            def killed_before_statistics(stats, path):
                if not any(Path(path).parent.iterdir()):
                    raise AssertionError(f"the kill point expected files in {Path(path).parent}")
                _kill()

            corrsteer_pl.steering.export.save_layer_stats = killed_before_statistics
        else:
            import corrsteer_pl.files.atomic

            sync = corrsteer_pl.files.atomic._fsync_tree

            def synced_then_killed(folder):
                sync(folder)
                if (Path(folder) / "steering.json").exists():  # the export's folder, not another atomic folder
                    _kill()

            corrsteer_pl.files.atomic._fsync_tree = synced_then_killed


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
