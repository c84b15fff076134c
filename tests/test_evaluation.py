from dataclasses import replace

import pytest
import torch

from corrsteer_pl.calibration.capture import generate_answers
from corrsteer_pl.evaluation import conditions as evaluation
from corrsteer_pl.evaluation.conditions import answered
from corrsteer_pl.models.tiny import random_sae, tiny_model
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.vectors import SteeringVectors


def _conditions(model):
    saes = {layer: random_sae(64, 32, layer, seed=layer) for layer in (0, 1)}
    conditions = {"unsteered": None}
    for scale in (20.0, 60.0):
        features = [SelectedFeature(0, 3, 0.5, scale, 0.1), SelectedFeature(1, 7, 0.4, scale, 0.1)]
        conditions[f"x{scale:g}"] = SteeringVectors.from_selection(features, saes, model)
    only_layer_1 = [SelectedFeature(1, 9, 0.3, 80.0, 0.1)]
    conditions["layer1"] = SteeringVectors.from_selection(only_layer_1, saes, model)  # zero rows at layer 0
    return conditions


def _tokens(model, batch, conditions, max_new_tokens, caches=None):
    """Each condition's new tokens from `answered` (EOS id 1, pad id 0)."""
    answers = answered(model, batch["input_ids"], batch["attention_mask"], conditions, max_new_tokens, [1], 0, caches)
    return {name: a.tokens for name, a in answers.items()}


@pytest.mark.parametrize("score_bytes", [2**30, 1], ids=["conditions-in-one-pass", "one-pass-each"])
def test_one_token_answers_with_a_shared_prompt_cache_equal_generate_per_condition(
    model, batch, score_bytes, monkeypatch
):
    monkeypatch.setattr(evaluation, "SCORE_BYTES_PER_PASS", score_bytes)
    conditions = _conditions(model)
    fast = _tokens(model, batch, conditions, 1)
    _assert_equal_generate_per_condition(model, batch, conditions, fast)


def test_prompts_longer_than_a_sliding_window_take_one_pass_per_condition_and_still_equal_generate(tokenizer):
    gemma2 = tiny_model("gemma2", num_layers=3)  # sliding_window 64: the 4D query mask would ignore it
    prompts = ["seven " * 80 + "Answer:", "A. red"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] > gemma2.config.sliding_window
    assert evaluation._conditions_per_pass(gemma2, batch["input_ids"].shape, 4) == 1
    conditions = _conditions(gemma2)
    fast = _tokens(gemma2, batch, conditions, 1)
    _assert_equal_generate_per_condition(gemma2, batch, conditions, fast)


def _assert_equal_generate_per_condition(model, batch, conditions, fast):
    for name, steering in conditions.items():
        hooks = steering.apply(model) if steering is not None else None
        if hooks:
            hooks.attach()
        expected = generate_answers(model, batch["input_ids"], batch["attention_mask"], 1, pad_token_id=0).tokens
        if hooks:
            hooks.detach()
        assert torch.equal(fast[name], expected), name
    assert not torch.equal(fast["unsteered"], fast["x60"]), "the conditions must actually differ"


def test_multi_token_conditions_fall_back_to_generate(llama, batch):
    conditions = _conditions(llama)
    out = _tokens(llama, batch, conditions, 3)
    with conditions["x60"].apply(llama):
        expected = generate_answers(llama, batch["input_ids"], batch["attention_mask"], 3, pad_token_id=0).tokens
    assert torch.equal(out["x60"], expected)


def test_a_second_pass_over_the_same_prompts_reuses_their_cache_and_gives_the_same_answers(llama, batch):
    conditions = _conditions(llama)
    calls = []
    handle = llama.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        caches = evaluation.PromptCaches()
        first = _tokens(llama, batch, conditions, 1, caches)
        assert len(calls) == 2 and len(caches) == 1  # the prompt body, then the conditions' last positions
        second = _tokens(llama, batch, conditions, 1, caches)
        assert len(calls) == 3, "the prompt body must not run again"
    finally:
        handle.remove()
    assert all(torch.equal(first[name], second[name]) for name in conditions)


def test_prompt_caches_over_their_byte_budget_are_not_kept(llama, batch):
    caches = evaluation.PromptCaches(max_bytes=0)
    _tokens(llama, batch, {"unsteered": None}, 1, caches)
    assert len(caches) == 0 and caches.bytes == 0


