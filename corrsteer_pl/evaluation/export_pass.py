"""The validate / test pass: the export's conditions (unsteered, steered, controls), one score column per
condition and batch, and the report that the columns of every item of every rank make."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from corrsteer_pl.calibration.stats import STATS_FILE, CorrelationStats, load_layer_stats
from corrsteer_pl.evaluation.choice_report import ChoiceReport, choice_scalars
from corrsteer_pl.evaluation.controls import ConditionSet, load_search_controls
from corrsteer_pl.evaluation.markdown import report_markdown
from corrsteer_pl.evaluation.methods import method_rows
from corrsteer_pl.evaluation.plots import report_figures, save_figure
from corrsteer_pl.evaluation.report import EvaluationReport
from corrsteer_pl.evaluation.verdict import headline
from corrsteer_pl.selection.diagnosis import nothing_steered
from corrsteer_pl.selection.evidence import SELECTION_FILE, read_selection
from corrsteer_pl.side_effects.markdown import side_scalars
from corrsteer_pl.side_effects.markdown import summary as side_summary
from corrsteer_pl.steering.vectors import SteeringVectors


def load_export(folder: Path, model: nn.Module) -> SteeringVectors:
    """The steering that fit exported to `folder` (--model.steering_path), checked against `model`."""
    if not (folder / "steering.json").exists():
        raise FileNotFoundError(
            f"no steering export at {folder}: run `train.py fit` with this config first, or set --model.steering_path"
        )
    steering = SteeringVectors.load(folder)
    steering.validate(model)
    return steering


def export_stats(folder: Path, needed_by: str, instead: str) -> dict[int, CorrelationStats]:
    """The export's correlation statistics; a missing file is one line saying what needs it and the two fixes
    (re-run fit to write it, or `instead`: do without what needs it)."""
    path = folder / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing, and {needed_by}: re-run `train.py fit` with this config to write it, or {instead}"
        )
    return load_layer_stats(path)


def export_conditions(
    steering: SteeringVectors, saes: dict[int, nn.Module], folder: Path, controls: int, seed: int
) -> ConditionSet:
    """Unsteered, steered and the random controls (with the export's search-matched draws), on the same items."""
    if not steering.layers:
        rank_zero_warn(nothing_steered(list(steering.info.get("warnings", []))))
    needed_by = "the random-feature controls (--model.controls) draw their features from it"
    without = "pass --model.controls 0 to run without controls"
    stats = export_stats(folder, needed_by, without) if controls and steering.layers else {}
    conditions = ConditionSet.with_random_controls(steering, saes, stats, controls, seed)
    searched = load_search_controls(folder) if controls else []
    if searched and steering.layers:
        conditions.controls["search_matched"] = searched
    return conditions


def build_report(
    conditions: ConditionSet,
    scores: Tensor,
    valid: Tensor,
    choice: Tensor | None,
    steering: SteeringVectors,
    folder: Path,
    **context: Any,
) -> EvaluationReport:
    """The report of (N, C) scores, valid flags and choice-restricted scores (None: not multiple choice);
    `context` gives task, split, judge and data."""
    column, control_scores = conditions.columns(scores)
    is_valid, control_valid = conditions.columns(valid)
    choice_column, choice_controls = conditions.columns(choice) if choice is not None else ({}, {})
    report = EvaluationReport.from_scores(
        column["unsteered"],
        column["steered"],
        valid=is_valid,
        controls={kind: (control_scores[kind], control_valid[kind]) for kind in control_scores},
        features=[asdict(f) for layer in steering.layers.values() for f in layer.features],
        steering={"path": str(folder), **steering.info},
        warnings=list(steering.info.get("warnings", [])),
        selection=selection_record_of(folder),
        methods=method_rows(conditions, column, is_valid, control_scores, choice_column),
        **context,
    )
    if choice is not None:
        report.choice = ChoiceReport.from_scores(
            choice_column["unsteered"], choice_column["steered"], choice_controls, report.paired, report.conditions
        )
    return report


def selection_record_of(folder: Path) -> dict[str, Any]:
    """The export's selection.json record; without the file, a warning that the report says what it cannot show."""
    if not (folder / SELECTION_FILE).is_file():
        rank_zero_warn(
            f"{folder / SELECTION_FILE} is missing: report.md says so in place of how the features were chosen and "
            "what they respond to; re-run `train.py fit` with this config to write it"
        )
    return read_selection(folder)


def report_scalars(report: EvaluationReport, stage: str) -> dict[str, float]:
    """The report's figures as `stage/name` scalars for the loggers (the paired ones under report.json's names)."""
    out = {f"{stage}/{name}": float(value) for name, value in report.paired.as_report().items()}
    out[f"{stage}/samples"] = float(report.samples)
    for c in report.conditions:
        out |= {f"{stage}/{c.name}/valid_rate": c.valid_rate, f"{stage}/{c.name}/accuracy_valid": c.accuracy_valid}
    for c in report.controls:
        out |= {f"{stage}/{c.kind}/accuracy_mean": c.accuracy_mean, f"{stage}/{c.kind}/p_value": c.p_value}
    for m in report.methods:
        out |= {f"{stage}/method/{m.name}/{k}": float(getattr(m.paired, k)) for k in ("accuracy", "difference", "ser")}
        if m.choice is not None:
            out |= {f"{stage}/method/{m.name}/choice_{k}": getattr(m.choice, k) for k in ("accuracy", "difference")}
    out |= side_scalars(report.side_effects, stage) if report.side_effects is not None else {}
    return out | (choice_scalars(report.choice, stage) if report.choice is not None else {})


def report_stem(split: str) -> str:
    """The report files' name: report.md / report.json for test, `<split>_report` for another split."""
    return "report" if split == "test" else f"{split}_report"


def console_summary(report: EvaluationReport, folder: Path) -> str:
    """The lines a validate / test run ends with: the comparison, the report's verdict, its reading (multiple
    choice: format or knowledge) and where report.md is; the figures are in the report and TensorBoard."""
    p = report.paired
    compared = (
        f"{report.task}, {report.split} split, {report.samples} items: accuracy {p.unsteered:.4f} unsteered -> "
        f"{p.accuracy:.4f} steered ({p.difference:+.4f}, 95% CI [{p.ci_low:+.4f}, {p.ci_high:+.4f}]); answers "
        f"changed: {p.better} wrong -> right, {p.worse} right -> wrong"
    )
    chosen = report.selection.get("chosen", [])
    verdict = (
        headline(p, report.controls, chosen, report.alpha, report.side_effects)
        if report.features
        else f"{nothing_steered(report.warnings)}: steered equals unsteered"
    )
    reading = [f"Reading: {report.choice.reading}"] if report.choice is not None and report.choice.reading else []
    side = [side_summary(report.side_effects, console=True)] if report.side_effects is not None else []
    where = f"Report: {folder / report_stem(report.split)}.md (report.json and the figures beside it)"
    return "\n".join([compared, verdict.replace("**", ""), *reading, *side, where])


def save_report(report: EvaluationReport, folder: Path, split: str, stage: str, loggers: list, step: int) -> None:
    """Writes report.md / report.json beside the export (`<split>_report` outside test), its figures as PNG, and
    the text and figures to TensorBoard."""
    stem = report_stem(split)
    stats = load_layer_stats(folder / STATS_FILE) if (folder / STATS_FILE).exists() else {}
    figures = report_figures(report, stats)
    boards = [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]
    for name, fig in figures.items():
        for board in boards:
            board.add_figure(f"{stage}/{name}", fig, step, close=False)
        report.figures.append(save_figure(fig, folder / f"{stem}_{name}.png").name)
    markdown = report_markdown(report)
    report.save(folder, markdown, stem=stem)
    for board in boards:
        board.add_text(f"{stage}/report", markdown, step)
