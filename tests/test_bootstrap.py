"""Specification of calibration.bootstrap: deterministic Poisson replicates, streamed, merged, reduced, resumed."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_stats import sparse_data

from corrsteer_pl.calibration.bootstrap import (
    BootstrapStats,
    bootstrap_pearson,
    overall_top1_share,
    r_interval,
    replicate_weights,
    top1_share,
)
from corrsteer_pl.calibration.significance import layer_p_values, layer_q_values, pooled_q_values
from corrsteer_pl.calibration.stats import CorrelationStats

BATCHES = [1, 7, 64, 3, 150, 32, 32, 111, 100]  # uneven, sums to 500
B = 20
R_ATOL = 1e-12  # float64 rounding of r near 0 (sums of Poisson-weighted terms round a bit more than in test_stats)
IDS = [f"item-{i}" for i in range(500)]


def feed(stats: BootstrapStats, z: np.ndarray, y: np.ndarray, ids: list[str], sizes: list[int], dtype=torch.float64):
    """Update `stats` with consecutive batches of the given sizes."""
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        stats.update(torch.tensor(z[rows], dtype=dtype), torch.tensor(y[rows]), ids[rows])
        start += size
    assert start == len(y)
    return stats


def one_pass(z: np.ndarray, y: np.ndarray, ids: list[str] = IDS, replicates: int = B) -> BootstrapStats:
    return feed(BootstrapStats(z.shape[1], replicates), z, y, ids, BATCHES if len(y) == 500 else [len(y)])


def weighted_r(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Reference: each replicate's weighted Pearson r [B, F] by explicit centring in float64 (0 if constant)."""
    out = np.zeros((w.shape[0], z.shape[1]))
    for b, wb in enumerate(w):
        total = wb.sum()
        zc = z - (wb @ z) / total
        yc = y - (wb @ y) / total
        var_z, var_y = wb @ zc**2, wb @ yc**2
        ok = (var_z > 1e-20 * (wb @ z**2)) & (var_y > 0)
        out[b] = np.where(ok, (wb * yc) @ zc / np.sqrt(np.where(ok, var_z * var_y, 1.0)), 0.0)
    return out


def weights(ids: list[str], replicates: int = B, seed: int = 0) -> np.ndarray:
    return replicate_weights(ids, replicates, seed).numpy()


# ---------------------------------------------------------------- replicate weights


def test_weights_are_poisson_one():
    w = weights([f"sample-{i}" for i in range(20_000)]).ravel()  # 400,000 draws
    assert w.dtype == np.float64 and np.all(w == np.round(w))
    assert abs(w.mean() - 1) < 0.005 and abs(w.var() - 1) < 0.01
    counts = np.bincount(w.astype(int), minlength=7)
    observed = np.append(counts[:6], counts[6:].sum())  # 0, 1, ..., 5, >= 6
    expected = np.append(scipy.stats.poisson.pmf(np.arange(6), 1.0), scipy.stats.poisson.sf(5, 1.0)) * w.size
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


def test_weights_are_a_pure_function_of_id_replicate_and_seed():
    ids = [f"q{i}" for i in range(50)]
    full = weights(ids)
    order = np.random.default_rng(0).permutation(50)
    np.testing.assert_array_equal(weights([ids[i] for i in order]), full[:, order])
    np.testing.assert_array_equal(np.concatenate([weights(ids[:7]), weights(ids[7:])], axis=1), full)
    np.testing.assert_array_equal(weights(ids, replicates=5), full[:5])  # replicate b is the same for any B
    assert not np.array_equal(weights(ids, seed=1), full)
    assert replicate_weights([], B).shape == (B, 0)


def test_weights_are_pinned_so_old_checkpoints_keep_their_replicates():
    ids = ["a", "item-0", "mmlu/validation/17"]
    assert replicate_weights(ids, 6).int().tolist() == [
        [0, 0, 1],
        [0, 3, 3],
        [1, 0, 0],
        [4, 0, 2],
        [0, 2, 1],
        [0, 1, 0],
    ]
    assert replicate_weights(ids, 6, seed=1).int().tolist() == [
        [0, 2, 0],
        [0, 2, 0],
        [1, 0, 2],
        [1, 0, 1],
        [2, 2, 1],
        [1, 0, 2],
    ]


# ---------------------------------------------------------------- correctness of the replicates


