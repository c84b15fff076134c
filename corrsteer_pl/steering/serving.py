"""Serving formats: a llama.cpp control vector (GGUF) and a bias-folded HF folder, both written atomically.

Both steer every position, the prompt included, like `positions="all"`; CorrSteer's default steers
generation positions only. Index convention, from llama.cpp's loader (`common_control_vector_load_one`)
and graph (`build_cvec` after each layer's `ffn_out`): `direction.N` is added to the output of decoder
layer N (0-based, = HF `model.layers[N]`, = our `steering.layers[N]`); layer 0 has no slot.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from corrsteer_pl.files.atomic import atomic_file, atomic_folder, write_errors
from corrsteer_pl.models.layers import decoder_layers, decoder_layers_path
from corrsteer_pl.steering.owned import owned_by_saved_model
from corrsteer_pl.steering.vectors import SteeringVectors

CONTROL_VECTOR_FILE = "steering.gguf"
MERGED_DIR = "merged"
CONTROL_VECTOR_ARCH = "controlvector"
FOLDABLE_MODEL_TYPES = ("llama",)
"""transformers configs whose MLP takes `mlp_bias` and whose MLP output is added to the residual unchanged."""
_LLAMA_CPP_ARCH = {"mistral": "llama", "gpt_neox": "gptneox"}  # HF model_type -> llama.cpp name, where they differ
HOOK_POINT = "the residual stream after decoder layer N: the layer's output hidden state (residual + MLP output)"
LAYER_INDEX = (
    "direction.N is added after decoder layer N, 0-based: N = HF model.layers[N] = llama.cpp's layer N = "
    "steering.json layers[].layer; no slot for layer 0"
)
_INSTEAD = (
    "serve steering.gguf with llama.cpp (--control-vector), lm_eval_steer.pt with lm-eval, "
    "or corrsteer's own hooks with positions='all'"
)


def model_hint(model_type: str) -> str:
    """llama.cpp's architecture name for an HF `model_type`, as `controlvector.model_hint` (informative only)."""
    return _LLAMA_CPP_ARCH.get(model_type, model_type)


def check_control_vector(steering: SteeringVectors) -> None:
    """Fails with one line when the steering cannot be written as a llama.cpp control vector."""
    if not steering.layers:
        raise ValueError("the steering has no layers: llama.cpp rejects a control vector without direction tensors")
    for layer, steer in steering.layers.items():
        if layer == 0:
            raise ValueError(
                "layer 0: a llama.cpp control vector cannot steer decoder layer 0's output (its loader rejects "
                "direction.0); drop layer 0 or use lm_eval_steer.pt / corrsteer's hooks with positions='all'"
            )
        if not 0 < layer < steering.num_layers:
            raise ValueError(
                f"layer {layer} does not exist: the steering's model has layers 0..{steering.num_layers - 1}"
            )
        _check_vector(layer, steer.vector, steering.d_model)


def write_control_vector(steering: SteeringVectors, path: str | Path, model_hint: str) -> Path:
    """Writes `path` as a llama.cpp control vector: F32 `direction.{N}` added after decoder layer N, every position.

    The file holds the vectors at strength 1; llama.cpp multiplies them by `--control-vector-scaled FILE S`.
    """
    import gguf

    check_control_vector(steering)
    path = Path(path)
    with write_errors(path), atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)  # also sets general.architecture
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", model_hint)
        # int32 and "number of direction tensors", as llama.cpp's own cvector-generator writes it
        writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(steering.layers))
        _add_semantics(writer, steering)
        for layer, steer in sorted(steering.layers.items()):
            vector = steer.vector.detach().to("cpu", torch.float32).numpy()  # (d_model,)
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_semantics(writer: Any, steering: SteeringVectors) -> None:
    """What the file means, for runtimes that disagree on it (one projects out, some shift the layer by one)."""
    writer.add_string("corrsteer.operation", "add")
    writer.add_string("corrsteer.hook_point", HOOK_POINT)
    writer.add_string("corrsteer.layer_index", LAYER_INDEX)
    writer.add_array("corrsteer.layers", sorted(steering.layers))
    writer.add_float32("corrsteer.strength", 1.0)
    writer.add_string("corrsteer.positions", steering.positions)  # the policy it was calibrated and tested with
    writer.add_string(
        "corrsteer.applied_positions",
        "all: llama.cpp's --control-vector adds it at every position, the prompt included; CorrSteer's 'generation' "
        "policy (the last prompt position and each generated token) needs corrsteer's hooks or its vLLM plugin",
    )


def check_mergeable(steering: SteeringVectors, model: nn.Module) -> None:
    """Fails with one line (why, and what to use instead) unless the steering folds into MLP biases."""
    steering.validate(model)
    name = type(model).__name__
    model_type = getattr(model.config, "model_type", "")
    if model_type not in FOLDABLE_MODEL_TYPES:
        first = decoder_layers(model)[0]
        if hasattr(first, "post_feedforward_layernorm"):
            why = "its MLP output passes through post_feedforward_layernorm before the residual add"
        else:
            why = f"transformers' {name} has no mlp_bias option (supported: {', '.join(FOLDABLE_MODEL_TYPES)})"
        raise ValueError(f"cannot fold a constant add into {name} weights: {why}; {_INSTEAD}")
    for layer, steer in steering.layers.items():
        _check_vector(layer, steer.vector, steering.d_model)


def bias_folded_model(steering: SteeringVectors, model: nn.Module) -> nn.Module:
    """A copy of a Llama-family model with `mlp_bias` on: gate/up biases 0, `down_proj.bias` = layer's vector.

    Weights are shared with `model`, not copied (only the biases are new); the copy's non-persistent
    buffers stay on the meta device, so it is for `save_pretrained`, not for running.
    """
    check_mergeable(steering, model)
    config = copy.deepcopy(model.config)
    state = dict(model.state_dict())
    path = decoder_layers_path(model)
    for i, layer in enumerate(decoder_layers(model)):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(layer.mlp, proj)
            key = f"{path}.{i}.mlp.{proj}.bias"
            bias = state.get(key)  # a config with mlp_bias already on keeps its biases
            if bias is None:
                bias = linear.weight.new_zeros(linear.out_features)  # (out,)
            if proj == "down_proj" and i in steering.layers:
                bias = bias + steering.layers[i].vector.to(bias.device, bias.dtype)  # (d_model,)
            state[key] = bias.detach()
    config.mlp_bias = True
    with torch.device("meta"):
        merged = type(model)(config)
    merged.load_state_dict(state, assign=True, strict=True)
    merged.tie_weights()
    merged.generation_config = copy.deepcopy(model.generation_config)
    return merged.eval()


def write_merged(
    steering: SteeringVectors,
    model: nn.Module,
    tokenizer: Any,
    folder: str | Path,
    note: Callable[[str], None] | None = None,
) -> Path:
    """Writes an HF folder that plain `from_pretrained` loads and that steers like `positions="all"`.

    vLLM's Llama, Mistral and Qwen3 layers read `mlp_bias` from the config, so the folder also serves there.
    Over an existing folder it replaces what `save_pretrained` writes and keeps the rest (`note` hears what).
    """
    merged = bias_folded_model(steering, model)
    folder = Path(folder)
    with write_errors(folder), atomic_folder(folder, owned=owned_by_saved_model, note=note) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


def _check_vector(layer: int, vector: Tensor, d_model: int) -> None:
    if tuple(vector.shape) != (d_model,):
        raise ValueError(f"layer {layer}: vector has shape {tuple(vector.shape)}, expected ({d_model},)")
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"layer {layer}: vector has NaN or infinite entries")
