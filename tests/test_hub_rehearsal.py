"""The presets rehearsed offline: a Hugging Face cache of tiny stand-ins in the published layouts
(tests/hub_rehearsal.py), read by the unmodified loading code (`from_pretrained`, `SAE.from_pretrained`,
`hf_hub_download`, `load_dataset`) in subprocesses whose HF_HOME is that cache and whose hub is offline.
Nothing here is monkeypatched."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_rehearsal  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAE_LAYERS = (1, 2)
GEMMA_SAES = [f"layer_{layer}/width_16k/canonical" for layer in SAE_LAYERS]
LLAMA_SAES = [f"l{layer}r_8x" for layer in SAE_LAYERS]
TASK_OPTIONS = {"simpleqa": {"judge": "exact-match"}, "harmbench": {"judge": "refusal-phrases"},
                "xstest": {"judge": "refusal-phrases"}}  # fmt: skip  # their judges are hub models, not stood in


@pytest.fixture(scope="module")
def datasets_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-datasets")
    hub_rehearsal.write_datasets(home, rows=24)
    return home


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    return hub_rehearsal.write_cache(tmp_path_factory.mktemp("hf-home"), sae_layers=SAE_LAYERS, rows=24)


def run(code: str, home: Path, *args: str) -> str:
    return hub_rehearsal.run_python(code, home, *args).stdout


EVERY_TASK = """
import json, sys
from corrsteer_pl.tasks import SPLITS, get_task
out = {}
for name, options in json.loads(sys.argv[1]).items():
    task = get_task(name, source="hub", **options)
    out[name] = {split: len(task.load_split(split)) for split in SPLITS}
print(json.dumps(out))
"""


def test_every_task_loads_every_split_from_its_hub_id_offline(datasets_home):
    tasks = ("mmlu", "mmlu_pro", "bbq_ambig", "bbq_disambig", "simpleqa", "harmbench", "xstest", "gsm8k")
    counts = json.loads(run(EVERY_TASK, datasets_home, json.dumps({t: TASK_OPTIONS.get(t, {}) for t in tasks})))
    assert set(counts) == set(tasks)
    for task, splits in counts.items():
        assert all(n > 0 for n in splits.values()), f"{task}: an empty split {splits}"
    assert counts["mmlu"] == {"calibration": 24, "validation": 24, "test": 24}  # auxiliary_train, validation, test
    assert counts["bbq_ambig"]["test"] + counts["bbq_disambig"]["test"] > 24 * 11 // 2  # 11 category folders


WRONG_NAMES = """
import datasets, json
from corrsteer_pl.tasks.rows import read_hub, read_hub_parquet
out = []
for call in (lambda: read_hub("cais/mmlu", "alll", split="test"),
             lambda: read_hub("cais/mmlu", "all", split="dev2"),
             lambda: read_hub("openai/gsm8k", "mainn", split="test"),
             lambda: read_hub("walledai/XSTest", split="train"),
             lambda: read_hub("openai/gsm8", "main", split="test"),
             lambda: read_hub_parquet("heegyu/bbq", "refs/convert/parquets", "Age/test"),
             lambda: read_hub_parquet("heegyu/bbq", "refs/convert/parquet", "Agee/test")):
    try:
        call()
        out.append("loaded")
    except Exception as error:
        out.append(str(error))
# what an online load_dataset(data_dir=...) leaves in the cache, it cannot find offline (why BBQ reads files):
try:
    datasets.load_dataset("heegyu/bbq", split="test", data_dir="Age", revision="refs/convert/parquet")
    out.append("loaded")
except Exception as error:
    out.append(str(error).splitlines()[0])
print(json.dumps(out))
"""


def test_a_wrong_dataset_id_config_split_revision_or_folder_fails_in_one_line(datasets_home):
    errors = json.loads(run(WRONG_NAMES, datasets_home))
    assert "loaded" not in errors
    assert all("\n" not in e for e in errors)
    assert "cais/mmlu/alll test" in errors[0] and "--data.source" in errors[0]
    assert "dev2" in errors[1] and "mainn" in errors[2] and "walledai/XSTest train" in errors[3]
    assert "openai/gsm8" in errors[4]
    assert "refs/convert/parquets" in errors[5] and "Agee/test" in errors[6]
    assert "Couldn't find cache for heegyu/bbq for config 'default-data_dir=Age'" in errors[7]


SAE_CHECKS = """
import json, math, sys
import numpy as np, torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformers import AutoModelForCausalLM, AutoTokenizer
from corrsteer_pl.calibration.capture import encode_rows
from corrsteer_pl.models.hooks import LayerHooks
from corrsteer_pl.models.sae import check_sae_fits, load_sae

