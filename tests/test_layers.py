import pytest

from corrsteer_pl.models.layers import decoder_layers_path, layer_from_hook_name, lm_eval_hookpoint
from corrsteer_pl.models.tiny import tiny_model


@pytest.mark.parametrize(
    ("hook", "layer"),
    [
        ("blocks.12.hook_resid_post", 12),
        ("blocks.12.hook_resid_pre", 11),
        ("model.layers.7", 7),
        ("model.layers.7.output", 7),
        ("layers.3", 3),
        ("transformer.h.5", 5),
    ],
)
def test_hook_names_map_to_the_layer_whose_output_they_read(hook, layer):
    assert layer_from_hook_name(hook) == layer


@pytest.mark.parametrize("hook", ["blocks.3.hook_mlp_out", "blocks.0.hook_resid_pre", "blocks.3.attn.hook_z", "embed"])
def test_unmappable_hook_is_refused_with_its_name(hook):
    with pytest.raises(ValueError, match=hook.replace(".", r"\.")):
        layer_from_hook_name(hook)


@pytest.mark.parametrize(
    ("arch", "path", "hookpoint"),
    [("llama", "model.layers", "layers.1"), ("qwen2", "model.layers", "layers.1"), ("gpt2", "transformer.h", "h.1")],
)
def test_decoder_layers_and_lm_eval_hookpoints_are_found_per_architecture(arch, path, hookpoint):
    model = tiny_model(arch)
    assert decoder_layers_path(model) == path
    assert lm_eval_hookpoint(model, 1) == hookpoint
    assert model.base_model.get_submodule(hookpoint) is model.get_submodule(f"{path}.1")
