"""The evaluation report: unsteered vs steered on the same items, random controls, bootstrap CIs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from corrsteer_pl.atomic import atomic_file
from corrsteer_pl.selection.diagnosis import nothing_steered
from corrsteer_pl.selection.evidence import SELECTION_FILE, candidates_table
from corrsteer_pl.selection.examples import examples_markdown

if TYPE_CHECKING:
    from corrsteer_pl.evaluation.choice_report import ChoiceReport

RESAMPLES = 10_000
CHOSEN_SECTION = "## How the features were chosen (validation split)"
RESPONDS_SECTION = "## What the chosen features respond to (calibration split)"


def _percentiles(samples: Tensor, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    low, high = torch.quantile(samples, torch.tensor([alpha, 1 - alpha], dtype=samples.dtype))
    return float(low), float(high)


def paired_bootstrap_ci(
    unsteered: Tensor, steered: Tensor, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of mean(steered - unsteered), resampling items (pairs kept together)."""
    diff = (steered.double() - unsteered.double()).cpu()
    if diff.numel() == 0:
        return 0.0, 0.0
    g = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, 1000):  # chunks keep the (chunk, n) index matrix small
        index = torch.randint(diff.numel(), (min(1000, resamples - start), diff.numel()), generator=g)
        means.append(diff[index].mean(dim=1))
    return _percentiles(torch.cat(means), level)


