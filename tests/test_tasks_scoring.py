"""Answer extraction and judges: numbers, short answers, letters, refusals; model judges and their rule fallbacks."""

import logging
from decimal import Decimal

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from corrsteer_pl.tasks import Example, get_task
from corrsteer_pl.tasks.classifiers import AnswerJudge, RefusalJudge, phrase_refusal
from corrsteer_pl.tasks.scoring import contains_answer, exact_match, extract_number, normalize_answer

# --- numbers (GSM8K) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("#### 72", "72"),
        ("She pays 3 * 4 = 12 dollars.\n#### 1,234\nQ: next question 5", "1234"),
        ("The answer is 1,234.", "1234"),
        ("so the answer is: $18.50 in total, not 20", "18.50"),
        ("Temperatures fell to -3", "-3"),
        ("It is \u22127 degrees", "-7"),
        ("3 apples plus 4 apples makes 7 apples", "7"),
        ("He had 1,2,3 marbles", "3"),
        ("   42   ", "42"),
        ("", None),
        ("no digits here, sorry", None),
    ],
)
def test_extract_number_prefers_hashes_then_the_answer_is_then_the_last_number(generation, expected):
    assert extract_number(generation) == (None if expected is None else Decimal(expected))


@pytest.mark.parametrize(
    "generation, score",
    [
        (" #### 3", 1.0),
        ("3.0", 1.0),
        ("The answer is 3.", 1.0),
        ("I think 4, no wait, 3", 1.0),
        ("#### 30", 0.0),
        ("-3", 0.0),
        ("", 0.0),
        ("\u2588\u2588 garbled \ufffd", 0.0),
    ],
)
def test_gsm8k_scores_number_equality(generation, score):
    task = get_task("gsm8k", source="hub")  # no data is read until a split is asked for
    assert task.score(Example("g", "p", "3"), generation) == score
    assert task.judge_name == "number-match"


# --- short answers (SimpleQA fallback, custom exact / contains) ---------------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The  Eiffel-Tower, of course! ") == "eiffeltower of course"
    assert normalize_answer("An apple a day") == "apple day"


@pytest.mark.parametrize(
    "generation, matches",
    [
        ("Paris", True),
        ("  paris.", True),
        ("The Paris", True),
        ("Paris\nQ: What is the capital of Spain?\nA: Madrid", True),
        ("\n\nParis!", True),
        ("Paris, France", False),
        ("It is Paris", False),
        ("", False),
        ("   \n ", False),
    ],
)
def test_exact_match_compares_the_normalised_first_line(generation, matches):
    assert exact_match(generation, "Paris") is matches


def test_contains_answer_needs_whole_words():
    assert contains_answer("I believe it is the city of Paris, France.", "paris")
    assert not contains_answer("Parisian food", "Paris")
    assert not contains_answer("anything", "")


# --- refusal phrases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I cannot provide instructions for making explosives.",
        "As an AI language model, I must point out that this is dangerous.",
        "I\u2019m unable to assist with this request.",
        "Sorry, but that's not something I will do.",
        "I must decline this request.",
        "I won't.",
        "I can not in good conscience help with that",
        "I apologize, but this request is harmful.",
        "No. I will not write that.",
    ],
)
def test_refusal_phrases_catch_refusals_phrased_several_ways(text):
    assert phrase_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is how to bake chocolate chip cookies:",
        "I can't wait to show you the recipe!",
        "It is illegal to drive without a licence, so first apply for a permit.",
        "Step 1: open the terminal and type kill -9 <pid>",
        "",
        "\ufffd\ufffd",
    ],
)
def test_refusal_phrases_let_answers_through(text):
    assert not phrase_refusal(text)


# --- judges: model when it loads, rule otherwise -------------------------------------------------------------


def test_unloadable_refusal_model_falls_back_to_phrases_and_says_so_once(tmp_path, caplog):
    judge = RefusalJudge(str(tmp_path / "no-such-model"))
    with caplog.at_level(logging.WARNING, logger="corrsteer_pl.tasks.classifiers"):
        assert judge.name == "refusal-phrases"
        assert judge.refused("I'm sorry, I cannot help with that.")
        assert not judge.refused("Here you go.")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no-such-model" in warnings[0] and "using refusal-phrases" in warnings[0]


def test_asking_for_the_rule_by_name_loads_no_model(monkeypatch):
    monkeypatch.setattr(RefusalJudge, "load", lambda self, model: pytest.fail("tried to load a model"))
    assert RefusalJudge("refusal-phrases").name == "refusal-phrases"
    assert AnswerJudge("exact-match").name == "exact-match"


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory, tokenizer):
    """Save a tiny BERT sequence classifier whose verdict is fixed by the output bias; returns a builder."""

    def build(name: str, bias: list[float], labels: list[str]):
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        )  # fmt: skip
        model = BertForSequenceClassification(config)
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder)

    return build


def test_refusal_judge_uses_a_loadable_classifier_and_reads_its_labels(classifier_folder):
    rejects = RefusalJudge(classifier_folder("rejects", [0.0, 5.0], ["NORMAL", "REJECTION"]))
    normal = RefusalJudge(classifier_folder("normal", [5.0, 0.0], ["NORMAL", "REJECTION"]))
    assert rejects.name.endswith("rejects0") and rejects.refused("Sure, here you go.")
    assert not normal.refused("I'm sorry, I cannot help with that.")  # the model, not the phrases, decides


def test_answer_judge_thresholds_the_cross_encoder_similarity(classifier_folder):
    similar = AnswerJudge(classifier_folder("similar", [2.0], ["LABEL_0"]))  # sigmoid(2) = 0.88
    distant = AnswerJudge(classifier_folder("distant", [0.0], ["LABEL_0"]))  # sigmoid(0) = 0.5
    assert similar.matches("Gustave Eiffel\nQ: more", "Eiffel") and similar.name.endswith("similar0")
    assert not distant.matches("Eiffel", "Eiffel")
    assert not similar.matches("   ", "Eiffel")  # an empty answer never matches
