"""Start-up checks in vLLM's front-end process, before any worker starts: the served model against the export.

They run as the served architecture's `verify_and_update_config` hook (vLLM calls it while building its config):
a mismatch refuses to start with one line naming steering.json and the fix. The same hook turns eager mode on:
the steering is added by forward hooks, which compiled graphs would not run at every step.
"""

from __future__ import annotations

import logging
from typing import Any

from corrsteer_pl.serve.served import ENV, ServedSteering, refuse, served_steering

log = logging.getLogger(__name__)


def check_served_model(served: ServedSteering, config: Any, model: str) -> None:
    """One line unless the served model (its HF `config`) has the export's width, layer count and layers."""
    steering = served.steering
    width, num_layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    made_for = (
        f"'{steering.model_name_or_path or 'an unnamed model'}' (width {steering.d_model}, "
        f"{steering.num_layers} layers)"
    )
    fix = f"serve the model it was made for, or set {ENV} to an export made from '{model}'"
    if isinstance(num_layers, int):
        missing = [layer for layer in sorted(steering.layers) if not 0 <= layer < num_layers]
        if missing:
            raise refuse(
                f"{served.meta_file}: layer {missing[0]} does not exist in the served model '{model}' "
                f"(layers 0..{num_layers - 1}); this steering was made for {made_for}: {fix}"
            )
    if width != steering.d_model:
        raise refuse(
            f"{served.meta_file}: made for {made_for}, but the served model '{model}' has width {width}: {fix}"
        )
    if num_layers != steering.num_layers:
        raise refuse(
            f"{served.meta_file}: made for {made_for}, but the served model '{model}' has {num_layers} layers: {fix}"
        )


def config_hook(base: type) -> type:
    """A `VerifyAndUpdateConfig` class for one architecture: vLLM's own hook for it (`base`), then ours."""

    class CorrSteerConfig(base):
        @classmethod
        def verify_and_update_config(cls, vllm_config: Any) -> None:
            base.verify_and_update_config(vllm_config)
            served = served_steering()
            if served is None:
                return
            model_config = vllm_config.model_config
            check_served_model(served, model_config.hf_text_config, str(model_config.model))
            if not model_config.enforce_eager:
                log.warning("corrsteer: eager mode forced (--enforce-eager): the steering hooks need every step eager")
                model_config.enforce_eager = True

    return CorrSteerConfig
