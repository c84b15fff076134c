"""A calibration: what one pass over calibration examples accumulates, and the one step that feeds it.

`calibration_batch` answers a batch greedily, reads the SAE features at the generation positions and judges the
answers; `Calibration.update` adds the batch to every layer's streaming Pearson sums, bootstrap replicates and
top examples. `corrsteer_pl.calibrate` (a notebook) and `CorrSteerModule.training_step` with
`CorrelationCallback` (the command line, DDP) are two loops over these same two calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from corrsteer_pl.calibration.answer_cache import AnswerCache
from corrsteer_pl.calibration.bootstrap import BootstrapStats
from corrsteer_pl.calibration.capture import Generation, generate_answers, recorded_features
from corrsteer_pl.calibration.options import CalibrationOptions
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.calibration.top_examples import TopExamples, example_keys
from corrsteer_pl.evaluation.judge import judge, target_choices
from corrsteer_pl.models.hooks import eos_ids, pad_id

CALIBRATION_FILE = "calibration.safetensors"
_PARTS = ("stats", "bootstrap", "top_examples")


@dataclass
class CalibrationBatch:
    """One batch's contribution: per-item labels, pooled features per layer, and where each feature peaked."""

    ids: list[str]
    labels: Tensor
    """(B,) float64: each answer's score as the calibration target defines correct."""
    pooled: dict[int, Tensor]
    """Per layer (B, d_sae): the feature's pooled activation over the answer's generation positions."""
    peaks: dict[int, Tensor] | None = None
    """Per layer (B, d_sae) int32: the generation position of each feature's maximum (None: all at 0)."""
    cut: int = 0
    """Free-form answers that used the whole answer budget (the task's max_new_tokens) without ending."""
    budget: int = 0
    """The answer budget they were generated with."""


