"""The vLLM plugin's fixtures: a tiny Llama saved to disk with a steering export of two layers, and its
transformers reference. The tests here need vLLM (the serving venv, .ci/run); elsewhere they skip."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corrsteer_pl.models.tiny import tiny_model, tiny_tokenizer
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors

D_MODEL, NUM_LAYERS = 256, 3  # 4 heads of 64: vLLM's CPU attention takes head sizes of 32 and up


@dataclass(frozen=True)
class TinyServing:
    model_dir: Path
    export_dir: Path
    steering: SteeringVectors
    model: torch.nn.Module  # the same weights in transformers, fp32
    vocab: int


def make_export(folder: Path, d_model: int, num_layers: int, layers: dict[int, float], name: str = "") -> Path:
    """An export of random vectors (layer -> norm) for a model of `d_model` x `num_layers`."""
    gen = torch.Generator().manual_seed(11)
    vectors = {layer: norm * torch.nn.functional.normalize(torch.randn(d_model, generator=gen), dim=0)
               for layer, norm in layers.items()}  # fmt: skip
    SteeringVectors(
        layers={layer: LayerSteering(layer, v, []) for layer, v in vectors.items()},
        d_model=d_model,
        num_layers=num_layers,
        positions="generation",
        model_name_or_path=name,
        lm_eval_hookpoints={layer: f"layers.{layer}" for layer in vectors},
    ).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_serving(tmp_path_factory) -> TinyServing:
    root = tmp_path_factory.mktemp("tiny-serving")
    model_dir = root / "model"
    tiny_model("llama", num_layers=NUM_LAYERS, hidden=D_MODEL).save_pretrained(model_dir)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(model_dir)
    export_dir = make_export(root / "steered", D_MODEL, NUM_LAYERS, {1: 3.0, 2: 2.0}, str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return TinyServing(model_dir, export_dir, SteeringVectors.load(export_dir), model, len(tokenizer))
