"""Which model a steering was made for: a portable name, the shape, and a fingerprint of the weights.

A steering vector only means something on the model whose residual stream it was read from; a model of the same
shape with other weights (another fine-tune, another seed) runs it without complaint and steers somewhere else.
The fingerprint tells them apart, cheaply: sha256 over each parameter's name, shape and a fixed strided sample of
`SAMPLES` of its values, not over all the bytes. Hashing every byte of a 16 GB model would take tens of seconds
and need the whole model on the host; the sample takes milliseconds on any device, and a different training run,
fine-tune or seed changes every sampled tensor. The sampled values are rounded to bfloat16 before hashing, so the
same checkpoint gives the same fingerprint loaded in float32 or bfloat16 (float16 rounds differently: it does not).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from corrsteer_pl.models.layers import decoder_layers, hidden_size

SAMPLES = 1024
"""Values sampled per parameter, evenly strided from its first element."""
FINGERPRINT_METHOD = f"sha256(name, shape, {SAMPLES} strided values as bfloat16)"


def fingerprint(model: nn.Module) -> str:
    """A deterministic hash of the model's weights (see the module docstring); cached until a weight changes."""
    params = list(model.named_parameters())
    key = tuple((name, p.data_ptr(), p._version) for name, p in params)
    cached = model.__dict__.get("_corrsteer_fingerprint")
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, param in params:
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES]
        bits = sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().astype("<i2")  # (<= SAMPLES,)
        digest.update(f"{name}:{tuple(param.shape)}\n".encode())
        digest.update(bits.tobytes())
    model.__dict__["_corrsteer_fingerprint"] = (key, digest.hexdigest())
    return digest.hexdigest()


def identity(model: nn.Module) -> dict[str, Any]:
    """What steering.json records of the model beside its name: architecture, dtype and weights' fingerprint."""
    param = next(model.parameters(), None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", ""),
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else "",
        "fingerprint": fingerprint(model),
        "fingerprint_method": FINGERPRINT_METHOD,
    }


def mismatch(recorded: dict[str, Any], d_model: int, num_layers: int, model: nn.Module) -> str:
    """How `model` differs from the one recorded ('' when it matches): width, layer count, then the fingerprint.

    An export written before fingerprints were recorded is checked for its shape only.
    """
    width, depth = hidden_size(model), len(decoder_layers(model))
    if (width, depth) != (d_model, num_layers):
        return f"{depth} layers of width {width} (the steering needs {num_layers} layers of width {d_model})"
    expected = recorded.get("fingerprint")
    if not expected or recorded.get("fingerprint_method") != FINGERPRINT_METHOD:
        return ""
    found = fingerprint(model)
    if found == expected:
        return ""
    dtype = identity(model)["dtype"]
    why = f"other weights (fingerprint {found[:12]}, expected {expected[:12]})"
    if recorded.get("dtype") and dtype != recorded["dtype"] and "float16" in (dtype, recorded["dtype"]):
        why += f"; it is {dtype} and the export was made in {recorded['dtype']}: load it in float32 or bfloat16"
    return why


def describe(name: str, recorded: dict[str, Any], d_model: int, num_layers: int) -> str:
    """'<name> (<architecture>, N layers, width D, weights <fingerprint>)' for messages."""
    arch = f"{recorded['architecture']}, " if recorded.get("architecture") else ""
    weights = f", weights {recorded['fingerprint'][:12]}" if recorded.get("fingerprint") else ""
    return f"'{name}' ({arch}{num_layers} layers, width {d_model}{weights})"
