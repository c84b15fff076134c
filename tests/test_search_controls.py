"""The search-matched control runs CorrSteer-P's own search, same k, norms and test, on random firing features."""

import json
from dataclasses import replace

import torch

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.evaluation.conditions import SplitResult
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.tiny import random_sae
from corrsteer_pl.selection import variants
from corrsteer_pl.selection.options import SelectionOptions
from corrsteer_pl.selection.search import random_families
from corrsteer_pl.selection.select import TrialKey, select
from corrsteer_pl.selection.variants import select_features, validated_layers, validation_trials
from corrsteer_pl.steering.vectors import decoder_vector

D_SAE, K = 64, 3


def _world():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(200, D_SAE, generator=g) * (torch.rand(200, D_SAE, generator=g) < 0.3)
    y = (z[:, 5] + 0.3 * torch.rand(200, generator=g) > 0.4).double()
    stats = {0: CorrelationStats(D_SAE), 1: CorrelationStats(D_SAE)}
    for s in stats.values():
        s.update(z, y)
    return stats, {layer: random_sae(64, D_SAE, layer, seed=layer) for layer in (0, 1)}


def _result(scores: list[float]) -> SplitResult:
    result = SplitResult()
    result.add(
        torch.tensor(scores, dtype=torch.float64), torch.ones(len(scores), dtype=torch.bool), [None] * len(scores)
    )
    return result


class _Validator:
    """Answers every candidate of a pass with `score(key, features)` and records each pass."""

    multiple_choice = False

    def __init__(self, saes, score):
        self.saes, self.score, self.calls = saes, score, []

    def results(self, candidates):
        self.calls.append(dict(candidates))
        return {key: _result(self.score(key, features)) for key, features in candidates.items()}


P_UNFILTERED = SelectionOptions(variant="P", top_k=5, candidates=K, require_significance=False)


def test_each_draw_tries_k_random_firing_features_per_layer_norm_matched_rank_by_rank_in_ps_pass():
    stats, saes = _world()
    ranked = select_features(stats, "A", top_k=5).candidates
    validator = _Validator(saes, lambda key, features: [0.0] * 10)
    selection = select(stats, replace(P_UNFILTERED, search_draws=4), validator)
    assert len(selection.search_controls) == 4 and len(validator.calls) == 1, "P and every draw in one pass"
    trials = {key: fs for key, fs in validator.calls[0].items() if isinstance(key, TrialKey)}
    assert len(trials) == 5 * 2 * K, "P's own trials and four draws', K per layer each"
    for key, (f,) in trials.items():
        if key.draw is None:
            continue
        same = [k for k in trials if (k.draw, trials[k][0].layer) == (key.draw, f.layer)]
        candidate = ranked[f.layer][same.index(key)]
        assert f.feature not in [c.feature for c in ranked[f.layer][:K]], "a random feature, never a trial of P"
        assert stats[f.layer].active[f.feature] > 0, "drawn from features that fired during calibration"
        expected = decoder_vector(saes[f.layer], [candidate]).norm()
        assert torch.isclose(decoder_vector(saes[f.layer], [f]).norm(), expected, rtol=1e-5)


def test_a_draw_keeps_a_layer_exactly_when_the_same_paired_test_passes():
    stats, saes = _world()
    unsteered = [0.0] * 20 + [1.0] * 20

    def score(key, features):
        if not features:
            return unsteered
        better = 12 if key.draw == 0 and features[0].layer == 1 else 1  # draw 0, layer 1: 12 better; else 1
        return [1.0] * better + [0.0] * (20 - better) + [1.0] * 20

    selection = select(stats, replace(P_UNFILTERED, search_draws=2), _Validator(saes, score))
    (kept_0, figures_0), (kept_1, _) = selection.search_controls
    assert [f.layer for f in kept_0] == [1] and kept_1 == [], "one item better never keeps a layer"
    assert sum(v.get("kept", False) for v in figures_0.values()) == 1
    assert selection.features == [], "P's own trials were one item better: nothing kept"


def _every_trial_passes(monkeypatch):
    """The tiny model's validation is noise that no trial survives Holm on: these tests are about the pipeline
    around P's test, so every trial passes it (P then keeps each layer's most accurate trial)."""
    monkeypatch.setattr(variants, "holm_adjusted", lambda p: [0.0] * len(p))


def test_test_stage_compares_a_p_steering_with_its_search_matched_draws(tmp_path, monkeypatch):
    _every_trial_passes(monkeypatch)
    args = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--selection.variant", "P"]
    args += ["--selection.search_draws", "3", "--test_after_fit", "true"]
    main(["fit", *args])
    report = json.loads((tmp_path / "steered" / "report.json").read_text())
    assert json.loads((tmp_path / "steered" / "steering.json").read_text())["layers"], "P kept a layer"
    kinds = {c["kind"]: c["draws"] for c in report["controls"]}
    assert kinds["search_matched"] == 3
    assert "Search-matched verdict" in (tmp_path / "steered" / "report.md").read_text()


def test_p_and_its_search_matched_draws_are_answered_in_one_validation_pass(tmp_path, monkeypatch):
    from corrsteer_pl.lightning.module import CorrSteerModule

    passes = []
    evaluate_split = CorrSteerModule.evaluate_split

    def recorded(self, conditions, *args, **kwargs):
        passes.append(list(conditions))
        return evaluate_split(self, conditions, *args, **kwargs)

    monkeypatch.setattr(CorrSteerModule, "evaluate_split", recorded)
    _every_trial_passes(monkeypatch)
    args = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--selection.variant", "P"]
    main(["fit", *args, "--selection.search_draws", "2", "--selection.scale_grid", "[1.0, 2.0]"])
    first, grid = passes  # P's check with the draws, then the scale grid: nothing else runs over validation
    assert "unsteered" in first and {key.draw for key in first if isinstance(key, TrialKey)} == {None, 0, 1}
    assert [scale for _, scale in grid] == [1.0, 2.0]


def test_a_draw_has_as_many_trials_per_layer_as_ps_family_and_the_same_holm_correction():
    stats, saes = _world()
    ranked = select_features(stats, "A", top_k=5).candidates
    family = {0: ranked[0][:2], 1: []}  # as if layer 0 had two eligible candidates and layer 1 none
    unsteered = [0.0] * 20 + [1.0] * 20
    lucky = [1.0] * 5 + [0.0] * 15 + [1.0] * 20  # 5 better, 0 worse: p = 1/32 alone, 2/32 after Holm over 2
    for draw in random_families(family, stats, saes, draws=3):
        assert len(draw[0]) == 2 and draw[1] == []
        results = {"unsteered": _result(unsteered)} | {name: _result(lucky) for name in validation_trials(draw)}
        kept, figures = validated_layers(draw, results, 0.05)
        trials = {name: v for name, v in figures.items() if name != "unsteered"}
        assert len(trials) == 2 and all(name.startswith("layer_0/") for name in trials)
        assert kept == [] and all(v["p_holm"] == 2 / 32 for v in trials.values())
