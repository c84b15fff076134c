"""CorrSteer from Python: calibrate, select, steer and export, the same code `train.py` runs.

    >>> from corrsteer_pl import calibrate, select, load_model, load_saes, get_task, SelectionOptions, SteeringVectors
    >>> model, tokenizer = load_model("tiny-random")
    >>> saes = load_saes(["tiny-random:layer_0", "tiny-random:layer_1"], model)
    >>> task = get_task("synthetic")
    >>> calibration = calibrate(model, tokenizer, saes, task.load_split("calibration"), task)
    >>> selection = select(calibration, SelectionOptions(variant="A", require_significance=False))
    >>> steering = SteeringVectors.from_selection(selection, saes, model)
    >>> with steering.apply(model):
    ...     out = model.generate(**tokenizer(["Q: 2+2? A:"], return_tensors="pt"), max_new_tokens=4)

P (and a scale grid) validate on held-out items: `select(calibration, SelectionOptions(variant="P"),
Validator.for_examples(model, tokenizer, saes, task, task.load_split("validation")))`. `write_export(folder, ...)`
writes the folder `train.py fit` writes; `Calibration.save` / `load` keep a calibration, `merge` adds another.
`measure_side_effects(model, tokenizer, steering, saes, stats, SideEffectsOptions(...), tasks)` says what else a
steering changes (other tasks, open generation, the served policy), beside random controls, as `train.py test` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from corrsteer_pl.calibration.answer_cache import AnswerCache
from corrsteer_pl.calibration.calibration import Calibration, calibration_batch
from corrsteer_pl.calibration.options import CalibrationOptions, check_target
from corrsteer_pl.models.loading import SAESpec, load_frozen_lm, load_sae_set
from corrsteer_pl.selection.evidence import sae_neuronpedia_ids, selection_record
from corrsteer_pl.selection.examples import add_top_examples, example_index, reanswer
from corrsteer_pl.selection.options import SelectionOptions
from corrsteer_pl.selection.select import select, select_many
from corrsteer_pl.selection.variants import Selection
from corrsteer_pl.steering.export import ExportOptions, write_export
from corrsteer_pl.steering.vectors import SteeringVectors
from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.batching import ShardedBatches


def load_model(name: str, revision: str | None = None, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """A frozen causal LM in eval mode and its tokenizer (left padding): a hub id, a local folder, or one of the
    offline names (`smollm2-135m-instruct`, `tiny-random`)."""
    return load_frozen_lm(name, revision, dtype)


def load_saes(specs: Sequence[str | SAESpec], model: nn.Module, dtype: str = "float32") -> dict[int, nn.Module]:
    """SAEs by the layer whose output they read: each a local sae-lens folder, `release:sae_id` (a sae-lens release,
    e.g. `gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical`) or an `SAESpec`; checked against `model`."""
    parsed = [s if isinstance(s, SAESpec) else SAESpec(*s.split(":", 1)) if ":" in s else SAESpec(s) for s in specs]
    return load_sae_set(parsed, model, dtype)[0]


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    saes: Mapping[int, nn.Module],
    examples: list[Example],
    task: Any,
    *,
    options: CalibrationOptions = CalibrationOptions(),
    batch_size: int = 8,
    chat_template: bool = False,
    answers: AnswerCache | None = None,
) -> Calibration:
    """Answers `examples` greedily with `task`'s answer budget, reads every SAE's features at the generation
    positions, judges each answer by `task`, and keeps per layer the streaming Pearson statistics, bootstrap
    replicates and top examples (`Calibration`).

    Batches are the prompts sorted longest first, left-padded, `batch_size` at a time (as `train.py fit` on one
    process makes them); `chat_template` wraps each prompt in the tokenizer's chat template; `answers` holds
    one-token answers recorded earlier (SAE training), read instead of running the model.
    """
    if not examples:
        raise ValueError("calibrate: examples is empty: pass the task's calibration examples")
    check_target(options.target, bool(examples[0].choices), task.name)
    calibration = Calibration.for_saes(saes, options, num_samples=len(examples))
    for batch in ShardedBatches(examples, batch_size, tokenizer, chat_template=chat_template):
        calibration.update(calibration_batch(model, tokenizer, saes, batch, task, options, answers))
    return calibration


def export_selection(
    folder: str | Path,
    selection: Selection,
    calibration: Calibration,
    saes: Mapping[int, nn.Module],
    model: nn.Module,
    *,
    tokenizer: Any = None,
    options: ExportOptions = ExportOptions(),
    examples: list[Example] | None = None,
    task: Any = None,
    chat_template: bool = False,
    answers: AnswerCache | None = None,
    sae_sources: Mapping[int, str] | None = None,
    info: dict[str, Any] | None = None,
    note: Callable[[str], None] | None = None,
) -> tuple[SteeringVectors, list[str]]:
    """Exports `selection` to `folder` as `train.py fit` does: the steering, the statistics, selection.json (with
    each candidate's top examples when the calibration `examples` and `task` are given: their prompts are answered
    again, unsteered), the search-matched draws and `options.formats`. Returns the steering and the warnings of
    serving formats it could not take. `info` adds to steering.json's `info` (e.g. the task's name)."""
    steering = selection_steering(selection, calibration, saes, model, sae_sources, info)
    record = selection_record(
        selection, selection.evidence, selection.warnings, _settings(selection, calibration), sae_neuronpedia_ids(saes)
    )
    if examples and task is not None and any(top.k for top in calibration.tops.values()):
        reanswered = lambda wanted: reanswer(model, tokenizer, task, wanted, chat_template, answers)  # noqa: E731
        decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
        add_top_examples(record, calibration.tops, example_index(examples), reanswered, decode)
    controls = [SteeringVectors.from_selection(kept, saes, model) for kept, _ in selection.search_controls]
    warnings = write_export(
        folder,
        steering,
        stats=calibration.stats,
        record=record,
        search_controls=controls,
        options=options,
        model=model,
        tokenizer=tokenizer,
        note=note,
    )
    return steering, warnings


def selection_steering(
    selection: Selection,
    calibration: Calibration,
    saes: Mapping[int, nn.Module],
    model: nn.Module,
    sae_sources: Mapping[int, str] | None = None,
    info: dict[str, Any] | None = None,
) -> SteeringVectors:
    """The steering of `selection`, with what steering.json says of how it was made."""
    o = selection.options or SelectionOptions(variant=selection.variant, ranking=selection.ranking)
    about = {"variant": selection.variant, "ranking": selection.ranking, "scale": selection.scale}
    about |= {"scale_grid": selection.scale_grid, "active_only": o.active_only}
    about |= {"samples_seen": calibration.num_samples, "positive_rate": calibration.positive_rate}
    about |= {"pooling": calibration.options.pooling} | (info or {})
    about |= {"validation": selection.validation, "warnings": selection.warnings}
    return SteeringVectors.from_selection(selection, saes, model, sae_sources, info=about)


def _settings(selection: Selection, calibration: Calibration) -> dict[str, Any]:
    """selection.json's `settings`: the options the selection and the calibration ran under."""
    o = selection.options or SelectionOptions(variant=selection.variant, ranking=selection.ranking)
    settings = {"variant": o.variant, "ranking": o.ranking, "candidates": o.candidates, "alpha": o.alpha}
    settings |= {"bootstrap": calibration.options.bootstrap, "scale": selection.scale, "top_k": o.top_k}
    settings |= {"search_draws": len(selection.search_controls), "require_significance": o.require_significance}
    return settings | {"target": calibration.options.target}


__all__ = [
    "Calibration",
    "CalibrationOptions",
    "ExportOptions",
    "SelectionOptions",
    "calibrate",
    "export_selection",
    "selection_steering",
    "load_model",
    "load_saes",
    "select",
    "select_many",
    "write_export",
]
