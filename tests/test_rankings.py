"""Specification of corrsteer_pl.calibration.rankings: pearson, mi, fisher and caa from one streaming pass."""

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_stats import BATCHES, SHARDINGS, feed, sparse_data, two_pass_r

from corrsteer_pl.calibration.rankings import (
    RANKINGS,
    caa_coefficient,
    caa_score,
    fisher_score,
    mi_score,
    pearson_score,
    score,
)
from corrsteer_pl.calibration.stats import CorrelationStats, load_layer_stats, save_layer_stats
from corrsteer_pl.selection.variants import select_features

RAW = {"pearson": pearson_score, "mi": mi_score, "fisher": fisher_score, "caa": caa_score}
CLASS_SQUARES = ("sum_zz_pos", "sum_zz_neg")


# ---------------------------------------------------------------- numpy float64 references


def ref_pearson(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two-pass r, 0 where a column or the labels are constant."""
    if np.ptp(y) == 0:
        return np.zeros(z.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.ptp(z, axis=0) > 0, two_pass_r(z, y), 0.0)


def ref_mi(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """I(1[z > 0]; 1[y > 0]) in nats as H(A) + H(S) - H(A, S) from the 2 x 2 contingency table."""
    a, s = z > 0, (y > 0)[:, None]
    joint = np.stack([(a & s).sum(0), (a & ~s).sum(0), (~a & s).sum(0), (~a & ~s).sum(0)])  # (4, F)
    h_joint = scipy.stats.entropy(joint, axis=0)
    h_a = scipy.stats.entropy(np.stack([a.sum(0), (~a).sum(0)]), axis=0)
    h_s = scipy.stats.entropy([s.sum(), (~s).sum()])
    return h_a + h_s - h_joint


def ref_fisher(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """E[z² | y > 0] / max(E[z² | y <= 0], 1e-12); 0 when a class is empty."""
    pos = y > 0
    if pos.all() or not pos.any():
        return np.zeros(z.shape[1])
    return (z[pos] ** 2).mean(0) / np.maximum((z[~pos] ** 2).mean(0), 1e-12)


def ref_caa_coefficient(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """mean(z | y > 0) - mean(z | y <= 0); 0 when a class is empty."""
    pos = y > 0
    if pos.all() or not pos.any():
        return np.zeros(z.shape[1])
    return z[pos].mean(0) - z[~pos].mean(0)


REFERENCE = {
    "pearson": ref_pearson,
    "mi": ref_mi,
    "fisher": ref_fisher,
    "caa": lambda z, y: np.abs(ref_caa_coefficient(z, y)),
}
TOLERANCE = {  # (rtol, atol)
    "pearson": (0, 1e-10),
    "mi": (1e-10, 1e-14),
    "fisher": (1e-12, 0),
    "caa": (1e-10, 1e-13),
}


def special_data(labels: str = "binary") -> tuple[np.ndarray, np.ndarray]:
    """Sparse SAE-like data with edge-case columns in front; 'real' labels are rewards in [-1, 1].

    Columns: 0 dead, 1 always active, 2 fires only on correct samples (Fisher's floor),
    3 fires only on incorrect samples, 4 constant 0.7, then random sparse features.
    """
    z, y = sparse_data()
    rng = np.random.default_rng(7)
    if labels == "real":
        y = np.where(y > 0, rng.uniform(0.05, 1.0, len(y)), rng.uniform(-1.0, 0.0, len(y)))
        y[:7] = 0.0
    pos = y > 0
    z[:, 0] = 0.0
    z[:, 1] = 1.0 + rng.exponential(1.0, len(y))
    z[:, 2] = np.where(pos & (rng.random(len(y)) < 0.3), rng.exponential(2.0, len(y)), 0.0)
    z[:, 3] = np.where(~pos & (rng.random(len(y)) < 0.3), rng.exponential(2.0, len(y)), 0.0)
    z[:, 4] = 0.7
    return z, y


def one_pass(z: np.ndarray, y: np.ndarray, dtype: torch.dtype = torch.float64) -> CorrelationStats:
    """Stream z, y in the uneven BATCHES (500 samples) or in one batch."""
    return feed(CorrelationStats(z.shape[1]), z, y, BATCHES if len(y) == 500 else [len(y)], dtype=dtype)


def assert_same_scores(stats: CorrelationStats, reference: CorrelationStats) -> None:
    """All scores agree to float64 rounding of sums over 500 samples.

    mean(z | incorrect) is Σz - Σ_correct z, so its rounding is relative to Σz, not to itself,
    and over the few active incorrect samples (active_only) it is a few 1e-12 absolute here.
    """
    expected = all_scores(reference)
    for name, value in all_scores(stats).items():
        atol = 1e-11 if name.startswith("caa_coefficient") else 1e-13
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=atol, msg=name)


def all_scores(stats: CorrelationStats) -> dict[str, torch.Tensor]:
    """Raw and masked scores of every ranking, plus CAA's coefficient."""
    out = {f"raw/{name}": fn(stats) for name, fn in RAW.items()}
    out |= {f"masked/{name}": score(stats, name) for name in RANKINGS}
    return out | {"caa_coefficient": caa_coefficient(stats), "caa_coefficient_active": caa_coefficient(stats, True)}


# ---------------------------------------------------------------- against the references


@pytest.mark.parametrize("labels", ["binary", "real"])
@pytest.mark.parametrize("ranking", RANKINGS)
def test_each_ranking_matches_numpy_float64_reference(ranking, labels):
    z, y = special_data(labels)
    stats = one_pass(z, y)
    raw, expected = RAW[ranking](stats).numpy(), REFERENCE[ranking](z, y)
    rtol, atol = TOLERANCE[ranking]
    np.testing.assert_allclose(raw, expected, rtol=rtol, atol=atol)
    assert np.isfinite(raw).all()
    masked = score(stats, ranking).numpy()
    positive = ref_pearson(z, y) > 0
    np.testing.assert_array_equal(np.isneginf(masked), ~positive)
    np.testing.assert_array_equal(masked[positive], raw[positive])
    assert positive.sum() > 50 and (~positive).sum() > 50  # both sides of the mask are exercised


def test_edge_columns_score_as_defined():
    stats = one_pass(*special_data())
    mi, fisher, caa, r = mi_score(stats), fisher_score(stats), caa_score(stats), stats.pearson()
    assert mi[0] == 0 and fisher[0] == 0 and caa[0] == 0 and r[0] == 0, "dead feature"
    assert mi[1] == pytest.approx(0, abs=1e-15), "always active: the active/inactive split says nothing"
    assert fisher[2] > 1e11 and mi[2] > 0 and r[2] > 0, "fires only on correct samples"
    assert fisher[3] == 0 and r[3] < 0 and torch.isneginf(score(stats, "fisher")[3])
    assert r[4] == 0 and caa[4] == pytest.approx(0, abs=1e-14) and fisher[4] == pytest.approx(1.0, rel=1e-14)
    assert mi.max() <= np.log(2)


def test_caa_coefficient_is_the_signed_mean_difference():
    z, y = special_data()
    stats = one_pass(z, y)
    np.testing.assert_allclose(caa_coefficient(stats).numpy(), ref_caa_coefficient(z, y), rtol=1e-10, atol=1e-13)
    pos, active = y > 0, z > 0
    sums = [(z * (active & m[:, None])).sum(0) for m in (pos, ~pos)]
    counts = [(active & m[:, None]).sum(0) for m in (pos, ~pos)]
    means = [np.where(c > 0, s / np.maximum(c, 1), 0.0) for s, c in zip(sums, counts, strict=True)]
    np.testing.assert_allclose(caa_coefficient(stats, True).numpy(), means[0] - means[1], rtol=1e-10, atol=1e-13)
    assert (caa_coefficient(stats) < 0).any(), "the coefficient is signed, the score is not"


def test_class_squares_accumulate_float32_and_bfloat16_inputs_exactly_in_float64():
    z, y = special_data("real")
    pos = y > 0
    for dtype in (torch.float32, torch.bfloat16):
        zq = torch.tensor(z).to(dtype).double().numpy()
        stats = one_pass(zq, y, dtype=dtype)
        np.testing.assert_allclose(stats.sum_zz_pos.numpy(), (zq[pos] ** 2).sum(0), rtol=1e-14, atol=0)
        np.testing.assert_allclose(stats.sum_zz_neg.numpy(), (zq[~pos] ** 2).sum(0), rtol=1e-14, atol=0)


def test_fisher_keeps_full_precision_for_large_activations():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.5).astype(np.float64)
    z = 1e6 + rng.normal(size=(500, 3)) + np.array([0.0, 1e-3, 1.0]) * y[:, None]  # ratios within 1e-6 of 1
    fisher = fisher_score(one_pass(z, y)).numpy()
    np.testing.assert_allclose(fisher - 1, ref_fisher(z, y) - 1, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- degenerate data


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3, -0.5])
def test_constant_labels_give_finite_scores_and_select_nothing(value):
    z, _ = special_data()
    stats = one_pass(z, np.full(500, value))
    for name in RANKINGS:
        raw = RAW[name](stats)
        assert torch.isfinite(raw).all(), name
        assert torch.equal(raw, torch.zeros_like(raw)), f"{name}: one class is empty, so no evidence"
        assert torch.isneginf(score(stats, name)).all(), name
        for variant in ("A", "S"):
            selection = select_features({0: stats, 1: stats}, variant, ranking=name)
            assert selection.features == [] and selection.candidates == {0: [], 1: []}, (name, variant)


