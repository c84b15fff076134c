"""Capture: SAE features on the generation positions during greedy decoding, pooled per sample."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from sae_lens import SAE
from torch import Tensor, nn

from corrsteer_pl.hooks import LayerFn, LayerHooks

Pooling = Literal["max", "mean"]


class FeatureCapture:
    """Encodes each layer's generation positions with its SAE and pools them per sample.

    Only the masked positions are encoded: the prompt body, padding and positions after EOS
    never reach the SAE. Use as a context manager around `generate`, then call `pooled()`.
    """

    def __init__(
        self,
        model: nn.Module,
        saes: Mapping[int, SAE],
        pooling: Pooling = "max",
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        if pooling not in ("max", "mean"):
            raise ValueError(f"unknown pooling '{pooling}'; use 'max' or 'mean'")
        self.saes = dict(saes)
        self.pooling = pooling
        self._pooled: dict[int, Tensor] = {}
        self._counts: dict[int, Tensor] = {}
        fns = {layer: self._encoder(layer) for layer in self.saes}
        self.hooks = LayerHooks(model, fns, positions="generation", eos_token_ids=eos_token_ids)

    def __enter__(self) -> FeatureCapture:
        self._pooled.clear()
        self._counts.clear()
        self.hooks.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.detach()

    def pooled(self) -> dict[int, Tensor]:
        """Per layer, (B, d_sae) pooled activations of the last captured batch."""
        out = {}
        for layer, acc in self._pooled.items():
            counts = self._counts[layer].unsqueeze(1)
            if self.pooling == "max":
                out[layer] = torch.where(counts > 0, acc, torch.zeros_like(acc))
            else:
                out[layer] = acc / counts.clamp_min(1)
        return out

    def _encoder(self, layer: int) -> LayerFn:
        sae = self.saes[layer]

        def encode(hidden: Tensor, mask: Tensor) -> None:
            rows, cols = mask.nonzero(as_tuple=True)
            if rows.numel() == 0:
                return None
            x = hidden[rows, cols]  # (n, d_model): generation positions only
            acts = sae.encode(x.to(sae.W_enc.device)).float()  # (n, d_sae)
            self._accumulate(layer, hidden.shape[0], rows.to(acts.device), acts)
            return None

        return encode

    def _accumulate(self, layer: int, batch: int, rows: Tensor, acts: Tensor) -> None:
        if layer not in self._pooled:
            fill = float("-inf") if self.pooling == "max" else 0.0
            self._pooled[layer] = torch.full((batch, acts.shape[1]), fill, device=acts.device)
            self._counts[layer] = torch.zeros(batch, device=acts.device)
        # Our own accumulators (not the model's hidden state) may be updated in place.
        if self.pooling == "max":
            index = rows.unsqueeze(1).expand_as(acts)
            self._pooled[layer].scatter_reduce_(0, index, acts, "amax", include_self=True)
        else:
            self._pooled[layer].index_add_(0, rows, acts)
        self._counts[layer].index_add_(0, rows, torch.ones_like(rows, dtype=torch.float))


@torch.inference_mode()
def generate_with_features(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    saes: Mapping[int, SAE] | None = None,
    pooling: Pooling = "max",
    eos_token_ids: Iterable[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Greedy-decode left-padded prompts; return the new tokens (B, N) and pooled SAE features."""
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    if eos_token_ids is not None:
        kwargs["eos_token_id"] = list(eos_token_ids)
    if not saes:
        out = model.generate(**kwargs)
        return out[:, input_ids.shape[1] :], {}
    with FeatureCapture(model, saes, pooling, eos_token_ids) as capture:
        out = model.generate(**kwargs)
    return out[:, input_ids.shape[1] :], capture.pooled()
