"""train.py end to end on the tiny config: fit exports and logs; test compares; errors are one line."""

import glob
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from corrsteer_pl.evaluation import conditions as evaluation
from corrsteer_pl.lightning import module
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.tiny import random_sae
from corrsteer_pl.selection import variants
from corrsteer_pl.steering.vectors import SteeringVectors

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny fit, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("fit")
    main(["fit", *TINY, "--trainer.default_root_dir", str(root)])
    return root


def _events(root, version=0):
    (path,) = glob.glob(f"{root}/lightning_logs/version_{version}/events.out.tfevents.*")
    events = EventAccumulator(path, size_guidance={"histograms": 0, "images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_fit_writes_a_reloadable_export_with_statistics(fitted):
    steering = SteeringVectors.load(fitted / "steered")
    assert sorted(steering.layers) == [0, 1], "variant A steers the top feature of every SAE layer"
    assert steering.info["samples_seen"] == 58 and steering.info["task"] == "synthetic"
    stats = load_file(fitted / "steered" / "statistics.safetensors")
    assert stats["layer.0.n"].item() == 58
    assert (fitted / "steered" / "lm_eval_steer.pt").exists()


def test_fit_logs_scalars_histograms_text_and_figures_to_tensorboard(fitted):
    tags = _events(fitted).Tags()
    assert {"calibration/samples_seen", "calibration/positive_rate", "samples_per_s"} <= set(tags["scalars"])
    assert tags["histograms"] == ["r/layer_0", "r/layer_1"]
    assert tags["images"] == ["r_distribution/layer_0", "r_distribution/layer_1"]
    assert "selection/text_summary" in tags["tensors"]
    text = _events(fitted).Tensors("selection/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| layer | feature | r | coefficient | activation frequency |" in text


def test_calibration_checkpoint_leaves_out_model_and_sae_weights(fitted):
    checkpoint = fitted / "checkpoints" / "last.ckpt"
    assert checkpoint.stat().st_size < 1_000_000
    state = torch.load(checkpoint, weights_only=True)  # plain tensors and containers: resume never unpickles
    assert state["state_dict"] == {}
    assert any("CorrelationCallback" in key for key in state["callbacks"])


def test_test_compares_unsteered_and_steered_with_side_effect_ratio(fitted, monkeypatch):
    built = []  # build_report's arguments: the (N, C) per-item scores and the conditions that name the columns
    build = module.build_report
    monkeypatch.setattr(module, "build_report", lambda *a, **k: built.append(a) or build(*a, **k))
    cli = main(["test", *TINY, "--trainer.default_root_dir", str(fitted)])
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    ((conditions, scores, *_),) = built
    column = conditions.columns(scores)[0]
    unsteered, steered = (column[name].double().numpy() for name in ("unsteered", "steered"))
    n = len(cli.datamodule.examples("test"))
    better, worse = int((steered > unsteered).sum()), int((steered < unsteered).sum())
    assert better + worse > 0, "the fixture must change answers, or the SER below is not checked"
    oracle = {
        "samples": n,
        "accuracy_unsteered": unsteered.mean(),
        "accuracy_steered": steered.mean(),
        "better": better,
        "worse": worse,
        "ser": worse / (better + worse),
    }
    assert {name: metrics[f"test/{name}"] for name in oracle} == pytest.approx(oracle, abs=1e-6)
    report = json.loads((fitted / "steered" / "report.json").read_text())
    assert {name: report[name] for name in oracle} == pytest.approx(oracle, abs=1e-12)
    assert report["difference"] == pytest.approx((steered - unsteered).mean(), abs=1e-12)
    low, high = _bootstrap_ci_oracle(steered - unsteered)
    assert (report["ci_low"], report["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert report["features"] and (fitted / "steered" / "report.md").exists()
    logged = _events(fitted, version=1).Tags()["scalars"]
    assert {"test/accuracy_unsteered", "test/accuracy_steered", "test/ser"} <= set(logged)


def test_test_ends_with_the_verdict_and_the_report_path_not_a_metric_table(fitted, capsys):
    main(["test", *TINY, "--trainer.default_root_dir", str(fitted)])
    out = capsys.readouterr().out
    *_, compared, verdict, where = out.strip().splitlines()
    report = fitted / "steered" / "report.md"
    assert where == f"Report: {report} (report.json and the figures beside it)"
    assert verdict == report.read_text().splitlines()[2].replace("**", ""), "the report's own verdict"
    assert verdict.startswith("Verdict: ") and compared.startswith("synthetic, test split, ")
    assert "Test metric" not in out and "DataLoader 0" not in out, "Lightning's metric table is off by default"


def _bootstrap_ci_oracle(diff: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The paired bootstrap 95% CI computed in numpy float64 from the report's own resamples of items (torch's
    generator, seeded as the report seeds it, in chunks of 1000): what the report should say for this column."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.cat(
        [torch.randint(len(diff), (1000, len(diff)), generator=generator) for _ in range(resamples // 1000)]
    )
    means = diff[index.numpy()].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def test_variant_p_records_validation_scores_per_candidate(tmp_path):
    main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--selection.variant", "P"])
    meta = json.loads((tmp_path / "steered" / "steering.json").read_text())
    validation = meta["info"]["validation"]
    trials = {k for k in validation if k != "unsteered"}
    assert {k.split("/")[0] for k in trials} == {"layer_0", "layer_1"} and len(trials) == 2 * 3, "top 3 per layer"
    kept = {(entry["layer"], f["feature"]) for entry in meta["layers"] for f in entry["features"]}
    assert kept == {(int(k[6:].split("/")[0]), int(k.split("/")[1])) for k in trials if validation[k]["kept"]}


def test_variant_p_and_the_scale_grid_run_the_validation_prompts_once(tmp_path, monkeypatch):
    found = []  # per validation batch and pass: was its prompt cache already there?
    get = evaluation.PromptCaches.get
    monkeypatch.setattr(
        evaluation.PromptCaches, "get", lambda self, *a: found.append(get(self, *a) is not None) or get(self, *a)
    )
    args = [
        "--selection.variant",
        "P",
        "--selection.scale_grid",
        "[0.5, 2.0]",
        "--data.task",
        "Synthetic",
        "--data.task.max_new_tokens",
        "1",
    ]
    # P keeps a layer, so the grid runs: the tiny model's noise survives no Holm correction, so every trial passes
    monkeypatch.setattr(variants, "holm_adjusted", lambda p: [0.0] * len(p))
    main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), *args])
    steering = json.loads((tmp_path / "steered" / "steering.json").read_text())
    assert steering["info"]["validation"] and steering["layers"]
    batches = len(found) // 2
    assert batches > 0 and found == [False] * batches + [True] * batches, "the grid pass reuses P's prompt caches"


def _error(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code) if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    return message.strip()


def test_unknown_task_is_one_line_naming_the_flag(tmp_path, capsys):
    message = _error(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--data.task", "nope"], capsys)
    assert "unknown task 'nope'" in message and "--data.task" in message and "\n" not in message


def test_unknown_config_key_is_refused_before_anything_runs(tmp_path, capsys, no_model_loads):
    message = _error(["fit", *TINY, "--model.learning_rate", "3"], capsys)
    assert "learning_rate" in message


@pytest.mark.parametrize(
    ("d_in", "layer", "expected"),
    [(32, 0, "has d_in=32 but the model's hidden size is 64"), (64, 5, "reads layer 5")],
)
def test_an_sae_that_does_not_fit_the_model_is_named(tmp_path, capsys, d_in, layer, expected):
    random_sae(d_in, 16, layer).save_model(tmp_path / "sae")
    saes = json.dumps([{"source": str(tmp_path / "sae")}])
    message = _error(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--model.saes", saes], capsys)
    assert expected in message and str(tmp_path / "sae") in message and "\n" not in message


def test_mmlu_from_the_offline_package_runs_through_fit_and_test(tmp_path, capsys):
    args = [*TINY, "--trainer.default_root_dir", str(tmp_path), "--data.task", "mmlu"]
    main(["fit", *args, "--data.limit_calibration", "24", "--data.limit_test", "8", "--test_after_fit", "true"])
    *_, verdict, reading, where = capsys.readouterr().out.strip().splitlines()
    report = (tmp_path / "steered" / "report.md").read_text()
    assert verdict.startswith("nothing was steered: every calibration answer was wrong (0 of 24 correct)")
    assert verdict.removesuffix(": steered equals unsteered") in report.replace("**", ""), "the report's own words"
    assert reading.startswith("Reading: ")
    assert f"**Reading:** {reading.removeprefix('Reading: ')}" in report, "the report's reading (format or knowledge)"
    assert where.startswith(f"Report: {tmp_path / 'steered' / 'report.md'} ")
    cli = main(["test", *args, "--data.limit_test", "8"])
    assert SteeringVectors.load(tmp_path / "steered").info["task"] == "mmlu"
    assert cli.trainer.callback_metrics["test/samples"] == 8


def test_scale_grid_is_scored_on_validation_and_recorded_in_the_export(tmp_path):
    main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--selection.scale_grid", "[0.5, 2.0]"])
    info = SteeringVectors.load(tmp_path / "steered").info
    assert set(info["scale_grid"]) == {"0.5", "2"} and info["scale"] in (0.5, 2.0)
    best = max(info["scale_grid"].items(), key=lambda kv: (kv[1]["accuracy"], -float(kv[0])))
    assert info["scale"] == float(best[0])
