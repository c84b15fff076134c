"""The shared loading path of tasks built from table rows: source -> rows -> examples -> seeded splits."""

# No `from __future__ import annotations` here: jsonargparse resolves the annotations a task inherits from this
# class in the task's own module, where `Package` is not imported; evaluated annotations need no resolving.
from abc import abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from corrsteer_pl.tasks.base import SPLITS, Example, Split, Task, check_split
from corrsteer_pl.tasks.rows import Package, Row, read_file, resolve_source
from corrsteer_pl.tasks.splitting import (
    TEST_SHARE,
    VALIDATION_SHARE,
    drop_duplicate_prompts,
    holdout_splits,
    seeded_order,
    validation_from_train,
)


@dataclass(frozen=True)
class Loaded:
    """A task's rows as read from its source, by part: "train" and "test" (hub), "all", or the three splits."""

    origin: str
    """The hub id, package file or local file, as messages name it."""
    parts: dict[str, list[Row]]


class TableTask(Task):
    """A task whose examples come from table rows: its hub id, a package that ships the data, or a local file.

    Subclasses are dataclasses with `seed` and `source` fields; they say how to read the hub and turn a row into
    an example. Splits: where the hub has a test split, it is the test split and a seeded 10% of train is
    validation; otherwise the paper's seeded 30% / 70% split with 10% of the 30% as validation. A local file
    may instead give each row's split in a `split` column (calibration, validation or test).
    """

    hub_id: ClassVar[str | None] = None
    package: ClassVar[Package | None] = None
    """A package that ships the data offline; the default source when it is installed (and package_is_default)."""
    package_is_default: ClassVar[bool] = True
    package_files: ClassVar[tuple[str, ...]] = ()
    """The data files inside `package`, read in this order."""

    seed: int
    source: str | None

    @abstractmethod
    def example(self, row: Row) -> Example | None:
        """The example a row holds, or None when the task leaves it out (e.g. BBQ's other context condition)."""

    def read_hub(self) -> dict[str, list[Row]]:
        """Rows by hub split: {"train": ..., "test": ...} when the hub has a test split, else {"all": ...}."""
        raise NotImplementedError(f"task '{self.name}' has no hub source")

    def empty_hint(self) -> str:
        """Said when no row gives an example, e.g. which filter left nothing."""
        return ""

    def example_id(self, row: Row) -> str:
        return f"{self.name}/{row.key}/{row.index}"

    def load_split(self, split: Split) -> list[Example]:
        check_split(split)
        return list(self.splits[split])

    @property
    def data_note(self) -> str:
        """How `splits` were made from what the source gave, with their sizes: the source's test split and a seeded
        validation share of its train split; a seeded holdout of a source without splits; or a file's `split`
        column."""
        loaded, splits = self.loaded, self.splits
        sizes = " / ".join(str(len(splits[split])) for split in SPLITS)
        counted = f"(calibration / validation / test: {sizes} items)"
        if "all" in loaded.parts:
            return (
                f"{self.name}: {loaded.origin} has no splits: a {1 - TEST_SHARE:.0%} / {TEST_SHARE:.0%} holdout "
                f"shuffled with seed {self.seed}, {TEST_SHARE:.0%} test and {VALIDATION_SHARE:.0%} of the "
                f"{1 - TEST_SHARE:.0%} validation {counted}"
            )
        if "train" in loaded.parts:
            return (
                f"{self.name}: {loaded.origin}'s test split as test; its train split shuffled with seed {self.seed}, "
                f"{VALIDATION_SHARE:.0%} validation and the rest calibration {counted}"
            )
        return f"{self.name}: the `split` column of {loaded.origin} {counted}"

    @cached_property
    def loaded(self) -> Loaded:
        origin = resolve_source(self.source, self.name, self.package, self.hub_id is not None, self.package_is_default)
        if origin == "hub":
            return Loaded(str(self.hub_id), self.read_hub())
        if isinstance(origin, Package):
            paths = [origin.path(file, self.name) for file in self.package_files]
            return Loaded(", ".join(map(str, paths)), {"all": [row for path in paths for row in read_file(path)]})
        rows = read_file(origin)
        return Loaded(str(origin), split_column(rows) if "split" in rows[0].fields else {"all": rows})

    @cached_property
    def splits(self) -> dict[Split, list[Example]]:
        loaded = self.loaded
        parts = {
            part: [e for row in rows if (e := self.example(row)) is not None] for part, rows in loaded.parts.items()
        }
        if not any(parts.values()):
            n_rows = sum(map(len, loaded.parts.values()))
            raise ValueError(f"{loaded.origin}: no {self.name} examples in {n_rows} rows{self.empty_hint()}")
        held_out_first = sorted(parts, key=lambda part: part not in ("test", "validation"))
        parts, self.duplicates_dropped = drop_duplicate_prompts({part: parts[part] for part in held_out_first})
        if "all" in parts:
            return holdout_splits(parts["all"], self.seed)
        if "train" in parts:
            return validation_from_train(parts["train"], parts["test"], self.seed)
        return {split: seeded_order(parts[split], self.seed, split) for split in SPLITS}  # a `split` column


def split_column(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by their `split` field, which must name one of SPLITS."""
    parts: dict[str, list[Row]] = {split: [] for split in SPLITS}
    for row in rows:
        split = str(row.get("split") or "").strip().lower()
        if split not in parts:
            raise row.error("split", f"is {row.get('split')!r}; expected one of: {', '.join(SPLITS)}")
        parts[split].append(row)
    return parts
