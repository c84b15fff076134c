"""The one hook mechanism: read or add to the residual stream at decoder-layer outputs.

Capture (SAE encoding) and steering both go through `LayerHooks`. A hook function receives
the layer output `hidden` (B, T, d) and a boolean `mask` (B, T) of the positions it may
touch; returning a tensor replaces the output (never edit `hidden` in place). Beside it, the
positions of left-padded batches (position ids, the attention sink) and the ids that end a generation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from corrsteer_pl.models.layers import decoder_layers

PositionPolicy = Literal["generation", "all"]
LayerFn = Callable[[Tensor, Tensor], Tensor | None]


class GenerationPositions:
    """Tracks, for every forward pass, which positions are CorrSteer's generation positions.

    Prefill (empty KV cache): only the last prompt position, whose output is the first
    generated token. Decoding: each fed-back token, until the sequence has been fed an EOS.
    Prompts must be left-padded, so that the last position is real for every row.
    """

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.mask: Tensor | None = None  # (B, T) for the current forward pass
        self._finished: Tensor | None = None  # (B,) rows that were fed an EOS

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
        device = input_ids.device if input_ids is not None else embeds.device
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is None or cache.get_seq_length() == 0 or self._finished is None:
            self._start(kwargs.get("attention_mask"), shape, device)
            return
        if input_ids is not None and self.eos.numel():
            fed = input_ids[:, -1]
            self._finished = self._finished | torch.isin(fed, self.eos)
        self.mask = (~self._finished)[:, None].expand(shape).contiguous()

    def _start(self, attention_mask: Tensor | None, shape: torch.Size, device: torch.device) -> None:
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "prompts are right-padded: generation positions need left padding (set tokenizer.padding_side = 'left')"
            )
        self.mask = torch.zeros(shape, dtype=torch.bool, device=device)
        self.mask[:, -1] = True
        self._finished = torch.zeros(shape[0], dtype=torch.bool, device=device)
        self.eos = self.eos.to(device)  # once per generate, not a host-to-device copy at every decoding step


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counted from each row's first real token, as `generate` numbers left-padded rows: padding
    must not shift them."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def without_attention_sink(attention_mask: Tensor) -> Tensor:
    """(B, T) True at each row's real tokens but its first: that position, BOS or not, is the attention sink, with
    norms far above the others (~25,000 on SmolLM2, against ~100-400), which would dominate what is read there."""
    return attention_mask.bool() & (attention_mask.cumsum(dim=-1) > 1)


def eos_ids(model: nn.Module, tokenizer: Any | None = None) -> list[int]:
    """The ids that end a generation: the model's generation config's EOS (one id or several), then the
    tokenizer's own EOS when it is not among them (chat models often end a turn with a token of their own)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    own = getattr(tokenizer, "eos_token_id", None)
    if own is not None and own not in ids:
        ids.append(own)
    return ids


def cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: transformers 5.x renamed `past_key_values` to `cache` (the old
    name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def pad_id(model: nn.Module, tokenizer: Any) -> int:
    """The id that fills finished rows: the tokenizer's pad token, else the first EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids(model, tokenizer)[0]


class LayerHooks:
    """Forward hooks on decoder-layer outputs, attached for a `with` block or until `detach()`.

    `positions="generation"` passes the mask of generation positions; `"all"` passes an
    all-true mask (every position, padding included, as lm-eval's `steered` model does).
    """

    def __init__(
        self,
        model: nn.Module,
        fns: Mapping[int, LayerFn],
        positions: PositionPolicy = "generation",
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        if positions not in ("generation", "all"):
            raise ValueError(f"unknown position policy '{positions}'; use 'generation' or 'all'")
        layers = decoder_layers(model)
        for layer in fns:
            if not 0 <= layer < len(layers):
                raise ValueError(f"layer {layer} does not exist: the model has layers 0..{len(layers) - 1}")
        self.model = model
        self.fns = dict(fns)
        self.positions = positions
        eos = eos_ids(model) if eos_token_ids is None else eos_token_ids
        self.tracker = GenerationPositions(eos) if positions == "generation" else None
        self._handles: list[RemovableHandle] = []

    def attach(self) -> LayerHooks:
        if self._handles:
            raise RuntimeError("hooks are already attached")
        layers = decoder_layers(self.model)
        if self.tracker is not None:
            self._handles.append(self.model.register_forward_pre_hook(self.tracker, with_kwargs=True))
        for layer, fn in self.fns.items():
            self._handles.append(layers[layer].register_forward_hook(self._wrap(fn)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LayerHooks:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _mask(self, hidden: Tensor) -> Tensor:
        if self.tracker is None:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.tracker.mask is None:
            raise RuntimeError("generation positions are unknown: call the model itself, not a layer")
        return self.tracker.mask.to(hidden.device)

    def _wrap(self, fn: LayerFn) -> Callable[..., Any]:
        # transformers 5 decoder layers return a Tensor, 4.x (and GPT-2 in some versions) a tuple.
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden, self._mask(hidden))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook
