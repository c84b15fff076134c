"""Full fine-tuning (--model.method full) on the tiny model: every weight matrix trains, the loss falls, the artefact
is a safetensors model folder that `train.py test --comparison.finetune` reads, and a bad method is one line."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import LlamaConfig, LlamaForCausalLM

from corrsteer_pl.finetune import FULL_FILES, SETTINGS_FILE, FineTuneModule, load_finetuned, load_full, main
from corrsteer_pl.lightning.cli import main as corrsteer_main

TINY = [
    "--model.model", "tiny-random",
    "--model.method", "full",
    "--data.task", "synthetic",
    "--data.batch_size", "8",  # 58 calibration items: 7 batches an epoch
    "--model.optimizer.lr", "1e-3",
    "--model.optimizer.warmup_steps", "0",
    "--model.optimizer.micro_batch_tokens", "32",
    "--trainer.val_check_interval", "4",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--seed_everything", "0",
]  # fmt: skip
CORRSTEER_TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny tensors: one torch thread for the module, its shared fit included (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """8 full fine-tuning steps (validated at 4 and 8), the artefact, then base vs best on the test split."""
    root = tmp_path_factory.mktemp("finetune_full")
    main(["fit", *TINY, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "8"])
    return root


def _base_weights():
    module = FineTuneModule()  # tiny-random, as it loads before any training
    return {name: p.detach().clone() for name, p in module.load_base().named_parameters()}


def test_every_weight_matrix_of_the_model_is_trained(fitted):
    best = torch.load(fitted / "finetune_full" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    base = _base_weights()
    assert {f"lm.{name}" for name in base} == set(best), "the checkpoint holds every weight of the model, nothing else"
    matrices = [name for name, value in base.items() if value.dim() == 2]
    assert len(matrices) >= 2 * 7 + 2, "q/k/v/o/gate/up/down per layer, the embedding and the head"
    unchanged = [name for name in matrices if torch.equal(best[f"lm.{name}"], base[name])]
    assert not unchanged, f"full fine-tuning left these weight matrices untouched: {unchanged}"


def test_training_loss_goes_down(fitted):
    events = EventAccumulator(str(fitted / "lightning_logs" / "version_0"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == list(range(8)), "one loss per optimizer step"
    first, last = losses[0], (losses[6] + losses[7]) / 2
    assert last < first - 0.5, f"the loss on the answer tokens should fall: {first:.3f} -> {last:.3f}"


def test_the_artefact_is_a_safetensors_model_folder_of_the_best_checkpoint(fitted):
    folder = fitted / "finetune_full" / "model"
    assert set(FULL_FILES) | {"config.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")], "no pickle written"
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    assert settings["method"] == "full" and settings["lora"] is None and settings["model"] == "tiny-random"
    best = torch.load(fitted / "finetune_full" / "checkpoints" / "best.ckpt", weights_only=True)
    assert settings["step"] == best["global_step"] and settings["checkpoint"].endswith("best.ckpt")
    assert settings["trainable_parameters"] == sum(v.numel() for v in best["state_dict"].values())
    assert len(load_file(folder / "model.safetensors")) == len(best["state_dict"])
    tuned = load_finetuned(folder)
    assert tuned.method == "full" and not any(p.requires_grad for p in tuned.parameters())
    for name, value in best["state_dict"].items():
        torch.testing.assert_close(tuned.state_dict()[name], value, msg=name)
    report = json.loads((fitted / "finetune_full" / "report.json").read_text())
    assert report["steering"]["method"] == "full" and "Full fine-tuning" in report["steering"]["description"]


def test_the_artefact_goes_into_comparison_finetune_and_matches_its_own_report(fitted, tmp_path):
    own = json.loads((fitted / "finetune_full" / "report.json").read_text())
    corrsteer_main(["fit", *CORRSTEER_TINY, "--trainer.default_root_dir", str(tmp_path)])
    folder = fitted / "finetune_full" / "model"
    corrsteer_main(["test", *CORRSTEER_TINY, "--trainer.default_root_dir", str(tmp_path), "--comparison.finetune",
                    str(folder)])  # fmt: skip
    report = json.loads((tmp_path / "steered" / "report.json").read_text())
    row = {r["name"]: r for r in report["methods"]}["fine-tuning"]
    assert row["label"] == f"fine-tuning (full, step {own['steering']['step']})"
    assert row["accuracy"] == pytest.approx(own["accuracy_steered"])
    assert report["accuracy_unsteered"] == pytest.approx(own["accuracy_unsteered"]), "the same base, the same items"


def test_a_checkpoint_of_one_method_is_refused_by_the_other(fitted):
    """`--ckpt_path <file>` takes the file's hyperparameters (the method too: LightningCLI merges them) and `last` is
    searched in the method's own folder; a checkpoint that still reaches a module of the other method (one written
    before --model.method, which names none) is refused, naming both."""
    state = torch.load(fitted / "finetune_full" / "checkpoints" / "last.ckpt", weights_only=True)
    with pytest.raises(ValueError) as caught:
        FineTuneModule(method="lora").on_load_checkpoint(state)
    line = str(caught.value)
    assert "--model.method full" in line and "--model.method lora" in line and "\n" not in line, line


def test_an_unknown_method_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--model.method", "bogus"])
    line = str(caught.value)
    assert line.startswith("error: --model.method") and "bogus" in line and "\n" not in line, line
    with pytest.raises(ValueError, match="--model.method must be one of full, lora, got 'bogus'"):
        FineTuneModule(method="bogus")


def test_tied_weights_round_trip_through_the_full_artefact(tmp_path):
    """SmolLM2 ties its head to its embedding: the folder holds the tensor once and loads strictly."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    tuned = LlamaForCausalLM(config)
    tuned.save_pretrained(tmp_path)
    torch.manual_seed(1)
    fresh = load_full(LlamaForCausalLM(config), tmp_path)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr(), "still tied"
    for name, value in tuned.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, msg=name)
