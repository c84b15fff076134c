"""report.md: the evaluation report rendered as Markdown (the verdict, conditions, paired difference, controls,
format or knowledge, side effects, features, comparison table, how the features were chosen, figures)."""

from __future__ import annotations

from corrsteer_pl.evaluation.choice_report import ChoiceReport
from corrsteer_pl.evaluation.paired import RESAMPLES, PairedAccuracy
from corrsteer_pl.evaluation.report import EvaluationReport, MethodRow
from corrsteer_pl.evaluation.verdict import headline, search_verdict
from corrsteer_pl.selection.diagnosis import nothing_steered
from corrsteer_pl.selection.evidence import SELECTION_FILE, candidates_table
from corrsteer_pl.selection.examples import examples_markdown
from corrsteer_pl.side_effects.markdown import section_lines as side_effects_lines

CHOSEN_SECTION = "## How the features were chosen (validation split)"
RESPONDS_SECTION = "## What the chosen features respond to (calibration split)"
SEARCH_NOTE = (
    "The search-matched draws repeat P's search on random firing features: as many trials per layer as P had, the "
    "same paired test and Holm's correction over the draw's own trials; random features are not filtered by "
    "calibration q (almost none would pass), so each draw keeps what Holm keeps."
)
PROMPTING_NOTE = (
    'Prompt rows: the instruction is written into every test prompt (on the line before "Answer:" for multiple '
    'choice, as the first line otherwise) and answered by its own pass; "+" rows also apply the export\'s steering. '
    "Each is compared with the unsteered model on the plain prompts; its p is against the controls on the plain "
    "prompts, not on the instructed ones."
)


def report_markdown(report: EvaluationReport) -> str:
    """The whole report.md."""
    lines = [f"# CorrSteer evaluation: {report.task} ({report.split} split, {report.samples} items)", ""]
    lines += _headline_lines(report) + _conditions_table(report)
    lines += difference_lines(report.paired, "Steered - unsteered")
    lines += _control_lines(report) + (choice_lines(report.choice, report) if report.choice is not None else [])
    lines += _features_table(report)
    lines += side_effects_lines(report.side_effects) if report.split == "test" else []
    lines += _methods_lines(report) + _selection_lines(report)
    lines += ["", "## Figures", "", *[f"![{name}]({name})" for name in report.figures]] if report.figures else []
    return "\n".join(lines) + "\n"


def interval(p: PairedAccuracy) -> str:
    """The difference and its paired 95% CI, e.g. "+0.0200 [-0.0100, +0.0500]"."""
    return f"{p.difference:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}]"


def _bootstrap(p: PairedAccuracy) -> str:
    return (
        f"{p.difference:+.4f}, paired bootstrap 95% CI [{p.ci_low:+.4f}, {p.ci_high:+.4f}] "
        f"({RESAMPLES:,} resamples of items)"
    )


def _changed(p: PairedAccuracy) -> str:
    return f"{p.better} wrong -> right, {p.worse} right -> wrong"


def difference_lines(p: PairedAccuracy, what: str) -> list[str]:
    """`what` (e.g. "Steered - unsteered"): the paired difference with its CI, then the answers that changed."""
    changed = f"Answers changed: {_changed(p)}; side-effect ratio (SER) {p.ser:.3f}."
    return ["", f"{what}: {_bootstrap(p)}.", "", changed]


def _headline_lines(report: EvaluationReport) -> list[str]:
    if not report.features:
        return [f"**{nothing_steered(report.warnings)}.** Steered equals unsteered below.", ""]
    verdict = headline(
        report.paired, report.controls, report.selection.get("chosen", []), report.alpha, report.side_effects
    )
    return [verdict, "", *[f"Warning: {w}" for w in report.warnings], *([""] if report.warnings else [])]


def _conditions_table(report: EvaluationReport) -> list[str]:
    lines = [f"Judge: {report.judge}", "", *([f"Data: {report.data}", ""] if report.data else [])]
    lines += ["| condition | accuracy | valid-answer rate | accuracy among valid |", "|---|---|---|---|"]
    lines += [
        f"| {c.name} | {c.accuracy:.4f} | {c.valid_rate:.4f} | {c.accuracy_valid:.4f} |" for c in report.conditions
    ]
    return lines + [
        f"| {c.kind} control (mean of {c.draws}) | {c.accuracy_mean:.4f} ± {c.accuracy_std:.4f} "
        f"(min {c.accuracy_min:.4f}, max {c.accuracy_max:.4f}) | {c.valid_rate_mean:.4f} | |"
        for c in report.controls
    ]


def _control_lines(report: EvaluationReport) -> list[str]:
    lines = []
    for c in report.controls:
        lines += [
            "",
            f"Against {c.draws} {c.kind} controls: {c.difference:+.4f} "
            f"(95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}], resampling items and draws); "
            f"rank {c.rank} of {c.draws + 1}, permutation p = {c.p_value:.3f}.",
        ]
    searched = search_verdict(report.controls, report.alpha)
    lines += ["", searched] if searched is not None else []
    return lines + (["", SEARCH_NOTE] if any(c.kind == "search_matched" for c in report.controls) else [])