@pytest.mark.parametrize("num_samples", [0, 1])
def test_fewer_than_two_samples_give_zero_scores(num_samples):
    z, y = special_data()
    stats = CorrelationStats(300)
    stats.update(torch.tensor(z[:num_samples]), torch.tensor(y[:num_samples]))
    for name in RANKINGS:
        assert torch.equal(RAW[name](stats), torch.zeros(300, dtype=torch.float64)), name
        assert torch.isneginf(score(stats, name)).all(), name


def test_dead_features_are_never_selected_under_any_ranking():
    z, y = special_data()
    z[:, 5:40] = 0.0
    stats = one_pass(z, y)
    for name in RANKINGS:
        chosen = select_features({0: stats}, "A", top_k=300, ranking=name).candidates[0]
        ids = {f.feature for f in chosen}
        assert ids.isdisjoint({0, *range(5, 40)}), name
        assert len(chosen) == int((stats.pearson() > 0).sum()), f"{name}: every r > 0 feature is a candidate"


# ---------------------------------------------------------------- planted feature


@pytest.fixture(scope="module")
def planted_stats() -> CorrelationStats:
    """The planted world's calibration with live distractors: every other feature fires on ~10% of prompts."""
    # imported here, not at the top: the gloo ranks import this module, and the tiny model's imports take seconds
    from test_planted_feature import D_SAE, PLANTED, _answers, _planted_world

    model, sae, prompts = _planted_world()
    others = torch.arange(D_SAE) != PLANTED
    with torch.no_grad():
        sae.threshold[others] = 0.0
        _, pooled = _answers(model, prompts(256, seed=1000), {0: sae})
        sae.threshold[others] = torch.quantile(pooled[0], 0.9, dim=0)[others].clamp_min(1e-6)
    stats = CorrelationStats(D_SAE)
    for seed in range(4):
        y, pooled = _answers(model, prompts(64, seed), {0: sae})
        stats.update(pooled[0], y)
    return stats


