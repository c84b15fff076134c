"""Serving formats: llama.cpp control vector (GGUF), bias-folded HF folder, the export CLI, atomic writes."""

import contextlib
import io

import gguf
import numpy as np
import pytest
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from corrsteer_pl.models.tiny import tiny_model, tiny_tokenizer
from corrsteer_pl.steering.formats import main, write_formats
from corrsteer_pl.steering.serving import CONTROL_VECTOR_FILE, MERGED_DIR, write_control_vector, write_merged
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors

D_MODEL, NUM_LAYERS = 64, 3


def _steering(layers=(1, 2), positions="all", name_or_path="", scale=3.0) -> SteeringVectors:
    gen = torch.Generator().manual_seed(7)
    vectors = {layer: scale * torch.randn(D_MODEL, generator=gen) for layer in layers}
    return SteeringVectors(
        layers={layer: LayerSteering(layer, v, []) for layer, v in vectors.items()},
        d_model=D_MODEL,
        num_layers=NUM_LAYERS,
        positions=positions,
        model_name_or_path=name_or_path,
        lm_eval_hookpoints={layer: f"layers.{layer}" for layer in vectors},
    )


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama and tokenizer saved to disk, so exports can name a real model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=NUM_LAYERS).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _logits(model, tokenizer):
    batch = tokenizer(["the quick brown fox", "A. red B. blue", "Answer:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits  # (B, T, vocab)


def test_gguf_round_trip_names_dtype_values_and_metadata(tmp_path):
    steering = _steering(layers=(2, 1))
    path = write_control_vector(steering, tmp_path / CONTROL_VECTOR_FILE, "llama")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    semantics = {name: value for name, value in fields.items() if name.startswith("corrsteer.")}
    assert {name: value for name, value in fields.items() if name not in semantics} == {
        "general.architecture": "controlvector",
        "controlvector.model_hint": "llama",
        "controlvector.layer_count": 2,
    }
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]
    for tensor in reader.tensors:
        layer = int(tensor.name.split(".")[1])
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert len(tensor.shape) == 1
        np.testing.assert_array_equal(np.asarray(tensor.data), steering.layers[layer].vector.numpy())


def test_gguf_records_the_operation_hook_point_index_convention_and_policy(tmp_path):
    path = write_control_vector(_steering(layers=(2, 1), positions="generation"), tmp_path / "cv.gguf", "llama")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}
    assert fields["corrsteer.operation"] == "add"
    assert fields["corrsteer.hook_point"].startswith("the residual stream after decoder layer N")
    assert (
        "direction.N is added after decoder layer N, 0-based: N = HF model.layers[N]" in fields["corrsteer.layer_index"]
    )
    assert fields["corrsteer.layers"] == [1, 2]
    assert fields["corrsteer.strength"] == 1.0
    assert fields["corrsteer.positions"] == "generation"
    assert fields["corrsteer.applied_positions"].startswith("all: llama.cpp")


def test_gguf_refuses_layer_zero_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="layer 0") as err:
        write_control_vector(_steering(layers=(0, 2)), tmp_path / CONTROL_VECTOR_FILE, "llama")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_gguf_refuses_an_empty_steering(tmp_path):
    with pytest.raises(ValueError, match="no layers"):
        write_control_vector(_steering(layers=()), tmp_path / CONTROL_VECTOR_FILE, "llama")


