"""The steering this server serves: the export named by CORRSTEER_STEERING, loaded once per process."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from corrsteer_pl.steering.vectors import META_FILE, SteeringVectors

ENV = "CORRSTEER_STEERING"
"""The export folder to serve (vLLM's worker processes inherit it); unset: the plugin does nothing."""


@dataclass(frozen=True)
class ServedSteering:
    """An export, checked as `SteeringVectors.load` checks it, and the key that names what it adds."""

    folder: Path
    steering: SteeringVectors
    key: str

    @property
    def meta_file(self) -> Path:
        return self.folder / META_FILE


def refuse(message: str) -> SystemExit:
    """A start-up refusal: one line on stderr and exit status 1, no stack trace (vLLM does not catch SystemExit)."""
    return SystemExit(f"corrsteer: {message}")


@functools.cache
def served_steering() -> ServedSteering | None:
    """The export CORRSTEER_STEERING names, or None when it is unset; a missing or corrupt export refuses to start."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise refuse(f"{ENV}={value}: no such folder; set {ENV} to an export folder (one holding {META_FILE})")
    try:
        steering = SteeringVectors.load(folder)
    except (FileNotFoundError, ValueError) as err:
        raise refuse(f"{ENV}={value}: {err}") from None
    if not steering.layers:
        raise refuse(f"{folder / META_FILE}: the export steers no layer; set {ENV} to an export that holds vectors")
    return ServedSteering(folder, steering, steering.key()[:16])
