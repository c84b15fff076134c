"""AnswerCache: for one-token answers, each calibration prompt's greedy answer token and its residual stream at
the answer position, so calibration can encode those instead of running the LM again.

With one new token the only generation position is the last prompt position, so one prefill holds everything
calibration needs. Training SAEs already runs that prefill over the calibration prompts; recording these rows
there saves calibration its own pass (on SmolLM2 + 2,000 MMLU prompts, 2 CPU cores: about 10 minutes). Rows are
keyed by the exact text the model read, so another prompt, template or subset never reads a wrong row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

ANSWERS_FILE = "answers.safetensors"


def prompt_key(text: str) -> str:
    """The key of one prompt: a digest of the exact text the model read."""
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class AnswerCache:
    """Per prompt: the greedy next token and the residual after each layer at the last prompt position."""

    keys: list[str] = field(default_factory=list)
    tokens: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    residuals: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> (N, d_model) float32, row i belonging to keys[i]."""

    def __post_init__(self) -> None:
        self._index = {key: i for i, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, texts: Sequence[str], tokens: Tensor, residuals: dict[int, Tensor]) -> None:
        """Appends one batch: `tokens` (B,) and, per layer, (B, d_model) rows in the order of `texts`."""
        if self.keys and set(residuals) != set(self.residuals):
            raise ValueError(f"rows for layers {sorted(residuals)} added to a cache of layers {sorted(self.residuals)}")
        for text in texts:
            key = prompt_key(text)
            self._index[key] = len(self.keys)
            self.keys.append(key)
        self.tokens = torch.cat([self.tokens, tokens.detach().long().cpu()])
        for layer, rows in residuals.items():
            rows = rows.detach().float().cpu()
            self.residuals[layer] = torch.cat([self.residuals[layer], rows]) if layer in self.residuals else rows

    def rows(self, texts: Sequence[str], layers: Sequence[int]) -> Tensor | None:
        """Row indices of `texts`, or None unless every text and every layer is cached."""
        if not set(layers) <= set(self.residuals):
            return None
        index = [self._index.get(prompt_key(text)) for text in texts]
        if any(i is None for i in index):
            return None
        return torch.tensor(index, dtype=torch.long)

    def save(self, path: str | Path) -> None:
        """Writes next to `path`, then renames: a killed run never leaves a half-written cache."""
        path = Path(path)
        tensors = {"tokens": self.tokens.contiguous()}
        tensors.update({f"residual.{layer}": rows.contiguous() for layer, rows in self.residuals.items()})
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"keys": json.dumps(self.keys)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> AnswerCache:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = json.loads(f.metadata()["keys"])
            tensors = load_file(str(path))
        except (SafetensorError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not an answer cache ({err}): delete it to rebuild it") from None
        residuals = {int(name.split(".", 1)[1]): t for name, t in tensors.items() if name.startswith("residual.")}
        if any(len(rows) != len(keys) for rows in [tensors["tokens"], *residuals.values()]):
            raise ValueError(f"{path} is inconsistent (row counts differ from its keys): delete it to rebuild it")
        return cls(keys, tensors["tokens"], residuals)


__all__ = ["ANSWERS_FILE", "AnswerCache", "prompt_key"]
