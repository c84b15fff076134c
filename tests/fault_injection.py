"""Test-only callback for subprocess runs: records each computed calibration batch, and can SIGKILL its own
process at the first batch after a checkpoint was written (a deterministic crash, whatever the CPU's speed)."""

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
