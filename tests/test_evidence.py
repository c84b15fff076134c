"""How sure the selection is: a planted feature is significant and stable, null data is said to be noise."""

import json

import pytest
import torch
from test_planted_feature import D_SAE, PLANTED, _answers, _planted_world

from corrsteer_pl.calibration.bootstrap import BootstrapStats
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.selection.diagnosis import selection_warnings
from corrsteer_pl.selection.evidence import (
    SELECTION_FILE,
    annotate,
    candidates_table,
    selection_record,
    significance_warning,
)
from corrsteer_pl.selection.variants import select_features


def _calibrate(batches):
    stats, boot = CorrelationStats(D_SAE), BootstrapStats(D_SAE, replicates=20)
    for i, (z, y) in enumerate(batches):
        stats.update(z, y)
        boot.update(z, y, [f"item/{i}/{j}" for j in range(len(y))])
    return {0: stats}, {0: boot}


def _null_batches():
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(8):
        z = torch.rand(50, D_SAE, generator=g) * (torch.rand(50, D_SAE, generator=g) < 0.05)
        batches.append((z, (torch.rand(50, generator=g) < 0.4).double()))
    return batches


def test_a_planted_feature_is_significant_and_stable_and_nothing_is_said_against_it():
    model, sae, prompts = _planted_world()
    batches = [(p[0], y) for seed in range(4) for y, p in [_answers(model, prompts(64, seed), {0: sae})]]
    stats, boot = _calibrate(batches)
    selection = select_features(stats, "A")
    evidence = annotate(selection, stats, boot)
    (chosen,) = selection.features
    assert chosen.feature == PLANTED and chosen.q_value < 1e-6 and chosen.stability >= 0.9
    low, high = evidence.intervals[(0, PLANTED)]
    assert low <= chosen.r <= high
    assert significance_warning(evidence, alpha=0.05) == []


def test_labels_independent_of_every_feature_give_no_significant_feature_and_a_warning():
    stats, boot = _calibrate(_null_batches())
    selection = select_features(stats, "A", require_significance=False)
    evidence = annotate(selection, stats, boot)
    assert evidence.smallest_q > 0.2, "far from any threshold: not a rounding-sensitive result"
    (warning,) = significance_warning(evidence, alpha=0.05)
    assert f"over {D_SAE:,} features" in warning and "may be noise" in warning


def test_selection_record_lists_every_candidate_with_its_figures():
    model, sae, prompts = _planted_world()
    stats, boot = _calibrate([(p[0], y) for y, p in [_answers(model, prompts(64, 0), {0: sae})]])
    selection = select_features(stats, "A", top_k=3)
    record = selection_record(selection, annotate(selection, stats, boot), [], {"variant": "A"})
    assert [f["feature"] for f in record["chosen"]] == [PLANTED]
    assert {"p_value", "q_value", "stability", "r_interval", "validation"} <= set(record["layers"]["0"][0])
    table = candidates_table(record).splitlines()
    assert len(table) == 2 + len(record["layers"]["0"]) and all(row.count("|") == table[0].count("|") for row in table)


def test_fit_with_nothing_significant_exports_nothing_and_says_why_in_console_export_and_report(tmp_path):
    args = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--test_after_fit", "true"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--selection.require_significance", "true"]
    with pytest.warns(UserWarning) as console:
        main(["fit", *args, "--selection.variant", "P"])
    meta = json.loads((tmp_path / "steered" / "steering.json").read_text())
    record = json.loads((tmp_path / "steered" / SELECTION_FILE).read_text())
    assert meta["layers"] == [] and record["chosen"] == []
    reason = "variant P tried no candidate: no layer's top features have a calibration q-value below alpha"
    assert any(w.startswith(reason) for w in meta["info"]["warnings"])
    assert any(w.startswith(reason) for w in record["warnings"])
    assert any(str(w.message).startswith(reason) for w in console)
    report = (tmp_path / "steered" / "report.md").read_text()
    assert f"**nothing was steered: {reason}" in report and "Verdict: the steering helps" not in report


def test_variant_a_on_null_data_withholds_its_choice_unless_forced():
    stats, _ = _calibrate(_null_batches())
    withheld = select_features(stats, "A")
    assert withheld.features == [] and [f.feature for f in withheld.withheld] == [stats[0].pearson().argmax().item()]
    (reason,) = selection_warnings(stats, withheld)
    assert reason.startswith("variant A's choice L0#") and "--selection.require_significance false" in reason
    forced = select_features(stats, "A", require_significance=False)
    assert forced.features == withheld.withheld and selection_warnings(stats, forced) == []
