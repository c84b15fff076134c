"""Seeded splits for data that ships without the three splits CorrSteer needs."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from corrsteer_pl.tasks.base import SPLITS, Split

T = TypeVar("T")


def check_fractions(fractions: Sequence[float], owner: str) -> None:
    """Reject fractions that are not three non-negative numbers summing to 1."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"{owner} fractions {tuple(fractions)} must be three non-negative numbers "
            "(calibration, validation, test) summing to 1"
        )


def seeded_order(items: Sequence[T], seed: int, salt: str) -> list[T]:
    """The items in an order fixed by (seed, salt), so a prefix limit is a random sample."""
    out = list(items)
    # String seeds are hashed with SHA-512, so the order does not depend on PYTHONHASHSEED.
    random.Random(f"{seed}/{salt}").shuffle(out)
    return out


def split_by_fractions(groups: dict[str, Sequence[T]], fractions: Sequence[float], seed: int) -> dict[Split, list[T]]:
    """Split every group (e.g. subject) by the fractions after a seeded shuffle: disjoint and stratified.

    Each split is then put in a seeded order, so taking its first n items samples every group.
    """
    parts: dict[Split, list[T]] = {split: [] for split in SPLITS}
    for key in sorted(groups):
        items = seeded_order(groups[key], seed, key)
        n_cal = round(len(items) * fractions[0])
        n_val = min(round(len(items) * fractions[1]), len(items) - n_cal)
        parts["calibration"] += items[:n_cal]
        parts["validation"] += items[n_cal : n_cal + n_val]
        parts["test"] += items[n_cal + n_val :]
    return {split: seeded_order(items, seed, split) for split, items in parts.items()}
