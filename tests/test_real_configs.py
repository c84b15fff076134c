"""The real-model presets (Gemma-2 2B + Gemma Scope, Llama-3.1 8B + Llama Scope): in sync with their
generator, accepted by the CLI, and runnable end to end with the hub swapped for tiny stand-ins.

The stand-ins sit at the hub boundary: `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` are redirected from the hub id to a local folder holding a tiny
random model of the same architecture class and layer count (the real transformers loading code
then runs on it, with the preset's revision and dtype), and `sae_lens.SAE.from_pretrained`, whose
download and conversion cannot run offline (Gemma Scope's converter also fixes d_in at 2304),
returns a random JumpReLU SAE reading the hook the real release reads, loaded through sae-lens's
own `load_from_disk`. Everything between the preset and those calls is the production code path.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2ForCausalLM, LlamaForCausalLM

from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.tiny import random_sae, tiny_model, tiny_tokenizer
from corrsteer_pl.steering.vectors import SteeringVectors
from corrsteer_pl.tasks import get_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_spec = importlib.util.spec_from_file_location("make_presets", CONFIGS / "make_presets.py")
presets = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("make_presets", presets)  # dataclasses look their module up there
_spec.loader.exec_module(presets)

TASKS = ("mmlu", "mmlu_pro", "bbq_ambig", "bbq_disambig", "simpleqa", "harmbench", "xstest", "gsm8k")
PRESETS = [f"{model}_{task}" for model in ("gemma2-2b-it", "llama3.1-8b") for task in TASKS]
# What each preset must read: hub id, sae-lens release, number of layers, the release's sae ids.
EXPECTED = {
    "gemma2-2b-it": ("google/gemma-2-2b-it", "gemma-scope-2b-pt-res-canonical", 26, "layer_{}/width_16k/canonical"),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B", "llama_scope_lxr_8x", 32, "l{}r_8x"),
}
# Both Gemma Scope (res) and Llama Scope (LXR) SAEs read the residual stream after block L.
REAL_HOOK = "blocks.{}.hook_resid_post"
TINY_ARCH = {
    "google/gemma-2-2b-it": ("gemma2", Gemma2ForCausalLM),
    "meta-llama/Llama-3.1-8B": ("llama", LlamaForCausalLM),
}
PAPER_SIZES = {"simpleqa": (1167, 130), "harmbench": (108, 12), "xstest": (121, 14)}  # others: 4000 / 200
PAPER_NEW_TOKENS = {"simpleqa": 16, "harmbench": 32, "xstest": 32, "gsm8k": 512}  # others: 1


def test_committed_presets_match_their_generator():
    generated = presets.presets()
    on_disk = {p for model in EXPECTED for p in CONFIGS.glob(f"{model}_*.yaml")}
    assert on_disk == set(generated), "stale or missing presets: run `python configs/make_presets.py`"
    for path, text in generated.items():
        assert path.read_text() == text, f"{path.name} differs from configs/make_presets.py: rerun it"
    assert sorted(p.stem for p in generated) == sorted(PRESETS)
    assert presets.over_budget() == [], f"planned peak above {presets.BUDGET_GB} GB"


def _printed_config(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None), exit_info.value.code
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_and_names_every_layer_of_the_real_release(name, capsys):
    config = _printed_config(name, capsys)
    model_key, task = name.split("_", 1)
    hub_id, release, num_layers, sae_id = EXPECTED[model_key]
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert model["model"] == hub_id and model["dtype"] == "bfloat16" and config["calibration"]["pooling"] == "max"
    assert model["saes"] == [{"source": release, "sae_id": sae_id.format(layer)} for layer in range(num_layers)]
    known = get_pretrained_saes_directory()[release]
    assert {s["sae_id"] for s in model["saes"]} <= set(known.saes_map), "ids sae-lens does not know"
    assert data["task"] == task and data["source"] == "hub"
    assert (data["limit_calibration"], data["limit_validation"]) == PAPER_SIZES.get(task, (4000, 200))
    assert trainer["accelerator"] == "gpu" and trainer["strategy"] == "ddp" and trainer["devices"] == 1
    assert trainer["precision"] is None, "the module sets dtypes itself"
    assert trainer["default_root_dir"] == f"runs/{name}"
    assert config["selection"]["variant"] == "A" and config["checkpoint"]["every_n_batches"] >= 1
    # The task accepts the preset's data settings (construction reads no data) and owns the paper's answer budget.
    built = get_task(data["task"], seed=data["seed"], source=data["source"])
    assert built.max_new_tokens == PAPER_NEW_TOKENS.get(task, 1) and "max_new_tokens" not in model


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """Serves tiny stand-ins for the presets' hub ids; records every call that reached the hub boundary."""
    folders: dict[str, Path] = {}
    calls: list[tuple] = []
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def add_model(hub_id: str, num_layers: int) -> None:
        folder = tmp_path / "hub" / hub_id
        tiny_model(TINY_ARCH[hub_id][0], num_layers=num_layers, hidden=64).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders[hub_id] = folder

    def local(name):
        if name not in folders:
            raise OSError(f"'{name}' is not on the fake hub")
        return folders[name]

    def model_from_pretrained(name, *args, **kwargs):
        calls.append(("model", name, kwargs.get("revision"), kwargs.get("dtype")))
        model = real_model(local(name), *args, **kwargs)
        model.name_or_path = model.config._name_or_path = name  # as a hub download records it
        return model

    def tokenizer_from_pretrained(name, *args, **kwargs):
        calls.append(("tokenizer", name))
        return real_tokenizer(local(name), *args, **kwargs)

    def sae_from_pretrained(release, sae_id, device="cpu", dtype="float32", **kwargs):
        calls.append(("sae", release, sae_id, device, dtype))
        if sae_id not in get_pretrained_saes_directory()[release].saes_map:
            raise ValueError(f"ID {sae_id} not found in release {release}")
        layer = int(re.search(r"\d+", sae_id).group())  # layer_12/width_16k/canonical, l12r_8x
        folder = tmp_path / "saes" / release / sae_id
        sae = random_sae(64, 32, layer, seed=layer)
        sae.cfg.metadata.hook_name = REAL_HOOK.format(layer)
        sae.save_model(folder)
        return SAE.load_from_disk(folder, device=device, dtype=dtype)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(model_from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", staticmethod(tokenizer_from_pretrained))
    monkeypatch.setattr(SAE, "from_pretrained", staticmethod(sae_from_pretrained))
    return add_model, calls


@pytest.mark.parametrize("name", ["gemma2-2b-it_mmlu", "llama3.1-8b_mmlu"])
def test_preset_calibrates_and_exports_with_tiny_stand_ins_of_the_same_architecture(
    name, fake_hub, one_thread, tmp_path
):
    add_model, calls = fake_hub
    hub_id, release, num_layers, sae_id = EXPECTED[name.split("_", 1)[0]]
    add_model(hub_id, num_layers)
    root = tmp_path / "run"
    cli = main(
        ["fit", "--config", str(CONFIGS / f"{name}.yaml")]
        + ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
        + ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
        + ["--model.dtype", "float32"]
        # The synthetic task: a random model's answers are right about half the time, so every layer
        # has a positively correlated feature to steer (MMLU letters would all be wrong).
        + ["--data.task", "Synthetic", "--data.task.max_new_tokens", "2", "--data.source", "null"]
        + ["--data.limit_calibration", "8"]
        + ["--data.batch_size", "4"]
        # 8 items make no feature significant: export anyway, this test is about loading and hooks, not evidence.
        + ["--selection.require_significance", "false"]
        # No TensorBoard: its per-layer r figures (tested in test_pipeline) cost ~0.2 s each x 26-32 layers.
        + ["--trainer.logger", "false"]
    )
    assert isinstance(cli.model.lm, TINY_ARCH[hub_id][1])
    assert ("model", hub_id, None, torch.float32) in calls and ("tokenizer", hub_id) in calls
    sae_dtype = presets.MODELS[name.split("_", 1)[0]].sae_dtype  # the preset's, not overridden here
    assert [c for c in calls if c[0] == "sae"] == [
        ("sae", release, sae_id.format(layer), "cpu", sae_dtype) for layer in range(num_layers)
    ]
    assert cli.trainer.global_step == 0 and cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2

    steering = SteeringVectors.load(root / "steered")
    assert steering.num_layers == num_layers and steering.model_name_or_path == hub_id
    assert steering.info["samples_seen"] == 8 and steering.info["variant"] == "A"
    assert sorted(steering.layers) == list(range(num_layers)), "variant A steers every layer with a positive r"
    for layer, steer in steering.layers.items():
        assert steer.hook_name == REAL_HOOK.format(layer)
        assert steer.sae_source == f"{release}/{sae_id.format(layer)}"