@pytest.mark.parametrize("labels", ["binary", "real"])
def test_replicates_equal_explicit_weighting_in_numpy_float64(labels):
    z, y = sparse_data()
    if labels == "real":
        y = np.random.default_rng(1).normal(size=500) + z[:, :50].sum(1)
    r = one_pass(z, y).pearson()
    assert r.shape == (B, 300) and r.dtype == torch.float64
    np.testing.assert_allclose(r.numpy(), weighted_r(z, y, weights(IDS)), rtol=0, atol=1e-12)
    assert r.abs().max() > 0.15 and r.std(0).median() > 0.01  # real correlations, replicates that differ


def test_replicate_sums_equal_explicit_weighted_sums():
    z, y = sparse_data()
    stats = one_pass(z, y).reshift(torch.zeros(300, dtype=torch.float64), 0.0)
    w = weights(IDS)
    expected = {"weight": w.sum(1), "sum_y": w @ y, "sum_yy": w @ y**2, "sum_z": w @ z}
    expected |= {"sum_zz": w @ z**2, "sum_zy": (w * y) @ z}
    for key, value in expected.items():
        np.testing.assert_allclose(getattr(stats, key).numpy(), value, rtol=1e-12, atol=1e-9, err_msg=key)


def test_float32_and_bfloat16_inputs_are_accumulated_in_float64():
    z, y = sparse_data()
    for dtype in (torch.float32, torch.bfloat16):
        zq = torch.tensor(z).to(dtype).double().numpy()
        r = feed(BootstrapStats(300, B), zq, y, IDS, BATCHES, dtype=dtype).pearson()
        np.testing.assert_allclose(r.numpy(), weighted_r(zq, y, weights(IDS)), rtol=0, atol=1e-12)


def test_large_mean_to_std_ratio_keeps_full_precision():
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.5).astype(np.float64)
    z = 1e6 + rng.normal(size=(500, 3)) + np.array([0.0, 0.5, -2.0]) * y[:, None]
    expected = weighted_r(z, y, weights(IDS))
    np.testing.assert_allclose(one_pass(z, y).pearson().numpy(), expected, rtol=1e-8, atol=0)
    merged = one_pass(z[:123], y[:123], IDS[:123]).merge(one_pass(z[123:], y[123:], IDS[123:]))
    np.testing.assert_allclose(merged.pearson().numpy(), expected, rtol=1e-8, atol=0)


def test_constant_features_and_constant_labels_give_r_exactly_zero():
    z, y = sparse_data(f=4)
    z[:, 0], z[:, 1], z[:, 2] = 0.0, 0.1, 123456.789
    r = feed(BootstrapStats(4, B), z, y, IDS, BATCHES, dtype=torch.float32).pearson()
    assert torch.equal(r[:, :3], torch.zeros(B, 3, dtype=torch.float64))
    assert (r[:, 3] != 0).all()
    for value in (0.0, 1.0):
        assert torch.equal(one_pass(z, np.full(500, value)).pearson(), torch.zeros(B, 4, dtype=torch.float64))


def test_functional_form_equals_streaming_result():
    z, y = sparse_data()
    once = bootstrap_pearson(torch.tensor(z), torch.tensor(y), IDS)
    torch.testing.assert_close(once, one_pass(z, y).pearson(), rtol=1e-12, atol=R_ATOL)


# ---------------------------------------------------------------- order, sharding, resume


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_any_batch_order_and_sharding_gives_the_same_replicates(k):
    z, y = sparse_data()
    reference = one_pass(z, y).pearson()
    order = np.random.default_rng(k).permutation(500)  # shuffled samples, each shard its own shift
    cuts = np.sort(np.random.default_rng(k).choice(np.arange(1, 500), k - 1, replace=False))
    merged = BootstrapStats(300, B)
    for a, b in itertools.pairwise([0, *cuts.tolist(), 500]):
        rows = order[a:b]
        shard = feed(BootstrapStats(300, B), z[rows], y[rows], [IDS[i] for i in rows], [(b - a + 1) // 2, (b - a) // 2])
        merged.merge(shard)
    assert merged.num_samples == 500
    torch.testing.assert_close(merged.pearson(), reference, rtol=1e-12, atol=R_ATOL)


def test_resume_from_a_saved_state_gives_the_same_replicates(tmp_path):
    z, y = sparse_data()
    before_kill = feed(BootstrapStats(300, B, seed=7), z[:200], y[:200], IDS[:200], [64, 136])
    save_file(before_kill.state_dict(), str(tmp_path / "bootstrap.safetensors"))
    resumed = BootstrapStats.from_state_dict(load_file(str(tmp_path / "bootstrap.safetensors")))
    assert (resumed.num_features, resumed.replicates, resumed.seed) == (300, B, 7)
    feed(resumed, z[200:], y[200:], IDS[200:], [100, 200])
    uninterrupted = feed(BootstrapStats(300, B, seed=7), z, y, IDS, BATCHES)
    torch.testing.assert_close(resumed.pearson(), uninterrupted.pearson(), rtol=1e-12, atol=R_ATOL)
    np.testing.assert_allclose(resumed.pearson().numpy(), weighted_r(z, y, weights(IDS, seed=7)), atol=1e-12)


def test_state_dict_round_trip_is_exact_and_independent_of_sample_count():
    z, y = sparse_data()
    stats = one_pass(z, y)
    restored = BootstrapStats(300, B)
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.pearson(), stats.pearson())
    small = one_pass(z[:10], y[:10], IDS[:10]).state_dict()
    assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in stats.state_dict().items()}
    assert stats.state_dict()["sum_zz"].shape == (B, 300)


