"""What the served steering must reproduce: our own greedy generation in transformers, one prompt at a time.

`SteeringVectors.apply` + `generate`, fp32, no padding (one prompt per call, so that no batch shape or padding
enters the comparison); tokens up to and including the first end-of-sequence id, as vLLM returns them. Beside
each token, the gap between the top two logits at that step: where a served token differs, the gap at the first
difference says whether it is a float32 tie (a gap of the order of rounding) or a real disagreement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from corrsteer_pl.models.hooks import PositionPolicy, eos_ids
from corrsteer_pl.steering.vectors import SteeringVectors


@dataclass(frozen=True)
class Reference:
    """Greedy new tokens of one prompt and, per step, top-1 minus top-2 logit."""

    tokens: list[int]
    gaps: list[float]

    def first_difference(self, served: Sequence[int]) -> int | None:
        """Index of the first token where `served` differs (a missing or extra token counts), or None if equal."""
        if list(served) == self.tokens:
            return None
        return next((i for i, (a, b) in enumerate(zip(served, self.tokens, strict=False)) if a != b),
                    min(len(served), len(self.tokens)))  # fmt: skip


def scaled(steering: SteeringVectors, scale: float, positions: PositionPolicy | None = None) -> SteeringVectors:
    """The same steering with every vector times `scale` (the served `corrsteer_scale`), optionally other positions."""
    layers = {
        layer: dataclasses.replace(steer, vector=steer.vector if scale == 1.0 else scale * steer.vector)
        for layer, steer in steering.layers.items()
    }
    return dataclasses.replace(steering, layers=layers, positions=positions or steering.positions)


@torch.no_grad()
def reference_tokens(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    steering: SteeringVectors | None = None,
) -> list[Reference]:
    """Greedy new tokens per prompt (given as token ids), steered by `steering` unless None."""
    eos = set(eos_ids(model))
    references = []
    for ids in prompt_ids:
        batch = torch.tensor([list(ids)], dtype=torch.long)  # (1, T)
        kwargs = dict(
            attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens, do_sample=False, top_p=None,
            top_k=None, temperature=None, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        if steering is None:
            out = model.generate(batch, **kwargs)
        else:
            with steering.apply(model):
                out = model.generate(batch, **kwargs)
        new = out.sequences[0, batch.shape[1] :].tolist()
        end = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
        top2 = [step[0].float().topk(2).values for step in out.logits[:end]]  # (2,) per step
        references.append(Reference(new[:end], [float(v[0] - v[1]) for v in top2]))
    return references
