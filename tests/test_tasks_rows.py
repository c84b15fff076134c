"""Rows as tasks read them: only text becomes a prompt or a gold answer, repeated prompts are reported, a UTF-8 BOM
is read, and the report says how the splits were made."""

import json
import warnings

import pytest

from corrsteer_pl.lightning.data import TaskDataModule
from corrsteer_pl.tasks import SPLITS, Example, get_task
from corrsteer_pl.tasks.gsm8k import GSM8K
from corrsteer_pl.tasks.rows import Row
from corrsteer_pl.tasks.splitting import drop_duplicate_prompts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def all_examples(task):
    return sorted((e for split in SPLITS for e in task.load_split(split)), key=lambda e: e.id)


# --- only text becomes a prompt or a gold answer ---------------------------------------------------------------

GOOD = {"question": "Q1", "answer": "w1", "options": ["w1", "x1"]}


@pytest.mark.parametrize(
    ("options", "bad", "message"),
    [
        ({}, {"question": {"text": "Q2", "lang": "en"}},
         r"row 2: field 'question' is a JSON object \(\{'text': 'Q2', 'lang': 'en'\}\), not text; give it a string"),
        ({}, {"answer": {"value": "w2"}}, r"row 2: field 'answer' is a JSON object \(\{'value': 'w2'\}\), not text"),
        ({}, {"answer": ["w2", "x2"]}, r"row 2: field 'answer' is a list \(\['w2', 'x2'\]\), not text"),
        ({"scorer": "contains"}, {"answer": True}, r"row 2: field 'answer' is a boolean \(True\), not text"),
        ({}, {"answer": 1.5}, r"row 2: field 'answer' is the number 1.5, which scorer 'exact' would compare as "
                              r"text.*write it as a string, or use --data.task.scorer number"),
        ({"scorer": "choice", "choices_field": "options"}, {"options": [{"t": "w2"}, "x2"], "answer": 1},
         r"row 2: field 'options\[0\]' is a JSON object \(\{'t': 'w2'\}\), not text"),
    ],
)  # fmt: skip
def test_a_custom_field_that_is_not_text_is_refused_naming_file_row_and_field(tmp_path, options, bad, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, {**GOOD, **bad}])
    with pytest.raises(ValueError, match=message) as error:
        all_examples(get_task("custom", source=path, **options))
    assert str(error.value).startswith(f"{path}: row 2: field") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("task", "good", "bad", "message"),
    [
        ("simpleqa", {"problem": "q", "answer": "a"}, {"problem": {"text": "q2"}},
         r"row 2: field 'problem' is a JSON object"),
        ("harmbench", {"prompt": "p", "context": "c"}, {"prompt": "p2", "context": ["c1", "c2"]},
         r"row 2: field 'context' is a list"),
        ("mmlu_pro", {"question": "q", "options": ["a", "b"], "answer": "A"},
         {"question": "q2", "options": ["a", {"b": 1}], "answer": "A"}, r"field 'options\[1\]' is a JSON object"),
        ("mmlu", {"question": "q", "choices": list("abcd"), "answer": 0},
         {"question": {"text": "q2"}, "choices": list("abcd"), "answer": 0}, r"field 'question' is a JSON object"),
    ],
)  # fmt: skip
def test_a_built_in_tasks_field_that_is_not_text_is_refused_naming_file_row_and_field(
    tmp_path, task, good, bad, message
):
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad])
    with pytest.raises(ValueError, match=message) as error:
        all_examples(get_task(task, source=path))
    assert str(error.value).startswith(f"{path}: row 2: field") and "\n" not in str(error.value)


def test_an_integer_answer_or_template_field_reads_as_its_digits(tmp_path):
    path = write_jsonl(tmp_path / "ints.jsonl", [{"question": "2 + 40?", "n": 7, "answer": 42}])
    (example,) = all_examples(get_task("custom", source=path, template="{question} ({n})"))
    assert (example.prompt, example.answer) == ("2 + 40? (7)", "42")


def test_the_number_scorer_takes_a_json_number_as_the_number_it_is(tmp_path):
    answers = [1.0, 2.5, 1e-07, 1e20, 1024, "#### 1,024"]
    rows = [{"question": f"q{i}", "answer": answer} for i, answer in enumerate(answers)]
    task = get_task("custom", source=write_jsonl(tmp_path / "n.jsonl", rows), scorer="number")
    golds = [e.answer for e in all_examples(task)]
    assert golds == ["1.0", "2.5", "0.0000001", "100000000000000000000", "1024", "1024"]
    assert task.score(Example("x", "p", golds[0]), "The answer is 1") == 1.0


def test_a_boolean_or_non_finite_number_answer_is_refused():
    row = Row({"answer": False, "n": float("inf")}, "t.jsonl", 0, "t")
    with pytest.raises(ValueError, match=r"^t.jsonl: row 1: field 'answer' is a boolean \(False\), not a number"):
        row.number("answer")
    with pytest.raises(ValueError, match=r"^t.jsonl: row 1: field 'n' is inf; expected a finite number"):
        row.number("n")


