"""Capture: SAE features on the generation positions during greedy decoding, pooled per sample."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any, Literal, NamedTuple

import torch
from sae_lens import SAE
from torch import Tensor, nn

from corrsteer_pl.calibration.answer_cache import AnswerCache
from corrsteer_pl.models.hooks import LayerFn, LayerHooks, cache_keyword
from corrsteer_pl.tasks.choice import ChoiceTokens

Pooling = Literal["max", "mean"]


class Generation(NamedTuple):
    """What `generate_answers` returns (unpacks as a 4-tuple)."""

    tokens: Tensor
    """(B, N) new tokens, greedy."""
    pooled: dict[int, Tensor]
    """Per layer (B, d_sae) pooled SAE features of the generation positions (empty without SAEs)."""
    choice_logits: Tensor | None
    """(B, K) the first answer position's logits restricted to the letters asked for (None when none were)."""
    peaks: dict[int, Tensor] | None
    """Per layer (B, d_sae) int32: where each feature peaked (None unless asked for)."""


class FeatureCapture:
    """Encodes each layer's generation positions with its SAE and pools them per sample.

    Only the masked positions are encoded: the prompt body, padding and positions after EOS
    never reach the SAE. Use as a context manager around `generate`, then call `pooled()`.
    The hooks only keep the residual rows; `pooled()` encodes them in one call per layer. Encoding
    at every decoding step re-read the encoder weights each time (10.6 MB for 4,608 latents on
    SmolLM2): 64 per-step calls cost 200 ms against 43 ms for one call per layer over the same rows.
    """

    def __init__(
        self,
        model: nn.Module,
        saes: Mapping[int, SAE],
        pooling: Pooling = "max",
        eos_token_ids: Iterable[int] | None = None,
        peaks: bool = False,
    ) -> None:
        """peaks: `pooled()` also fills `self.peaks`: per layer (B, d_sae) int32, the generation position (0 = the
        last prompt position) where each feature's activation was largest (the first such position on a tie)."""
        if pooling not in ("max", "mean"):
            raise ValueError(f"unknown pooling '{pooling}'; use 'max' or 'mean'")
        self.saes = dict(saes)
        self.pooling = pooling
        self._rows: dict[int, list[Tensor]] = {}  # per layer: batch row of each kept residual
        self._residuals: dict[int, list[Tensor]] = {}  # per layer: (n, d_model) residual chunks
        self._steps: dict[int, list[Tensor]] = {}  # per layer: generation position of each kept residual
        self._seen: dict[int, Tensor] = {}  # per layer: (B,) positions kept so far per batch row
        self.track_peaks, self.peaks = peaks, {}
        self._batch = 0
        fns = {layer: self._keeper(layer) for layer in self.saes}
        self.hooks = LayerHooks(model, fns, positions="generation", eos_token_ids=eos_token_ids)

    def __enter__(self) -> FeatureCapture:
        self._rows = {layer: [] for layer in self.saes}
        self._residuals = {layer: [] for layer in self.saes}
        self._steps = {layer: [] for layer in self.saes}
        self._seen, self.peaks = {}, {}
        self.hooks.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.detach()

    def pooled(self) -> dict[int, Tensor]:
        """Per layer, (B, d_sae) pooled activations of the last captured batch (zeros for a row never captured)."""
        out = {}
        for layer, sae in self.saes.items():
            if not self._rows[layer]:
                continue
            rows = torch.cat(self._rows[layer])
            x = torch.cat(self._residuals[layer])
            acts = encode_rows(sae, x)  # (n, d_sae), one call for all steps
            out[layer] = self._pool(rows.to(acts.device), acts)
            if self.track_peaks:
                self.peaks[layer] = self._peak(
                    rows.to(acts.device), torch.cat(self._steps[layer]).to(acts.device), acts
                )
        return out

    def _peak(self, rows: Tensor, steps: Tensor, acts: Tensor) -> Tensor:
        """(B, d_sae) int32: the first generation position where each feature reached its maximum of the row."""
        index = rows.unsqueeze(1).expand_as(acts)
        top = torch.full((self._batch, acts.shape[1]), float("-inf"), device=acts.device)
        top.scatter_reduce_(0, index, acts, "amax", include_self=True)
        never = torch.iinfo(torch.int32).max
        at = torch.where(acts == top[rows], steps.to(torch.int32).unsqueeze(1), never)  # (n, d_sae)
        peak = torch.full_like(top, never, dtype=torch.int32).scatter_reduce_(0, index, at, "amin", include_self=True)
        return torch.where(peak == never, 0, peak)

    def _pool(self, rows: Tensor, acts: Tensor) -> Tensor:
        ones = torch.ones_like(rows, dtype=acts.dtype)
        counts = torch.zeros(self._batch, device=acts.device).index_add_(0, rows, ones)
        if self.pooling == "max":
            pooled = torch.full((self._batch, acts.shape[1]), float("-inf"), device=acts.device)
            pooled.scatter_reduce_(0, rows.unsqueeze(1).expand_as(acts), acts, "amax", include_self=True)
            return torch.where(counts.unsqueeze(1) > 0, pooled, torch.zeros_like(pooled))
        summed = torch.zeros(self._batch, acts.shape[1], device=acts.device).index_add_(0, rows, acts)
        return summed / counts.clamp_min(1).unsqueeze(1)

    def _keeper(self, layer: int) -> LayerFn:
        def keep(hidden: Tensor, mask: Tensor) -> None:
            self._batch = hidden.shape[0]
            rows, cols = mask.nonzero(as_tuple=True)  # row-major: rows ascending, positions ascending in a row
            if self.track_peaks and rows.numel():
                seen = self._seen.setdefault(layer, torch.zeros(self._batch, dtype=torch.long, device=rows.device))
                within = torch.arange(rows.numel(), device=rows.device) - torch.searchsorted(rows, rows)
                self._steps[layer].append(seen[rows] + within)
                seen += torch.bincount(rows, minlength=self._batch)
            if rows.numel():
                self._rows[layer].append(rows)
                self._residuals[layer].append(hidden[rows, cols])  # advanced indexing copies: safe to keep
            return None

        return keep


