"""The report's "Side effects" section, its console lines and its scalars."""

from __future__ import annotations

from corrsteer_pl.evaluation.paired import PairedAccuracy
from corrsteer_pl.side_effects.costs import TEXT_MEASURES
from corrsteer_pl.side_effects.measure import SERVED, SideEffects
from corrsteer_pl.side_effects.open_generation import CHANGED_WITHIN, TextMeasures
from corrsteer_pl.side_effects.other_tasks import SideTaskResult

SECTION = "## Side effects"
RULE = (
    "A side measure counts as a cost when it moves in its bad direction by more than the tolerance ({tolerance:g}: "
    "accuracy and share points, relative for NLL and length) and by more than the tolerance beyond every random "
    "control draw of the same per-layer norms ({controls} random-feature and {controls} random-direction draws); "
    "an accuracy must also "
    "fall beyond its paired 95% CI. The served policy (every position) is judged the same way against the steering "
    "as exported: what serving it that way adds."
)


def _delta(p: PairedAccuracy) -> str:
    return f"{p.difference:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}]"


def summary(side: SideEffects, console: bool = False) -> str:
    """One sentence: what the steering costs, or that it stays within tolerance of its controls (`console`: the
    costs are in the verdict line above, so only their count, and the served policy's)."""
    if side.nothing:
        return f"Side effects: {side.nothing}."
    measured = _measured(side)
    served = f"; serving it at every position adds: {'; '.join(side.served_costs)}" if side.served_costs else ""
    if not measured:
        return f"Side effects: measured on the target only{served}."
    if side.costs and console:
        return f"Side effects ({measured}): {len(side.costs)} beyond tolerance and controls (in the verdict){served}."
    if side.costs:
        return f"Side effects ({measured}) beyond tolerance and controls: {'; '.join(side.costs)}{served}."
    return f"Side effects ({measured}) stay within tolerance ({side.tolerance:g}) of the random controls{served}."


def _measured(side: SideEffects) -> str:
    parts = [", ".join(t.task for t in side.tasks)] if side.tasks else []
    return ", ".join(parts + (["open generation"] if side.open_generation else []))


def section_lines(side: SideEffects | None) -> list[str]:
    """The whole section (a line saying it was not measured when `side` is None)."""
    lines = ["", SECTION, ""]
    if side is None:
        return lines + ["Not measured: turn on --side_effects.tasks / open_generation / served / dose."]
    if side.nothing:
        return lines + [f"**{side.nothing[0].upper()}{side.nothing[1:]}.**"]
    lines += [summary(side).replace("Side effects", "**Side effects**", 1), ""]
    lines += [RULE.format(tolerance=side.tolerance, controls=side.controls)]
    lines += _task_lines(side.tasks) + _open_lines(side) + _served_lines(side) + _dose_lines(side)
    return lines + ([""] + [f"Measured in {side.seconds:.0f} s."] if side.seconds else [])


