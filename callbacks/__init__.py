"""Lightning callbacks of corrsteer-pl."""

from callbacks.checkpoint import CalibrationCheckpoint
from callbacks.correlation import CorrelationCallback

__all__ = ["CalibrationCheckpoint", "CorrelationCallback"]
