"""Seeded splits for data that ships without the three splits CorrSteer needs."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from typing import TypeVar

from corrsteer_pl.tasks.base import SPLITS, Example, Split

T = TypeVar("T")
TEST_SHARE = 0.7
"""The paper's held-out test share of data without a test split."""
VALIDATION_SHARE = 0.1
"""The share of the rest (or of a train split) held out as validation."""


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


def holdout_splits(
    items: Sequence[T], seed: int, test_share: float = TEST_SHARE, validation_share: float = VALIDATION_SHARE
) -> dict[Split, list[T]]:
    """The paper's split for data without a test split: seeded shuffle, `test_share` to test, then
    `validation_share` of the rest to validation. Held-out sizes round up as scikit-learn's train_test_split
    does, which reproduces the paper's counts (SimpleQA 4326 rows -> 1167 / 130 / 3029, HarmBench 108 / 12 / 280).
    """
    ordered = seeded_order(items, seed, "holdout")
    n_train = len(ordered) - _share(len(ordered), test_share)
    n_val = _share(n_train, validation_share)
    return {"calibration": ordered[n_val:n_train], "validation": ordered[:n_val], "test": ordered[n_train:]}


def validation_from_train(
    train: Sequence[T], test: Sequence[T], seed: int, validation_share: float = VALIDATION_SHARE
) -> dict[Split, list[T]]:
    """Calibration and validation from a train split (validation = `validation_share`, rounded up); test as given.

    Every split comes out in a seeded order, so taking its first n items is a random sample.
    """
    ordered = seeded_order(train, seed, "validation")
    n_val = _share(len(ordered), validation_share)
    return {"calibration": ordered[n_val:], "validation": ordered[:n_val], "test": seeded_order(test, seed, "test")}


def _share(n: int, share: float) -> int:
    # Rounded first so that float noise (0.7 * 400 = 280.00000000000006) does not round up a whole item.
    return math.ceil(round(n * share, 9))


def drop_duplicate_prompts(parts: dict[str, list[Example]]) -> tuple[dict[str, list[Example]], int]:
    """Keeps the first example of each prompt text, reading parts in the order given; returns the count dropped.

    Row ids come from row positions, so an identical prompt on two rows would otherwise land in two splits
    (calibrated on, then tested on). Give held-out parts first ("test" before "train") to keep them whole.
    Dropping any is a warning with the count; a dropped example whose gold answer differs from the kept one's is a
    conflict in the data, and the warning counts those and names the first (both ids and answers). A warning, not
    an error: hub data cannot be edited, and the kept example is the first in the order given.
    """
    first: dict[str, Example] = {}
    kept: dict[str, list[Example]] = {}
    conflicts: list[tuple[Example, Example]] = []
    for part, examples in parts.items():
        kept[part] = []
        for example in examples:
            earlier = first.get(example.prompt)
            if earlier is None:
                first[example.prompt] = example
                kept[part].append(example)
            elif earlier.answer != example.answer:
                conflicts.append((earlier, example))
    total = sum(map(len, parts.values()))
    dropped = total - len(first)
    if dropped:
        warnings.warn(_duplicates_message(dropped, total, conflicts), stacklevel=2)
    return kept, dropped


def _duplicates_message(dropped: int, total: int, conflicts: list[tuple[Example, Example]]) -> str:
    """What was dropped, e.g. "3 of 6 items repeat the prompt of an earlier one ...; 2 of them with a different
    answer, first 't/3' (answer 'c') after 't/1' (answer 'b'): ..."."""
    said = f"{dropped} of {total} items repeat the prompt of an earlier one and were left out before splitting"
    if not conflicts:
        return f"{said}; each has the answer of the item kept"
    earlier, later = conflicts[0]
    return (
        f"{said}; {len(conflicts)} of them with a different answer, first {later.id!r} (answer {later.answer!r}) "
        f"after {earlier.id!r} (answer {earlier.answer!r}), which is kept: give each prompt one gold answer"
    )