def _task_lines(tasks: list[SideTaskResult]) -> list[str]:
    if not tasks:
        return []
    lines = ["", "### Other tasks (test items)", ""]
    lines += [
        "| task (judge) | items | unsteered | steered | vs unsteered [95% CI] | better / worse | choice-restricted "
        "vs unsteered | random controls (min - max) | every position vs unsteered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        controls = t.control_accuracies()
        drawn = f"{min(controls):.4f} - {max(controls):.4f} ({len(controls)})" if controls else "-"
        served = _delta(t.conditions[SERVED]) if SERVED in t.conditions else "-"
        choice = _delta(t.choice) if t.choice else "-"
        lines.append(
            f"| {t.task} ({t.judge}) | {t.items} | {t.unsteered.accuracy:.4f} | {t.steered.accuracy:.4f} | "
            f"{_delta(t.steered)} | {t.steered.better} / {t.steered.worse} | {choice} | {drawn} | {served} |"
        )
    return lines


def _measure_cells(m: TextMeasures) -> str:
    return " | ".join(f"{getattr(m, x.name):.3f}" for x in TEXT_MEASURES)


def _range_cells(draws: list[TextMeasures]) -> str:
    cells = []
    for x in TEXT_MEASURES:
        values = [getattr(d, x.name) for d in draws]
        cells.append(f"{sum(values) / len(values):.3f} ({min(values):.3f} - {max(values):.3f})")
    return " | ".join(cells)


def _open_lines(side: SideEffects) -> list[str]:
    og = side.open_generation
    if og is None:
        return []
    lines = ["", f"### Open generation ({og.prompts} shipped prompts, {og.tokens} greedy tokens)", ""]
    lines += [f"Changed: the first {CHANGED_WITHIN} tokens differ from the unsteered continuation's."]
    head = "| condition | " + " | ".join(x.label for x in TEXT_MEASURES) + " |"
    for rendering, measures in og.measures.items():
        lines += ["", f"{'Raw prompts' if rendering == 'raw' else 'Chat template'}:", "", head]
        lines.append("|---|" + "---|" * len(TEXT_MEASURES))
        lines += [f"| {name} | {_measure_cells(m)} |" for name, m in measures.items()]
        lines += [
            f"| {kind} ({len(draws)} draws: mean (min - max)) | {_range_cells(draws)} |"
            for kind, draws in og.controls[rendering].items()
            if draws
        ]
        for e in og.examples[rendering]:
            lines.append(f"- {e['prompt']!r}: unsteered {e['unsteered'][:80]!r} -> steered {e['steered'][:80]!r}")
    return lines


def _served_lines(side: SideEffects) -> list[str]:
    if side.target_served is None and not any(SERVED in t.conditions for t in side.tasks):
        return []
    lines = ["", "### The served policy (every position, as merged/, steering.gguf and lm_eval_steer.pt apply it)", ""]
    if side.target_served is not None:
        p = side.target_served
        lines.append(f"Target task: {p.unsteered:.4f} -> {p.accuracy:.4f}, {_delta(p)} ({p.better} / {p.worse}).")
    costs = side.served_costs
    lines.append(f"Its side costs: {'; '.join(costs)}." if costs else "Its side measures stay within tolerance.")
    return lines


def _dose_lines(side: SideEffects) -> list[str]:
    if not side.dose:
        return []
    tasks = list(side.dose[0].tasks)
    renderings = list(side.dose[0].open_changed)
    head = ["scale", "target vs unsteered", *[f"{t} vs unsteered" for t in tasks]]
    head += [f"changed ({r})" for r in renderings] + [f"NLL ({r})" for r in renderings]
    lines = ["", "### Dose and response (the export's scale grid)", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for row in side.dose:
        cells = [f"{row.scale:g}{' (export)' if row.exported else ''}", _delta(row.target) if row.target else "-"]
        cells += [f"{row.tasks[t].difference:+.4f}" for t in tasks]
        cells += [f"{row.open_changed[r]:.3f}" for r in renderings] + [f"{row.open_nll[r]:.3f}" for r in renderings]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def side_scalars(side: SideEffects, stage: str) -> dict[str, float]:
    """The section's figures as `stage/side/...` scalars for TensorBoard."""
    out = {f"{stage}/side/costs": float(len(side.costs)), f"{stage}/side/served_costs": float(len(side.served_costs))}
    for t in side.tasks:
        out |= {f"{stage}/side/{t.task}/{k}": float(getattr(t.steered, k)) for k in ("accuracy", "difference")}
        out[f"{stage}/side/{t.task}/accuracy_unsteered"] = t.unsteered.accuracy
    og = side.open_generation
    for rendering, measures in (og.measures if og else {}).items():
        for name, m in measures.items():
            out |= {f"{stage}/side/open_{rendering}/{name}/{x.name}": getattr(m, x.name) for x in TEXT_MEASURES}
    if side.target_served is not None:
        out[f"{stage}/side/served/target_difference"] = side.target_served.difference
    return out
