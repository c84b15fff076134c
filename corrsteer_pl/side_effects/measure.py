"""The side-effects pass: the steering as exported, on other tasks and on open generation, beside its controls,
under the served policy and along its scale grid; `measure_side_effects` is the one entry (the test pass and a
notebook alike)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.errors import OptionError
from corrsteer_pl.evaluation.controls import ConditionSet
from corrsteer_pl.evaluation.labels import steering_label
from corrsteer_pl.evaluation.paired import PairedAccuracy
from corrsteer_pl.side_effects.costs import accuracy_cost, text_costs
from corrsteer_pl.side_effects.open_generation import OpenGeneration, open_generation
from corrsteer_pl.side_effects.options import SideEffectsOptions
from corrsteer_pl.side_effects.other_tasks import SideTaskResult, side_task_result
from corrsteer_pl.steering.vectors import SteeringVectors
from corrsteer_pl.tasks import get_task
from corrsteer_pl.tasks.base import Task

SERVED = "steered-all-positions"
"""The served policy's condition: the export's vectors at every position, the prompt included."""
NOTHING = "the export steers nothing: there is no side effect to measure"


@dataclass
class DoseRow:
    """The steering at one scale of its grid: the target's change and each side measure's."""

    scale: float
    exported: bool
    target: PairedAccuracy | None = None
    """On the target's test items (filled from the test pass's rows)."""
    tasks: dict[str, PairedAccuracy] = field(default_factory=dict)
    open_changed: dict[str, float] = field(default_factory=dict)
    """rendering -> share of continuations changed."""
    open_nll: dict[str, float] = field(default_factory=dict)


@dataclass
class SideEffects:
    """What else the steering changes, and which of it counts as a cost (`costs`; the verdict reads them)."""

    tolerance: float
    controls: int
    tasks: list[SideTaskResult] = field(default_factory=list)
    open_generation: OpenGeneration | None = None
    target_served: PairedAccuracy | None = None
    """The target's accuracy under the served policy against unsteered (filled from the test pass's rows)."""
    dose: list[DoseRow] = field(default_factory=list)
    costs: list[str] = field(default_factory=list)
    """Side effects of the steering as exported (generation positions) beyond tolerance and controls."""
    served_costs: list[str] = field(default_factory=list)
    """The served policy's (every position) side effects beyond tolerance and beyond the steering as exported."""
    nothing: str | None = None
    """Why nothing was measured (an empty steering), else None."""
    seconds: float = 0.0


def scale_conditions(steering: SteeringVectors) -> dict[str, SteeringVectors]:
    """The steering at every other scale of its grid, by name "scale=<s>" (its vectors rescaled)."""
    scale = steering.info.get("scale")
    grid = sorted(float(s) for s in steering.info.get("scale_grid") or {})  # steering.json: {"0.5": figures, ...}
    if not scale:
        return {}
    return {f"scale={s:g}": rescaled(steering, s / scale, s) for s in grid if s != scale}


def rescaled(steering: SteeringVectors, factor: float, scale: float) -> SteeringVectors:
    """The steering with its vectors times `factor`, labelled as the export at `scale`."""
    layers = {layer: replace(s, vector=s.vector * factor) for layer, s in steering.layers.items()}
    label = f"{_own(steering)} x{scale:g}"
    return replace(steering, layers=layers, info=steering.info | {"scale": scale, "label": label})


def served(steering: SteeringVectors) -> SteeringVectors:
    """The served policy: the export's vectors at every position, the prompt included."""
    label = f"{_own(steering)} (export, every position)"
    return replace(steering, positions="all", info=steering.info | {"label": label})


def _own(steering: SteeringVectors) -> str:
    return steering_label(steering.info)


def target_conditions(steering: SteeringVectors, options: SideEffectsOptions) -> dict[str, SteeringVectors]:
    """What the side-effects pass adds to the target's own test pass (as comparison rows): the served policy and
    the other scales, as `options` asks; nothing for an empty steering."""
    if not steering.layers:
        return {}
    out = {SERVED: served(steering)} if options.served else {}
    return out | (scale_conditions(steering) if options.dose else {})


def add_target(side: SideEffects, rows: Mapping[str, PairedAccuracy]) -> None:
    """Fills the target's figures from its test pass: `rows` maps "steered" and `target_conditions`' names to
    their accuracy against unsteered on the target's test items."""
    side.target_served = rows.get(SERVED)
    for row in side.dose:
        row.target = rows.get("steered" if row.exported else f"scale={row.scale:g}")


def side_conditions(
    steering: SteeringVectors,
    saes: Mapping[int, nn.Module],
    stats: Mapping[int, CorrelationStats],
    options: SideEffectsOptions,
    seed: int = 0,
) -> ConditionSet:
    """Unsteered, the steering, the served policy and other scales (as asked), and `options.controls` draws of each
    control kind (the first draws of the target's own controls with the same seed)."""
    conditions = ConditionSet.with_random_controls(steering, saes, stats, options.controls, seed)
    conditions.methods |= target_conditions(steering, options)
    return conditions