@pytest.mark.parametrize("ranking", RANKINGS)
def test_each_ranking_selects_the_planted_feature_among_live_distractors(planted_stats, ranking):
    from test_planted_feature import PLANTED

    stats = planted_stats
    assert 0.2 < stats.positive_rate() < 0.8
    assert (stats.active > 0).all() and (stats.pearson() > 0).sum() > 100, "distractors fire, many with r > 0"
    for variant in ("A", "S"):
        selection = select_features({0: stats}, variant, ranking=ranking)
        assert [f.feature for f in selection.features] == [PLANTED], variant
        assert selection.ranking == ranking
    best, runner_up = select_features({0: stats}, "A", top_k=2, ranking=ranking).candidates[0]
    assert best.score > 2 * runner_up.score, "the planted feature stands out"
    expected = caa_coefficient(stats) if ranking == "caa" else stats.positive_mean()
    assert best.coefficient == pytest.approx(float(expected[PLANTED]), rel=1e-12)


# ---------------------------------------------------------------- selection by ranking


def _two_layers() -> dict[int, CorrelationStats]:
    """Layer 0's feature has the higher r; layer 1's fires only on (a few) correct samples, so its Fisher is higher."""
    rng = np.random.default_rng(11)
    y = (rng.random(400) < 0.5).astype(np.float64)
    fires0 = np.where(y > 0, rng.random(400) < 0.9, rng.random(400) < 0.2)
    fires1 = (y > 0) & (rng.random(400) < 0.3)
    z0 = np.stack([fires0 * 1.0, rng.random(400) < 0.1], 1).astype(np.float64)
    z1 = np.stack([fires1 * 3.0, rng.random(400) < 0.1], 1).astype(np.float64)
    return {0: one_pass(z0, y), 1: one_pass(z1, y)}


