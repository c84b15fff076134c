"""--comparison.prompts: instructed prompts answered as comparison rows, with and without the export's steering."""

import json

import pytest
import torch

from corrsteer_pl.calibration.capture import generate_answers
from corrsteer_pl.evaluation import conditions as answering
from corrsteer_pl.evaluation.conditions import answered
from corrsteer_pl.evaluation.judge import judge
from corrsteer_pl.evaluation.prompting import PromptRows, check_prompts, resolve_prompts
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.lightning.data import collate
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors
from corrsteer_pl.tasks import get_task
from corrsteer_pl.tasks.base import CHOICE_INSTRUCTIONS, GENERATION_INSTRUCTIONS, Example, instructed
from corrsteer_pl.tasks.choice import ChoiceTask, ChoiceTokens, build_prompt

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
LETTERS = ("A", "B", "C", "D")
LAST = 2  # the tiny Llama's last layer (tests/conftest.py: 3 layers)
INSTRUCTION = "Answer with the letter of the correct option only."


class _Choice(ChoiceTask):
    name = "choice-test"
    max_new_tokens = 1

    def load_split(self, split):
        return []


def _examples(n: int = 8) -> list[Example]:
    prompts = [build_prompt(f"Question {i}?", ["red", "blue", "green", "stone"]) for i in range(n)]
    return [Example(f"q/{i}", p, "B", LETTERS) for i, p in enumerate(prompts)]


def _toward(model, tokenizer, letter: str, weight: float) -> SteeringVectors:
    """A last-layer steering along one letter's unembedding row (weak enough that the instruction still matters)."""
    head = model.lm_head.weight.detach()
    (token,) = tokenizer.encode(letter, add_special_tokens=False)
    vector = weight * head[token] / head[token].norm()
    return SteeringVectors({LAST: LayerSteering(LAST, vector, [])}, head.shape[1], LAST + 1)


def _rows(llama, tokenizer, steering, seen=None) -> PromptRows:
    """PromptRows answering as CorrSteerModule.score_conditions does (one-token answers, choice logits)."""

    def answer(batch, conditions):
        if seen is not None:
            seen.append((batch, dict(conditions)))
        choice = ChoiceTokens.for_examples(tokenizer, batch["examples"])
        out = answered(llama, batch["input_ids"], batch["attention_mask"], conditions, 1, [1], 0, choice=choice)
        return {
            name: judge(_Choice(), tokenizer, batch["examples"], a.tokens, a.choice_logits) for name, a in out.items()
        }

    return PromptRows(
        [INSTRUCTION], steering, lambda examples, index: collate(tokenizer, examples, False, index), answer
    )


def _by_hand(llama, tokenizer, examples, steering=None):
    """The examples answered by their own generate pass (the steering's hook applied around it)."""
    batch = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True)
    choice = ChoiceTokens.for_examples(tokenizer, examples)
    with steering.apply(llama) if steering is not None else torch.no_grad():
        tokens, _, logits, _ = generate_answers(
            llama, batch["input_ids"], batch["attention_mask"], 1, eos_token_ids=[1], pad_token_id=0, choice=choice
        )
    return judge(_Choice(), tokenizer, examples, tokens, logits)


def test_the_instruction_goes_before_answer_on_multiple_choice_and_first_on_free_form():
    choice = _examples(1)[0]
    lines = instructed(choice, INSTRUCTION).prompt.split("\n")
    assert lines[-2:] == [INSTRUCTION, "Answer:"] and lines[:-2] == choice.prompt.split("\n")[:-1]
    free = Example("f/0", "Request: say hi\nResponse:", "hi")
    assert instructed(free, "Be brief.").prompt == "Be brief.\n\nRequest: say hi\nResponse:"
    assert instructed(choice, INSTRUCTION).answer == choice.answer and instructed(choice, INSTRUCTION).choices


def test_a_prompt_row_is_answered_with_the_instruction_in_its_prompt_tokens(llama, tokenizer):
    examples, seen = _examples(), []
    rows = _rows(llama, tokenizer, _toward(llama, tokenizer, "A", 0.04), seen)
    plain = collate(tokenizer, examples, chat_template=False)
    judged = rows.scorers()["prompt1"](plain)
    (batch, conditions), *more = seen
    assert not more, "the plain and the steered row of one instruction share one pass"
    assert set(conditions) == {"prompt", "prompt+steered"}
    for row, mask, example in zip(batch["input_ids"], batch["attention_mask"], examples, strict=True):
        expected = tokenizer(instructed(example, INSTRUCTION).prompt)["input_ids"]
        assert row[mask.bool()].tolist() == expected
        assert INSTRUCTION in tokenizer.decode(row[mask.bool()])
    assert batch["input_ids"].shape[1] > plain["input_ids"].shape[1]
    hand = _by_hand(llama, tokenizer, [instructed(e, INSTRUCTION) for e in examples])
    assert judged.choice_answers == hand.choice_answers and judged.answers == hand.answers
    assert judged.choice_answers != _by_hand(llama, tokenizer, examples).choice_answers, "the instruction matters"


