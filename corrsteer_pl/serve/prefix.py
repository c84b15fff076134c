"""Prefix caching that never hands one request KV computed under another steering.

vLLM keys a cached KV block by its tokens, its parent block and "extra keys" (LoRA, multimodal inputs, a cache
salt). A steered position changes the KV of every later layer, so a block that holds a steered position of a
request gets an extra key: the export, the scale, the policy and the first steered position. Blocks wholly
before the first steered position are computed exactly as without steering and keep their plain key: steered and
unsteered requests still share a common prompt prefix. The key is added by wrapping vLLM's
`generate_block_hash_extra_keys` in the engine-core process (a function, replaced in its module at start-up).
"""

from __future__ import annotations

from typing import Any

from corrsteer_pl.serve.requests import request_steering
from corrsteer_pl.serve.served import ServedSteering

KEY = "corrsteer"


def block_key(served: ServedSteering, request: Any, end_token: int) -> tuple[str, str] | None:
    """The extra key of the block of `request` that ends before `end_token`, or None if no position in it is steered."""
    params = getattr(request, "sampling_params", None)
    if params is None:
        return None
    steering = request_steering(params.extra_args, served.steering.positions)  # validated by the front end
    if not steering.steered:
        return None
    first = steering.first_position(request.num_prompt_tokens)
    if end_token <= first:
        return None
    return KEY, f"{served.key}|scale={steering.scale!r}|{steering.positions}|from={first}"


def install(served: ServedSteering) -> None:
    """Adds `block_key` to vLLM's block-hash extra keys (once per process)."""
    from vllm.v1.core import block_pool, kv_cache_utils

    original = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(original, KEY, False):
        return

    def extra_keys(request: Any, start_token_idx: int, end_token_idx: int, start_mm_idx: int) -> tuple[Any, int]:
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        ours = block_key(served, request, end_token_idx)
        return ((keys or ()) + (ours,) if ours else keys), next_mm_idx

    setattr(extra_keys, KEY, True)
    kv_cache_utils.generate_block_hash_extra_keys = extra_keys
    block_pool.generate_block_hash_extra_keys = extra_keys  # the KV events it publishes carry the same keys