def test_variant_s_picks_the_best_score_of_the_chosen_ranking_across_layers():
    layers = _two_layers()
    assert layers[0].pearson()[0] > layers[1].pearson()[0] > 0
    assert [(f.layer, f.feature) for f in select_features(layers, "S").features] == [(0, 0)]
    assert [(f.layer, f.feature) for f in select_features(layers, "S", ranking="fisher").features] == [(1, 0)]
    chosen = select_features(layers, "A", ranking="fisher").features
    assert [f.score for f in chosen] == [float(fisher_score(layers[f.layer])[f.feature]) for f in chosen]
    assert [f.r for f in chosen] == [float(layers[f.layer].pearson()[f.feature]) for f in chosen]


def test_pearson_ranking_is_the_previous_ranking_by_r():
    stats = one_pass(*special_data())
    r = stats.pearson()
    chosen = select_features({0: stats}, "A", top_k=20).candidates[0]
    assert [f.feature for f in chosen] == torch.topk(r, 20).indices.tolist()
    assert all(f.score == f.r for f in chosen)
    assert select_features({0: stats}, "A").ranking == "pearson"


def test_caa_coefficient_is_the_mean_difference():
    stats = one_pass(*special_data())
    plain = select_features({0: stats}, "A", ranking="caa").features[0]
    assert plain.coefficient == pytest.approx(float(caa_coefficient(stats)[plain.feature]), rel=1e-15)
    active = select_features({0: stats}, "A", active_only=True, ranking="caa").features[0]
    assert active.coefficient == pytest.approx(float(caa_coefficient(stats, True)[active.feature]), rel=1e-15)


def test_unknown_ranking_is_refused_naming_the_option():
    stats = one_pass(*special_data())
    with pytest.raises(ValueError, match=r"unknown ranking 'spare' \(--selection.ranking\); use one of pearson"):
        select_features({0: stats}, "A", ranking="spare")
    with pytest.raises(ValueError, match="unknown ranking"):
        score(stats, "MI")


# ---------------------------------------------------------------- merge, persistence, older files


@pytest.mark.parametrize("cut", [1, 137, 499])
def test_merging_two_shards_equals_one_pass_for_every_ranking(cut):
    z, y = special_data("real")
    merged = one_pass(z[:cut], y[:cut]).merge(one_pass(z[cut:], y[cut:]))
    reference = one_pass(z, y)
    for key in CLASS_SQUARES:
        torch.testing.assert_close(getattr(merged, key), getattr(reference, key), rtol=1e-14, atol=0, msg=key)
    assert_same_scores(merged, reference)


