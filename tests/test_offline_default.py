"""End to end on the real offline model: SmolLM2-135M-Instruct, offline MMLU, an SAE trained here.

Minutes, not seconds: `pytest -m "not e2e"` skips it locally; CI runs it.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from corrsteer_pl.lightning.cli import DEFAULT_CONFIG, main
from corrsteer_pl.lightning.module import CorrSteerModule
from corrsteer_pl.steering.vectors import SteeringVectors, load_steered_model

pytestmark = pytest.mark.e2e

SMALL = [
    "--trainer.enable_progress_bar", "false",
    "--data.limit_calibration", "48",
    "--data.limit_validation", "8",
    "--data.limit_test", "12",
    "--model.train_saes", json.dumps({"layers": [12], "d_sae": 512, "k": 16, "tokens": 4000}),
    "--model.controls", "1",
    "--selection.scale_grid", "[4.0, 8.0]",  # at 1.0 (chosen from [1.0, 4.0]) no test answer changed; at 4.0, 2 of 12
    "--selection.variant", "A",  # the default P may keep no layer on 8 validation items
    "--selection.require_significance", "false",  # 48 calibration items make no feature significant
    "--side_effects.tasks", "[bbq_disambig]", "--side_effects.items", "4", "--side_effects.open_tokens", "2",
    "--side_effects.controls", "1",
]  # fmt: skip


def test_default_job_on_the_real_offline_model_exports_steering_that_changes_answers(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    answers = _record_test_answers(monkeypatch)
    main(["fit", "--config", str(DEFAULT_CONFIG), "--trainer.default_root_dir", str(tmp_path), *SMALL])
    assert len(answers["unsteered"]) == len(answers["steered"]) == 12, "test_after_fit answered the 12 test items"
    pairs = list(zip(answers["unsteered"], answers["steered"], strict=True))
    assert any(plain != steered for plain, steered in pairs), f"the exported steering changed no judged answer: {pairs}"
    export = tmp_path / "steered"
    steering = SteeringVectors.load(export)
    assert steering.info["samples_seen"] == 48 and steering.info["task"] == "mmlu"
    assert steering.layers[12].hook_name == "blocks.12.hook_resid_post"

    report = json.loads((export / "report.json").read_text())
    assert report["samples"] == 12 and report["judge"] == "letter-match"
    assert "no auxiliary_train offline" in report["data"] and "calibration 48" in report["data"]
    assert {c["kind"] for c in report["controls"]} == {"random_feature", "random_direction"}
    assert (export / "report.md").exists()
    side = report["side_effects"]  # the default job's side-effects pass, on the real model
    assert [t["task"] for t in side["tasks"]] == ["bbq_disambig"] and side["tasks"][0]["items"] == 4
    assert set(side["open_generation"]["measures"]) == {"raw", "chat"}
    assert [row["scale"] for row in side["dose"]] == [4.0, 8.0] and side["target_served"] is not None
    assert "## Side effects" in (export / "report.md").read_text()

    model, tokenizer = load_steered_model(export)
    prompts = tokenizer(["Question: 2 + 2 = ?\nA. 3\nB. 4\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        steered = model(**prompts).logits[0, -1]
        model.corrsteer_hooks.detach()
        unsteered = model(**prompts).logits[0, -1]
    assert not torch.allclose(steered, unsteered), "load_steered_model attaches the steering (its logits move)"

    study = _load_selection_study(monkeypatch)
    study.main(["--run", str(tmp_path), "--items", "8", "--draws", "1"])
    table = capsys.readouterr().out
    assert "| condition (8 validation items) |" in table and "| A x1 |" in table
    assert "| layer 12 #" in table, "each layer's top feature is scored alone"


def _record_test_answers(monkeypatch) -> dict[str, list[str | None]]:
    """The judged answers of the unsteered and the steered (exported) model on each test item, as test answers
    them (test_after_fit: the steering is read back from the export)."""
    answers = {"unsteered": [], "steered": []}
    score = CorrSteerModule.score_conditions

    def recording(self, batch, conditions, prompt_caches=None):
        judged = score(self, batch, conditions, prompt_caches)
        if self.trainer.testing:
            for name, rows in answers.items():
                rows.extend(judged[name].answers)
        return judged

    monkeypatch.setattr(CorrSteerModule, "score_conditions", recording)
    return answers


def _load_selection_study(monkeypatch):
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("selection_study", benchmarks / "selection_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
