"""What the report concludes, in words: the headline verdict, the search-matched verdict, and the reading of the
generated-answer against the choice-restricted accuracy (format or knowledge)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corrsteer_pl.evaluation.control_summary import ControlSummary
from corrsteer_pl.evaluation.paired import ConditionResult, PairedAccuracy
from corrsteer_pl.side_effects.measure import SideEffects


def beats(control: ControlSummary, alpha: float) -> tuple[bool, str]:
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


def headline(
    paired: PairedAccuracy,
    controls: Sequence[ControlSummary],
    chosen: Sequence[dict[str, Any]],
    alpha: float,
    side: SideEffects | None = None,
) -> str:
    """One verdict that every check below agrees with: positive only if the `chosen` features (selection.json's)
    are significant, the paired CI against unsteered excludes 0 from above, and the steering beats every control
    kind; with `side` (the side-effects pass), "helps" also needs every side effect within tolerance of the controls,
    else the verdict says what the gain costs."""
    failed = []
    if chosen and all(f.get("q_value") is not None for f in chosen):
        if not any(f["q_value"] < alpha for f in chosen):
            smallest = min(f["q_value"] for f in chosen)
            failed.append(f"its features are not significant (smallest q {smallest:.3f}, alpha {alpha})")
    if not paired.ci_low > 0:
        failed.append(f"its 95% CI against unsteered, [{paired.ci_low:+.4f}, {paired.ci_high:+.4f}], is not above 0")
    failed += [f"it does not beat the {c.kind} controls" for c in controls if not beats(c, alpha)[0]]
    costs = f" What it changes beyond its controls elsewhere: {'; '.join(side.costs)}." if side and side.costs else ""
    if failed:
        but = f"but {'; '.join(failed)}.{costs}"
        return f"**Verdict: not shown to help.** {paired.difference:+.4f} over unsteered, {but}"
    kinds = ", ".join(c.kind for c in controls) or "no controls run"
    gain = (
        f"{paired.difference:+.4f} over unsteered (95% CI [{paired.ci_low:+.4f}, {paired.ci_high:+.4f}]), "
        f"significant features, and it beats every control kind ({kinds})"
    )
    if costs:
        return f"**Verdict: the steering helps its task, at a cost.** {gain}.{costs}"
    return f"**Verdict: the steering helps.** {gain}{_side_clause(side)}."


def _side_clause(side: SideEffects | None) -> str:
    if side is None or side.nothing:
        return "; its side effects were not measured"
    where = [t.task for t in side.tasks] + (["open generation"] if side.open_generation else [])
    if not where:
        return "; its side effects were not measured"
    return f"; its side effects ({', '.join(where)}) stay within tolerance ({side.tolerance:g}) of its controls"


def search_verdict(controls: Sequence[ControlSummary], alpha: float) -> str | None:
    """What the search-matched control says about the unsearched one: selection, or the search's luck? None
    without both kinds."""
    by_kind = {c.kind: c for c in controls}
    searched, plain = by_kind.get("search_matched"), by_kind.get("random_feature")
    if searched is None or plain is None:
        return None
    beaten, how = beats(searched, alpha)
    if beats(plain, alpha)[0] and not beaten:
        verdict = (
            "the steering beats unsearched random features but not random features put through the same "
            "validation search: its edge may come from the search's chances, not from the correlation"
        )
    elif beaten:
        verdict = "the steering beats random features put through the same validation search"
    else:
        verdict = "the steering does not beat random features put through the same validation search"
    return f"Search-matched verdict ({how}): {verdict}."


def reading(
    generated: PairedAccuracy, choice: PairedAccuracy, unsteered: ConditionResult, steered: ConditionResult
) -> str:
    """Which of the two accuracies moved beyond its paired 95% CI, in words."""
    g = f"generated-answer accuracy {_moved(generated)}"
    c = f"choice-restricted accuracy {_moved(choice)}"
    rates = (
        f"valid-answer rate {unsteered.valid_rate:.3f} -> {steered.valid_rate:.3f}, accuracy among valid "
        f"{unsteered.accuracy_valid:.3f} -> {steered.accuracy_valid:.3f}"
    )
    if generated.moved and not choice.moved:
        return (
            f"a format effect, not knowledge: the {g} ({rates}), but the {c}. The steering changed how the model "
            "answers, not which option it ranks first."
        )
    if choice.moved and not generated.moved:
        return (
            f"the {c}, but the {g} ({rates}): the steering changed which option the model ranks first without "
            "changing enough of what it writes to show in the generated answers."
        )
    if generated.moved and choice.moved and generated.moved == choice.moved:
        return (
            f"both moved: the {g} ({rates}) and the {c}. The steering changed which option the model ranks "
            "first, not only how it answers."
        )
    if generated.moved and choice.moved:
        return f"the two moved in opposite directions: the {g} ({rates}), while the {c}."
    return f"neither moved beyond its 95% CI: the {g} ({rates}), and the {c}."


def _moved(p: PairedAccuracy) -> str:
    verb = {1: "rose", -1: "fell", 0: "did not move (its CI holds 0)"}[p.moved]
    return f"{verb}: {p.unsteered:.4f} -> {p.accuracy:.4f}, {p.difference:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}]"