def test_state_dict_round_trip_is_exact_for_every_ranking():
    z, y = special_data()
    stats = one_pass(z, y)
    assert set(CLASS_SQUARES) <= set(stats.state_dict())
    restored = CorrelationStats(300)
    restored.load_state_dict(stats.state_dict())
    extra_z, extra_y = sparse_data(n=20, seed=9)
    for step in ("restored", "streamed on"):
        expected = all_scores(stats)
        for name, value in all_scores(restored).items():
            assert torch.equal(value, expected[name]), (step, name)
        for s in (stats, restored):
            s.update(torch.tensor(extra_z), torch.tensor(extra_y))


def test_layer_stats_file_round_trip_is_exact_for_every_ranking(tmp_path):
    z, y = special_data()
    stats = {2: one_pass(z, y), 5: one_pass(z[:, :40], y)}
    save_layer_stats(stats, tmp_path / "statistics.safetensors")
    loaded = load_layer_stats(tmp_path / "statistics.safetensors")
    for layer, s in stats.items():
        expected = all_scores(s)
        for name, value in all_scores(loaded[layer]).items():
            assert torch.equal(value, expected[name]), (layer, name)


def _older_file(tmp_path, stats: dict[int, CorrelationStats]):
    """Writes `stats` as a version before the per-class Σz² did (no sum_zz_pos / sum_zz_neg keys)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "statistics.safetensors"
    save_layer_stats(stats, path)
    save_file({k: v for k, v in load_file(path).items() if k.split(".", 2)[2] not in CLASS_SQUARES}, path)
    return path


def test_older_statistics_still_rank_by_pearson_mi_and_caa_and_fisher_says_recalibrate(tmp_path):
    z, y = special_data()
    current = one_pass(z, y)
    path = _older_file(tmp_path, {3: current})
    older = load_layer_stats(path)[3]
    assert not older.has_class_squares and current.has_class_squares
    assert older.sum_zz_pos.isnan().all()
    for name in ("pearson", "mi", "caa"):
        assert torch.equal(score(older, name), score(current, name)), name
        assert (
            select_features({3: older}, "A", ranking=name).features
            == select_features({3: current}, "A", ranking=name).features
        )
    with pytest.raises(ValueError, match=rf"statistics file {path}.*Recalibrate"):
        select_features({3: older}, "A", ranking="fisher")
    merged = CorrelationStats(300).merge(current).merge(older)  # unknown stays unknown after merging
    with pytest.raises(ValueError, match="this statistics state lacks.*Recalibrate"):
        fisher_score(merged)


def test_older_state_without_samples_loads_as_zeros():
    state = {k: v for k, v in CorrelationStats(300).state_dict().items() if k not in CLASS_SQUARES}
    stats = CorrelationStats(300)
    stats.load_state_dict(state)
    assert stats.has_class_squares and torch.equal(stats.sum_zz_neg, torch.zeros(300, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"missing keys \['sum_zz_neg', 'sum_zz_pos'\], unexpected keys \['x'\]"):
        CorrelationStats(300).load_state_dict({**state, "x": torch.zeros(1)})


# ---------------------------------------------------------------- distributed


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Per process: stream this rank's shard of each sharding, all_reduce, save the state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        z, y = special_data("real")
        for name, bounds in SHARDINGS.items():
            a, b = bounds[rank], bounds[rank + 1]
            stats = CorrelationStats(300)
            if a < b:
                feed(stats, z[a:b], y[a:b], [(b - a) // 4 + 1, b - a - (b - a) // 4 - 1])
            stats.all_reduce()
            torch.save(stats.state_dict(), f"{out_dir}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_equals_one_process_for_every_ranking(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reference = one_pass(*special_data("real"))
    for name in SHARDINGS:
        for rank in range(2):
            stats = CorrelationStats(300)
            stats.load_state_dict(torch.load(tmp_path / f"{name}-rank{rank}.pt"))
            for key in CLASS_SQUARES:
                torch.testing.assert_close(getattr(stats, key), getattr(reference, key), rtol=1e-14, atol=0)
            assert_same_scores(stats, reference)
