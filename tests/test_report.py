import json

import numpy as np
import pytest
import scipy.stats
import torch

from corrsteer_pl.evaluation.control_summary import ControlSummary, control_bootstrap_ci
from corrsteer_pl.evaluation.markdown import CHOSEN_SECTION, RESPONDS_SECTION, report_markdown
from corrsteer_pl.evaluation.paired import ConditionResult, PairedAccuracy, paired_bootstrap_ci
from corrsteer_pl.evaluation.report import EvaluationReport, MethodRow


def test_bootstrap_ci_of_identical_differences_is_that_difference():
    low, high = paired_bootstrap_ci(torch.zeros(40), torch.ones(40))
    assert (low, high) == (1.0, 1.0)


def test_bootstrap_ci_matches_a_hand_enumerated_case():
    # diffs (0, 0, 1): resampled means are 0, 1/3, 2/3, 1 with probabilities 8, 12, 6, 1 (/27).
    # P(mean = 0) = 0.296 > 0.025 and P(mean < 1) = 0.963 < 0.975, so the 95% interval is [0, 1].
    low, high = paired_bootstrap_ci(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert (low, high) == (0.0, 1.0)


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    g = np.random.default_rng(0)
    unsteered = (g.random(300) < 0.4).astype(float)
    steered = np.where(g.random(300) < 0.15, 1 - unsteered, unsteered)
    low, high = paired_bootstrap_ci(torch.tensor(unsteered), torch.tensor(steered))
    ref = scipy.stats.bootstrap((steered - unsteered,), np.mean, method="percentile", n_resamples=20_000, rng=1)
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.006)


def test_report_counts_changed_answers_and_side_effect_ratio(tmp_path):
    unsteered = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    steered = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    report = EvaluationReport.from_scores(unsteered, steered, task="mmlu", split="test", judge="letter-match")
    paired = report.paired
    assert (paired.better, paired.worse, report.samples) == (2, 1, 5)
    assert paired.ser == pytest.approx(1 / 3)
    assert paired.unsteered == pytest.approx(0.4) and paired.accuracy == pytest.approx(0.6)
    assert paired.difference == pytest.approx(0.2) and paired.ci_low <= 0.2 <= paired.ci_high
    report.save(tmp_path, report_markdown(report))
    assert json.loads((tmp_path / "report.json").read_text())["judge"] == "letter-match"
    assert "2 wrong -> right, 1 right -> wrong" in (tmp_path / "report.md").read_text()


def test_report_and_method_rows_hold_one_paired_accuracy_and_report_json_keeps_its_flat_keys(tmp_path):
    unsteered = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    steered = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    row = MethodRow.from_scores("steered", "CorrSteer-S (export)", unsteered, steered, torch.ones(5, dtype=torch.bool))
    report = EvaluationReport.from_scores(unsteered, steered, "t", "test", "j", methods=[row])
    paired = PairedAccuracy.from_scores(unsteered, steered)
    assert report.paired == paired and row.paired == paired, "one computation of the paired figures"
    report.save(tmp_path, report_markdown(report))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert list(saved)[:12] == [
        "task", "split", "judge", "samples", "accuracy_unsteered", "accuracy_steered", "difference", "ci_low",
        "ci_high", "better", "worse", "ser",
    ]  # fmt: skip
    assert "paired" not in saved and (saved["accuracy_unsteered"], saved["ser"]) == (paired.unsteered, paired.ser)
    (saved_row,) = saved["methods"]
    assert list(saved_row) == [
        "name", "label", "accuracy", "valid_rate", "accuracy_valid", "difference", "ci_low", "ci_high", "better",
        "worse", "ser", "p_values", "features", "scale", "choice",
    ]  # fmt: skip
    assert (saved_row["accuracy"], saved_row["better"], saved_row["worse"]) == (paired.accuracy, 2, 1)


def test_nothing_changed_means_ser_zero():
    same = torch.tensor([1.0, 0.0])
    assert EvaluationReport.from_scores(same, same, task="t", split="test", judge="j").paired.ser == 0.0


def test_control_summary_ranks_the_selected_steering_among_the_draws():
    steered = torch.tensor([1.0, 1.0, 0.0, 1.0])  # accuracy 0.75
    controls = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # 0.25, 1.0, 0.25
    summary = ControlSummary.from_scores("random_feature", steered, controls, torch.ones(3, 4, dtype=torch.bool))
    assert summary.rank == 2 and summary.p_value == 2 / 4, "one draw of three beats the selection"
    assert summary.accuracy_mean == pytest.approx(0.5) and summary.difference == pytest.approx(0.25)
    assert summary.ci_low <= 0.25 <= summary.ci_high


