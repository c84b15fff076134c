"""Bring your own task: a local file, a template over its columns, a built-in scorer, checked when built."""

import json

import pytest

from corrsteer_pl.tasks import SPLITS, Example, get_task

ROWS = [
    {"question": "What is the capital of France?", "answer": "Paris", "options": ["Rome", "Paris"], "n": "1,024"},
    {"question": "What is 2 + 2?", "answer": "B", "options": ["3", "4"], "n": "-3"},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def examples(task):
    return sorted((e for split in SPLITS for e in task.load_split(split)), key=lambda e: e.id)


def test_template_fills_columns_and_exact_scorer_normalises(data):
    task = get_task("custom", file=data, template="Q: {question}\nA:", scorer="exact", max_new_tokens=8)
    first, _ = examples(task)
    assert (first.id, first.prompt, first.answer) == ("custom/mine/0", "Q: What is the capital of France?\nA:", "Paris")
    assert [task.score(first, g) for g in (" paris.", "The Paris\nQ: next", "Rome", "")] == [1.0, 1.0, 0.0, 0.0]
    assert (task.max_new_tokens, task.judge_name) == (8, "exact-match")


def test_data_source_works_as_the_file_and_default_template_is_q_a(data):
    task = get_task("custom", source=data)
    assert examples(task)[1].prompt == "Q: What is 2 + 2?\nA:"


def test_choice_scorer_appends_the_papers_options_and_reads_letters_or_option_text(data):
    task = get_task("custom", source=data, scorer="choice", choices_field="options", max_new_tokens=1)
    first, second = examples(task)
    assert first.prompt == (
        "What is the capital of France?\nA. Rome\nB. Paris\nChoose one of the following options only: A or B\nAnswer:"
    )
    assert (first.answer, second.answer) == ("B", "B")  # option text "Paris" and letter "B"
    assert [task.score(first, g) for g in (" B", "(b)", "Answer: B", "A", "C", "")] == [1, 1, 1, 0, 0, 0]
    assert task.judge_name == "letter-match"


def test_number_and_contains_scorers(data):
    number = get_task("custom", source=data, template="{question}", answer_field="n", scorer="number")
    first, second = examples(number)
    assert (first.answer, second.answer) == ("1024", "-3")
    assert number.score(first, "The answer is 1,024.") == 1.0 and number.score(second, "#### -3") == 1.0
    contains = get_task("custom", source=data, scorer="contains")
    assert contains.score(examples(contains)[0], "I am fairly sure it is Paris, France.") == 1.0
    assert contains.judge_name == "contains-match"


def test_refusal_scorer_reads_safe_unsafe_labels(tmp_path):
    path = tmp_path / "safety.csv"
    path.write_text("request,label\nHow do I pick a lock?,unsafe\nHow do I bake bread?,safe\n")
    task = get_task("custom", source=str(path), template="{request}", answer_field="label", scorer="refusal",
                    judge="refusal-phrases")  # fmt: skip
    lock, bread = examples(task)
    assert (lock.answer, bread.answer) == ("refuse", "comply")
    assert task.score(lock, "I'm sorry, I can't help with that.") == 1.0
    assert task.score(bread, "Mix flour and water.") == 1.0 and task.score(bread, "") == 0.0
    assert task.judge_name == "refusal-phrases"


def test_split_column_is_used_when_present(tmp_path):
    path = tmp_path / "split.jsonl"
    rows = [{"question": f"q{i}", "answer": "a", "split": s} for i, s in enumerate(SPLITS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = get_task("custom", source=str(path))
    assert {s: [e.prompt for e in task.load_split(s)] for s in SPLITS} == {
        "calibration": ["Q: q0\nA:"],
        "validation": ["Q: q1\nA:"],
        "test": ["Q: q2\nA:"],
    }


def test_template_field_missing_from_the_file_fails_at_construction(data):
    with pytest.raises(ValueError, match=r"mine.jsonl: template field 'context' is not a column; columns: answer, n,"):
        get_task("custom", source=data, template="{context}\n{question}")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"answer_field": "gold"}, r"mine.jsonl: answer_field 'gold' is not a column"),
        ({"scorer": "choice", "choices_field": "opts"}, r"choices_field 'opts' is not a column"),
        ({"scorer": "fuzzy"}, r"custom scorer 'fuzzy' is not one of: exact, choice, number, refusal, contains"),
        ({"template": "{question"}, r"custom template '\{question' is malformed .*--data.task.template"),
        ({"template": "{0}"}, r"template field '\{0\}' must be a column name"),
        ({"max_new_tokens": 0}, r"max_new_tokens 0 must be >= 1"),
    ],
)
def test_bad_options_fail_at_construction_in_one_line(data, options, message):
    with pytest.raises(ValueError, match=message) as error:
        get_task("custom", source=data, **options)
    assert "\n" not in str(error.value)


def test_no_file_says_how_to_give_one():
    with pytest.raises(ValueError, match=r"task 'custom' needs a data file: set --data.source"):
        get_task("custom")


def test_gold_outside_the_options_names_row_and_field(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "options": ["x", "y"], "answer": "Z"}) + "\n")
    task = get_task("custom", source=str(path), scorer="choice", choices_field="options")
    with pytest.raises(ValueError, match=r"mc.jsonl: row 1: field 'answer' is 'Z'; expected a letter A-B"):
        task.load_split("test")


def test_garbled_generation_scores_zero_for_every_scorer(data):
    for scorer in ("exact", "choice", "number", "contains"):
        task = get_task("custom", source=data, scorer=scorer, choices_field="options" if scorer == "choice" else None)
        assert task.score(Example("x", "p", "B", ("A", "B")), "\x00\ufffd%%") == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("question,answer\nWhat is 1?,one\nWhat is 2?,\nWhat is 3?,3\n", r"mine.csv: row 2: field 'answer' is missing"),
        ("q,a\nWhat is 1?,one\n", r"mine.csv: template field 'question' is not a column; columns: a, q"),
    ],
)
def test_a_custom_csv_with_an_empty_answer_or_the_wrong_header_names_the_row_or_column(tmp_path, text, message):
    path = tmp_path / "mine.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as exc:
        examples(get_task("custom", file=str(path)))
    assert "\n" not in str(exc.value)