def test_merged_folder_equals_all_positions_steering(saved_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    tokenizer = tiny_tokenizer()
    steering = _steering(layers=(0, 2))  # layer 0 folds fine: only the gguf format lacks it
    folder = write_merged(steering, model, tokenizer, tmp_path / MERGED_DIR)
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, no corrsteer code
    with steering.apply(model):
        expected = _logits(model, tokenizer)
    assert merged.config.mlp_bias is True
    assert (_logits(merged, tokenizer) - expected).abs().max().item() <= 1e-4
    assert (_logits(model, tokenizer) - expected).abs().max().item() > 1e-2  # the steering does change logits


def test_merged_biases_are_zero_except_down_proj_of_steered_layers(saved_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    steering = _steering(layers=(1,))
    merged = AutoModelForCausalLM.from_pretrained(write_merged(steering, model, None, tmp_path / MERGED_DIR))
    for i, layer in enumerate(merged.model.layers):
        assert not layer.mlp.gate_proj.bias.any() and not layer.mlp.up_proj.bias.any()
        expected = steering.layers[1].vector if i == 1 else torch.zeros(D_MODEL)
        torch.testing.assert_close(layer.mlp.down_proj.bias.detach(), expected, rtol=0, atol=0)


def test_merged_refuses_gemma2_saying_why_and_what_instead(tmp_path):
    with pytest.raises(ValueError) as err:
        write_merged(_steering(), tiny_model("gemma2", num_layers=NUM_LAYERS), None, tmp_path / MERGED_DIR)
    message = str(err.value)
    assert "post_feedforward_layernorm" in message and "steering.gguf" in message and "positions='all'" in message
    assert "\n" not in message
    assert not (tmp_path / MERGED_DIR).exists()


def test_write_formats_checks_every_format_before_writing_any(tmp_path):
    with pytest.raises(ValueError, match="post_feedforward_layernorm"):
        write_formats(tmp_path, _steering(), tiny_model("gemma2", num_layers=NUM_LAYERS), None, ["gguf", "merged"])
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        write_formats(tmp_path, _steering(), tiny_model("llama", num_layers=NUM_LAYERS), None, ["gguf", "onnx"])
    assert not list(tmp_path.iterdir())


def test_cli_writes_both_formats(saved_llama, tmp_path, capsys):
    steering = _steering(positions="generation", name_or_path=str(saved_llama))
    steering.save(tmp_path)
    assert main([str(tmp_path), "--to", "gguf", "merged"]) == 0
    names = [t.name for t in gguf.GGUFReader(tmp_path / CONTROL_VECTOR_FILE).tensors]
    assert names == ["direction.1", "direction.2"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / MERGED_DIR)
    torch.testing.assert_close(merged.model.layers[2].mlp.down_proj.bias.detach(), steering.layers[2].vector)
    assert (tmp_path / MERGED_DIR / "tokenizer.json").is_file()
    assert "every position" in capsys.readouterr().err  # the generation-only steering is served at all positions


def test_cli_gguf_alone_reads_only_the_config_for_the_hint(saved_llama, tmp_path):
    _steering(name_or_path=str(saved_llama)).save(tmp_path)
    assert main([str(tmp_path), "--to", "gguf"]) == 0
    reader = gguf.GGUFReader(tmp_path / CONTROL_VECTOR_FILE)
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert not (tmp_path / MERGED_DIR).exists()


def test_cli_uses_the_exports_standalone_model_and_the_given_hint(saved_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    _steering(name_or_path="not/on-this-machine").save(tmp_path, model=model, tokenizer=tiny_tokenizer())
    assert main([str(tmp_path), "--to", "merged", "gguf", "--model-hint", "smollm2"]) == 0
    reader = gguf.GGUFReader(tmp_path / CONTROL_VECTOR_FILE)
    assert reader.fields["controlvector.model_hint"].contents() == "smollm2"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / MERGED_DIR).config.mlp_bias is True


@pytest.mark.parametrize(("layers", "hidden"), [(2, D_MODEL), (NUM_LAYERS, 32)])
def test_cli_gguf_refuses_a_layer_or_width_its_models_config_lacks(tmp_path, layers, hidden):
    model = tmp_path / "model"
    tiny_model("llama", num_layers=layers, hidden=hidden).save_pretrained(model)
    _steering(name_or_path=str(model)).save(tmp_path / "export")  # layers 1 and 2 of width 64
    error = _cli_error([str(tmp_path / "export"), "--to", "gguf"])
    assert f"{layers} layers of width {hidden}" in error and "--model" in error
    assert not (tmp_path / "export" / CONTROL_VECTOR_FILE).exists()


def test_cli_merged_on_a_full_disk_is_one_line_and_leaves_the_old_merged_folder(saved_llama, tmp_path, monkeypatch):
    _steering(name_or_path=str(saved_llama)).save(tmp_path)
    assert main([str(tmp_path), "--to", "merged"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / MERGED_DIR).iterdir()}

    def full_disk(*args, **kwargs):  # what safetensors' writer raises when the disk fills up
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    error = _cli_error([str(tmp_path), "--to", "merged"])
    assert "No space left on device" in error and str(tmp_path / MERGED_DIR) in error
    assert {p.name: p.read_bytes() for p in (tmp_path / MERGED_DIR).iterdir()} == before


def _cli_error(argv: list[str]) -> str:
    """The one line `main` prints for a failure (after any progress bar of the loaders), checked to be one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    text = err.getvalue()
    line = text[text.index("corrsteer-export: error:") :]
    assert line.count("\n") == 1 and "Traceback" not in text
    return line


@pytest.mark.parametrize(
    "argv, names",
    [
        (["{missing}", "--to", "gguf"], "is not a folder"),
        (["{export}", "--to", "onnx"], "--to"),
        (["{export}"], "--to"),
    ],
)
def test_cli_bad_input_fails_in_one_line_with_exit_code_2(saved_llama, tmp_path, capsys, argv, names):
    _steering(name_or_path=str(saved_llama)).save(tmp_path / "export")
    argv = [a.format(missing=tmp_path / "missing", export=tmp_path / "export") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err and "Traceback" not in err


def test_cli_names_steering_json_when_its_model_is_missing(tmp_path, capsys):
    _steering(name_or_path=str(tmp_path / "gone")).save(tmp_path / "export")
    assert main([str(tmp_path / "export"), "--to", "merged"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steering.json" in err


def test_failed_gguf_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = write_control_vector(_steering(), tmp_path / CONTROL_VECTOR_FILE, "llama")
    before = path.read_bytes()

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_control_vector(_steering(scale=5.0), path, "llama")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CONTROL_VECTOR_FILE]  # no temporary file left behind


def test_failed_merged_write_leaves_the_old_folder_intact(saved_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_llama).eval()
    folder = write_merged(_steering(), model, tiny_tokenizer(), tmp_path / MERGED_DIR)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("partial")
            raise OSError("killed mid-write")

    with pytest.raises(OSError, match="killed mid-write"):
        write_merged(_steering(scale=5.0), model, BrokenTokenizer(), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [MERGED_DIR]


def test_fit_writes_the_requested_serving_formats_and_warns_for_one_it_cannot(tmp_path):
    """--export.formats: merged/ lands in the export; gguf cannot hold layer 0, so fit warns and goes on."""
    from corrsteer_pl.lightning.cli import main as cli

    args = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--export.formats", "[gguf, merged]"]
    with pytest.warns(UserWarning, match="--export.formats: gguf not written: layer 0"):
        cli(["fit", *args])
    export = tmp_path / "steered"
    steering = SteeringVectors.load(export)
    assert sorted(steering.layers) == [0, 1] and not (export / CONTROL_VECTOR_FILE).exists()
    merged = AutoModelForCausalLM.from_pretrained(export / MERGED_DIR)
    for layer, steer in steering.layers.items():
        torch.testing.assert_close(merged.model.layers[layer].mlp.down_proj.bias, steer.vector, rtol=0, atol=0)
