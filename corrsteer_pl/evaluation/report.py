"""The evaluation report's data: unsteered vs steered on the same items (one `PairedAccuracy`), each condition's
answers, the random controls, a comparison's rows, and report.json (flat keys, written from those)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from corrsteer_pl.evaluation.choice_report import ChoiceReport
from corrsteer_pl.evaluation.control_summary import ControlSummary, control_rank
from corrsteer_pl.evaluation.paired import ConditionResult, PairedAccuracy
from corrsteer_pl.files.atomic import atomic_file
from corrsteer_pl.side_effects.measure import SideEffects


@dataclass
class MethodRow:
    """One row of a comparison table: a method answered on the same items as the unsteered model and the controls."""

    name: str  # key, e.g. "mi-A" (TensorBoard tags)
    label: str  # what the table shows, e.g. "SPARE (MI)-A"
    paired: PairedAccuracy  # its accuracy against unsteered on the same items
    valid_rate: float
    accuracy_valid: float
    p_values: dict[str, float] = field(default_factory=dict)  # control kind -> permutation p among its draws
    features: list[str] = field(default_factory=list)  # "L{layer}/{feature}"
    scale: float | None = None  # the coefficients' scale (None: not a steering)
    choice: PairedAccuracy | None = None  # the choice-restricted accuracy vs unsteered (multiple choice only)

    @classmethod
    def from_scores(
        cls, name: str, label: str, unsteered: Tensor, scores: Tensor, valid: Tensor,
        controls: dict[str, Tensor] | None = None, features: list[str] | None = None, scale: float | None = None,
        choice: tuple[Tensor, Tensor] | None = None,
    ) -> MethodRow:  # fmt: skip
        """`controls`: kind -> (draws, n) per-item scores on the same items; p = rank / (draws + 1); `choice`: the
        unsteered and this row's choice-restricted per-item scores."""
        paired = PairedAccuracy.from_scores(unsteered, scores)
        plain = ConditionResult.from_scores(label, scores, valid)
        p_values = {
            kind: control_rank(paired.accuracy, draws.cpu()) / (draws.shape[0] + 1)
            for kind, draws in (controls or {}).items()
        }
        restricted = PairedAccuracy.from_scores(*choice) if choice is not None else None
        return cls(
            name, label, paired, plain.valid_rate, plain.accuracy_valid, p_values, features or [], scale, restricted
        )

    def to_json(self) -> dict[str, Any]:
        """The row as report.json has it: accuracy, valid rates, then the paired figures as flat keys."""
        flat = self.paired.flat("accuracy")
        head = {"name": self.name, "label": self.label, "accuracy": flat.pop("accuracy")}
        head |= {"valid_rate": self.valid_rate, "accuracy_valid": self.accuracy_valid}
        rest = {"p_values": self.p_values, "features": self.features, "scale": self.scale}
        return head | flat | rest | {"choice": asdict(self.choice) if self.choice is not None else None}


@dataclass
class EvaluationReport:
    """What `train.py test` found: accuracies, their paired difference, what changed, controls."""

    task: str
    split: str
    judge: str
    samples: int
    paired: PairedAccuracy  # steered against unsteered on the same items
    conditions: list[ConditionResult] = field(default_factory=list)
    controls: list[ControlSummary] = field(default_factory=list)
    features: list[dict[str, Any]] = field(default_factory=list)
    steering: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # where the items come from (how the splits were made, limits)
    warnings: list[str] = field(default_factory=list)  # why the steering is empty or suspect, from the export
    selection: dict[str, Any] = field(default_factory=dict)  # the export's selection.json: every candidate's evidence
    methods: list[MethodRow] = field(default_factory=list)  # a comparison's rows (empty without one)
    figures: list[str] = field(default_factory=list)  # PNG files written beside the report (evaluation/plots.py)
    choice: ChoiceReport | None = None  # multiple choice: the choice-restricted accuracy and which accuracy moved
    side_effects: SideEffects | None = None  # what else the steering changes (test with --side_effects.*)

    @classmethod
    def from_scores(
        cls,
        unsteered: Tensor,
        steered: Tensor,
        task: str,
        split: str,
        judge: str,
        valid: dict[str, Tensor] | None = None,
        controls: dict[str, tuple[Tensor, Tensor]] | None = None,
        **extra: Any,
    ) -> EvaluationReport:
        """`valid`: per-item validity for "unsteered"/"steered"; `controls`: kind -> (scores, valid) (draws, n)."""
        unsteered, steered = unsteered.double().cpu(), steered.double().cpu()
        valid = valid or {name: torch.ones_like(unsteered, dtype=torch.bool) for name in ("unsteered", "steered")}
        conditions = [
            ConditionResult.from_scores("unsteered", unsteered, valid["unsteered"]),
            ConditionResult.from_scores("steered", steered, valid["steered"]),
        ]
        summaries = [
            ControlSummary.from_scores(kind, steered, scores, control_valid.cpu())
            for kind, (scores, control_valid) in (controls or {}).items()
        ]
        paired = PairedAccuracy.from_scores(unsteered, steered)
        return cls(task, split, judge, unsteered.numel(), paired, conditions, summaries, **extra)

    @property
    def alpha(self) -> float:
        """The run's --selection.alpha (from the export's selection record; 0.05 for an export without one)."""
        return float(self.selection.get("settings", {}).get("alpha", 0.05))

    def __post_init__(self) -> None:
        # Each steered feature's Neuronpedia page, as selection.json has it, goes into report.json too.
        pages = self.pages()
        self.features = [
            f | {"neuronpedia_url": pages[(f["layer"], f["feature"])]} if pages.get((f["layer"], f["feature"])) else f
            for f in self.features
        ]

    def pages(self) -> dict[tuple[int, int], str | None]:
        """(layer, feature) -> the chosen feature's Neuronpedia page, as selection.json has it (None: no page)."""
        return {(f["layer"], f["feature"]): f.get("neuronpedia_url") for f in self.selection.get("chosen", [])}

    def to_json(self) -> dict[str, Any]:
        """report.json: task, split, judge, samples, the paired figures as flat keys (`PairedAccuracy.as_report`),
        then the rest; each method row flat as well (`MethodRow.to_json`)."""
        data = asdict(self)
        del data["paired"]
        head = {key: data.pop(key) for key in ("task", "split", "judge", "samples")}
        data["methods"] = [row.to_json() for row in self.methods]
        return head | self.paired.as_report() | data

    def save(self, folder: str | Path, markdown: str, stem: str = "report") -> None:
        """Writes `<stem>.json` and `<stem>.md` (`markdown`: the report rendered, `evaluation.markdown`)."""
        folder = Path(folder)
        for name, text in ((f"{stem}.json", json.dumps(self.to_json(), indent=2)), (f"{stem}.md", markdown)):
            with atomic_file(folder / name) as tmp:
                tmp.write_text(text)
