"""The served model with the steering added: vLLM's own model class plus forward hooks on its decoder layers.

vLLM's Llama decoder layer returns (hidden_states, residual) apart and the next layer adds them (fused with its
RMSNorm); the residual stream after layer L, where our transformers hooks add the vector, is their sum. The hook
returns (hidden_states + residual + s_t * v_L, 0) where some token of the pass is steered: the sum is the one
transformers computes (residual + layer output), then the vector is added as our hooks add it, and the next layer
adds a zero residual, which changes nothing. A pass with no steered token is left as vLLM computes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from corrsteer_pl.serve.rows import token_scales
from corrsteer_pl.serve.served import ServedSteering, served_steering


class TokenSteering:
    """Hooks on one vLLM model: per forward pass, each token's scale; per steered layer, scale x vector added."""

    def __init__(self, served: ServedSteering, dtype: torch.dtype, device: torch.device) -> None:
        self.vectors = {
            layer: steer.vector.to(device=device, dtype=dtype) for layer, steer in served.steering.layers.items()
        }  # layer -> (d_model,)
        self.dtype = dtype
        self.scales: Tensor | None = None  # (T,) for the current forward pass, None when nothing is steered

    def attach(self, model: nn.Module) -> TokenSteering:
        """`model` is vLLM's inner model (e.g. LlamaModel), which holds `.layers`.

        The token scales are computed before the first steered layer runs, not in a hook on `model` itself: vLLM's
        compile decorator calls the inner model's `forward` directly, so hooks on it never fire.
        """
        model.layers[min(self.vectors)].register_forward_pre_hook(self.before_first_layer, with_kwargs=True)
        for layer, vector in self.vectors.items():
            model.layers[layer].register_forward_hook(self._adder(vector))
        return self

    def before_first_layer(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        positions = kwargs.get("positions", args[0] if args else None)  # a decoder layer takes (positions, ...)
        self.scales = token_scales(positions, self.dtype) if isinstance(positions, Tensor) else None

    def _adder(self, vector: Tensor) -> Any:
        def hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
            if self.scales is None:
                return None
            hidden, residual = output  # (T, d) each; the residual stream is their sum
            stream = residual + hidden  # as transformers' decoder layer adds them
            return stream + self.scales[:, None] * vector, torch.zeros_like(residual)

        return hook


def steered_class(base: type[nn.Module]) -> type[nn.Module]:
    """A subclass of vLLM's model class `base` that attaches `TokenSteering` for the served export on creation."""

    class Steered(base):
        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            served = served_steering()
            if served is not None:
                dtype, device = vllm_config.model_config.dtype, vllm_config.device_config.device
                self.corrsteer_steering = TokenSteering(served, dtype, device).attach(self.model)

    Steered.__name__ = Steered.__qualname__ = f"CorrSteer{base.__name__}"
    return Steered