def control_bootstrap_ci(
    steered: Tensor, controls: Tensor, resamples: int = 2_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """CI of mean(steered) - mean(controls) resampling items AND control draws.

    Resampling items alone would hold the random draws fixed and overstate certainty: two sets
    of random features can differ more than the item noise suggests.
    """
    steered, controls = steered.double().cpu(), controls.double().cpu()  # (n,), (draws, n)
    draws, n = controls.shape
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(resamples):
        items = torch.randint(n, (n,), generator=g)
        picked = torch.randint(draws, (draws,), generator=g)
        diffs.append(steered[items].mean() - controls[picked][:, items].mean())
    return _percentiles(torch.stack(diffs), level)


@dataclass
class ConditionResult:
    """One condition's answers: accuracy, how often the answer was valid, accuracy among valid ones."""

    name: str
    accuracy: float
    valid_rate: float
    accuracy_valid: float

    @classmethod
    def from_scores(cls, name: str, scores: Tensor, valid: Tensor) -> ConditionResult:
        scores, valid = scores.double(), valid.bool()
        n, n_valid = max(scores.numel(), 1), int(valid.sum())
        return cls(
            name,
            float(scores.sum() / n),
            n_valid / n,
            float(scores[valid].sum() / n_valid) if n_valid else 0.0,
        )


@dataclass
class PairedAccuracy:
    """One condition's accuracy against the unsteered model's on the same items, pairs kept together."""

    accuracy: float
    unsteered: float
    difference: float  # accuracy - unsteered
    ci_low: float  # paired bootstrap 95% CI of the difference
    ci_high: float
    better: int  # wrong -> right
    worse: int  # right -> wrong
    ser: float  # worse / (better + worse); 0 when nothing changed

    @classmethod
    def from_scores(cls, unsteered: Tensor, scores: Tensor) -> PairedAccuracy:
        unsteered, scores = unsteered.double().cpu(), scores.double().cpu()
        better, worse = int((scores > unsteered).sum()), int((scores < unsteered).sum())
        low, high = paired_bootstrap_ci(unsteered, scores)
        n = scores.numel()
        accuracy, base = (float(scores.mean()), float(unsteered.mean())) if n else (0.0, 0.0)
        ser = worse / (better + worse) if better + worse else 0.0
        return cls(accuracy, base, accuracy - base, low, high, better, worse, ser)

    @property
    def moved(self) -> int:
        """+1 / -1 when the 95% CI of the difference lies above / below 0, else 0."""
        return 1 if self.ci_low > 0 else -1 if self.ci_high < 0 else 0


def control_rank(accuracy: float, controls: Tensor) -> int:
    """1 + the number of control draws (rows of `controls`, (draws, n) per-item scores) at least as accurate."""
    return 1 + int((controls.double().mean(dim=1) >= accuracy).sum())


@dataclass
class MethodRow:
    """One row of a comparison table: a method answered on the same items as the unsteered model and the controls."""

    name: str  # key, e.g. "mi-A" (TensorBoard tags)
    label: str  # what the table shows, e.g. "SPARE (MI)-A"
    accuracy: float
    valid_rate: float
    accuracy_valid: float
    difference: float  # accuracy - unsteered accuracy
    ci_low: float  # paired bootstrap 95% CI of the difference
    ci_high: float
    better: int  # wrong -> right against unsteered
    worse: int  # right -> wrong
    ser: float
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
        unsteered, scores = unsteered.double().cpu(), scores.double().cpu()
        plain = ConditionResult.from_scores(label, scores, valid.cpu())
        better, worse = int((scores > unsteered).sum()), int((scores < unsteered).sum())
        low, high = paired_bootstrap_ci(unsteered, scores)
        p_values = {
            kind: control_rank(plain.accuracy, draws.cpu()) / (draws.shape[0] + 1)
            for kind, draws in (controls or {}).items()
        }
        difference = plain.accuracy - float(unsteered.mean())
        ser = worse / (better + worse) if better + worse else 0.0
        return cls(
            name, label, plain.accuracy, plain.valid_rate, plain.accuracy_valid, difference, low, high, better, worse,
            ser, p_values, features or [], scale, PairedAccuracy.from_scores(*choice) if choice is not None else None,
        )  # fmt: skip


def methods_table(rows: list[MethodRow]) -> str:
    """The comparison as Markdown: one row per method, p against each control kind."""
    kinds = list(dict.fromkeys(kind for row in rows for kind in row.p_values))
    head = ["method", "accuracy", "valid rate", "accuracy among valid", "vs unsteered [95% CI]"]
    head += ["better / worse", "SER"]
    with_choice = any(r.choice is not None for r in rows)
    head += ["choice-restricted accuracy (vs unsteered [95% CI])"] if with_choice else []
    lines = ["| " + " | ".join(head + [f"p vs {kind}" for kind in kinds] + ["scale", "features"]) + " |"]
    lines.append("|" + "---|" * (len(head) + len(kinds) + 2))
    for r in rows:
        cells = [r.label, f"{r.accuracy:.4f}", f"{r.valid_rate:.4f}", f"{r.accuracy_valid:.4f}"]
        cells += [f"{r.difference:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]", f"{r.better} / {r.worse}", f"{r.ser:.3f}"]
        if with_choice:
            c = r.choice
            cells.append(f"{c.accuracy:.4f} ({c.difference:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}])" if c else "")
        cells += [f"{r.p_values[k]:.3f}" if k in r.p_values else "" for k in kinds]
        cells.append(f"{r.scale:g}" if r.scale is not None else "")
        cells.append(", ".join(r.features) if r.features else ("none" if r.scale is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class ControlSummary:
    """How the selected steering compares with `draws` random steerings of one kind."""

    kind: str
    draws: int
    accuracy_mean: float
    accuracy_std: float
    accuracy_min: float
    accuracy_max: float
    valid_rate_mean: float
    rank: int  # 1 + number of draws with accuracy >= the selected steering's
    p_value: float  # rank / (draws + 1): permutation p-value of "selection beats random"
    difference: float  # steered accuracy - mean control accuracy
    ci_low: float
    ci_high: float
    accuracies: list[float] = field(default_factory=list)  # each draw's accuracy, for the figure

    @classmethod
    def from_scores(cls, kind: str, steered: Tensor, controls: Tensor, valid: Tensor) -> ControlSummary:
        acc = controls.double().mean(dim=1)  # (draws,)
        steered_acc = float(steered.double().mean())
        rank = control_rank(steered_acc, controls)
        low, high = control_bootstrap_ci(steered, controls)
        return cls(
            kind=kind,
            draws=controls.shape[0],
            accuracy_mean=float(acc.mean()),
            accuracy_std=float(acc.std()) if acc.numel() > 1 else 0.0,
            accuracy_min=float(acc.min()),
            accuracy_max=float(acc.max()),
            valid_rate_mean=float(valid.double().mean()),
            rank=rank,
            p_value=rank / (controls.shape[0] + 1),
            difference=steered_acc - float(acc.mean()),
            ci_low=low,
            ci_high=high,
            accuracies=acc.tolist(),
        )


def _beats(control: ControlSummary, alpha: float) -> tuple[bool, str]:
    """Does the steering beat this control kind, and by which test?

    With fewer than 1 / alpha - 1 draws the permutation p cannot reach alpha (6 draws: p >= 1/7), so the verdict
    then rests on the 95% CI over items and draws, and says so.
    """
    floor = 1 / (control.draws + 1)
    if floor < alpha:
        return control.p_value < alpha, f"permutation p < {alpha}"
    return control.ci_low > 0, (
        f"{control.draws} draws cannot give a permutation p below {floor:.3f}, so by the 95% CI over items "
        f"and draws, [{control.ci_low:+.4f}, {control.ci_high:+.4f}]"
    )


@dataclass
class EvaluationReport:
    """What `train.py test` found: accuracies, their paired difference, what changed, controls."""

    task: str
    split: str
    judge: str
    samples: int
    accuracy_unsteered: float
    accuracy_steered: float
    difference: float
    ci_low: float
    ci_high: float
    better: int  # wrong -> right
    worse: int  # right -> wrong
    ser: float  # worse / (worse + better); 0 when nothing changed
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
        better, worse = int((steered > unsteered).sum()), int((steered < unsteered).sum())
        low, high = paired_bootstrap_ci(unsteered, steered)
        n = max(unsteered.numel(), 1)
        conditions = [
            ConditionResult.from_scores("unsteered", unsteered, valid["unsteered"].cpu()),
            ConditionResult.from_scores("steered", steered, valid["steered"].cpu()),
        ]
        summaries = [
            ControlSummary.from_scores(kind, steered, scores.cpu(), control_valid.cpu())
            for kind, (scores, control_valid) in (controls or {}).items()
        ]
        return cls(
            task=task,
            split=split,
            judge=judge,
            samples=unsteered.numel(),
            accuracy_unsteered=float(unsteered.sum() / n),
            accuracy_steered=float(steered.sum() / n),
            difference=float((steered - unsteered).sum() / n),
            ci_low=low,
            ci_high=high,
            better=better,
            worse=worse,
            ser=worse / (better + worse) if better + worse else 0.0,
            conditions=conditions,
            controls=summaries,
            **extra,
        )

    def to_markdown(self) -> str:
        lines = [f"# CorrSteer evaluation: {self.task} ({self.split} split, {self.samples} items)", ""]
        lines += self._headline_lines() + self._conditions_table() + self._difference_lines()
        lines += self._control_lines() + (self.choice.markdown(self) if self.choice is not None else [])
        lines += self._features_table() + self._methods_lines() + self._selection_lines()
        lines += ["", "## Figures", "", *[f"![{name}]({name})" for name in self.figures]] if self.figures else []
        return "\n".join(lines) + "\n"

    def _selection_lines(self) -> list[str]:
        """The sections built from the export's selection.json; without it, each says why it is empty."""
        chosen, responds = CHOSEN_SECTION, RESPONDS_SECTION
        if not self.selection:
            folder = self.steering.get("path")
            where = f"the export folder {folder}" if folder else "the export"
            missing = (
                f"Not shown: {where} has no {SELECTION_FILE}, which this section is built from; re-run "
                "`train.py fit` with this config to write it."
            )
            return ["", chosen, "", missing, "", responds, "", missing]
        lines = ["", chosen, "", candidates_table(self.selection)]
        examples = examples_markdown(self.selection)
        return lines + (["", responds, "", examples] if examples else [])

    def _headline_lines(self) -> list[str]:
        if not self.features:
            return [f"**{nothing_steered(self.warnings)}.** Steered equals unsteered below.", ""]
        return [self.headline(), "", *[f"Warning: {w}" for w in self.warnings], *([""] if self.warnings else [])]

    def _conditions_table(self) -> list[str]:
        lines = [f"Judge: {self.judge}", "", *([f"Data: {self.data}", ""] if self.data else [])]
        lines += ["| condition | accuracy | valid-answer rate | accuracy among valid |", "|---|---|---|---|"]
        lines += [
            f"| {c.name} | {c.accuracy:.4f} | {c.valid_rate:.4f} | {c.accuracy_valid:.4f} |" for c in self.conditions
        ]
        return lines + [
            f"| {c.kind} control (mean of {c.draws}) | {c.accuracy_mean:.4f} ± {c.accuracy_std:.4f} "
            f"(min {c.accuracy_min:.4f}, max {c.accuracy_max:.4f}) | {c.valid_rate_mean:.4f} | |"
            for c in self.controls
        ]

    def _difference_lines(self) -> list[str]:
        return [
            "",
            f"Steered - unsteered: {self.difference:+.4f}, paired bootstrap 95% CI "
            f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}] ({RESAMPLES:,} resamples of items).",
            "",
            f"Answers changed: {self.better} wrong -> right, {self.worse} right -> wrong; "
            f"side-effect ratio (SER) {self.ser:.3f}.",
        ]

    def _control_lines(self) -> list[str]:
        lines = []
        for c in self.controls:
            lines += [
                "",
                f"Against {c.draws} {c.kind} controls: {c.difference:+.4f} "
                f"(95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}], resampling items and draws); "
                f"rank {c.rank} of {c.draws + 1}, permutation p = {c.p_value:.3f}.",
            ]
        lines += self._search_verdict()
        if any(c.kind == "search_matched" for c in self.controls):
            lines += [
                "",
                "The search-matched draws repeat P's search on random firing features: as many trials per layer as "
                "P had, the same paired test and Holm's correction over the draw's own trials; random features are "
                "not filtered by calibration q (almost none would pass), so each draw keeps what Holm keeps.",
            ]
        return lines

    def _methods_lines(self) -> list[str]:
        if not self.methods:
            return []
        return [
            "",
            f"## Comparison ({self.split} split, the same {self.samples} items)",
            "",
            "Each method is selected from this run's statistics with its options (candidates, paired test, "
            "scale grid on validation); p: permutation p of its accuracy among the control draws above "
            "(norm-matched to the exported steering).",
            *self._prompting_note(),
            "",
            methods_table(self.methods),
        ]

    def _prompting_note(self) -> list[str]:
        if not any(m.name.startswith("prompt") for m in self.methods):
            return []
        return [
            "",
            'Prompt rows: the instruction is written into every test prompt (on the line before "Answer:" for '
            'multiple choice, as the first line otherwise) and answered by its own pass; "+" rows also apply the '
            "export's steering. Each is compared with the unsteered model on the plain prompts; its p is against "
            "the controls on the plain prompts, not on the instructed ones.",
        ]

    @property
    def alpha(self) -> float:
        """The run's --selection.alpha (from the export's selection record; 0.05 for an export without one)."""
        return float(self.selection.get("settings", {}).get("alpha", 0.05))

    def __post_init__(self) -> None:
        # Each steered feature's Neuronpedia page, as selection.json has it, goes into report.json too.
        pages = self._pages()
        self.features = [
            f | {"neuronpedia_url": pages[(f["layer"], f["feature"])]} if pages.get((f["layer"], f["feature"])) else f
            for f in self.features
        ]

    def _pages(self) -> dict[tuple[int, int], str | None]:
        return {(f["layer"], f["feature"]): f.get("neuronpedia_url") for f in self.selection.get("chosen", [])}

    def _features_table(self) -> list[str]:
        """The steered features; a Neuronpedia column where selection.json has their pages (sae-lens releases)."""
        pages = self._pages()
        linked = any(pages.values())
        head = "| layer | feature | r | coefficient | activation frequency |" + (" Neuronpedia |" if linked else "")
        lines = ["", head, "|---|---|---|---|---|" + ("---|" if linked else "")]
        for f in self.features:
            row = f"| {f['layer']} | {f['feature']} | {f['r']:.4f} | {f['coefficient']:.4f} | {f['frequency']:.4f} |"
            url = pages.get((f["layer"], f["feature"]))
            lines.append(row + (f" [{f['feature']}]({url}) |" if url else " |" if linked else ""))
        return lines

    def headline(self) -> str:
        """One verdict that every check below agrees with: positive only if the chosen features are significant, the
        paired CI against unsteered excludes 0 from above, and the steering beats every control kind."""
        failed = []
        chosen = self.selection.get("chosen", [])
        if chosen and all(f.get("q_value") is not None for f in chosen):
            if not any(f["q_value"] < self.alpha for f in chosen):
                smallest = min(f["q_value"] for f in chosen)
                failed.append(f"its features are not significant (smallest q {smallest:.3f}, alpha {self.alpha})")
        if not self.ci_low > 0:
            failed.append(f"its 95% CI against unsteered, [{self.ci_low:+.4f}, {self.ci_high:+.4f}], is not above 0")
        for c in self.controls:
            if not _beats(c, self.alpha)[0]:
                failed.append(f"it does not beat the {c.kind} controls")
        if failed:
            return f"**Verdict: not shown to help.** {self.difference:+.4f} over unsteered, but {'; '.join(failed)}."
        kinds = ", ".join(c.kind for c in self.controls) or "no controls run"
        return (
            f"**Verdict: the steering helps.** {self.difference:+.4f} over unsteered (95% CI [{self.ci_low:+.4f}, "
            f"{self.ci_high:+.4f}]), significant features, and it beats every control kind ({kinds})."
        )

    def _search_verdict(self) -> list[str]:
        """What the search-matched control says about the unsearched one: selection, or the search's luck?"""
        by_kind = {c.kind: c for c in self.controls}
        searched, plain = by_kind.get("search_matched"), by_kind.get("random_feature")
        if searched is None or plain is None:
            return []
        beats, how = _beats(searched, self.alpha)
        if _beats(plain, self.alpha)[0] and not beats:
            verdict = (
                "the steering beats unsearched random features but not random features put through the same "
                "validation search: its edge may come from the search's chances, not from the correlation"
            )
        elif beats:
            verdict = "the steering beats random features put through the same validation search"
        else:
            verdict = "the steering does not beat random features put through the same validation search"
        return ["", f"Search-matched verdict ({how}): {verdict}."]

    def save(self, folder: str | Path, stem: str = "report") -> None:
        """Writes `<stem>.json` and `<stem>.md`."""
        folder = Path(folder)
        for name, text in ((f"{stem}.json", json.dumps(asdict(self), indent=2)), (f"{stem}.md", self.to_markdown())):
            with atomic_file(folder / name) as tmp:
                tmp.write_text(text)
