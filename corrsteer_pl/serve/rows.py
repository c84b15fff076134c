"""Which request sits in which row of vLLM's running batch, and how each of its tokens is steered.

vLLM tells logits processors, before every forward pass, which requests were added to, removed from or moved
within its persistent batch (row i = the i-th request of the flattened batch). `SteeringRequests` is such a
processor that never touches logits: it keeps, per steered row, the request's scale and its first steered
position. `token_scales` turns that into one scale per token of the forward pass, from the tokens' positions and
the attention metadata's `query_start_loc` (where each row's tokens start), under chunked prefill too: a token at
position p of a request is steered iff p >= its first steered position (the last prompt position, or 0 for "all").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from corrsteer_pl.serve.requests import mentions_steering, request_steering
from corrsteer_pl.serve.served import ENV, served_steering

log = logging.getLogger(__name__)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
"""vLLM model classes whose decoder layers return (hidden_states, residual) and whose model holds `.model.layers`,
checked token for token against transformers (tests/serve)."""


@dataclass(frozen=True)
class RowSteering:
    scale: float
    first_position: int


ROWS: dict[int, RowSteering] = {}
"""Steered rows of this worker's running batch (unsteered rows are absent), kept by the live `SteeringRequests`."""


class SteeringRequests(LogitsProcessor):
    """Validates requests' steering arguments (front end: a ValueError is an HTTP 400) and tracks steered rows."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = sampling_params.extra_args
        if not mentions_steering(extra):
            return
        served = served_steering()
        if served is None:
            key = next(str(k) for k in extra if str(k).startswith("corrsteer"))
            raise ValueError(f"vllm_xargs.{key}: this server serves no steering; start it with {ENV}=<export folder>")
        request_steering(extra, served.steering.positions)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        served = served_steering()
        self.positions = served.steering.positions if served is not None else "generation"
        self.active = served is not None
        architecture = vllm_config.model_config.architecture
        if self.active and architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{served.meta_file}: corrsteer steers {', '.join(SUPPORTED_ARCHITECTURES)} models in vLLM, not "
                f"{architecture}; unset {ENV} or use the export's steering.gguf / merged/ formats"
            )
        ROWS.clear()  # a new input batch (vLLM may rebuild it once) starts empty; this instance keeps ROWS from now

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.active:
            process_dict_updates(ROWS, batch_update, self._row)

    def _row(self, params: Any, prompt_tok_ids: list[int] | None, output_tok_ids: list[int]) -> RowSteering | None:
        steering = request_steering(params.extra_args, self.positions)
        if not steering.steered:
            return None
        if prompt_tok_ids is None:
            log.warning("corrsteer: a request given as prompt embeddings is served unsteered (no prompt length)")
            return None
        return RowSteering(steering.scale, steering.first_position(len(prompt_tok_ids)))

    def apply(self, logits: Tensor) -> Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True


def _query_start_loc() -> Tensor | None:
    """(num_reqs + 1,) offsets of each row's tokens in this forward pass; None outside a batch (profiling runs)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict):
        return None
    for layer_metadata in metadata.values():
        loc = getattr(layer_metadata, "query_start_loc", None)
        if isinstance(loc, Tensor):
            return loc
    return None


def token_scales(positions: Tensor, dtype: torch.dtype) -> Tensor | None:
    """(T,) the scale of each token of this forward pass (0 where unsteered), or None when no token is steered."""
    if not ROWS:
        return None
    loc = _query_start_loc()
    if loc is None or positions.dim() != 1:
        return None
    loc = loc.to("cpu", torch.long)
    num_rows, num_tokens = loc.numel() - 1, int(loc[-1])
    scale = torch.zeros(num_rows, dtype=dtype)  # (R,)
    first = torch.zeros(num_rows, dtype=torch.long)  # (R,)
    for row, steer in ROWS.items():
        if row < num_rows:
            scale[row], first[row] = steer.scale, steer.first_position
    if not bool(scale.any()):
        return None
    counts = loc.diff()  # (R,) tokens per row
    token_scale, token_first = scale.repeat_interleave(counts), first.repeat_interleave(counts)  # (num_tokens,)
    scales = torch.zeros(positions.shape[0], dtype=dtype)  # (T,) padding tokens beyond num_tokens stay 0
    steered = positions[:num_tokens].to("cpu", torch.long) >= token_first
    scales[:num_tokens] = torch.where(steered, token_scale, torch.zeros_like(token_scale))
    return scales.to(positions.device)
