"""Lightning callbacks of corrsteer-pl."""

from callbacks.checkpoint import CalibrationCheckpoint
from callbacks.comparison import ComparisonCallback
from callbacks.correlation import CorrelationCallback

__all__ = ["CalibrationCheckpoint", "ComparisonCallback", "CorrelationCallback"]
