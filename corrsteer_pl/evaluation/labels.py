"""What tables and tags call a method: its key ("mi-A") and the paper's name for it ("SPARE (MI)-A")."""

from __future__ import annotations

METHOD_NAMES: dict[str, str] = {"pearson": "CorrSteer", "mi": "SPARE (MI)", "fisher": "DSG (Fisher)", "caa": "CAA"}
"""What the paper calls each ranking's method."""


def method_key(ranking: str, variant: str) -> str:
    """A method's key, e.g. "mi-A" (TensorBoard tags, report keys)."""
    return f"{ranking}-{variant}"


def method_label(key: str) -> str:
    """A method's name in tables, e.g. "SPARE (MI)-A"."""
    ranking, variant = key.rsplit("-", 1)
    return f"{METHOD_NAMES.get(ranking, ranking)}-{variant}"


def steering_label(info: dict) -> str:
    """The table name of a steering from its steering.json `info` (ranking and variant), e.g. "CorrSteer-P"."""
    return method_label(method_key(info.get("ranking", "pearson"), info.get("variant", "?")))
