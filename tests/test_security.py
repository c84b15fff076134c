"""Loading never executes code: a pickle payload (a `__reduce__` that creates a marker file) crafted into every kind
of file corrsteer-pl reads never runs, and each refusal is one line naming the flag or the file and the fix.

The files: `--ckpt_path` of train.py and of the fine-tune (a path or `last`, also with `--weights_only false` and
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), `--comparison.finetune` (a file or an adapter folder), an export's
lm_eval_steer.pt and vectors.safetensors, an SAE folder, statistics.safetensors, answers.safetensors, a model folder's
pytorch_model.bin; and a scan of the sources for any unpickling call.
"""

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from corrsteer_pl import finetune
from corrsteer_pl.calibration.answer_cache import AnswerCache
from corrsteer_pl.calibration.stats import load_layer_stats
from corrsteer_pl.finetune import SETTINGS_FORMAT, load_finetuned
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.sae import load_sae
from corrsteer_pl.models.sources import load_pretrained
from corrsteer_pl.models.tiny import random_sae
from corrsteer_pl.steering.vectors import LM_EVAL_FILE, VECTORS_FILE, SteeringVectors

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
FINETUNE = [
    "--model.model", "tiny-random", "--data.task", "synthetic", "--data.batch_size", "8", "--trainer.max_steps", "4",
    "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


class Payload:
    """Unpickling this calls os.system, which creates `marker`: what a crafted checkpoint does to its reader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture()
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "the pickle payload ran"


def _craft(path: Path, marker: Path, wrap: bool = True) -> Path:
    """A torch.save of a checkpoint-shaped dict (or the bare payload) that runs the payload when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "epoch": 0, "payload": Payload(marker)} if wrap else Payload(marker), path)
    return path


def _one_line(call) -> str:
    """The error of `call` as the user sees it: SystemExit's line (the CLI) or a ValueError's message."""
    with pytest.raises((SystemExit, ValueError)) as exc:
        call()
    line = str(exc.value.code if isinstance(exc.value, SystemExit) else exc.value)
    assert "\n" not in line, f"not one line: {line}"
    return line