def choice_lines(choice: ChoiceReport, report: EvaluationReport) -> list[str]:
    """The format-or-knowledge section: both accuracies side by side, the paired CI, the controls, the reading."""
    c, generated, valid = choice.steered, {k.kind: k for k in report.controls}, {r.name: r for r in report.conditions}
    rate = {name: f"{valid[name].valid_rate:.4f}" if name in valid else "" for name in ("unsteered", "steered")}
    lines = ["", "## Format or knowledge: choice-restricted accuracy", ""]
    lines += [
        "Choice-restricted: the option letter with the highest logit at the first answer position (argmax over "
        "the item's letters, each letter's forms 'A' and ' A' summed), as lm-eval's multiple-choice metric; "
        "read from the same pass, so every item has an answer and answering in the format cannot move it.",
        "",
        "| condition | generated-answer accuracy | valid-answer rate | choice-restricted accuracy |",
        "|---|---|---|---|",
        f"| unsteered | {report.paired.unsteered:.4f} | {rate['unsteered']} | {c.unsteered:.4f} |",
        f"| steered | {report.paired.accuracy:.4f} | {rate['steered']} | {c.accuracy:.4f} |",
    ]
    lines += [
        f"| {k.kind} control (mean of {k.draws}) | "
        f"{generated[k.kind].accuracy_mean if k.kind in generated else float('nan'):.4f} | | "
        f"{k.accuracy_mean:.4f} ± {k.accuracy_std:.4f} |"
        for k in choice.controls
    ]
    changed = f"answers changed: {_changed(c)}; SER {c.ser:.3f}"
    lines += ["", f"Choice-restricted steered - unsteered: {_bootstrap(c)}; {changed}."]
    lines += [
        f"Choice-restricted, against {k.draws} {k.kind} controls: {k.difference:+.4f} (95% CI [{k.ci_low:+.4f}, "
        f"{k.ci_high:+.4f}]); rank {k.rank} of {k.draws + 1}, permutation p = {k.p_value:.3f}."
        for k in choice.controls
    ]
    return lines + ["", f"**Reading:** {choice.reading}"]


def _features_table(report: EvaluationReport) -> list[str]:
    """The steered features; a Neuronpedia column where selection.json has their pages (sae-lens releases)."""
    pages = report.pages()
    linked = any(pages.values())
    head = "| layer | feature | r | coefficient | activation frequency |" + (" Neuronpedia |" if linked else "")
    lines = ["", head, "|---|---|---|---|---|" + ("---|" if linked else "")]
    for f in report.features:
        row = f"| {f['layer']} | {f['feature']} | {f['r']:.4f} | {f['coefficient']:.4f} | {f['frequency']:.4f} |"
        url = pages.get((f["layer"], f["feature"]))
        lines.append(row + (f" [{f['feature']}]({url}) |" if url else " |" if linked else ""))
    return lines


def _methods_lines(report: EvaluationReport) -> list[str]:
    if not report.methods:
        return []
    prompting = any(m.name.startswith("prompt") for m in report.methods)
    return [
        "",
        f"## Comparison ({report.split} split, the same {report.samples} items)",
        "",
        "Each method is selected from this run's statistics with its options (candidates, paired test, "
        "scale grid on validation); p: permutation p of its accuracy among the control draws above "
        "(norm-matched to the exported steering).",
        *(["", PROMPTING_NOTE] if prompting else []),
        "",
        methods_table(report.methods),
    ]


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
        p = r.paired
        cells = [r.label, f"{p.accuracy:.4f}", f"{r.valid_rate:.4f}", f"{r.accuracy_valid:.4f}"]
        cells += [interval(p), f"{p.better} / {p.worse}", f"{p.ser:.3f}"]
        if with_choice:
            cells.append(f"{r.choice.accuracy:.4f} ({interval(r.choice)})" if r.choice else "")
        cells += [f"{r.p_values[k]:.3f}" if k in r.p_values else "" for k in kinds]
        cells.append(f"{r.scale:g}" if r.scale is not None else "")
        cells.append(", ".join(r.features) if r.features else ("none" if r.scale is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _selection_lines(report: EvaluationReport) -> list[str]:
    """The sections built from the export's selection.json; without it, each says why it is empty."""
    if not report.selection:
        folder = report.steering.get("path")
        where = f"the export folder {folder}" if folder else "the export"
        missing = (
            f"Not shown: {where} has no {SELECTION_FILE}, which this section is built from; re-run "
            "`train.py fit` with this config to write it."
        )
        return ["", CHOSEN_SECTION, "", missing, "", RESPONDS_SECTION, "", missing]
    lines = ["", CHOSEN_SECTION, "", candidates_table(report.selection)]
    examples = examples_markdown(report.selection)
    return lines + (["", RESPONDS_SECTION, "", examples] if examples else [])
