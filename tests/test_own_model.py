"""A user's own model, SAEs and data given in flags get their run: the task's answer budget, no default-job settings,
bounded state (issue 31, items 0, 1 and 5)."""

import json
from pathlib import Path

import pytest
import yaml

from corrsteer_pl.calibration import calibration as calibration_module
from corrsteer_pl.calibration.options import CalibrationOptions
from corrsteer_pl.errors import OptionError
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.tiny import build_tiny_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar", "false"]


def _rows(path: Path, n: int = 40) -> str:
    path.write_text(
        "".join(json.dumps({"question": f"What is {i} plus one?", "answer": str(i + 1)}) + "\n" for i in range(n))
    )
    return str(path)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A 2-layer model folder and two sae-lens SAE folders, as a user brings them."""
    root = build_tiny_checkpoint(tmp_path_factory.mktemp("own") / "checkpoint")
    saes = json.dumps([{"source": str(root / "saes" / f"layer_{layer}")} for layer in (0, 1)])
    return ["--model.model", str(root / "model"), "--model.saes", saes]


def test_flags_alone_run_the_users_model_on_the_classes_defaults_not_the_default_job(own, tmp_path, capsys):
    data = _rows(tmp_path / "task.jsonl")
    main(
        [
            "fit",
            *own,
            "--data.task",
            "custom",
            "--data.source",
            data,
            "--trainer.default_root_dir",
            str(tmp_path),
            *QUIET,
        ]
    )
    assert (tmp_path / "steered" / "steering.json").is_file()
    config = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert config["model"]["train_saes"] is None, "the default job's SAE training for SmolLM2 layers stays out"
    assert config["export"]["formats"] == [] and config["selection"]["scale_grid"] is None
    assert config["data"]["limit_calibration"] is None and config["test_after_fit"] is False
    assert "no --config: the classes' defaults and your flags" in capsys.readouterr().err


def _recorded_budgets(monkeypatch) -> list[int]:
    budgets = []
    features = calibration_module.generate_answers

    def recording(model, ids, mask, max_new_tokens, *args, **kwargs):
        budgets.append(max_new_tokens)
        return features(model, ids, mask, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(calibration_module, "generate_answers", recording)
    return budgets


def test_a_free_form_tasks_own_answer_budget_reaches_generation_under_a_config(tmp_path, monkeypatch):
    budgets = _recorded_budgets(monkeypatch)
    data = _rows(tmp_path / "task.jsonl")
    main([
        "fit", "--config", str(CONFIGS / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path), *QUIET,
        "--data.task", "Custom", "--data.source", data, "--data.task.max_new_tokens", "16",
    ])  # fmt: skip
    assert budgets and set(budgets) == {16}


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_sets_an_answer_budget_of_its_own(config):
    text = yaml.safe_load(config.read_text())
    assert "max_new_tokens" not in (text.get("model") or {}), "the task owns the answer budget"


def test_an_answer_budget_that_cuts_every_free_form_answer_is_said(own, tmp_path):
    data = _rows(tmp_path / "task.jsonl")
    main([
        "fit", *own, "--data.task", "Custom", "--data.source", data, "--data.task.max_new_tokens", "1",
        "--trainer.default_root_dir", str(tmp_path), *QUIET,
    ])  # fmt: skip
    warnings = json.loads((tmp_path / "steered" / "steering.json").read_text())["info"]["warnings"]
    assert any("used the whole answer budget of 1 new tokens" in w and "max_new_tokens" in w for w in warnings)


def test_top_examples_are_capped_at_the_calibration_samples(tmp_path):
    main([
        "fit", "--config", str(CONFIGS / "tiny.yaml"), "--trainer.default_root_dir", str(tmp_path), *QUIET,
        "--calibration.top_examples", "10000",
    ])  # fmt: skip
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.stat().st_size < 2 * 2**20, "58 samples x 512 features, not 10,000 slots per feature (82 MB)"


def test_top_examples_past_the_memory_budget_are_refused_with_the_memory_they_would_take():
    with pytest.raises(OptionError) as error:
        CalibrationOptions(top_examples=10000).top_examples_for(26 * 16384, num_samples=4000)
    message = str(error.value)
    assert error.value.argument == "top_examples" and "GiB" in message and "at most" in message
    assert CalibrationOptions(top_examples=10000).top_examples_for(512, num_samples=58) == 58
