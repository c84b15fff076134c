"""The vLLM plugin's pure parts, without vLLM: per-request arguments, prefix-cache block keys, start-up checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from corrsteer_pl.serve import served as served_module
from corrsteer_pl.serve.checks import check_served_model
from corrsteer_pl.serve.prefix import block_key
from corrsteer_pl.serve.requests import RequestSteering, mentions_steering, request_steering
from corrsteer_pl.serve.served import ENV, ServedSteering, served_steering
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors


def _served(layers=(1, 2), d_model=8, num_layers=3, positions="generation") -> ServedSteering:
    steering = SteeringVectors(
        layers={layer: LayerSteering(layer, torch.ones(d_model), []) for layer in layers},
        d_model=d_model, num_layers=num_layers, positions=positions, model_name_or_path="tiny",
        lm_eval_hookpoints={layer: f"layers.{layer}" for layer in layers},
    )  # fmt: skip
    return ServedSteering(Path("/exports/x"), steering, steering.key()[:16])


def test_a_request_is_steered_at_scale_one_unless_it_says_otherwise():
    assert request_steering(None, "generation") == RequestSteering(1.0, "generation")
    assert request_steering({"corrsteer": False, "corrsteer_scale": 3}, "generation").scale == 0.0
    assert request_steering({"corrsteer": 0}, "all") == RequestSteering(0.0, "all")  # JSON false via the server
    assert request_steering({"corrsteer": 1, "corrsteer_scale": -0.5}, "generation").scale == -0.5
    assert request_steering({"corrsteer_positions": "all"}, "generation").positions == "all"
    assert request_steering({"other_extension": "x"}, "generation").steered
    assert not mentions_steering({"other_extension": 1}) and mentions_steering({"corrsteer_scal": 1})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"corrsteer": "yes"}, "vllm_xargs.corrsteer: must be true or false, got 'yes'"),
        ({"corrsteer": 1.0}, "vllm_xargs.corrsteer: must be true or false, got 1.0"),
        ({"corrsteer_scale": "2"}, "vllm_xargs.corrsteer_scale: must be a finite number, got '2'"),
        ({"corrsteer_scale": float("inf")}, "vllm_xargs.corrsteer_scale: must be a finite number, got inf"),
        ({"corrsteer_scale": True}, "vllm_xargs.corrsteer_scale: must be a finite number, got True"),
        ({"corrsteer_positions": "prompt"}, "vllm_xargs.corrsteer_positions: must be 'generation' or 'all'"),
        ({"corrsteer_scal": 2}, "vllm_xargs.corrsteer_scal: unknown steering argument; use corrsteer, "),
    ],
)
def test_a_bad_argument_is_one_line_naming_it(args, message):
    with pytest.raises(ValueError) as err:
        request_steering(args, "generation")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def _request(extra_args, num_prompt_tokens):
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra_args), num_prompt_tokens=num_prompt_tokens)


def test_only_blocks_that_hold_a_steered_position_get_a_key():
    served = _served()
    steered, plain = _request({}, 80), _request({"corrsteer": False}, 80)
    assert block_key(served, steered, 64) is None  # positions 0..63 < 79: computed as without steering
    assert block_key(served, steered, 80) is not None  # holds position 79, the last prompt position
    assert block_key(served, plain, 96) is None
    assert block_key(served, _request(None, 80), 96) is not None  # steered by default
    assert block_key(served, SimpleNamespace(sampling_params=None, num_prompt_tokens=5), 32) is None


def test_block_keys_differ_by_scale_first_position_and_policy():
    served = _served()
    keys = {
        block_key(served, _request(args, n), 128)
        for args, n in [({}, 80), ({"corrsteer_scale": 0.5}, 80), ({}, 104), ({"corrsteer_positions": "all"}, 80)]
    }
    assert len(keys) == 4
    assert block_key(served, _request({"corrsteer_positions": "all"}, 80), 32) is not None  # all: from position 0


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (SimpleNamespace(hidden_size=16, num_hidden_layers=3), "has width 16: serve the model it was made for"),
        (SimpleNamespace(hidden_size=8, num_hidden_layers=4), "has 4 layers: serve the model it was made for"),
        (SimpleNamespace(hidden_size=8, num_hidden_layers=2), "layer 2 does not exist in the served model 'm'"),
    ],
)
def test_a_served_model_of_another_shape_refuses_in_one_line(config, words):
    with pytest.raises(SystemExit) as err:
        check_served_model(_served(), config, "m")
    line = str(err.value.code)
    assert line.startswith("corrsteer: /exports/x/steering.json") and words in line and "\n" not in line
    assert f"{ENV} to an export made from 'm'" in line


def test_the_export_is_read_from_the_environment(monkeypatch, tmp_path):
    served_module.served_steering.cache_clear()
    monkeypatch.delenv(ENV, raising=False)
    assert served_steering() is None
    served_module.served_steering.cache_clear()
    monkeypatch.setenv(ENV, str(tmp_path / "gone"))
    with pytest.raises(SystemExit, match=f"corrsteer: {ENV}=.*gone: no such folder"):
        served_steering()
    served_module.served_steering.cache_clear()
    _served().steering.save(tmp_path / "ok")
    monkeypatch.setenv(ENV, str(tmp_path / "ok"))
    assert sorted(served_steering().steering.layers) == [1, 2]
    served_module.served_steering.cache_clear()