@torch.inference_mode()
def calibration_batch(
    model: nn.Module,
    tokenizer: Any,
    saes: Mapping[int, nn.Module],
    batch: dict[str, Any],
    task: Any,
    options: CalibrationOptions = CalibrationOptions(),
    answers: AnswerCache | None = None,
) -> CalibrationBatch:
    """Answers `batch` (a `tasks.batching.collate` batch) greedily with the task's answer budget, reads every SAE's
    features at the generation positions, pooled per answer, and scores the answers by the task."""
    examples = batch["examples"]
    if not examples:
        return CalibrationBatch([], torch.zeros(0, dtype=torch.float64), {})
    device = next(model.parameters()).device
    batch = batch | {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    eos, pad = eos_ids(model, tokenizer), pad_id(model, tokenizer)
    steps = task.max_new_tokens
    choice = target_choices(options.target, tokenizer, examples)  # None: the generated answer decides
    generated = _recorded(answers, batch, saes, choice) if steps == 1 and answers is not None else None
    if generated is None:  # peaks: with one generation position every feature peaks at position 0
        ids, mask = batch["input_ids"], batch["attention_mask"]
        generated = generate_answers(model, ids, mask, steps, saes, options.pooling, eos, pad, choice, steps > 1)
    new, pooled, logits, peaks = generated
    labels = judge(task, tokenizer, examples, new, logits).target(options.target).scores
    cut = 0 if examples[0].choices else answers_cut(new, eos, steps)  # a one-letter answer is meant to be cut
    return CalibrationBatch([e.id for e in examples], labels, pooled, peaks, cut, steps)


def _recorded(
    answers: AnswerCache, batch: dict[str, Any], saes: Mapping[int, nn.Module], choice: Any
) -> Generation | None:
    """The batch's one-token answers as recorded while training the SAEs (their features encoded from the recorded
    residuals), or None when any prompt, layer or letter logit is missing: then the model answers."""
    recorded = recorded_features(answers, batch["texts"], saes, choice)
    return Generation(*recorded, None) if recorded is not None else None


def answers_cut(new_tokens: Tensor, eos_token_ids: Iterable[int], max_new_tokens: int) -> int:
    """How many rows of (B, N) new tokens ran the whole budget without an end-of-sequence token."""
    if new_tokens.shape[1] < max_new_tokens:
        return 0  # generation stopped early: every row ended
    ended = torch.isin(new_tokens, torch.tensor(list(eos_token_ids), device=new_tokens.device)).any(dim=1)
    return int((~ended).sum())


@dataclass
class Calibration:
    """Per SAE layer: streaming Pearson sums (`CorrelationStats`), bootstrap replicates of r and each feature's top
    activating examples. Two calibrations over disjoint examples merge into the calibration over both (the DDP
    all-reduce is that merge); `save` / `load` keep it in one safetensors file."""

    stats: dict[int, CorrelationStats]
    bootstrap: dict[int, BootstrapStats]
    tops: dict[int, TopExamples]
    options: CalibrationOptions = field(default_factory=CalibrationOptions)
    cut: int = 0
    """Free-form answers that ran the whole answer budget without ending (a budget that cuts them all is said)."""
    budget: int = 0
    """The answer budget (max new tokens) calibration ran with (0: unknown)."""

    @classmethod
    def empty(
        cls,
        widths: Mapping[int, int],
        options: CalibrationOptions = CalibrationOptions(),
        num_samples: int | None = None,
        device: torch.device | str = "cpu",
    ) -> Calibration:
        """A calibration of no samples for SAEs of `widths` (layer -> d_sae); `num_samples` (the calibration
        split's size, when known) caps the top examples kept per feature."""
        k = options.top_examples_for(sum(widths.values()), num_samples)
        stats = {layer: CorrelationStats(d, device=device) for layer, d in sorted(widths.items())}
        boot = {layer: BootstrapStats(d, options.bootstrap, device=device) for layer, d in sorted(widths.items())}
        tops = {layer: TopExamples(d, k, device=device) for layer, d in sorted(widths.items())}
        return cls(stats, boot, tops, options)

    @classmethod
    def for_saes(
        cls, saes: Mapping[int, Any], options: CalibrationOptions = CalibrationOptions(), num_samples: int | None = None
    ) -> Calibration:
        """`empty` for these SAEs, on the device of their weights."""
        device = next(iter(saes.values())).W_dec.device if saes else "cpu"
        return cls.empty({layer: sae.cfg.d_sae for layer, sae in saes.items()}, options, num_samples, device)

    @property
    def num_samples(self) -> int:
        return next(iter(self.stats.values())).num_samples if self.stats else 0

    @property
    def positive_rate(self) -> float:
        return float(next(iter(self.stats.values())).positive_rate()) if self.stats else 0.0

    def update(self, batch: CalibrationBatch) -> None:
        """Adds one batch to every layer (bootstrap weights and top-example keys follow the sample id)."""
        if not batch.ids:
            return
        keys = example_keys(batch.ids) if any(top.k for top in self.tops.values()) else None
        for layer, pooled in batch.pooled.items():
            labels = batch.labels.to(pooled.device)
            self.stats[layer].update(pooled, labels)
            self.bootstrap[layer].update(pooled, labels, batch.ids)
            if keys is not None:
                self.tops[layer].update(pooled, keys, (batch.peaks or {}).get(layer))
        self.cut, self.budget = self.cut + batch.cut, batch.budget or self.budget

    def merge(self, other: Calibration) -> Calibration:
        """This calibration and `other` (over other samples) as one; returns self."""
        if set(other.stats) != set(self.stats):
            raise ValueError(f"cannot merge calibrations of layers {sorted(self.stats)} and {sorted(other.stats)}")
        for layer in self.stats:
            self.stats[layer].merge(other.stats[layer])
            self.bootstrap[layer].merge(other.bootstrap[layer])
            self.tops[layer].merge(other.tops[layer])
        self.cut, self.budget = self.cut + other.cut, self.budget or other.budget
        return self

    def all_reduce(self) -> Calibration:
        """Merges every rank's calibration into each (no-op without DDP); returns self."""
        for layer in self.stats:
            self.stats[layer].all_reduce()
            self.bootstrap[layer].all_reduce()
            self.tops[layer].all_reduce()
        if dist.is_available() and dist.is_initialized():
            cut = torch.tensor([self.cut], dtype=torch.long, device=next(iter(self.stats.values())).sum_z.device)
            dist.all_reduce(cut)
            self.cut = int(cut.item())
        return self

    def to(self, device: torch.device | str) -> Calibration:
        for layer in self.stats:
            self.stats[layer].to(device), self.bootstrap[layer].to(device), self.tops[layer].to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of every layer's state, the options it was made with and the cut-answer count."""
        return {
            "stats": {layer: _cpu(s.state_dict()) for layer, s in self.stats.items()},
            "bootstrap": {layer: _cpu(b.state_dict()) for layer, b in self.bootstrap.items()},
            "top_examples": {layer: _cpu(t.state_dict()) for layer, t in self.tops.items()},
            "options": asdict(self.options),
            "cut": self.cut,
            "budget": self.budget,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str = "cpu") -> Calibration:
        stats = {}
        for layer, s in state["stats"].items():
            stats[int(layer)] = CorrelationStats(int(s["sum_z"].numel()), device=device)
            stats[int(layer)].load_state_dict(s)
        boot = {int(layer): BootstrapStats.from_state_dict(b, device) for layer, b in state["bootstrap"].items()}
        tops = {int(layer): TopExamples.from_state_dict(t, device) for layer, t in state["top_examples"].items()}
        options = CalibrationOptions(**state.get("options", {}))
        return cls(stats, boot, tops, options, int(state.get("cut", 0)), int(state.get("budget", 0)))

    def zeros_like(self) -> Calibration:
        """A calibration of no samples with this one's layers, widths, replicates and top-example slots."""
        device = next(iter(self.stats.values())).device if self.stats else "cpu"
        stats = {layer: CorrelationStats(s.num_features, device=device) for layer, s in self.stats.items()}
        boot = {
            layer: BootstrapStats(b.num_features, b.replicates, device=device) for layer, b in self.bootstrap.items()
        }
        tops = {layer: TopExamples(t.num_features, t.k, device=device) for layer, t in self.tops.items()}
        return Calibration(stats, boot, tops, self.options, budget=self.budget)

    def save(self, path: str | Path) -> Path:
        """Writes the whole calibration to one safetensors file (a folder gets `calibration.safetensors`)."""
        path = Path(path)
        path = path / CALIBRATION_FILE if path.is_dir() else path
        state = self.state_dict()
        flat = {
            f"{part}.{layer}.{key}": value.contiguous()
            for part in _PARTS
            for layer, tensors in state[part].items()
            for key, value in tensors.items()
        }
        metadata = {"options": json.dumps(state["options"]), "cut": str(self.cut), "budget": str(self.budget)}
        save_file(flat, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Calibration:
        """Reads a file written by `save` (or the folder holding `calibration.safetensors`)."""
        path = Path(path)
        path = path / CALIBRATION_FILE if path.is_dir() else path
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            extra = {"options": json.loads(metadata.get("options", "{}"))}
            extra |= {"cut": int(metadata.get("cut", 0)), "budget": int(metadata.get("budget", 0))}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not a calibration written by Calibration.save ({err})") from None
        state: dict[str, Any] = {part: {} for part in _PARTS}
        for name, value in tensors.items():
            part, layer, key = name.split(".", 2)
            state[part].setdefault(int(layer), {})[key] = value
        return cls.from_state_dict(state | extra, device)


def _cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().cpu() for key, value in state.items()}
