import json

import pytest
import torch

from corrsteer_pl.models.tiny import random_sae, tiny_model, tiny_tokenizer
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.vectors import LM_EVAL_FILE, META_FILE, VECTORS_FILE, SteeringVectors, load_steered_model

FEATURES = [
    SelectedFeature(0, 3, 0.4, 2.5, 0.1),
    SelectedFeature(0, 9, 0.3, 1.5, 0.2),
    SelectedFeature(2, 7, 0.5, 4.0, 0.3),
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama saved to disk, so exports can name a real model folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", num_layers=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval(), tiny_tokenizer()


@pytest.fixture(scope="module")
def saes():
    return {layer: random_sae(64, 16, layer, seed=layer) for layer in (0, 2)}


def _generate(model, tok, n=6):
    batch = tok(["the quick brown fox", "A. red", "Answer:"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, batch["input_ids"].shape[1] :]


def test_vector_is_the_coefficient_weighted_sum_of_decoder_rows(saved_model, saes):
    steering = SteeringVectors.from_selection(FEATURES, saes, saved_model[0])
    expected = 2.5 * saes[0].W_dec[3] + 1.5 * saes[0].W_dec[9]
    torch.testing.assert_close(steering.layers[0].vector, expected.detach(), rtol=1e-6, atol=1e-6)
    assert sorted(steering.layers) == [0, 2]


def test_zero_coefficients_leave_generation_bit_identical(saved_model, saes):
    model, tok = saved_model
    zero = [SelectedFeature(f.layer, f.feature, f.r, 0.0, f.frequency) for f in FEATURES]
    with torch.no_grad():
        base_logits = model(**tok(["A. red"], return_tensors="pt")).logits
        with SteeringVectors.from_selection(zero, saes, model).apply(model):
            logits = model(**tok(["A. red"], return_tensors="pt")).logits
            tokens = _generate(model, tok)
    assert torch.equal(logits, base_logits)
    assert torch.equal(tokens, _generate(model, tok))


def test_steering_changes_generation_and_detaches_cleanly(saved_model, saes):
    model, tok = saved_model
    strong = [SelectedFeature(f.layer, f.feature, f.r, 50 * f.coefficient, f.frequency) for f in FEATURES]
    base = _generate(model, tok)
    hooks = SteeringVectors.from_selection(strong, saes, model).attach(model)
    steered = _generate(model, tok)
    hooks.detach()
    assert not torch.equal(steered, base)
    assert torch.equal(_generate(model, tok), base)


def test_export_then_load_generates_the_same_tokens_as_in_memory_steering(saved_model, saes, tmp_path):
    model, tok = saved_model
    strong = [SelectedFeature(f.layer, f.feature, f.r, 50 * f.coefficient, f.frequency) for f in FEATURES]
    steering = SteeringVectors.from_selection(strong, saes, model, sae_sources={0: "a", 2: "b"}, info={"scale": 1.0})
    with steering.apply(model):
        expected = _generate(model, tok)
    steering.save(tmp_path / "export")
    loaded_model, loaded_tok = load_steered_model(tmp_path / "export")
    assert torch.equal(_generate(loaded_model, loaded_tok), expected)
    meta = json.loads((tmp_path / "export" / META_FILE).read_text())
    assert meta["positions"] == "generation" and meta["layers"][1]["features"][0]["feature"] == 7
    assert meta["layers"][0]["sae_source"] == "a" and meta["layers"][0]["hook_name"] == "blocks.0.hook_resid_post"


def test_standalone_export_carries_the_model_weights(saved_model, saes, tmp_path):
    model, tok = saved_model
    steering = SteeringVectors.from_selection(FEATURES, saes, model)
    steering.save(tmp_path / "export", model=model, tokenizer=tok)
    with steering.apply(model):
        expected = _generate(model, tok)
    loaded_model, loaded_tok = load_steered_model(tmp_path / "export")
    assert loaded_model.name_or_path == str(tmp_path / "export" / "model")
    assert torch.equal(_generate(loaded_model, loaded_tok), expected)


def test_lm_eval_file_is_a_plain_dict_whose_hookpoints_exist(saved_model, saes, tmp_path):
    model, _ = saved_model
    steering = SteeringVectors.from_selection(FEATURES, saes, model)
    steering.save(tmp_path)
    spec = torch.load(tmp_path / LM_EVAL_FILE, weights_only=True)
    assert sorted(spec) == ["layers.0", "layers.2"]
    for hookpoint, entry in spec.items():
        model.base_model.get_submodule(hookpoint)
        assert entry["action"] == "add" and entry["steering_coefficient"] == 1.0 and entry["bias"] is None
    torch.testing.assert_close(spec["layers.2"]["steering_vector"], steering.layers[2].vector)


def test_loading_for_a_model_of_another_width_fails_clearly(saved_model, saes, tmp_path):
    SteeringVectors.from_selection(FEATURES, saes, saved_model[0]).save(tmp_path)
    wide = tiny_model("llama", num_layers=3, hidden=32)
    with pytest.raises(ValueError, match="d_model=64, but the model has d_model=32"):
        SteeringVectors.load(tmp_path).apply(wide)
    shallow = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="3 layers, but the model has 2"):
        SteeringVectors.load(tmp_path).apply(shallow)


@pytest.mark.parametrize(
    "broken", ["missing_vectors", "missing_json", "corrupt_json", "corrupt_vectors", "wrong_shape"]
)
def test_a_broken_export_fails_with_a_message_naming_the_file(saved_model, saes, tmp_path, broken):
    SteeringVectors.from_selection(FEATURES, saes, saved_model[0]).save(tmp_path)
    if broken == "missing_vectors":
        (tmp_path / VECTORS_FILE).unlink()
        error, match = FileNotFoundError, VECTORS_FILE
    elif broken == "missing_json":
        (tmp_path / META_FILE).unlink()
        error, match = FileNotFoundError, META_FILE
    elif broken == "corrupt_json":
        (tmp_path / META_FILE).write_text("{not json")
        error, match = ValueError, f"{META_FILE} is not valid JSON"
    elif broken == "corrupt_vectors":
        (tmp_path / VECTORS_FILE).write_bytes(b"\x00" * 20)
        error, match = ValueError, f"{VECTORS_FILE} is corrupt"
    else:
        meta = json.loads((tmp_path / META_FILE).read_text())
        meta["model"]["d_model"] = 65
        (tmp_path / META_FILE).write_text(json.dumps(meta))
        error, match = ValueError, "inconsistent export"
    with pytest.raises(error, match=match):
        SteeringVectors.load(tmp_path)


def test_attaching_a_steering_the_model_already_carries_is_refused_in_one_line(saved_model, saes):
    model, tok = saved_model
    steering = SteeringVectors.from_selection(FEATURES, saes, model)
    hooks = steering.attach(model)
    try:
        for again in (lambda: steering.attach(model), lambda: SteeringVectors(**vars(steering)).apply(model)):
            with pytest.raises(ValueError, match="already attached") as err:
                again()
            assert "\n" not in str(err.value)
    finally:
        hooks.detach()
    with steering.apply(model):  # once detached, it attaches again
        pass


def test_load_steered_model_then_attaching_its_steering_again_is_refused(saved_model, saes, tmp_path):
    steering = SteeringVectors.from_selection(FEATURES, saes, saved_model[0])
    steering.save(tmp_path / "export")
    model, tok = load_steered_model(tmp_path / "export")
    base = _generate(model, tok)
    with pytest.raises(ValueError, match="model.corrsteer_hooks"):
        SteeringVectors.load(tmp_path / "export").attach(model)
    assert torch.equal(_generate(model, tok), base), "the steering is still added once"
