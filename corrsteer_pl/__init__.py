"""corrsteer-pl: CorrSteer (correlation-selected SAE feature steering) for Hugging Face causal LMs."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public names load on first use (PEP 562): `import corrsteer_pl.calibration.stats` alone does not import
# sae-lens and transformers (about 5 s of every process start here, spawned DDP and gloo ranks included).
_PUBLIC = {
    # the library: calibrate -> select -> steer -> export (corrsteer_pl/api.py)
    "calibrate": "corrsteer_pl.api",
    "select": "corrsteer_pl.api",
    "select_many": "corrsteer_pl.api",
    "export_selection": "corrsteer_pl.api",
    "write_export": "corrsteer_pl.api",
    "load_model": "corrsteer_pl.api",
    "load_saes": "corrsteer_pl.api",
    "get_task": "corrsteer_pl.tasks",
    "Calibration": "corrsteer_pl.calibration.calibration",
    "CalibrationOptions": "corrsteer_pl.calibration.options",
    "SelectionOptions": "corrsteer_pl.selection.options",
    "ExportOptions": "corrsteer_pl.steering.export",
    "Validator": "corrsteer_pl.selection.validation",
    "OptionError": "corrsteer_pl.errors",
    "measure_side_effects": "corrsteer_pl.side_effects.measure",
    "SideEffects": "corrsteer_pl.side_effects.measure",
    "SideEffectsOptions": "corrsteer_pl.side_effects.options",
    # the pieces underneath
    "CorrelationStats": "corrsteer_pl.calibration.stats",
    "FeatureCapture": "corrsteer_pl.calibration.capture",
    "LayerHooks": "corrsteer_pl.models.hooks",
    "SelectedFeature": "corrsteer_pl.selection.variants",
    "Selection": "corrsteer_pl.selection.variants",
    "SteeringVectors": "corrsteer_pl.steering.vectors",
    "generate_answers": "corrsteer_pl.calibration.capture",
    "load_sae": "corrsteer_pl.models.sae",
    "load_steered_model": "corrsteer_pl.steering.vectors",
    "pearson_corrcoef": "corrsteer_pl.calibration.stats",
    "select_features": "corrsteer_pl.selection.variants",
}
__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'corrsteer_pl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
