"""vLLM's entry point (`vllm.general_plugins`): run in every vLLM process; does nothing unless CORRSTEER_STEERING
names an export."""

from __future__ import annotations

import functools
import importlib

from corrsteer_pl.serve.served import served_steering

_ARCHITECTURES = {"LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM")}
"""Served architecture -> vLLM's model class; keep in step with rows.SUPPORTED_ARCHITECTURES."""


@functools.cache
def register() -> None:
    """Loads and checks the export (a bad one refuses to start, one line), then installs the steering into vLLM:
    the steered model class and the config check for each supported architecture, and the prefix-cache keys."""
    served = served_steering()
    if served is None:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    from corrsteer_pl.serve import prefix
    from corrsteer_pl.serve.checks import config_hook
    from corrsteer_pl.serve.model import steered_class

    for architecture, (module, name) in _ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, steered_class(getattr(importlib.import_module(module), name)))
        MODELS_CONFIG_MAP[architecture] = config_hook(MODELS_CONFIG_MAP.get(architecture, VerifyAndUpdateConfig))
    prefix.install(served)
