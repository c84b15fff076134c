"""Specification of corrsteer_pl.calibration.stats: streaming, mergeable, distributed Pearson statistics."""

import itertools

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from corrsteer_pl.calibration.stats import CorrelationStats, pearson_corrcoef

BATCHES = [1, 7, 64, 3, 150, 32, 32, 111, 100]  # uneven, sums to 500
# Float64 rounding alone moves r by ~5e-14 when r ~ 0.02 (the two-pass reference included),
# so "equal to 1e-12 relative" is checked with this absolute floor for near-zero r.
R_ATOL = 1e-13


def sparse_data(n: int = 500, f: int = 300, density: float = 0.03, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SAE-like activations: non-negative, mostly zero, some features correlated with binary labels."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.float64)
    fire = rng.random((n, f)) < density * (1 + y[:, None] * np.linspace(-0.9, 2, f))
    z = fire * rng.exponential(2.0, (n, f))
    return z, y


def feed(stats: CorrelationStats, z: np.ndarray, y: np.ndarray, sizes: list[int], dtype=torch.float64):
    """Update `stats` with consecutive batches of the given sizes."""
    start = 0
    for size in sizes:
        stats.update(torch.tensor(z[start : start + size], dtype=dtype), torch.tensor(y[start : start + size]))
        start += size
    assert start == len(y)
    return stats


def two_pass_r(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reference Pearson r in float64 via explicit centring."""
    zc, yc = z - z.mean(0), y - y.mean()
    return (zc * yc[:, None]).sum(0) / np.sqrt((zc**2).sum(0) * (yc**2).sum())


def one_pass(z: np.ndarray, y: np.ndarray) -> CorrelationStats:
    return feed(CorrelationStats(z.shape[1]), z, y, BATCHES if len(y) == 500 else [len(y)])


# ---------------------------------------------------------------- correctness of r


@pytest.mark.parametrize("labels", ["binary", "real"])
def test_pearson_matches_scipy_and_two_pass_on_sparse_batched_data(labels):
    z, y = sparse_data()
    if labels == "real":
        y = np.random.default_rng(1).normal(size=len(y)) + z[:, :50].sum(1)
    r = one_pass(z, y).pearson().numpy()
    expected = np.array([scipy.stats.pearsonr(z[:, j], y).statistic for j in range(z.shape[1])])
    assert np.all(z.std(0) > 0)
    np.testing.assert_allclose(r, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r, two_pass_r(z, y), rtol=0, atol=1e-10)
    assert np.abs(r).max() > 0.15  # the data does contain real correlations


def test_functional_form_equals_streaming_result():
    z, y = sparse_data()
    streamed = one_pass(z, y).pearson()
    once = pearson_corrcoef(torch.tensor(z), torch.tensor(y))
    torch.testing.assert_close(once, streamed, rtol=0, atol=1e-12)
    assert once.dtype == torch.float64


def test_float32_and_bfloat16_inputs_are_accumulated_in_float64():
    z, y = sparse_data()
    for dtype in (torch.float32, torch.bfloat16):
        zq = torch.tensor(z).to(dtype)
        r = feed(CorrelationStats(z.shape[1]), zq.double().numpy(), y, BATCHES, dtype=dtype).pearson()
        np.testing.assert_allclose(r.numpy(), two_pass_r(zq.double().numpy(), y), rtol=0, atol=1e-10)


def test_large_mean_to_std_ratio_keeps_full_precision():
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.5).astype(np.float64)
    noise = rng.normal(size=(500, 3))
    z = 1e6 + noise + np.array([0.0, 0.5, -2.0]) * y[:, None]  # mean/std ~ 1e6
    expected = two_pass_r(z, y)
    r = one_pass(z, y).pearson().numpy()
    np.testing.assert_allclose(r, expected, rtol=1e-8, atol=0)

    # Raw (unshifted) float64 sums lose ~12 of 16 digits to cancellation here.
    n, sz, szz, sy, syy, szy = len(y), z.sum(0), (z * z).sum(0), y.sum(), y @ y, y @ z
    naive = (szy - sz * sy / n) / np.sqrt((szz - sz**2 / n) * (syy - sy**2 / n))
    assert np.max(np.abs(naive / expected - 1)) > 1e-6


def test_agrees_with_torchmetrics_pearson_on_dense_data():
    from torchmetrics.regression import PearsonCorrCoef

    rng = np.random.default_rng(3)
    y = rng.normal(size=500)
    z = rng.normal(size=(500, 40)) + np.linspace(0, 1, 40) * y[:, None] + 3.0
    metric = PearsonCorrCoef(num_outputs=40)
    metric.set_dtype(torch.float64)
    feed(_Recorder(metric), z, y, BATCHES)
    np.testing.assert_allclose(one_pass(z, y).pearson().numpy(), metric.compute().numpy(), rtol=0, atol=1e-8)


class _Recorder:
    """Adapts a torchmetrics metric to `feed` (which passes y [B])."""

    def __init__(self, metric):
        self.metric = metric

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        self.metric.update(z, y[:, None].expand_as(z))


# ---------------------------------------------------------------- degenerate cases


def test_never_firing_and_constant_features_have_r_exactly_zero():
    z, y = sparse_data(f=4)
    z[:, 0] = 0.0
    z[:, 1] = 0.1
    z[:, 2] = 123456.789
    stats = feed(CorrelationStats(4), z, y, BATCHES, dtype=torch.float32)
    r = stats.pearson()
    assert r[:3].tolist() == [0.0, 0.0, 0.0]
    assert r[3] != 0
    assert torch.isfinite(r).all()


def test_features_constant_up_to_rounding_have_r_exactly_zero():
    y = np.tile([0.0, 1.0], 250)
    z = np.stack([np.where(y > 0, np.nextafter(0.1, 1), 0.1), np.where(y > 0, 1e6, np.nextafter(1e6, 0))], 1)
    r = one_pass(z, y).pearson()
    assert torch.equal(r, torch.zeros(2, dtype=torch.float64))


def test_constant_features_stay_at_r_zero_after_reshifting_far_away():
    z, y = sparse_data(f=3)
    z[:, :2] = [0.1, 0.7]
    # A first batch of 7 puts the 0.1 shift one ulp off, so the reshift leaves rounding noise.
    stats = feed(CorrelationStats(3), z, y, [7, 493]).reshift(torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64), 0.0)
    r = stats.pearson()
    assert r[:2].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(r[2].item(), two_pass_r(z, y)[2], rtol=1e-10)


def test_perfectly_correlated_features_give_r_of_magnitude_one_never_above():
    rng = np.random.default_rng(5)
    y = rng.normal(size=500)
    z = y[:, None] * rng.normal(scale=10, size=200) + rng.normal(size=200)
    r = one_pass(z, y).pearson()
    assert r.abs().max() <= 1.0
    torch.testing.assert_close(r.abs(), torch.ones(200, dtype=torch.float64), rtol=0, atol=1e-14)


def test_constant_labels_give_r_exactly_zero():
    z, _ = sparse_data()
    for value in (0.0, 1.0, 0.3):
        r = one_pass(z, np.full(500, value)).pearson()
        assert torch.equal(r, torch.zeros(300, dtype=torch.float64))


@pytest.mark.parametrize("num_samples", [0, 1])
def test_fewer_than_two_samples_give_r_exactly_zero(num_samples):
    z, y = sparse_data(n=num_samples, f=5)
    stats = CorrelationStats(5)
    stats.update(torch.tensor(z), torch.tensor(y))
    assert stats.num_samples == num_samples
    assert torch.equal(stats.pearson(), torch.zeros(5, dtype=torch.float64))


def test_empty_batches_are_ignored_and_do_not_fix_the_shift():
    z, y = sparse_data()
    stats = CorrelationStats(300)
    stats.update(torch.zeros(0, 300), torch.zeros(0))
    feed(stats, z, y, BATCHES)
    stats.update(torch.zeros(0, 300), torch.zeros(0))
    assert stats.num_samples == 500
    torch.testing.assert_close(stats.shift_z, torch.tensor(z[0]), rtol=0, atol=0)
    np.testing.assert_allclose(stats.pearson().numpy(), two_pass_r(z, y), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- merging and shifting


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_merging_k_uneven_shards_equals_one_pass(k):
    z, y = sparse_data()
    cuts = np.sort(np.random.default_rng(k).choice(np.arange(1, 500), k - 1, replace=False))
    bounds = [0, *cuts.tolist(), 500]
    shards = [
        feed(CorrelationStats(300), z[a:b], y[a:b], [max(1, (b - a) // 3), b - a - max(1, (b - a) // 3)])
        for a, b in itertools.pairwise(bounds)
    ]
    merged = CorrelationStats(300)
    for shard in shards:
        merged.merge(shard)
    reference = one_pass(z, y)
    assert merged.num_samples == 500
    torch.testing.assert_close(merged.pearson(), reference.pearson(), rtol=1e-12, atol=R_ATOL)
    torch.testing.assert_close(merged.positive_mean(), reference.positive_mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.frequency(), reference.frequency(), rtol=0, atol=0)


def test_merge_adopts_shift_when_empty_and_leaves_other_unchanged():
    z, y = sparse_data()
    other = one_pass(z, y)
    before = other.state_dict()
    merged = CorrelationStats(300).merge(other)
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert torch.equal(merged.state_dict()[key], value), key
    assert merged.merge(CorrelationStats(300)).num_samples == 500


def test_merge_keeps_precision_for_large_mean_features():
    rng = np.random.default_rng(4)
    y = rng.normal(size=500)
    z = 1e6 + rng.normal(size=(500, 2)) + np.array([0.3, -1.0]) * y[:, None]
    merged = one_pass(z[:123], y[:123]).merge(one_pass(z[123:], y[123:]))
    np.testing.assert_allclose(merged.pearson().numpy(), two_pass_r(z, y), rtol=1e-8, atol=0)


def test_merge_rejects_different_num_features():
    with pytest.raises(ValueError, match="300.*299|299.*300"):
        CorrelationStats(300).merge(CorrelationStats(299))


def test_reshift_preserves_results_and_round_trips():
    z, y = sparse_data()
    stats = one_pass(z, y)
    before = stats.state_dict()
    r, mean = stats.pearson(), stats.mean_z()
    stats.reshift(torch.linspace(-3, 5, 300, dtype=torch.float64), 0.7)
    assert stats.shift_y.item() == 0.7
    torch.testing.assert_close(stats.pearson(), r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stats.mean_z(), mean, rtol=1e-12, atol=1e-14)
    stats.reshift(before["shift_z"], before["shift_y"])
    for key, value in before.items():
        torch.testing.assert_close(getattr(stats, key), value, rtol=1e-12, atol=1e-9, msg=key)


# ---------------------------------------------------------------- auxiliary statistics


def test_positive_mean_frequency_and_rates_match_numpy():
    z, y = sparse_data()
    y[:5] = -1.0  # non-positive labels other than 0 also count as negatives
    stats = feed(CorrelationStats(300), z, y, BATCHES, dtype=torch.float32)
    z32 = torch.tensor(z, dtype=torch.float32).double().numpy()
    pos = y > 0
    active_pos = (z32[pos] > 0).sum(0)
    np.testing.assert_allclose(stats.positive_mean().numpy(), z32[pos].mean(0), rtol=1e-12, atol=0)
    expected_active = np.where(active_pos > 0, z32[pos].sum(0) / np.maximum(active_pos, 1), 0.0)
    np.testing.assert_allclose(stats.positive_mean(active_only=True).numpy(), expected_active, rtol=1e-12, atol=0)
    np.testing.assert_allclose(stats.frequency().numpy(), (z32 > 0).mean(0), rtol=1e-15, atol=0)
    np.testing.assert_allclose(stats.mean_z().numpy(), z32.mean(0), rtol=1e-12, atol=1e-15)
    assert stats.positive_rate().item() == pytest.approx(pos.mean(), abs=1e-15)
    assert (active_pos == 0).any()  # exercises the 0-denominator branch


def test_results_are_zero_and_finite_without_positive_samples_or_any_samples():
    z, _ = sparse_data()
    stats = one_pass(z, np.zeros(500))
    empty = CorrelationStats(300)
    for s in (stats, empty):
        for out in (s.positive_mean(), s.positive_mean(active_only=True)):
            assert torch.equal(out, torch.zeros(300, dtype=torch.float64))
    for out in (empty.frequency(), empty.mean_z(), empty.pearson()):
        assert torch.equal(out, torch.zeros(300, dtype=torch.float64))
    assert empty.positive_rate().item() == 0.0


# ---------------------------------------------------------------- validation and persistence


@pytest.mark.parametrize(
    ("z_shape", "y_shape"), [((4, 5), (4,)), ((4, 6, 1), (4,)), ((4, 6), (3,)), ((4, 6), (4, 1)), ((6,), (6,))]
)
def test_bad_shapes_raise_value_error_naming_the_shapes(z_shape, y_shape):
    with pytest.raises(ValueError, match=rf"{z_shape}.*{y_shape}".replace("(", r"\(").replace(")", r"\)")):
        CorrelationStats(6).update(torch.zeros(z_shape), torch.zeros(y_shape))
    if len(z_shape) != 2 or z_shape[0] != y_shape[0] or len(y_shape) != 1:
        with pytest.raises(ValueError):
            pearson_corrcoef(torch.zeros(z_shape), torch.zeros(y_shape))


def test_state_dict_round_trip_gives_identical_results():
    z, y = sparse_data()
    stats = one_pass(z, y)
    restored = CorrelationStats(300)
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.pearson(), stats.pearson())
    assert torch.equal(restored.positive_mean(active_only=True), stats.positive_mean(active_only=True))
    # Restored state keeps streaming exactly like the original.
    extra_z, extra_y = sparse_data(n=20, seed=9)
    for s in (stats, restored):
        s.update(torch.tensor(extra_z), torch.tensor(extra_y))
    assert torch.equal(restored.pearson(), stats.pearson())


def test_state_dict_is_independent_of_number_of_samples():
    z, y = sparse_data()
    small, large = one_pass(z[:10], y[:10]), one_pass(z, y)
    shapes = {k: v.shape for k, v in small.state_dict().items()}
    assert shapes == {k: v.shape for k, v in large.state_dict().items()}
    assert all(v.dtype == torch.float64 for v in large.state_dict().values())


def test_load_state_dict_rejects_wrong_num_features_and_bad_keys():
    state = one_pass(*sparse_data()).state_dict()
    with pytest.raises(ValueError, match="num_features=299"):
        CorrelationStats(299).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing keys \['sum_zy'\]"):
        CorrelationStats(300).load_state_dict({k: v for k, v in state.items() if k != "sum_zy"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        CorrelationStats(300).load_state_dict({**state, "extra": torch.zeros(1)})


def test_to_moves_state_and_keeps_results():
    stats = one_pass(*sparse_data())
    r = stats.pearson()
    assert stats.to("cpu") is stats
    assert stats.device == torch.device("cpu")
    assert torch.equal(stats.pearson(), r)


# ---------------------------------------------------------------- distributed


SHARDINGS = {"uneven": [0, 137, 500], "rank0-empty": [0, 0, 500], "rank1-empty": [0, 500, 500]}


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Per process: stream this rank's shard of each sharding, all_reduce, save the state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        z, y = sparse_data()
        for name, bounds in SHARDINGS.items():
            a, b = bounds[rank], bounds[rank + 1]
            stats = CorrelationStats(300)
            if a == b:
                stats.update(torch.tensor(z[a:b]), torch.tensor(y[a:b]))  # an empty batch
            else:  # first batches of different sizes give each rank its own shift
                feed(stats, z[a:b], y[a:b], [(b - a) // 4 + 1, b - a - (b - a) // 4 - 1])
            assert stats.all_reduce() is stats
            torch.save(stats.state_dict(), f"{out_dir}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def all_reduced(tmp_path_factory) -> dict[tuple[str, int], CorrelationStats]:
    """Run two gloo processes once; return each (sharding, rank)'s state after all_reduce."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank_worker, args=(str(out / "init"), str(out)), nprocs=2, join=True)
    results = {}
    for name in SHARDINGS:
        for rank in range(2):
            results[name, rank] = CorrelationStats(300)
            results[name, rank].load_state_dict(torch.load(out / f"{name}-rank{rank}.pt"))
    return results


@pytest.mark.parametrize("sharding", list(SHARDINGS))
@pytest.mark.parametrize("rank", [0, 1])
def test_all_reduce_over_two_gloo_processes_equals_single_process_pass(all_reduced, sharding, rank):
    stats, reference = all_reduced[sharding, rank], one_pass(*sparse_data())
    assert stats.num_samples == 500
    torch.testing.assert_close(stats.pearson(), reference.pearson(), rtol=1e-12, atol=R_ATOL)
    for active_only in (False, True):
        torch.testing.assert_close(
            stats.positive_mean(active_only), reference.positive_mean(active_only), rtol=1e-12, atol=0
        )
    torch.testing.assert_close(stats.frequency(), reference.frequency(), rtol=0, atol=0)


def test_all_reduce_is_a_no_op_without_distributed():
    stats = one_pass(*sparse_data())
    before = stats.state_dict()
    assert stats.all_reduce() is stats
    assert all(torch.equal(v, before[k]) for k, v in stats.state_dict().items())


def test_layer_stats_file_round_trip(tmp_path):
    from corrsteer_pl.calibration.stats import load_layer_stats, save_layer_stats

    g = torch.Generator().manual_seed(5)
    stats = {3: CorrelationStats(7), 11: CorrelationStats(4)}
    for s in stats.values():
        s.update(torch.rand(9, s.num_features, generator=g), (torch.rand(9, generator=g) > 0.5).double())
    save_layer_stats(stats, tmp_path / "stats.safetensors")
    loaded = load_layer_stats(tmp_path / "stats.safetensors")
    assert sorted(loaded) == [3, 11]
    for layer, s in stats.items():
        assert torch.equal(loaded[layer].pearson(), s.pearson())


def test_the_statistics_import_without_sae_lens_or_transformers():
    import subprocess
    import sys

    code = "import sys, corrsteer_pl.calibration.stats; print(sorted({'sae_lens', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_every_public_name_resolves_to_its_module_attribute():
    import importlib

    import corrsteer_pl

    for name in corrsteer_pl.__all__:
        if name != "__version__":
            module = importlib.import_module(corrsteer_pl._PUBLIC[name])
            assert getattr(corrsteer_pl, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        corrsteer_pl.nope  # noqa: B018