def build_side_tasks(names: Sequence[str], seed: int, source: str | None = None) -> list[Task]:
    """The side tasks by registry name, split with `seed`: from the hub when the target's `source` is "hub" (a hub
    job need not have the offline packages), else each from its default source (a target's own file is not theirs)."""
    hub = {"source": "hub"} if source == "hub" else {}
    return [get_task(name, seed=seed, **hub) for name in names]


def measure_side_effects(
    model: nn.Module,
    tokenizer: Any,
    steering: SteeringVectors,
    saes: Mapping[int, nn.Module],
    stats: Mapping[int, CorrelationStats],
    options: SideEffectsOptions,
    tasks: Sequence[Task] = (),
    *,
    control_seed: int = 0,
    batch_size: int = 16,
    chat_template: bool = False,
) -> SideEffects:
    """The side-effects pass of `steering` (the export: `SteeringVectors.load(folder)`): `tasks`' test items (at
    most `options.items` each, under `chat_template` as the target's) and, with `options.open_generation`, the
    shipped open-generation prompts, each beside random controls drawn from `stats` (the export's statistics);
    the served policy and the scale grid as `options` asks. An empty steering measures nothing and says so."""
    started = time.perf_counter()
    side = SideEffects(options.tolerance, options.controls)
    if not steering.layers:
        side.nothing = NOTHING
        return side
    missing = sorted(set(steering.layers) - set(stats)) if options.controls else []
    if missing:
        raise OptionError(
            "measure_side_effects", "stats", f"has no statistics for layer {missing[0]}, which the random-feature "
            "controls draw from: pass the export's (load_layer_stats(<export>/statistics.safetensors)), or "
            "SideEffectsOptions(controls=0)",
        )  # fmt: skip
    conditions = side_conditions(steering, saes, stats if options.controls else {}, options, control_seed)
    for task in tasks:
        examples = task.load_split("test")[: options.items]
        side.tasks.append(side_task_result(model, tokenizer, task, examples, conditions, batch_size, chat_template))
    if options.open_generation:
        named = {"unsteered": None, "steered": steering} | conditions.methods
        side.open_generation = open_generation(
            model, tokenizer, named, conditions.controls, options.open_tokens, batch_size
        )
    judge_costs(side)
    side.dose = dose_rows(side, steering)
    side.seconds = time.perf_counter() - started
    return side


def judge_costs(side: SideEffects) -> None:
    """Fills `costs` (the steering as exported, against its controls) and `served_costs` (the served policy against
    the steering as exported: what serving it at every position adds) by the rule of `side_effects.costs`."""
    for t in side.tasks:
        side.costs.append(accuracy_cost(t.task, t.steered, t.control_accuracies(), side.tolerance))
        if SERVED in t.conditions:
            served = accuracy_cost(t.task, t.conditions[SERVED], [t.steered.accuracy], side.tolerance, "the export")
            side.served_costs.append(served)
    og = side.open_generation
    for rendering, measures in (og.measures if og else {}).items():
        drawn = [m for draws in og.controls[rendering].values() for m in draws]
        where, base, steered = f"open generation ({rendering})", measures["unsteered"], measures["steered"]
        side.costs += text_costs(where, steered, base, drawn, side.tolerance)
        if SERVED in measures:
            side.served_costs += text_costs(where, measures[SERVED], base, [steered], side.tolerance, "the export")
    side.costs = [c for c in side.costs if c]
    side.served_costs = [c for c in side.served_costs if c]


def dose_rows(side: SideEffects, steering: SteeringVectors) -> list[DoseRow]:
    """One row per scale measured: the export's own scale and each "scale=<s>" condition."""
    names = {"steered": steering.info.get("scale")} | {
        name: float(name.split("=", 1)[1]) for name in scale_conditions(steering)
    }
    og = side.open_generation
    rows = []
    for name, scale in names.items():
        if name != "steered" and not any(name in t.conditions for t in side.tasks) and not (og and _has(og, name)):
            continue
        row = DoseRow(float(scale or 0.0), name == "steered")
        row.tasks = {t.task: t.steered if name == "steered" else t.conditions[name] for t in side.tasks}
        for rendering, measures in (og.measures if og else {}).items():
            row.open_changed[rendering] = measures[name].changed
            row.open_nll[rendering] = measures[name].nll
        rows.append(row)
    return sorted(rows, key=lambda r: r.scale) if len(rows) > 1 else []


def _has(og: OpenGeneration, name: str) -> bool:
    return all(name in measures for measures in og.measures.values())
