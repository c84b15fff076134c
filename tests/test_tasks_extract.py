"""`Task.extract`: the answer a model gave, or None; reports count valid answers from it."""

import pytest

from corrsteer_pl.tasks import Example, get_task


@pytest.mark.parametrize(("generation", "expected"), [(" B", "B"), ("(c)", "C"), ("I think", None), ("", None)])
def test_multiple_choice_extracts_an_option_letter_or_none(generation, expected):
    task = get_task("mmlu")
    example = Example("x", "Q", "B", ("A", "B", "C", "D"))
    assert task.extract(example, generation) == expected


@pytest.mark.parametrize(
    ("generation", "expected"), [("#### 1,234", "1234"), ("The answer is -3.", "-3"), ("no", None)]
)
def test_gsm8k_extracts_the_final_number(generation, expected):
    task = get_task("gsm8k")
    assert task.extract(Example("x", "Q", "1234"), generation) == expected


def test_free_form_answers_are_their_first_line_and_empty_is_invalid():
    task = get_task("synthetic")
    example = task.load_split("test")[0]
    assert task.extract(example, "  red apple\nQ: next") == "red apple"
    assert task.extract(example, " \n ") is None
