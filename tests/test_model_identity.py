"""An export names its base model portably (a built-in name or hub id, never this machine's cache path), records its
shape and a fingerprint of its weights; `load_steered_model(folder, model=...)` takes the model from the caller and
refuses, in one line, one the steering was not made for."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from corrsteer_pl.models.gguf import SMOLLM2
from corrsteer_pl.models.sources import TINY_RANDOM, cache_dir, portable_name, resolve_model
from corrsteer_pl.models.tiny import random_sae, tiny_model, tiny_tokenizer
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.formats import main
from corrsteer_pl.steering.identity import fingerprint
from corrsteer_pl.steering.serving import MERGED_DIR
from corrsteer_pl.steering.vectors import META_FILE, SteeringVectors, load_steered_model

FEATURES = [SelectedFeature(1, 3, 0.4, 40.0, 0.1), SelectedFeature(2, 7, 0.5, 60.0, 0.3)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama saved to a folder, loaded back from it (as a user's own model would be)."""
    folder = tmp_path_factory.mktemp("base")
    tiny_model("llama", num_layers=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval()


def _steering(model) -> SteeringVectors:
    saes = {layer: random_sae(64, 16, layer, seed=layer) for layer in (1, 2)}
    return SteeringVectors.from_selection(FEATURES, saes, model)


def _export(tmp_path, model, name_or_path: str | None = None):
    """An export of a steering made on `model`; `name_or_path` rewrites the model steering.json names."""
    folder = tmp_path / "export"
    _steering(model).save(folder)
    if name_or_path is not None:
        meta = json.loads((folder / META_FILE).read_text())
        meta["model"]["name_or_path"] = name_or_path
        (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def _generate(model, tokenizer):
    batch = tokenizer(["the quick brown fox", "A. red"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return out[:, batch["input_ids"].shape[1] :]


def test_steering_json_names_a_built_in_model_by_its_name_never_by_this_machines_cache_path(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY_RANDOM)).eval()
    folder = _export(tmp_path, model)
    text = (folder / META_FILE).read_text()
    assert json.loads(text)["model"]["name_or_path"] == TINY_RANDOM
    assert str(cache_dir()) not in text and str(cache_dir().resolve()) not in text


def test_an_older_exports_cache_path_from_another_machine_maps_to_the_built_in_name():
    assert portable_name(str(cache_dir() / SMOLLM2)) == SMOLLM2
    assert portable_name(f"/home/someone-else/.cache/corrsteer-pl/{SMOLLM2}") == SMOLLM2
    assert portable_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_steering_json_records_architecture_width_layers_and_the_weights_fingerprint(base, tmp_path):
    folder, model = base
    recorded = json.loads((_export(tmp_path, model) / META_FILE).read_text())["model"]
    assert recorded["name_or_path"] == str(folder), "a user's own folder is kept as given"
    assert (recorded["architecture"], recorded["num_layers"], recorded["d_model"]) == ("LlamaForCausalLM", 3, 64)
    assert recorded["fingerprint"] == fingerprint(model) and len(recorded["fingerprint"]) == 64


def test_the_fingerprint_is_the_same_in_float32_and_bfloat16_and_changes_with_one_weight(base):
    folder, model = base
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert fingerprint(reloaded) == fingerprint(model)
    assert fingerprint(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)) == fingerprint(model)
    with torch.no_grad():
        reloaded.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # a sampled element (the first one)
    assert fingerprint(reloaded) != fingerprint(model)


@pytest.mark.parametrize("given", ["path", "module"])
def test_load_steered_model_takes_the_model_when_the_recorded_one_is_not_on_this_machine(base, tmp_path, given):
    folder, model = base
    export = _export(tmp_path, model, name_or_path="/another/machine/models/tiny")
    with _steering(model).apply(model):
        expected = _generate(model, tiny_tokenizer())
    own = AutoModelForCausalLM.from_pretrained(folder).eval()
    steered, tokenizer = load_steered_model(export, model=folder if given == "path" else own)
    assert torch.equal(_generate(steered, tokenizer), expected)


def test_a_recorded_model_that_is_not_here_is_one_line_saying_to_pass_model(base, tmp_path):
    export = _export(tmp_path, base[1], name_or_path="/another/machine/models/tiny")
    with pytest.raises(ValueError) as err:
        load_steered_model(export)
    message = str(err.value)
    assert "\n" not in message and str(export / META_FILE) in message and "model=" in message
    assert "/another/machine/models/tiny" in message


def test_a_model_with_other_weights_is_refused_naming_the_export_what_it_was_made_for_and_the_fix(base, tmp_path):
    folder, model = base
    export = _export(tmp_path, model)
    other = tiny_model("llama", num_layers=3, seed=1)  # the same shape, other weights
    with pytest.raises(ValueError) as err:
        load_steered_model(export, model=other, tokenizer=tiny_tokenizer())
    message = str(err.value)
    assert "\n" not in message and str(export) in message and str(folder) in message
    assert "other weights" in message and "LlamaForCausalLM" in message and "model=" in message
    assert not hasattr(other, "corrsteer_hooks"), "nothing was attached"


@pytest.mark.parametrize(("layers", "hidden"), [(2, 64), (3, 32)])
def test_a_model_of_another_depth_or_width_is_refused_in_one_line(base, tmp_path, layers, hidden):
    export = _export(tmp_path, base[1])
    with pytest.raises(ValueError) as err:
        load_steered_model(export, model=tiny_model("llama", num_layers=layers, hidden=hidden), tokenizer=object())
    message = str(err.value)
    assert "\n" not in message and str(export) in message and f"{layers} layers of width {hidden}" in message


def test_an_export_written_before_identities_were_recorded_still_loads(base, tmp_path):
    folder, model = base
    export = _export(tmp_path, model)
    meta = json.loads((export / META_FILE).read_text())
    for key in ("architecture", "model_type", "dtype", "fingerprint", "fingerprint_method"):
        del meta["model"][key]
    (export / META_FILE).write_text(json.dumps(meta))
    steered, tokenizer = load_steered_model(export)
    with _steering(model).apply(model):
        assert torch.equal(_generate(steered, tokenizer), _generate(model, tiny_tokenizer()))


def test_the_export_cli_takes_the_base_model_by_flag_and_refuses_other_weights(base, tmp_path, capsys):
    folder, model = base
    export = _export(tmp_path, model, name_or_path="/another/machine/models/tiny")
    other = tmp_path / "other"
    tiny_model("llama", num_layers=3, seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    capsys.readouterr()
    assert main([str(export), "--to", "merged", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    error = err[err.index("corrsteer-export: error:") :]  # after the loader's progress bars
    assert error.count("\n") == 1 and "other weights" in error and "--model" in error and "Traceback" not in err
    assert main([str(export), "--to", "merged", "--model", str(folder)]) == 0
    assert (export / MERGED_DIR / "model.safetensors").is_file()
