import pytest
import torch

from corrsteer_pl.models.hooks import LayerHooks, eos_ids, position_ids, without_attention_sink
from corrsteer_pl.models.layers import decoder_layers


def _generate(model, batch, max_new_tokens=5, eos=None):
    kwargs = {"eos_token_id": eos} if eos is not None else {}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def test_generation_mask_is_last_prompt_position_then_fed_tokens_until_eos(llama, batch):
    free = _generate(llama, batch)
    eos = int(free[0, 1])  # row 0 emits this at step 2: make it EOS so row 0 finishes early
    masks = []
    with LayerHooks(llama, {0: lambda h, m: masks.append(m.clone())}, eos_token_ids=[eos]):
        new = _generate(llama, batch, eos=eos)
    prompt_len = batch["input_ids"].shape[1]
    assert masks[0].shape == (4, prompt_len)
    assert masks[0][:, -1].all() and not masks[0][:, :-1].any()
    for step, mask in enumerate(masks[1:], start=1):  # step k feeds new[:, k-1]
        fed_eos_so_far = (new[:, :step] == eos).any(dim=1)
        assert torch.equal(mask[:, 0], ~fed_eos_so_far)
    assert not masks[2][0, 0], "row 0 was fed its EOS at step 2 and must be excluded from then on"


def _layer_output(model, batch, layer, steering=None):
    """The output of `layer` as the next layer receives it (a recorder hooked after the steering)."""
    seen = []
    recorder = LayerHooks(model, {layer: lambda h, m: seen.append(h.clone())}, positions="all")
    with torch.no_grad():
        if steering is None:
            with recorder:
                logits = model(**batch).logits
        else:
            with steering, recorder:
                logits = model(**batch).logits
    return seen[0], logits


def test_steering_adds_the_vector_exactly_at_the_last_position_only(llama, batch):
    vector = torch.randn(64)
    steering = LayerHooks(llama, {1: lambda h, m: h + m.unsqueeze(-1).float() * vector})
    base, base_logits = _layer_output(llama, batch, 1)
    steered, logits = _layer_output(llama, batch, 1, steering)
    assert torch.equal(steered[:, :-1], base[:, :-1])
    assert torch.equal(steered[:, -1], base[:, -1] + vector)
    assert torch.equal(logits[:, :-1], base_logits[:, :-1]) and not torch.allclose(logits[:, -1], base_logits[:, -1])


def test_layer_hook_sees_what_output_hidden_states_reports(model, batch):
    seen, _ = _layer_output(model, batch, 1)
    with torch.no_grad():
        reported = model(**batch, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(seen, reported, rtol=0, atol=0)


def test_all_policy_steers_every_position(llama, batch):
    vector = torch.randn(64)
    base, _ = _layer_output(llama, batch, 0)
    steering = LayerHooks(llama, {0: lambda h, m: h + m.unsqueeze(-1).float() * vector}, positions="all")
    steered, _ = _layer_output(llama, batch, 0, steering)
    assert torch.equal(steered, base + vector)


def test_hooks_are_removed_when_the_block_raises(llama, batch):
    layer = decoder_layers(llama)[0]
    # compare with what was there: transformers itself may leave output-capturing hooks on a shared model
    before = (dict(layer._forward_hooks), dict(llama._forward_pre_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with LayerHooks(llama, {0: lambda h, m: None}):
            raise RuntimeError("boom")
    assert (dict(layer._forward_hooks), dict(llama._forward_pre_hooks)) == before


def test_tuple_layer_outputs_keep_their_extra_entries(llama):
    hooks = LayerHooks(llama, {0: lambda h, m: h + 1}, positions="all")
    hook = hooks._wrap(hooks.fns[0])
    hidden, extra = torch.zeros(1, 2, 64), object()
    new_hidden, new_extra = hook(None, (), (hidden, extra))
    assert torch.equal(new_hidden, hidden + 1) and new_extra is extra


def test_right_padded_prompts_are_refused(llama, tokenizer):
    right = tokenizer(["a b c d e", "a"], return_tensors="pt", padding=True, padding_side="right")
    with LayerHooks(llama, {0: lambda h, m: None}), pytest.raises(ValueError, match="padding_side = 'left'"):
        llama(**right)


def test_a_layer_the_model_lacks_is_refused(llama):
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        LayerHooks(llama, {7: lambda h, m: None})


def test_position_ids_count_from_each_rows_first_real_token_as_generate_does(llama, batch):
    mask = batch["attention_mask"]
    positions = position_ids(mask)
    assert torch.equal(positions[mask.bool()], torch.cat([torch.arange(int(n)) for n in mask.sum(1)]))
    assert (positions[~mask.bool()] == 0).all()
    with torch.no_grad():  # left padding does not move a row's logits when the positions skip it
        padded = llama(**batch, position_ids=positions).logits[1, -1]
        alone = llama(input_ids=batch["input_ids"][1:2, ~(mask[1] == 0)]).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_without_attention_sink_keeps_real_tokens_but_each_rows_first():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(without_attention_sink(mask), expected)


def test_eos_ids_are_the_generation_configs_then_the_tokenizers_own_once(llama, tokenizer):
    assert eos_ids(llama) == [1]
    assert eos_ids(llama, tokenizer) == [1]  # the tiny tokenizer's <eos> is id 1 too: not repeated
    llama.generation_config.eos_token_id = [5, 7]
    try:
        assert eos_ids(llama, tokenizer) == [5, 7, 1]
    finally:
        llama.generation_config.eos_token_id = 1
    assert eos_ids(torch.nn.Linear(2, 2)) == []  # a model without a generation config