def test_the_payload_runs_when_unpickled_so_these_tests_can_fail(tmp_path):
    marker = tmp_path / "ran"
    torch.load(_craft(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


# -- --ckpt_path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["path", "last", "weights_only false", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_train_ckpt_path_with_a_payload_is_refused_in_one_line_without_running_it(tmp_path, marker, monkeypatch, how):
    evil = _craft(tmp_path / "checkpoints" / "last.ckpt", marker)
    args = ["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path"]
    args += ["last"] if how == "last" else [str(evil)]
    if how == "weights_only false":
        args += ["--weights_only", "false"]
    if how == "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD":
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    line = _one_line(lambda: main(args))
    assert "--ckpt_path" in line and "GLOBAL posix.system" in line and "checkpoints/last.ckpt" in line


def test_finetune_ckpt_path_with_a_payload_is_refused_in_one_line_without_running_it(tmp_path, marker):
    evil = _craft(tmp_path / "evil.ckpt", marker)
    args = ["fit", *FINETUNE, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(evil)]
    line = _one_line(lambda: finetune.main(args))
    assert "--ckpt_path" in line and "finetune/checkpoints" in line


def _truncated(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(64)}}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("kind", "write", "says"),
    [
        ("truncated", _truncated, "corrupt or truncated"),
        ("random bytes", lambda p: p.write_bytes(bytes(range(256)) * 4), "not a PyTorch checkpoint"),
        ("plain tensors", lambda p: torch.save({"weights": torch.ones(3)}, p), "not a Lightning checkpoint"),
        ("a list", lambda p: torch.save([1, 2], p), "holds a list"),
        ("no Lightning version", lambda p: torch.save({"state_dict": {}, "epoch": 0, "global_step": 0}, p),
         "not a Lightning checkpoint"),
        ("another project's", lambda p: torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6",
                                                    "hyper_parameters": {"lr": 0.1}}, p),
         "is not a calibration checkpoint of `train.py fit`"),
    ],
)  # fmt: skip
def test_a_corrupt_or_foreign_ckpt_path_is_one_line_naming_the_flag_and_what_to_pass(tmp_path, kind, write, says):
    path = tmp_path / "foreign.ckpt"
    write(path)
    args = ["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(path)]
    line = _one_line(lambda: main(args))
    assert line.startswith("error: --ckpt_path") and says in line and "last.ckpt" in line, line


# -- --comparison.finetune ------------------------------------------------------------------------------------


def test_comparison_finetune_given_a_pickled_checkpoint_file_is_refused_before_any_model_loads(
    tmp_path, marker, no_model_loads
):
    evil = _craft(tmp_path / "best.ckpt", marker)
    line = _one_line(lambda: main(["test", *TINY, "--trainer.default_root_dir", str(tmp_path),
                                   "--comparison.finetune", str(evil)]))  # fmt: skip
    assert "--comparison.finetune" in line and "is a file" in line and "finetune/adapter" in line


def _adapter_folder(folder: Path) -> Path:
    """A folder that looks like fit's adapter export (settings and peft config valid), weights to be crafted."""
    folder.mkdir(parents=True)
    lora = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "seed": 0}
    settings = {"format": SETTINGS_FORMAT, "model": "tiny-random", "revision": None, "dtype": "float32",
                "max_new_tokens": None, "lora": lora}  # fmt: skip
    (folder / "finetune.json").write_text(json.dumps(settings))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_an_adapter_folder_whose_safetensors_is_a_pickle_is_refused_in_one_line(tmp_path, marker):
    folder = _adapter_folder(tmp_path / "adapter")
    _craft(folder / "adapter_model.safetensors", marker, wrap=False)
    _craft(folder / "adapter_model.bin", marker)  # what peft would torch.load without the safetensors file
    line = _one_line(lambda: load_finetuned(folder))
    assert line.startswith("--comparison.finetune: cannot load the adapters") and "SafetensorError" in line


def test_an_adapter_folder_with_only_a_pickled_bin_is_refused_in_one_line(tmp_path, marker):
    folder = _adapter_folder(tmp_path / "adapter")
    _craft(folder / "adapter_model.bin", marker)
    line = _one_line(lambda: load_finetuned(folder))
    assert "adapter_model.safetensors missing" in line and "--comparison.finetune" in line


def test_an_adapter_folder_of_another_project_is_refused_naming_its_settings_file(tmp_path):
    folder = _adapter_folder(tmp_path / "adapter")
    (folder / "finetune.json").write_text('{"model": "tiny-random"}')
    (folder / "adapter_model.safetensors").write_bytes(b"")
    assert "not written by corrsteer-pl's fine-tune" in _one_line(lambda: load_finetuned(folder))


def _full_folder(folder: Path) -> Path:
    """A folder that looks like a full fine-tune's export (settings and config valid), weights to be crafted."""
    folder.mkdir(parents=True)
    settings = {"format": SETTINGS_FORMAT, "method": "full", "model": "tiny-random", "revision": None,
                "dtype": "float32", "max_new_tokens": None, "lora": None}  # fmt: skip
    (folder / "finetune.json").write_text(json.dumps(settings))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_a_full_model_folder_whose_safetensors_is_a_pickle_is_refused_in_one_line(tmp_path, marker):
    folder = _full_folder(tmp_path / "model")
    _craft(folder / "model.safetensors", marker, wrap=False)
    _craft(folder / "pytorch_model.bin", marker)  # what transformers would read without the safetensors file
    line = _one_line(lambda: load_finetuned(folder))
    assert line.startswith("--comparison.finetune: cannot load the weights") and "SafetensorError" in line


def test_a_full_model_folder_with_only_a_pickled_bin_is_refused_in_one_line(tmp_path, marker):
    folder = _full_folder(tmp_path / "model")
    _craft(folder / "pytorch_model.bin", marker)
    line = _one_line(lambda: load_finetuned(folder))
    assert "model.safetensors missing" in line and "--comparison.finetune" in line and "finetune_full/model" in line


