import pytest
import torch

from corrsteer_pl.calibration.capture import FeatureCapture, generate_answers
from corrsteer_pl.models.tiny import random_sae

LAYERS = (0, 1)  # not the last layer: its hidden_states entry has the final norm applied


def _oracle(model, batch, new, saes, eos, pooling):
    """Pooled SAE codes from output_hidden_states over the finished sequences, positions chosen by hand."""
    prompt_len = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], new], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() computes them for left padding
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    out = {}
    for layer, sae in saes.items():
        rows = []
        for b in range(new.shape[0]):
            # the last prompt position, then every fed token g_1..g_{N-1} until one of them was EOS
            keep = [prompt_len - 1] + [
                prompt_len + k - 1 for k in range(1, new.shape[1]) if not (new[b, :k] == eos).any()
            ]
            codes = sae.encode(hidden.hidden_states[layer + 1][b, keep])
            rows.append(codes.max(0).values if pooling == "max" else codes.mean(0))
        out[layer] = torch.stack(rows)
    return out


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_capture_equals_hidden_states_at_exactly_the_generation_positions(model, batch, pooling):
    saes = {layer: random_sae(64, 128, layer, seed=layer) for layer in LAYERS}
    free, _, _, _ = generate_answers(model, batch["input_ids"], batch["attention_mask"], 6, pad_token_id=0)
    eos = int(free[0, 1])  # row 0 emits it at step 2: an early EOS in the batch
    new, pooled, _, _ = generate_answers(
        model, batch["input_ids"], batch["attention_mask"], 6, saes, pooling, eos_token_ids=[eos], pad_token_id=0
    )
    assert (new[0, 2:] == 0).all(), "row 0 must have stopped early"
    expected = _oracle(model, batch, new, saes, eos, pooling)
    for layer in LAYERS:
        assert pooled[layer].shape == (4, 128)
        torch.testing.assert_close(pooled[layer], expected[layer], atol=1e-4, rtol=1e-4)


def test_capture_never_encodes_the_prompt_body(llama, batch):
    sae = random_sae(64, 32, 0)
    encoded = []
    original = sae.encode
    sae.encode = lambda x: encoded.append(x.shape[0]) or original(x)
    generate_answers(llama, batch["input_ids"], batch["attention_mask"], 3, {0: sae}, pad_token_id=0)
    batch_size, prompt_length = batch["input_ids"].shape
    assert len(encoded) == 1, "one encode call per layer for the whole generation"
    # prefill: the last position of each row; then at most one fed-back token per row and step (3 new tokens)
    assert batch_size <= encoded[0] <= 3 * batch_size < batch_size * prompt_length


def test_unknown_pooling_is_refused(llama):
    with pytest.raises(ValueError, match="pooling 'median'"):
        FeatureCapture(llama, {}, pooling="median")


def test_peak_position_is_where_the_hidden_states_oracle_reaches_the_max(model, batch):
    saes = {0: random_sae(64, 128, 0, seed=0)}
    new, pooled, _, peaks = generate_answers(
        model, batch["input_ids"], batch["attention_mask"], 5, saes, pad_token_id=0, peaks=True
    )
    prompt_len = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], new], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], dim=1)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                       output_hidden_states=True).hidden_states[1]  # fmt: skip
    codes = saes[0].encode(hidden[:, prompt_len - 1 : prompt_len + 4])  # (B, 5 generation positions, d_sae)
    top2 = codes.topk(2, dim=1).values
    clear = (top2[:, 0] > 0) & (top2[:, 0] - top2[:, 1] > 1e-3)  # a peak that float noise cannot move
    assert clear.sum() > 50 and peaks[0].dtype == torch.int32
    assert torch.equal(peaks[0][clear], codes.argmax(dim=1).to(torch.int32)[clear])
    torch.testing.assert_close(pooled[0], codes.max(dim=1).values, atol=1e-4, rtol=1e-4)