def test_gsm8k_reads_a_json_number_answer(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [{"question": "q", "answer": 18.0}, {"question": "r", "answer": 0.5}])
    assert [e.answer for e in all_examples(get_task("gsm8k", source=path))] == ["18.0", "0.5"]


def test_row_text_names_the_field_it_found():
    row = Row({"problem": None, "question": ["a"]}, "t.jsonl", 0, "t")
    with pytest.raises(ValueError, match=r"t.jsonl: row 1: field 'question' is a list"):
        row.text("problem", "question")


# --- repeated prompts -------------------------------------------------------------------------------------------


def example(index, prompt, answer):
    return Example(f"t/{index}", prompt, answer)


def test_dropping_repeated_prompts_warns_with_the_count_and_names_the_first_conflict():
    parts = {
        "test": [example(0, "p", "a"), example(1, "q", "b")],
        "train": [example(2, "p", "a"), example(3, "q", "c"), example(4, "p", "d"), example(5, "r", "e")],
    }
    with pytest.warns(UserWarning) as caught:
        kept, dropped = drop_duplicate_prompts(parts)
    assert dropped == 3 and [e.id for e in kept["test"] + kept["train"]] == ["t/0", "t/1", "t/5"]
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("3 of 6 items repeat the prompt of an earlier one and were left out before splitting")
    assert "2 of them with a different answer, first 't/3' (answer 'c') after 't/1' (answer 'b')" in message


def test_repeated_prompts_with_the_same_answer_warn_without_a_conflict():
    with pytest.warns(UserWarning, match=r"^1 of 2 items repeat .*; each has the answer of the item kept$"):
        drop_duplicate_prompts({"all": [example(0, "p", "a"), example(1, "p", "a")]})


def test_distinct_prompts_drop_nothing_and_say_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert drop_duplicate_prompts({"all": [example(0, "p", "a"), example(1, "q", "a")]})[1] == 0


def test_a_custom_file_with_a_conflicting_repeat_names_both_rows_ids(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"w{i}"} for i in range(10)] + [{"question": "q3", "answer": "other"}]
    task = get_task("custom", source=write_jsonl(tmp_path / "dup.jsonl", rows))
    with pytest.warns(UserWarning, match=r"first 'custom/dup/10' \(answer 'other'\) after 'custom/dup/3' \(answer"):
        task.load_split("test")
    assert task.duplicates_dropped == 1


# --- a UTF-8 byte order mark ------------------------------------------------------------------------------------

BOM_ROWS = [{"question": "Qué?", "answer": "sí"}, {"question": "Q2", "answer": "a2"}]


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in BOM_ROWS)),
        (".json", json.dumps(BOM_ROWS, ensure_ascii=False)),
        (".csv", "question,answer\nQué?,sí\nQ2,a2\n"),
    ],
)
def test_a_file_with_a_utf8_bom_loads_the_same_rows_as_without(tmp_path, suffix, text):
    loaded = {}
    for name, prefix in (("plain", ""), ("bom", "\ufeff")):
        (tmp_path / name).mkdir()
        path = tmp_path / name / f"rows{suffix}"
        path.write_text(prefix + text, encoding="utf-8")
        loaded[name] = [(e.id, e.prompt, e.answer) for e in all_examples(get_task("custom", source=str(path)))]
    assert loaded["bom"] == loaded["plain"] and len(loaded["bom"]) == 2
    assert ("custom/rows/0", "Q: Qué?\nA:", "sí") in loaded["bom"]


# --- how the splits were made, as the report says it ------------------------------------------------------------


def test_the_note_of_a_file_without_a_split_column_says_it_was_held_out_30_70_with_the_seed(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(40)])
    note = TaskDataModule(task="custom", source=path, seed=5).describe()
    assert note == (
        f"custom: {path} has no splits: a 30% / 70% holdout shuffled with seed 5, 70% test and 10% of the 30% "
        "validation (calibration / validation / test: 10 / 2 / 28 items)"
    )
    assert "own" not in note


def test_the_note_of_a_file_with_a_split_column_says_the_column_made_the_splits(tmp_path):
    rows = [{"question": f"q{i}", "answer": "a", "split": s} for i, s in enumerate(["calibration", "test", "test"])]
    path = write_jsonl(tmp_path / "split.jsonl", rows)
    assert get_task("custom", source=path).data_note == (
        f"custom: the `split` column of {path} (calibration / validation / test: 1 / 0 / 2 items)"
    )


def test_the_note_of_a_hub_source_with_a_test_split_says_validation_is_a_tenth_of_train(monkeypatch):
    rows = [Row({"question": f"q{i}", "answer": f"#### {i}"}, "openai/gsm8k/main", i, "train") for i in range(20)]
    monkeypatch.setattr(GSM8K, "read_hub", lambda self: {"train": rows[:15], "test": rows[15:]})
    assert GSM8K(seed=2, source="hub").data_note == (
        "gsm8k: openai/gsm8k's test split as test; its train split shuffled with seed 2, 10% validation and the rest "
        "calibration (calibration / validation / test: 13 / 2 / 5 items)"
    )