def test_a_kept_prompt_cache_owns_just_its_prompt_after_a_query_pass(llama, batch):
    """The C query positions are cropped off and their storage freed: a kept cache does not grow pass by pass."""
    caches = evaluation.PromptCaches()
    _tokens(llama, batch, _conditions(llama), 1, caches)
    (cache,) = caches._caches.values()
    body = batch["input_ids"].shape[1] - 1
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            assert t.shape[-2] == body
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), "storage still holds the queries"


def test_prompt_caches_budget_by_default_a_quarter_of_the_free_memory(llama, batch, monkeypatch):
    monkeypatch.setattr(evaluation, "free_memory", lambda device: 4 * 1000)
    caches = evaluation.PromptCaches()
    _tokens(llama, batch, {"unsteered": None}, 1, caches)
    assert caches.max_bytes == 1000 and len(caches) == 0, "a cache larger than the budget is not kept"


def test_an_every_position_steering_among_one_token_conditions_gets_its_own_prefill_and_equals_generate(model, batch):
    conditions = _conditions(model)
    conditions["x20_all"] = replace(conditions["x20"], positions="all")
    lengths = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        fast = _tokens(model, batch, conditions, 1)
    finally:
        handle.remove()
    assert list(fast) == list(conditions)
    width = batch["input_ids"].shape[1]
    assert lengths.count(width - 1) == 1, "the generation-position conditions share one prompt-body pass"
    assert lengths.count(width) == 1, "the every-position steering runs its own prefill of the whole prompt"
    _assert_equal_generate_per_condition(model, batch, conditions, fast)


def test_longer_answers_continuing_one_shared_prompt_body_equal_generate_per_condition(model, batch):
    conditions = _conditions(model)
    fast = _tokens(model, batch, conditions, 4)
    for name, steering in conditions.items():
        with steering.apply(model) if steering is not None else torch.inference_mode():
            expected = generate_answers(model, batch["input_ids"], batch["attention_mask"], 4, eos_token_ids=[1],
                                        pad_token_id=0).tokens  # fmt: skip
        assert torch.equal(fast[name], expected), name


def _alone(model, batch, steering, max_new_tokens, eos):
    with steering.apply(model) if steering is not None else torch.inference_mode():
        return generate_answers(model, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                                eos_token_ids=eos, pad_token_id=0).tokens  # fmt: skip


@pytest.mark.parametrize("conditions_per_decode", [None, 1], ids=["decoded-together", "one-decode-each"])
def test_conditions_that_end_at_different_steps_decoded_together_each_equal_generate_alone(
    model, batch, conditions_per_decode, monkeypatch
):
    if conditions_per_decode is not None:
        monkeypatch.setattr(evaluation, "_conditions_per_decode", lambda *args: conditions_per_decode)
    conditions = _conditions(model)
    batch = {key: rows[:1] for key, rows in batch.items()}  # one row: a condition ends when its row does
    eos = [int(_alone(model, batch, None, 6, [1])[0, 2])]  # ends the unsteered answer at its third token
    expected = {name: _alone(model, batch, steering, 6, eos) for name, steering in conditions.items()}
    assert expected["unsteered"].shape[1] < max(t.shape[1] for t in expected.values()), "a condition must end early"
    answers = answered(model, batch["input_ids"], batch["attention_mask"], conditions, 6, eos, 0)
    for name in conditions:
        assert torch.equal(answers[name].tokens, expected[name]), name


def test_longer_answers_under_many_conditions_take_one_decoding_step_per_token_not_one_per_condition(llama, batch):
    conditions = _conditions(llama)
    steps = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda m, args, out: steps.append(args[0].shape))
    try:
        _tokens(llama, batch, conditions, 3)
    finally:
        hook.remove()
    rows = batch["input_ids"].shape[0] * len(conditions)
    assert [s for s in steps if s[1] == 1] == [torch.Size([rows, 1])] * 3, "every condition's rows in each step"


def test_longer_answers_run_the_prompt_body_once_for_all_generation_position_conditions(llama, batch):
    conditions = _conditions(llama)
    conditions["every position"] = replace(conditions["x20"], positions="all")
    calls = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    try:
        _tokens(llama, batch, conditions, 3)
    finally:
        hook.remove()
    prompt = batch["input_ids"].shape[1]
    assert calls.count(prompt - 1) == 1, "one pass over the prompt body for the shared conditions"
    assert calls.count(prompt) == 1, "the every-position steering runs its own prefill"
