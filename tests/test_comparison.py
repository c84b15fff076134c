"""train.py test --comparison.*: every ranking x variant and a fine-tuned model, on the report's test items."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from corrsteer_pl import finetune
from corrsteer_pl.calibration.stats import load_layer_stats
from corrsteer_pl.evaluation.labels import method_label
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.selection.variants import rank_layer, select_features

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
RANKINGS = ["pearson", "mi", "fisher", "caa"]
FINETUNE = [
    "--model.model", "tiny-random", "--data.task", "synthetic", "--data.batch_size", "8", "--trainer.max_steps", "4",
    "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A tiny fit (variant A, pearson), a 4-step fine-tune, then test with every ranking x variant and the fine-tune."""
    root = tmp_path_factory.mktemp("comparison")
    main(["fit", *TINY, "--trainer.default_root_dir", str(root)])
    finetune.main(["fit", *FINETUNE, "--trainer.default_root_dir", str(root)])
    adapters = root / "finetune" / "adapter"
    args = ["--comparison.rankings", f"[{', '.join(RANKINGS)}]", "--comparison.finetune", str(adapters)]
    args += ["--side_effects.served", "true"]
    main(["test", *TINY, "--trainer.default_root_dir", str(root), *args])
    return root, json.loads((root / "steered" / "report.json").read_text())


def _rows(report):
    return {row["name"]: row for row in report["methods"]}


def test_the_table_holds_unsteered_the_export_every_other_method_and_the_finetuned_model(compared):
    _, report = compared
    others = [f"{r}-{v}" for r in RANKINGS for v in "SAP" if f"{r}-{v}" != "pearson-A"]
    assert list(_rows(report)) == ["unsteered", "steered", "steered-all-positions", *others, "fine-tuning"]
    assert _rows(report)["steered"]["label"] == "CorrSteer-A (export)"
    assert _rows(report)["steered-all-positions"]["label"] == "CorrSteer-A (export, every position)"
    assert _rows(report)["mi-P"]["label"] == method_label("mi-P") == "SPARE (MI)-P"


def test_every_row_is_answered_on_the_report_items(compared):
    _, report = compared
    rows = _rows(report)
    assert rows["unsteered"]["accuracy"] == pytest.approx(report["accuracy_unsteered"])
    assert rows["steered"]["accuracy"] == pytest.approx(report["accuracy_steered"])
    assert (rows["steered"]["better"], rows["steered"]["worse"]) == (report["better"], report["worse"])
    for row in rows.values():
        changed = row["better"] + row["worse"]
        assert row["ser"] == (row["worse"] / changed if changed else 0.0)
        assert set(row["p_values"]) == {"random_feature", "random_direction"}


def test_each_method_steers_its_own_rankings_selection(compared):
    root, report = compared
    stats = load_layer_stats(root / "steered" / "statistics.safetensors")
    rows = _rows(report)
    for ranking in RANKINGS:
        for variant in "SA":
            if (ranking, variant) == ("pearson", "A"):
                continue
            chosen = select_features(stats, variant, top_k=10, ranking=ranking, require_significance=False).features
            assert rows[f"{ranking}-{variant}"]["features"] == [f"L{f.layer}/{f.feature}" for f in chosen]
        top3 = [f for layer, s in stats.items() for f in rank_layer(s, layer, 3, False, ranking)]
        candidates = {f"L{f.layer}/{f.feature}" for f in top3}
        assert set(rows[f"{ranking}-P"]["features"]) <= candidates, "P keeps only its ranking's validated candidates"
    caa = {f"L{layer}/{rank_layer(s, layer, 1, False, 'caa')[0].feature}" for layer, s in stats.items()}
    assert set(rows["caa-A"]["features"]) == caa


def test_the_finetuned_row_equals_the_finetuned_models_own_report(compared):
    root, report = compared
    own = json.loads((root / "finetune" / "report.json").read_text())
    assert own["samples"] == report["samples"]
    assert _rows(report)["fine-tuning"]["accuracy"] == pytest.approx(own["accuracy_steered"])


def test_the_table_reaches_the_markdown_report_and_tensorboard(compared):
    root, _ = compared
    text = (root / "steered" / "report.md").read_text()
    assert "## Comparison (test split, the same" in text and "| SPARE (MI)-A |" in text
    assert "| fine-tuning (LoRA, step 4) |" in text, "the fine-tuned row names its method and step"
    versions = sorted((root / "lightning_logs").iterdir())
    events = EventAccumulator(str(versions[-1]))
    events.Reload()
    assert {"test/method/mi-A/accuracy", "test/method/fine-tuning/ser"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--comparison.rankings", "[pearson, spare]"], "--comparison.rankings"),
        (["--comparison.variants", "[A, Q]"], "--comparison.variants"),
        (["--comparison.finetune", "no/such/adapter"], "--comparison.finetune"),
    ],
)
def test_a_bad_comparison_option_is_one_line_naming_its_flag(tmp_path, args, flag):
    with pytest.raises(SystemExit) as exc:
        main(["test", *TINY, "--trainer.default_root_dir", str(tmp_path), *args])
    line = str(exc.value.code)
    assert line.startswith("error: ") and flag in line and "\n" not in line


def test_without_comparison_options_the_report_has_no_table(tmp_path):
    main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "true"])
    report = json.loads((tmp_path / "steered" / "report.json").read_text())
    assert report["methods"] == [] and "## Comparison" not in (tmp_path / "steered" / "report.md").read_text()


def test_validate_with_comparison_options_warns_that_they_act_in_test_only(compared):
    root, _ = compared
    with pytest.warns(UserWarning, match="--comparison.* acts in `test` only"):
        main(["validate", *TINY, "--trainer.default_root_dir", str(root), "--comparison.rankings", "[mi]"])
