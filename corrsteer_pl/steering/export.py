"""The export folder: the steering, its statistics and evidence, its search-matched draws and serving formats,
written whole or not at all (`--export.*` on the command line)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from corrsteer_pl.calibration.stats import STATS_FILE, CorrelationStats, save_layer_stats
from corrsteer_pl.errors import OptionError
from corrsteer_pl.files.atomic import Owned, atomic_folder, owned_names, write_errors
from corrsteer_pl.selection.evidence import SELECTION_FILE, write_selection
from corrsteer_pl.steering.formats import FORMATS, write_formats
from corrsteer_pl.steering.owned import SAVED_MODEL
from corrsteer_pl.steering.serving import CONTROL_VECTOR_FILE, MERGED_DIR
from corrsteer_pl.steering.vectors import LM_EVAL_FILE, META_FILE, MODEL_DIR, VECTORS_FILE, SteeringVectors

SEARCH_CONTROLS_DIR = "search_controls"
"""Export subfolder with one steering per search-matched control draw (`0/`, `1/`, ...; an empty one steers nothing)."""


def export_names() -> dict[str, tuple[str, ...] | None]:
    """{name: None (owned whole) or the names owned inside}: every name an export writes into its folder
    (`write_export`, `SteeringVectors.save`, `corrsteer-export`). A re-export replaces or removes these and keeps
    everything else: `train.py test` writes report.md / report.json and figures beside the export, and a user may
    keep notes there."""
    whole = dict.fromkeys((META_FILE, VECTORS_FILE, LM_EVAL_FILE, STATS_FILE, SELECTION_FILE, CONTROL_VECTOR_FILE))
    return whole | {SEARCH_CONTROLS_DIR: None, MERGED_DIR: SAVED_MODEL, MODEL_DIR: SAVED_MODEL}


owned_by_export: Owned = owned_names(export_names())
"""Whether a path inside an export folder is the export's own (`export_names`)."""


@contextmanager
def export_folder(folder: str | Path, note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """`atomic_folder` for an export: replaces the export's own files, keeps the rest (a report written by `test`,
    a user's notes), and says in one line to `note` what it kept. A failed write (a full disk) is one OSError line
    naming the folder."""
    with write_errors(folder), atomic_folder(folder, owned=owned_by_export, note=note) as tmp:
        yield tmp


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