hub_id, release, sae_ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(hub_id, padding_side="left")
batch = tokenizer(["Question: Which option is number 2?\\nA. zero\\nB. one\\nAnswer:"], return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch, output_hidden_states=True).hidden_states
lookup = get_pretrained_saes_directory()[release]
out = {"model": type(model).__name__, "pad": tokenizer.pad_token, "saes": {}}
for sae_id in sae_ids:
    sae = load_sae(release, sae_id, dtype="float32")
    layer = check_sae_fits(sae, model, sae_id)
    seen = {}
    with torch.no_grad(), LayerHooks(model, {layer: lambda h, m: seen.setdefault("h", h.clone())}, positions="all"):
        model(**batch)
    x = seen["h"][0, -1:]  # what the SAE's hook reads at the last position (1, d_model)
    folder = lookup.saes_map[sae_id]
    x64 = x[0].double().numpy()
    if release.startswith("gemma-scope"):  # Gemma Scope: JumpReLU with a threshold per latent, raw input
        raw = np.load(hf_hub_download(lookup.repo_id, f"{folder}/params.npz"))
        pre = x64 @ raw["W_enc"].astype(np.float64) + raw["b_enc"]
        expected = pre * (pre > raw["threshold"])
    else:  # Llama Scope: input times sqrt(d_model) / dataset average norm, then JumpReLU in those units
        hyper = json.load(open(hf_hub_download(lookup.repo_id, f"{folder}/hyperparams.json")))
        raw = {k: v.double().numpy() for k, v in load_file(
            hf_hub_download(lookup.repo_id, f"{folder}/checkpoints/final.safetensors")).items()}
        scale = math.sqrt(hyper["d_model"]) / hyper["dataset_average_activation_norm"]["in"]
        pre = (x64 * scale) @ raw["encoder.weight"].T + raw["encoder.bias"]
        expected = pre * (pre > hyper["jump_relu_threshold"] * scale)
    got = encode_rows(sae, x)[0].double().numpy()
    out["saes"][sae_id] = {
        "layer": layer, "hook": sae.cfg.metadata.hook_name, "neuronpedia": sae.cfg.metadata.neuronpedia_id,
        "registry_neuronpedia": lookup.neuronpedia_id[sae_id], "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
        "read_equals_layer_output": bool(torch.equal(x[0], hidden[layer + 1][0, -1])),
        "firing": int((expected > 0).sum()), "same_firing": bool(((got > 0) == (expected > 0)).all()),
        "max_diff": float(np.abs(got - expected).max()), "largest": float(np.abs(expected).max()),
    }
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "hub_id, release, sae_ids, d_sae, model_class, pad",
    [
        ("google/gemma-2-2b-it", "gemma-scope-2b-pt-res-canonical", GEMMA_SAES, 16384, "Gemma2ForCausalLM", "<pad>"),
        ("meta-llama/Llama-3.1-8B", "llama_scope_lxr_8x", LLAMA_SAES, hub_rehearsal.LLAMA_SCOPE_D_SAE,
         "LlamaForCausalLM", None),
    ],
)  # fmt: skip
def test_each_preset_sae_reads_its_layer_output_and_encodes_as_the_raw_files_say(
    hub_home, hub_id, release, sae_ids, d_sae, model_class, pad
):
    out = json.loads(run(SAE_CHECKS, hub_home, hub_id, release, json.dumps(sae_ids)))
    assert out["model"] == model_class and out["pad"] == pad  # Llama 3.1 ships no pad token
    for sae_id, layer in zip(sae_ids, SAE_LAYERS, strict=True):
        sae = out["saes"][sae_id]
        assert sae["layer"] == layer and sae["hook"] == f"blocks.{layer}.hook_resid_post"
        assert sae["read_equals_layer_output"], "the hook reads model.model.layers[L]'s output"
        assert (sae["d_in"], sae["d_sae"]) == (hub_rehearsal.MODELS[hub_id].hidden, d_sae)
        assert sae["neuronpedia"] == sae["registry_neuronpedia"] is not None
        assert 0 < sae["firing"] < hub_rehearsal.ACTIVE, "some latents fire, some do not: thresholds bite"
        assert sae["same_firing"] and sae["max_diff"] <= 1e-4 * sae["largest"], sae


