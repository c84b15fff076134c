"""Per-request steering arguments: what a request's `vllm_xargs` (OpenAI API) or `SamplingParams.extra_args` says.

- `corrsteer`: true or false (default true: a server started with a steering steers); the OpenAI server turns
  JSON booleans into 1 and 0, which are accepted too;
- `corrsteer_scale`: a finite number multiplying the export's vectors (default 1.0; 0 steers nothing);
- `corrsteer_positions`: "generation" (the last prompt position and every generated token, CorrSteer's own policy)
  or "all" (every position, the prompt included); default: the export's `positions`.

Other keys belong to other extensions and are left alone; a key that starts with "corrsteer" but is none of these
is refused, so that a typo does not silently serve the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ON, SCALE, POSITIONS = "corrsteer", "corrsteer_scale", "corrsteer_positions"
KNOWN = (ON, SCALE, POSITIONS)
PREFIX = "corrsteer"
Positions = Literal["generation", "all"]


@dataclass(frozen=True)
class RequestSteering:
    """How one request is steered: `scale` times the export's vectors (0.0: not at all) at `positions`."""

    scale: float
    positions: Positions

    @property
    def steered(self) -> bool:
        return self.scale != 0.0

    def first_position(self, num_prompt_tokens: int) -> int:
        """The first steered position (0-based in the request's tokens): every later position is steered too."""
        return max(num_prompt_tokens - 1, 0) if self.positions == "generation" else 0


def mentions_steering(extra_args: Mapping[str, Any] | None) -> bool:
    """True when a request's extra arguments hold any key of ours (or a misspelt one)."""
    return any(str(key).startswith(PREFIX) for key in (extra_args or {}))


def request_steering(extra_args: Mapping[str, Any] | None, default_positions: Positions) -> RequestSteering:
    """The request's steering; a bad argument is a ValueError naming it (`vllm_xargs.<key>`) and what it takes."""
    args = dict(extra_args or {})
    unknown = sorted(str(key) for key in args if str(key).startswith(PREFIX) and key not in KNOWN)
    if unknown:
        raise ValueError(f"vllm_xargs.{unknown[0]}: unknown steering argument; use {', '.join(KNOWN)}")
    on = args.get(ON, True)
    if on not in (True, False) or isinstance(on, float):  # 1 and 0 pass (JSON booleans through the server)
        raise ValueError(f"vllm_xargs.{ON}: must be true or false, got {on!r}")
    scale = args.get(SCALE, 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"vllm_xargs.{SCALE}: must be a finite number, got {scale!r}")
    positions = args.get(POSITIONS, default_positions)
    if positions not in ("generation", "all"):
        raise ValueError(f"vllm_xargs.{POSITIONS}: must be 'generation' or 'all', got {positions!r}")
    return RequestSteering(float(scale) if on else 0.0, positions)
