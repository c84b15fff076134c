"""The report's figures: written beside the report, linked from it, deterministic, honest about an empty steering."""

import hashlib

import torch

from corrsteer_pl.calibration.stats import STATS_FILE, CorrelationStats, save_layer_stats
from corrsteer_pl.evaluation.export_pass import save_report
from corrsteer_pl.evaluation.plots import controls_figure, r_by_layer_figure, scale_grid_figure
from corrsteer_pl.evaluation.report import EvaluationReport

GRID = {
    "0.5": {"accuracy": 0.10, "valid_rate": 0.30, "top_answer_share": 0.40, "refused": False},
    "1": {"accuracy": 0.15, "valid_rate": 0.45, "top_answer_share": 0.55, "refused": False},
    "2": {"accuracy": 0.25, "valid_rate": 0.90, "top_answer_share": 0.95, "refused": True},
}


def _report(features: list[dict] | None = None) -> EvaluationReport:
    g = torch.Generator().manual_seed(0)
    unsteered = (torch.rand(60, generator=g) < 0.2).double()
    steered = torch.maximum(unsteered, (torch.rand(60, generator=g) < 0.2).double())
    controls = {"random_feature": ((torch.rand(5, 60, generator=g) < 0.25).double(), torch.ones(5, 60, dtype=bool))}
    features = [{"layer": 1, "feature": 3, "r": 0.3, "coefficient": 1.0, "frequency": 0.5}] if features is None else []
    selection = {"chosen": features, "layers": {"1": features}}
    return EvaluationReport.from_scores(
        unsteered, steered, task="mmlu", split="test", judge="letter-match", controls=controls, features=features,
        steering={"scale_grid": GRID, "scale": 1.0}, selection=selection,
    )  # fmt: skip


def _stats(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    stats = {1: CorrelationStats(8)}
    z = torch.rand(40, 8, generator=g) * (torch.rand(40, 8, generator=g) < 0.5)
    stats[1].update(z, (torch.rand(40, generator=g) < 0.5).double())
    save_layer_stats(stats, tmp_path / STATS_FILE)


def test_the_report_writes_each_figure_as_png_and_links_it(tmp_path):
    _stats(tmp_path)
    save_report(_report(), tmp_path, "test", "test", [], 0)
    names = ["report_controls.png", "report_scale_grid.png", "report_r_by_layer.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report.md").read_text()
    assert all(f"![{name}]({name})" in markdown for name in names)


def test_the_same_report_gives_the_same_png_bytes(tmp_path):
    digests = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _stats(tmp_path / run)
        save_report(_report(), tmp_path / run, "test", "test", [], 0)
        digests.append(hashlib.sha256((tmp_path / run / "report_controls.png").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_each_control_draw_is_a_point_of_the_strip():
    report = _report()
    (collection,) = controls_figure(report).axes[0].collections
    assert sorted(collection.get_offsets()[:, 0].tolist()) == sorted(report.controls[0].accuracies)
    assert len(report.controls[0].accuracies) == 5


def test_refused_scales_are_marked_and_the_chosen_one_drawn():
    ax = scale_grid_figure(GRID, 1.0).axes[0]
    (refused,) = ax.collections
    assert refused.get_offsets()[:, 0].tolist() == [2.0]
    assert any(line.get_xdata()[0] == 1.0 for line in ax.lines if line.get_linestyle() == ":")


def test_an_empty_steering_still_renders_and_says_so_on_every_plot(tmp_path):
    _stats(tmp_path)
    report = _report(features=[])
    save_report(report, tmp_path, "test", "test", [], 0)
    assert (tmp_path / "report_controls.png").exists() and "nothing was steered" in (tmp_path / "report.md").read_text()
    for fig in (
        controls_figure(report),
        r_by_layer_figure({1: CorrelationStats(4)}, report.selection),
        scale_grid_figure({}, None),
    ):
        assert any("nothing was steered" in t.get_text() for t in fig.axes[0].texts)