def test_a_full_model_folder_of_another_model_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    folder = _full_folder(tmp_path / "model")
    save_file({"model.embed_tokens.weight": torch.zeros(3, 2)}, folder / "model.safetensors")
    line = _one_line(lambda: load_finetuned(folder))
    assert line.startswith("--comparison.finetune: cannot load the weights") and "this --model.model" in line


# -- exports, SAE folders, statistics, caches, model folders ------------------------------------------------


@pytest.fixture()
def export(tmp_path, llama):
    from corrsteer_pl.selection.variants import SelectedFeature

    saes = {layer: random_sae(64, 16, layer, seed=layer) for layer in (0, 1)}
    features = [SelectedFeature(layer, 3, 0.5, 2.0, 0.1) for layer in saes]
    SteeringVectors.from_selection(features, saes, llama).save(tmp_path / "export")
    return tmp_path / "export"


def test_an_exports_lm_eval_file_is_never_read_back(export, marker):
    _craft(export / LM_EVAL_FILE, marker, wrap=False)  # lm-eval's file: corrsteer-pl reads safetensors + JSON
    assert sorted(SteeringVectors.load(export).layers) == [0, 1]


def test_an_exports_vectors_file_holding_a_pickle_is_one_line(export, marker):
    _craft(export / VECTORS_FILE, marker, wrap=False)
    line = _one_line(lambda: SteeringVectors.load(export))
    assert VECTORS_FILE in line and "corrupt" in line


@pytest.fixture()
def sae_folder(tmp_path):
    folder = tmp_path / "sae"
    random_sae(64, 16, 0, seed=0).save_model(folder)
    return folder


def test_an_sae_folder_whose_weights_are_a_pickle_is_one_line(sae_folder, marker):
    _craft(sae_folder / "sae_weights.safetensors", marker, wrap=False)
    line = _one_line(lambda: load_sae(str(sae_folder)))
    assert line.startswith(f"SAESpec.source: cannot load the SAE folder {sae_folder}")


def test_an_sae_folder_with_a_pickled_checkpoint_instead_of_safetensors_is_one_line(sae_folder, marker):
    (sae_folder / "sae_weights.safetensors").unlink()
    _craft(sae_folder / "sae_weights.pt", marker)
    assert "has no sae_weights.safetensors" in _one_line(lambda: load_sae(str(sae_folder)))


def test_statistics_and_answer_cache_holding_a_pickle_are_one_line(tmp_path, marker):
    stats = _craft(tmp_path / "statistics.safetensors", marker, wrap=False)
    answers = _craft(tmp_path / "answers.safetensors", marker, wrap=False)
    assert "is not a safetensors file" in _one_line(lambda: load_layer_stats(stats))
    assert "is not an answer cache" in _one_line(lambda: AnswerCache.load(answers))


def test_a_model_folder_with_a_pickled_pytorch_model_bin_is_one_line(tmp_path, marker, llama):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    llama.config.save_pretrained(folder)
    _craft(folder / "pytorch_model.bin", marker)
    line = _one_line(lambda: load_pretrained(AutoModelForCausalLM.from_pretrained, str(folder)))
    assert line.startswith("load_model.name: cannot load")


# -- the sources ------------------------------------------------------------------------------------------


UNPICKLING = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|pickle\.loads?\(|dill|joblib\.load")


def test_no_source_file_unpickles():
    sources = [p for d in ("corrsteer_pl", "callbacks", "tools", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    sources += [ROOT / "train.py"]
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if UNPICKLING.search(line) and "save_checkpoint(" not in line
    ]  # fmt: skip (saving full state is fine)
    assert not found, f"unpickling calls: {found}"
    loads = [p for p in sources if re.search(r"torch\.load\(", p.read_text())]
    assert {p.relative_to(ROOT).as_posix() for p in loads} <= {"corrsteer_pl/files/safe_load.py"}