def test_the_steered_prompt_row_applies_both_the_instruction_and_the_steering(llama, tokenizer):
    examples, steering = _examples(), _toward(llama, tokenizer, "A", 0.04)
    scorers = _rows(llama, tokenizer, steering).scorers()
    plain = collate(tokenizer, examples, chat_template=False)
    both, prompt_only = scorers["prompt1+steered"](plain), scorers["prompt1"](plain)
    hand = _by_hand(llama, tokenizer, [instructed(e, INSTRUCTION) for e in examples], steering)
    assert both.choice_answers == hand.choice_answers and both.answers == hand.answers
    torch.testing.assert_close(both.choice_scores, hand.choice_scores)
    assert both.choice_answers != prompt_only.choice_answers, "the steering matters"
    assert both.choice_answers != _by_hand(llama, tokenizer, examples, steering).choice_answers, "so does the prompt"


def test_an_empty_steering_gets_no_steered_prompt_row(llama, tokenizer):
    empty = SteeringVectors({}, llama.config.hidden_size, 3)
    assert list(_rows(llama, tokenizer, empty).scorers()) == ["prompt1"]


def test_default_selects_the_documented_instructions_of_the_task_kind():
    assert resolve_prompts(check_prompts("default"), get_task("synthetic"), False) == list(GENERATION_INSTRUCTIONS)
    assert resolve_prompts("default", get_task("synthetic"), True) == list(CHOICE_INSTRUCTIONS)
    assert resolve_prompts(check_prompts([" Be brief. "]), get_task("synthetic"), True) == ["Be brief."]
    assert resolve_prompts(check_prompts(None), get_task("synthetic"), True) == []


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    """A tiny fit, then `train.py test --comparison.prompts default` on its export."""
    root = tmp_path_factory.mktemp("prompting")
    main(["fit", *TINY, "--trainer.default_root_dir", str(root)])
    main(["test", *TINY, "--trainer.default_root_dir", str(root), "--comparison.prompts", "default"])
    return root, json.loads((root / "steered" / "report.json").read_text())


def test_default_prompts_add_a_plain_and_a_steered_row_per_instruction_to_the_table(prompted):
    root, report = prompted
    rows = {row["name"]: row for row in report["methods"]}
    names = ["prompt1", "prompt1+steered", "prompt2", "prompt2+steered"]
    assert list(rows) == ["unsteered", "steered", *names]
    assert rows["prompt2"]["label"] == f'prompt 2 "{GENERATION_INSTRUCTIONS[1]}"'
    assert rows["prompt2+steered"]["label"] == f'prompt 2 "{GENERATION_INSTRUCTIONS[1]}" + CorrSteer-A'
    for name in names:
        row, changed = rows[name], rows[name]["better"] + rows[name]["worse"]
        assert row["difference"] == pytest.approx(row["accuracy"] - report["accuracy_unsteered"])
        assert row["ser"] == (row["worse"] / changed if changed else 0.0)
        assert set(row["p_values"]) == {"random_feature", "random_direction"}
    assert rows["prompt1"]["accuracy"] != rows["unsteered"]["accuracy"], "the instructed prompts were answered"
    text = (root / "steered" / "report.md").read_text()
    assert "Prompt rows: the instruction is written into every test prompt" in text
    assert f'| prompt 1 "{GENERATION_INSTRUCTIONS[0]}" + CorrSteer-A |' in text


@pytest.mark.parametrize(
    ("value", "says"),
    [('[""]', "non-empty"), ("Answer only.", "must be a list"), ("[Be brief., Be brief.]", "given twice")],
)
def test_a_bad_prompts_option_is_one_line_naming_the_flag(tmp_path, value, says):
    with pytest.raises(SystemExit) as exc:
        main(["test", *TINY, "--trainer.default_root_dir", str(tmp_path), "--comparison.prompts", value])
    line = str(exc.value.code)
    assert line.startswith("error: --comparison.prompts") and says in line and "\n" not in line


def test_an_instruction_that_makes_a_test_prompt_too_long_is_one_line_before_anything_is_answered(
    prompted, monkeypatch
):
    root, _ = prompted
    monkeypatch.setattr(answering, "generate_answers", lambda *a, **k: pytest.fail("a test prompt was answered"))
    report = root / "steered" / "report.json"
    before = report.read_text()
    long = "word " * 20  # 80 tokens of the tiny tokenizer: the plain test prompts (at most 20) fit in 64, not with it
    with pytest.raises(SystemExit) as exc:
        main(
            ["test", *TINY, "--trainer.default_root_dir", str(root), "--data.max_prompt_tokens", "64"]
            + ["--comparison.prompts", json.dumps([long])]
        )
    line = str(exc.value.code)
    assert line.startswith("error: --comparison.prompts: instruction 1") and "\n" not in line
    assert "instructed test item 'synthetic/" in line and "more than 64 tokens" in line
    assert report.read_text() == before, "nothing was answered"
