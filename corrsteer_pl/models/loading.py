"""What a run loads: the frozen LM and its tokenizer, and the SAE set (`--model.saes`), one SAE per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from corrsteer_pl.models.sae import check_sae_fits, load_sae
from corrsteer_pl.models.sources import load_pretrained, resolve_model, resolve_sae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_frozen_lm(model: str, revision: str | None, dtype: str) -> tuple[nn.Module, Any]:
    """The causal LM in eval mode with no gradients, and its tokenizer (left padding, for batched generation)."""
    path = resolve_model(model)
    lm = load_pretrained(AutoModelForCausalLM.from_pretrained, path, revision=revision, dtype=DTYPES[dtype]).eval()
    lm.requires_grad_(False)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, revision=revision, padding_side="left")
    if tokenizer.pad_token is None:  # batched generation pads; finished rows are filled with EOS anyway
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


@dataclass
class SAESpec:
    """One SAE: a local sae-lens folder, or a sae-lens release with an id inside it."""

    source: str
    """Local sae-lens folder, a release such as gemma-scope-2b-pt-res-canonical, or tiny-random."""
    sae_id: str | None = None
    """Id inside the release, e.g. layer_12/width_16k/canonical (None for a local folder)."""

    def label(self) -> str:
        return f"{self.source}/{self.sae_id}" if self.sae_id else self.source


def load_sae_set(specs: list[SAESpec], model: nn.Module, dtype: str) -> tuple[dict[int, nn.Module], dict[int, str]]:
    """SAEs by the layer whose output they read, and each layer's source label; two SAEs on one layer are refused."""
    saes: dict[int, nn.Module] = {}
    sources: dict[int, str] = {}
    for spec in specs:
        source, sae_id = resolve_sae(spec.source, spec.sae_id)
        sae = load_sae(source, sae_id, dtype=dtype)
        layer = check_sae_fits(sae, model, spec.label())
        if layer in sources:
            raise ValueError(f"two SAEs read layer {layer} ({sources[layer]}, {spec.label()}): keep one")
        saes[layer], sources[layer] = sae, spec.label()
    return saes, sources


def check_module_options(controls: int, has_saes: bool) -> None:
    """Refuses --model options that would silently do something else than asked, before anything loads."""
    if controls < 0:
        raise ValueError(f"--model.controls must be >= 0 (0 leaves the random controls out), got {controls}")
    if not has_saes:
        raise ValueError(
            "no SAEs configured: add entries to --model.saes (source, sae_id) or layers to --model.train_saes"
        )
