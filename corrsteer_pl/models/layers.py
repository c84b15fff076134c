"""Where SAEs read and steering writes: SAE hook names -> decoder layer index -> HF module."""

from __future__ import annotations

import re

from torch import nn

# Attribute paths of the decoder-layer list, per architecture family (first match wins).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Gemma, Gemma2, Qwen2, Mistral, Phi3
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # Pythia
    "model.decoder.layers",  # OPT
)

# (pattern, offset): the layer whose *output* the hook point is. resid_pre of block L is the
# output of block L-1; everything else here names the output of block L itself.
_HOOK_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),
    (re.compile(r"^(?:model\.)?layers\.(\d+)(?:\.output)?$"), 0),
    (re.compile(r"^(?:model\.)?language_model\.layers\.(\d+)(?:\.output)?$"), 0),
    (re.compile(r"^transformer\.h\.(\d+)(?:\.output)?$"), 0),
    (re.compile(r"^gpt_neox\.layers\.(\d+)(?:\.output)?$"), 0),
)


def layer_from_hook_name(hook_name: str) -> int:
    """Index of the decoder layer whose output an SAE hook point reads (the residual stream)."""
    for pattern, offset in _HOOK_PATTERNS:
        match = pattern.match(hook_name)
        if match:
            layer = int(match.group(1)) + offset
            if layer < 0:
                break  # blocks.0.hook_resid_pre is the embedding output, not a layer output
            return layer
    raise ValueError(
        f"cannot map SAE hook '{hook_name}' to a decoder layer output; corrsteer-pl reads the "
        "residual stream after a layer: use an SAE trained on 'blocks.L.hook_resid_post' "
        "(or 'model.layers.L' / 'model.layers.L.output')"
    )


def decoder_layers_path(model: nn.Module) -> str:
    """Attribute path of the model's decoder-layer list, e.g. 'model.layers'."""
    for path in LAYER_PATHS:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return path
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}; supported layouts: {', '.join(LAYER_PATHS)}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    return model.get_submodule(decoder_layers_path(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ValueError(f"cannot read the residual width from {type(config).__name__}")


def lm_eval_hookpoint(model: nn.Module, layer: int) -> str:
    """Module name of a decoder layer relative to `model.base_model`, as lm-eval's `steered` model wants."""
    path = decoder_layers_path(model)
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and path.startswith(prefix + "."):
        path = path[len(prefix) + 1 :]
    return f"{path}.{layer}"
