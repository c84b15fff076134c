"""AnswerCache: for one-token answers, each calibration prompt's greedy answer token and its residual stream at
the answer position, so calibration can encode those instead of running the LM again.

With one new token the only generation position is the last prompt position, so one prefill holds everything
calibration needs. Training SAEs already runs that prefill over the calibration prompts; recording these rows
there saves calibration its own pass (on SmolLM2 + 2,000 MMLU prompts, 2 CPU cores: about 10 minutes). Rows are
keyed by the exact text the model read, so another prompt, template or subset never reads a wrong row.

Each row also keeps the logits, at that position, of every one-token form of the letters A-Z (`letter_ids`): the
choice-restricted answer (`--calibration.target choice`) is then read from the same pass, exactly. Logits cannot
be recomputed from a recorded residual unless the last layer is among the SAE layers, and even then the final norm
and head would run again; these few columns cost 4 bytes x 52 ids per prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from corrsteer_pl.tasks.choice import letter_token_ids

ANSWERS_FILE = "answers.safetensors"
ANSWERS_FORMAT = 2
"""Bumped when a cache's content changes (2: letter logits added), so that caches of another format are rebuilt."""


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
    logit_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """(M,) the token ids whose logits are kept (`letter_ids`)."""
    logits: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    """(N, M) float32 logits at the answer position for `logit_ids`."""

    def __post_init__(self) -> None:
        self._index = {key: i for i, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, texts: Sequence[str], tokens: Tensor, residuals: dict[int, Tensor], logits: Tensor) -> None:
        """Appends one batch: `tokens` (B,), per layer (B, d_model) rows, and (B, M) logits at `logit_ids`, in the
        order of `texts`."""
        if logits.shape[-1] != self.logit_ids.numel():
            raise ValueError(f"{logits.shape[-1]} logits per row added to a cache of {self.logit_ids.numel()} ids")
        if self.keys and set(residuals) != set(self.residuals):
            raise ValueError(f"rows for layers {sorted(residuals)} added to a cache of layers {sorted(self.residuals)}")
        for text in texts:
            key = prompt_key(text)
            self._index[key] = len(self.keys)
            self.keys.append(key)
        self.tokens = torch.cat([self.tokens, tokens.detach().long().cpu()])
        rows = logits.detach().float().cpu()
        self.logits = torch.cat([self.logits, rows]) if len(self.logits) else rows
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
        tensors = {"tokens": self.tokens.contiguous(), "logit_ids": self.logit_ids, "logits": self.logits.contiguous()}
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
        if "logits" not in tensors:
            raise ValueError(f"{path} was written by an older corrsteer-pl (no letter logits): delete it to rebuild it")
        if any(len(rows) != len(keys) for rows in [tensors["tokens"], tensors["logits"], *residuals.values()]):
            raise ValueError(f"{path} is inconsistent (row counts differ from its keys): delete it to rebuild it")
        return cls(keys, tensors["tokens"], residuals, tensors["logit_ids"], tensors["logits"])


def letter_ids(tokenizer: Any) -> Tensor:
    """(M,) every id that `letter_token_ids` gives the letters A-Z, in order: what an `AnswerCache` keeps logits of.
    Letters that are not one token in this tokenizer are left out (a task using them then runs the model)."""
    ids: list[int] = []
    for letter in string.ascii_uppercase:
        try:
            ids += [i for i in letter_token_ids(tokenizer, [letter])[0] if i not in ids]
        except ValueError:
            continue
    return torch.tensor(ids, dtype=torch.long)


__all__ = ["ANSWERS_FILE", "ANSWERS_FORMAT", "AnswerCache", "letter_ids", "prompt_key"]
