"""corrsteer-pl: CorrSteer (correlation-selected SAE feature steering) for Hugging Face causal LMs."""

__version__ = "0.1.0"

from corrsteer_pl.calibration.capture import FeatureCapture, generate_with_features  # noqa: E402
from corrsteer_pl.calibration.stats import CorrelationStats, pearson_corrcoef  # noqa: E402
from corrsteer_pl.models.hooks import LayerHooks  # noqa: E402
from corrsteer_pl.models.sae import load_sae  # noqa: E402
from corrsteer_pl.selection.variants import SelectedFeature, Selection, select_features  # noqa: E402
from corrsteer_pl.steering.vectors import SteeringVectors, load_steered_model  # noqa: E402

__all__ = [
    "CorrelationStats",
    "FeatureCapture",
    "LayerHooks",
    "SelectedFeature",
    "Selection",
    "SteeringVectors",
    "__version__",
    "generate_with_features",
    "load_sae",
    "load_steered_model",
    "pearson_corrcoef",
    "select_features",
]