def test_control_ci_is_wider_than_holding_the_draws_fixed():
    g = torch.Generator().manual_seed(0)
    steered = (torch.rand(400, generator=g) < 0.5).double()
    # draws that differ a lot from each other: the uncertainty over draws must show in the CI
    controls = torch.stack([(torch.rand(400, generator=g) < p).double() for p in (0.2, 0.3, 0.4, 0.5, 0.6)])
    low, high = control_bootstrap_ci(steered, controls)
    fixed_low, fixed_high = paired_bootstrap_ci(controls.mean(0), steered)
    assert high - low > 1.5 * (fixed_high - fixed_low)


def test_condition_result_separates_validity_from_accuracy():
    result = ConditionResult.from_scores(
        "steered", torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([True, True, False, True])
    )
    assert result.accuracy == 0.5 and result.valid_rate == 0.75 and result.accuracy_valid == pytest.approx(2 / 3)


def _verdict(draws: int, control_rate: float) -> str:
    g = torch.Generator().manual_seed(0)
    unsteered = (torch.rand(400, generator=g) < 0.1).double()
    steered = torch.maximum(unsteered, (torch.rand(400, generator=g) < 0.4).double())  # clearly better
    controls = {
        kind: ((torch.rand(n, 400, generator=g) < rate).double(), torch.ones(n, 400, dtype=torch.bool))
        for kind, n, rate in (("random_feature", 20, 0.1), ("search_matched", draws, control_rate))
    }
    report = EvaluationReport.from_scores(unsteered, steered, "t", "test", "j", controls=controls)
    (line,) = [line for line in report_markdown(report).splitlines() if line.startswith("Search-matched verdict")]
    return line


def test_too_few_search_draws_for_the_permutation_p_leave_the_verdict_to_the_ci_and_say_so():
    line = _verdict(draws=6, control_rate=0.12)  # rank 1 of 7: p = 0.143 at best
    assert "6 draws cannot give a permutation p below 0.143" in line
    assert "beats random features put through the same validation search" in line and "does not" not in line
    line = _verdict(draws=6, control_rate=0.45)  # as good as the steering: the CI includes 0
    assert "but not random features put through the same validation search" in line


def test_enough_search_draws_decide_by_the_permutation_p():
    assert "(permutation p < 0.05): the steering beats random" in _verdict(draws=20, control_rate=0.12)


def _headline(control_rate: float, q_value: float) -> str:
    g = torch.Generator().manual_seed(0)
    unsteered = (torch.rand(400, generator=g) < 0.1).double()
    steered = torch.maximum(unsteered, (torch.rand(400, generator=g) < 0.4).double())  # clearly better than unsteered
    controls = {
        kind: ((torch.rand(n, 400, generator=g) < rate).double(), torch.ones(n, 400, dtype=torch.bool))
        for kind, n, rate in (("random_feature", 20, 0.1), ("search_matched", 6, control_rate))
    }
    feature = {"layer": 6, "feature": 1, "r": 0.2, "coefficient": 1.0, "frequency": 0.1, "q_value": q_value}
    selection = {"settings": {"alpha": 0.05}, "chosen": [feature]}
    report = EvaluationReport.from_scores(
        unsteered, steered, "t", "test", "j", controls=controls, features=[feature], selection=selection
    )
    lines = report_markdown(report).splitlines()
    (line,) = [line for line in lines if line.startswith("**Verdict")]
    return line


def test_the_headline_is_positive_only_when_every_check_below_it_agrees():
    assert _headline(control_rate=0.12, q_value=0.001).startswith("**Verdict: the steering helps.**")
    failed_search = _headline(control_rate=0.45, q_value=0.001)  # search-matched draws do as well
    assert failed_search.startswith("**Verdict: not shown to help.**")
    assert "does not beat the search_matched controls" in failed_search
    noise = _headline(control_rate=0.12, q_value=0.2)  # exported with --selection.require_significance false
    assert noise.startswith("**Verdict: not shown to help.**") and "not significant (smallest q 0.200" in noise


def test_a_report_without_a_selection_record_says_so_under_both_sections_built_from_it():
    scores = torch.tensor([1.0, 0.0])
    report = EvaluationReport.from_scores(scores, scores, "t", "test", "j", steering={"path": "runs/x/steered"})
    text = report_markdown(report)
    missing = "Not shown: the export folder runs/x/steered has no selection.json"
    for heading in (CHOSEN_SECTION, RESPONDS_SECTION):
        assert f"{heading}\n\n{missing}" in text