def test_merge_and_load_reject_other_features_replicates_or_seed():
    state = one_pass(*sparse_data()).state_dict()
    for other in (BootstrapStats(299, B), BootstrapStats(300, B - 1), BootstrapStats(300, B, seed=1)):
        with pytest.raises(ValueError, match="cannot merge"):
            BootstrapStats(300, B).merge(other)
    with pytest.raises(ValueError, match="num_features=299, replicates=20"):
        BootstrapStats(299, B).load_state_dict(state)
    with pytest.raises(ValueError, match="replicates=19"):
        BootstrapStats(300, B - 1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 0.*use 3"):
        BootstrapStats(300, B, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing keys \['sum_zy'\]"):
        BootstrapStats(300, B).load_state_dict({k: v for k, v in state.items() if k != "sum_zy"})


def test_update_needs_one_id_per_sample_and_valid_shapes():
    with pytest.raises(ValueError, match="4 rows, 3 ids"):
        BootstrapStats(6).update(torch.zeros(4, 6), torch.zeros(4), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        BootstrapStats(6).update(torch.zeros(4, 5), torch.zeros(4), list("abcd"))
    with pytest.raises(ValueError, match=">= 0"):
        BootstrapStats(6, replicates=-1)


def test_zero_replicates_turn_the_bootstrap_off():
    stats = BootstrapStats(300, replicates=0)
    z, y = sparse_data()
    feed(stats, z, y, IDS, BATCHES)
    assert stats.num_samples == 0  # nothing was done
    assert stats.pearson().shape == (0, 300)
    assert all(v.numel() <= 300 for v in stats.state_dict().values())
    with pytest.raises(ValueError, match="B = 0"):
        top1_share(stats.pearson(), [0])


def test_empty_batches_are_ignored():
    z, y = sparse_data()
    stats = BootstrapStats(300, B)
    stats.update(torch.zeros(0, 300), torch.zeros(0), [])
    feed(stats, z, y, IDS, BATCHES)
    torch.testing.assert_close(stats.pearson(), one_pass(z, y).pearson(), rtol=0, atol=0)


def test_to_moves_state_and_keeps_results():
    stats = one_pass(*sparse_data())
    r = stats.pearson()
    assert stats.to("cpu") is stats and torch.equal(stats.pearson(), r)


# ---------------------------------------------------------------- distributed

SHARDINGS = {
    "uneven": ([0, 137], [137, 500]),
    "strided": ("even", "odd"),  # as DistributedSampler deals samples
    "rank0-empty": ([0, 0], [0, 500]),
}


def _shard_rows(name: str, rank: int) -> np.ndarray:
    spec = SHARDINGS[name][rank]
    if spec in ("even", "odd"):
        return np.arange(rank, 500, 2)
    return np.arange(*spec)


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Per process: stream this rank's shard of each sharding, all_reduce, save the state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        z, y = sparse_data()
        for name in SHARDINGS:
            rows = _shard_rows(name, rank)
            stats = BootstrapStats(300, B)
            m = len(rows)
            feed(stats, z[rows], y[rows], [IDS[i] for i in rows], [m // 3 + 1, m - m // 3 - 1] if m else [0])
            assert stats.all_reduce() is stats
            torch.save(stats.state_dict(), f"{out_dir}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def all_reduced(tmp_path_factory) -> dict[tuple[str, int], BootstrapStats]:
    """Run two gloo processes once; return each (sharding, rank)'s state after all_reduce."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank_worker, args=(str(out / "init"), str(out)), nprocs=2, join=True)
    results = {}
    for name in SHARDINGS:
        for rank in range(2):
            results[name, rank] = BootstrapStats(300, B)
            results[name, rank].load_state_dict(torch.load(out / f"{name}-rank{rank}.pt"))
    return results


@pytest.mark.parametrize("sharding", list(SHARDINGS))
@pytest.mark.parametrize("rank", [0, 1])
def test_all_reduce_over_two_gloo_processes_equals_one_process(all_reduced, sharding, rank):
    stats, reference = all_reduced[sharding, rank], one_pass(*sparse_data())
    assert stats.num_samples == 500
    torch.testing.assert_close(stats.pearson(), reference.pearson(), rtol=1e-12, atol=R_ATOL)
    torch.testing.assert_close(stats.weight, reference.weight, rtol=0, atol=0)


def test_all_reduce_is_a_no_op_without_distributed():
    stats = one_pass(*sparse_data())
    before = stats.state_dict()
    assert stats.all_reduce() is stats
    assert all(torch.equal(v, before[k]) for k, v in stats.state_dict().items())


# ---------------------------------------------------------------- stability and intervals


def test_top1_share_counts_the_replicates_where_a_candidate_is_best():
    r = torch.tensor([[0.1, 0.3, 0.2], [0.4, 0.3, 0.2], [0.1, 0.3, 0.3], [-0.1, -0.2, -0.3]], dtype=torch.float64)
    # replicate 2: a tie goes to the first; replicate 3: no feature with r > 0 is nobody's top-1
    torch.testing.assert_close(top1_share(r, [1, 0, 2]), torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(top1_share(r, torch.tensor([1])), torch.tensor([0.5], dtype=torch.float64))


def test_overall_top1_share_compares_across_layers():
    r = {
        12: torch.tensor([[0.2, 0.5], [0.2, 0.1], [0.0, -0.1]], dtype=torch.float64),
        6: torch.tensor([[0.4, 0.1], [0.3, 0.0], [-0.5, 0.0]], dtype=torch.float64),
    }
    shares = overall_top1_share(r, [(12, 1), (6, 0), (12, 0)])
    torch.testing.assert_close(shares, torch.tensor([1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert overall_top1_share(r, []).shape == (0,)


def test_r_interval_matches_numpy_percentiles():
    r = torch.randn(B, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for level in (0.9, 0.5, 0.99):
        low, high = r_interval(r, level)
        np.testing.assert_allclose(low.numpy(), np.quantile(r.numpy(), (1 - level) / 2, axis=0), rtol=1e-14)
        np.testing.assert_allclose(high.numpy(), np.quantile(r.numpy(), (1 + level) / 2, axis=0), rtol=1e-14)
    with pytest.raises(ValueError, match="level"):
        r_interval(r, 1.0)


def planted_world(n: int = 2000, features: int = 1000, seed: int = 0) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Two SAE-like layers (1-3% firing); layer 12's feature 123 fires 4x as often on correct answers."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float64)
    layers = {}
    for layer in (6, 12):
        rate = rng.uniform(0.01, 0.03, features)[None, :].repeat(n, 0)
        if layer == 12:
            rate[:, 123] = np.where(y > 0, 0.16, 0.04)
        layers[layer] = (rng.random((n, features)) < rate) * rng.exponential(1.0, (n, features))
    return layers, y


def test_planted_feature_is_significant_and_stable():
    layers, y = planted_world()
    ids = [f"item-{i}" for i in range(len(y))]
    plain, boot = {}, {}
    for layer, z in layers.items():
        plain[layer] = CorrelationStats(z.shape[1])
        boot[layer] = BootstrapStats(z.shape[1], B)
        for start in range(0, len(y), 32):
            rows = slice(start, start + 32)
            plain[layer].update(torch.tensor(z[rows]), torch.tensor(y[rows]))
            boot[layer].update(torch.tensor(z[rows]), torch.tensor(y[rows]), ids[rows])
    p = layer_p_values(plain)
    assert float(layer_q_values(p)[12][123]) < 1e-6
    assert float(pooled_q_values(p)[12][123]) < 1e-6
    replicate_r = {layer: s.pearson() for layer, s in boot.items()}
    assert float(top1_share(replicate_r[12], [123])[0]) >= 0.9
    assert float(overall_top1_share(replicate_r, [(12, 123)])[0]) >= 0.9
    low, high = r_interval(replicate_r[12][:, 123])
    assert low < plain[12].pearson()[123] < high and low > 0.1


def test_bootstrap_spread_matches_the_standard_error_of_r():
    """The replicates' sd of r is close to (1 - r²) / sqrt(n), the standard error of r near 0 (null features)."""
    layers, y = planted_world(features=200)
    z = layers[12]
    ids = [f"s{i}" for i in range(len(y))]
    r = bootstrap_pearson(torch.tensor(z), torch.tensor(y), ids, replicates=200)  # (200, 200)
    sd = r.std(0)
    expected = (1 - r.mean(0) ** 2) / math.sqrt(len(y))
    assert 0.8 < float((sd / expected).median()) < 1.2
