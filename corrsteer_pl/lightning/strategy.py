"""DDP for calibration: one process per device, no DistributedDataParallel wrapper."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry


class CalibrationDDPStrategy(DDPStrategy):
    """DDP whose model is not wrapped: calibration has no gradient to synchronise (DDP refuses a
    module without trainable parameters); ranks only all-reduce the correlation statistics."""

    strategy_name = "ddp"

    def configure_ddp(self) -> None:
        pass


def register() -> None:
    """Make `--trainer.strategy ddp` (and ddp_spawn-free variants) resolve to the calibration strategy."""
    StrategyRegistry.register(
        "ddp", CalibrationDDPStrategy, description="DDP without a DistributedDataParallel wrapper", override=True
    )
