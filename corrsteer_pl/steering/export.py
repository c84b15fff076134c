"""The export folder: the steering, its statistics and evidence, its search-matched draws and serving formats,
written whole or not at all (`--export.*` on the command line)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from corrsteer_pl.calibration.stats import STATS_FILE, CorrelationStats, save_layer_stats
from corrsteer_pl.errors import OptionError
from corrsteer_pl.export import FORMATS, export_folder, write_formats
from corrsteer_pl.selection.evidence import write_selection
from corrsteer_pl.steering.vectors import SteeringVectors

SEARCH_CONTROLS_DIR = "search_controls"
"""Export subfolder with one steering per search-matched control draw (`0/`, `1/`, ...; an empty one steers nothing)."""


@dataclass(frozen=True)
class ExportOptions:
    """What the export folder holds besides the steering, its statistics and its evidence."""

    formats: tuple[str, ...] = ()
    """Also write gguf (steering.gguf, llama.cpp control vector) and/or merged (merged/, HF folder with the steering
    in the MLP biases); both steer every position, the prompt included."""
    include_model: bool = False
    """Also write the base model's weights into the export (it then stands alone)."""

    def __post_init__(self) -> None:
        formats = tuple(dict.fromkeys(self.formats or ()))
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise OptionError(
                self.__class__, "formats", f"must name formats from {', '.join(FORMATS)}; got {', '.join(unknown)}"
            )
        object.__setattr__(self, "formats", formats)


def write_export(
    folder: str | Path,
    steering: SteeringVectors,
    *,
    stats: Mapping[int, CorrelationStats] | None = None,
    record: dict[str, Any] | None = None,
    search_controls: Sequence[SteeringVectors] = (),
    options: ExportOptions = ExportOptions(),
    model: nn.Module | None = None,
    tokenizer: Any = None,
    note: Callable[[str], None] | None = None,
) -> list[str]:
    """Writes the export folder that `train.py fit` writes, atomically: a failure leaves any previous export whole.

    `stats` (a `Calibration`'s `.stats`) become statistics.safetensors (the controls and the comparison of
    `train.py test` need them); `record` becomes selection.json (`selection.evidence.selection_record`);
    `search_controls` go to search_controls/<i>/; `options.formats` need `model` (and `tokenizer` for merged).
    Files in `folder` that an export does not write (an earlier `test` report, a user's notes) are kept, and
    `note` hears which. Returns the warnings of formats the steering could not take (the main export lands).
    """
    if options.formats and model is None:
        raise ValueError("write_export: serving formats need the base model: pass model=")
    warnings = []
    with export_folder(folder, note=note) as tmp:
        standalone = model if options.include_model else None
        steering.save(tmp, model=standalone, tokenizer=tokenizer if standalone is not None else None)
        if stats is not None:
            save_layer_stats(dict(stats), tmp / STATS_FILE)
        if record is not None:
            write_selection(tmp, record)
        for i, control in enumerate(search_controls):
            control.save(tmp / SEARCH_CONTROLS_DIR / str(i))
        for fmt in options.formats:
            try:
                write_formats(tmp, steering, model, tokenizer, [fmt])
            except ValueError as err:
                warnings.append(f"{fmt} not written: {err}")
    return warnings