MISSING = """
import json
from transformers import AutoModelForCausalLM
from corrsteer_pl.models.sae import load_sae
from corrsteer_pl.models.sources import load_pretrained
out = []
for call in (lambda: load_sae("gemma-scope-2b-pt-res-canonical", "layer_5/width_16k/canonical"),
             lambda: load_sae("llama_scope_lxr_8x", "l7r_8x"),
             lambda: load_pretrained(AutoModelForCausalLM.from_pretrained, "google/gemma-2-9b-it")):
    try:
        call()
        out.append("loaded")
    except ValueError as error:
        out.append(str(error))
print(json.dumps(out))
"""


def test_what_the_cache_cannot_serve_is_one_line_naming_the_repo_and_file(datasets_home):
    gemma, llama, model = json.loads(run(MISSING, datasets_home))  # a cache with no model or SAE in it
    assert "\n" not in gemma + llama + model
    assert "google/gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_" in gemma and "params.npz" in gemma
    assert "fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L7R-8x/hyperparams.json" in llama
    assert "google/gemma-2-9b-it/config.json" in model and "not in the HF cache" in model


def preset_run(home: Path, root: Path, preset: str, saes: list[dict], task_args: list[str]) -> None:
    """`train.py fit` then `train.py test` on a preset, overriding only sizes, the layer list and the accelerator,
    in one fresh process (its HF_HOME is the rehearsal cache): `test` reads the export `fit` wrote, from disk."""
    common = ["--config", str(ROOT / "configs" / f"{preset}.yaml"), "--trainer.accelerator", "cpu",
              "--trainer.strategy", "auto", "--trainer.devices", "1", "--trainer.default_root_dir", str(root),
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--model.saes", json.dumps(saes),
              "--data.limit_calibration", "16", "--data.limit_validation", "8", "--data.limit_test", "8",
              "--data.batch_size", "8", "--model.controls", "2",
              "--side_effects.items", "4", "--side_effects.open_tokens", "2", "--side_effects.controls", "1",
              # 16 items make no feature significant: export anyway (this rehearses loading, not evidence)
              "--selection.require_significance", "false", *task_args]  # fmt: skip
    code = "import sys; from corrsteer_pl.lightning.cli import main; "
    code += "main(['fit', *sys.argv[1:]]); main(['test', *sys.argv[1:]])"
    hub_rehearsal.run_python(code, home, *common)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, release, sae_ids, neuronpedia",
    [
        ("gemma2-2b-it_mmlu", "gemma-scope-2b-pt-res-canonical", GEMMA_SAES, "gemma-2-2b/{}-gemmascope-res-16k"),
        ("llama3.1-8b_bbq_disambig", "llama_scope_lxr_8x", LLAMA_SAES, "llama3.1-8b/{}-llamascope-res-32k"),
    ],
)
def test_preset_fits_and_tests_by_hub_id_and_links_each_chosen_feature_to_neuronpedia(
    hub_home, tmp_path, preset, release, sae_ids, neuronpedia
):
    preset_run(hub_home, tmp_path, preset, [{"source": release, "sae_id": i} for i in sae_ids], [])
    export = tmp_path / "steered"
    selection = json.loads((export / "selection.json").read_text())
    assert selection["chosen"], selection["warnings"]
    for f in selection["chosen"]:
        assert f["neuronpedia_url"] == f"https://neuronpedia.org/{neuronpedia.format(f['layer'])}/{f['feature']}"
    report = json.loads((export / "report.json").read_text())
    assert report["split"] == "test" and report["samples"] == 8
    assert {f["neuronpedia_url"] for f in report["features"]} == {f["neuronpedia_url"] for f in selection["chosen"]}
    assert f"]({selection['chosen'][0]['neuronpedia_url']})" in (export / "report.md").read_text()
    steered = {c["name"]: c for c in report["conditions"]}["steered"]
    assert 0 <= steered["valid_rate"] <= 1 and {c["kind"] for c in report["controls"]} >= {"random_feature"}
    side = report["side_effects"]  # the preset's side-effects pass, its other tasks loaded by hub id as the target
    target = report["task"]
    assert [t["task"] for t in side["tasks"]] == [
        t for t in ("mmlu", "bbq_disambig", "xstest", "harmbench") if t != target
    ]
    assert all(t["items"] == 4 for t in side["tasks"]) and side["open_generation"]["measures"].keys() >= {"raw"}