def encode_rows(sae: SAE, residuals: Tensor) -> Tensor:
    """(n, d_sae) float32 SAE activations of (n, d_model) residual rows, on the SAE's device and dtype."""
    return sae.encode(residuals.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)).float()


@torch.inference_mode()
def recorded_features(
    cache: AnswerCache, texts: list[str], saes: Mapping[int, SAE], choice: ChoiceTokens | None = None
) -> tuple[Tensor, dict[int, Tensor], Tensor | None] | None:
    """New tokens (B, 1), pooled features and (with `choice`) the letters' restricted logits (B, K) of prompts
    whose one-token answer `cache` recorded; None if any prompt, layer or letter logit is missing.

    One answer token means one generation position, where max and mean pooling are both the identity: the
    features are the SAE encodes of the recorded residuals, exactly what `FeatureCapture` computes live.
    """
    rows = cache.rows(texts, list(saes))
    if rows is None or (choice is not None and not choice.covered_by(cache.logit_ids)):
        return None
    restricted = choice.restrict(cache.logits[rows], cache.logit_ids) if choice is not None else None
    pooled = {layer: encode_rows(sae, cache.residuals[layer][rows]) for layer, sae in saes.items()}
    return cache.tokens[rows].unsqueeze(1), pooled, restricted


@torch.inference_mode()
def generate_answers(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    saes: Mapping[int, SAE] | None = None,
    pooling: Pooling = "max",
    eos_token_ids: Iterable[int] | None = None,
    pad_token_id: int | None = None,
    choice: ChoiceTokens | None = None,
    peaks: bool = False,
    prompt_cache: Any = None,
) -> Generation:
    """The one greedy generation: left-padded prompts in, their new tokens (B, N) out; with `saes`, each SAE's
    features at the generation positions pooled per answer; with `choice`, the first position's logits restricted
    to its letters (B, K), the logits the first new token is the argmax of, read from the same pass
    (`output_logits`, unprocessed); with `peaks`, per layer the generation position where each feature peaked;
    `prompt_cache`: the KV cache of every prompt position but the last (a copy: generation appends to it), so that
    only the last prompt position and the new tokens run.
    Steering applies through hooks attached around the call (`SteeringVectors.apply`); answering many conditions
    at once is `evaluation.conditions.answered`, built on this."""
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_logits=choice is not None,
    )
    if eos_token_ids is not None:
        kwargs["eos_token_id"] = list(eos_token_ids)
    if prompt_cache is not None:
        kwargs[cache_keyword(model)] = prompt_cache
    capture = FeatureCapture(model, saes, pooling, eos_token_ids, peaks=peaks) if saes else None
    with capture if capture is not None else nullcontext():
        out = model.generate(**kwargs)
    restricted = choice.restrict(out.logits[0]) if choice is not None else None  # (B, V) -> (B, K)
    pooled = capture.pooled() if capture is not None else {}
    where = capture.peaks if capture is not None and peaks else None
    return Generation(out.sequences[:, input_ids.shape[1] :], pooled, restricted, where)
