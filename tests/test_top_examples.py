"""Streaming top-k examples: update and merge equal a brute-force sort, ties broken by ascending sample id."""

import pytest
import torch

from corrsteer_pl.calibration.top_examples import (
    EMPTY,
    TopExamples,
    TopState,
    example_keys,
    top_examples,
    top_examples_merge,
    top_examples_update,
)


def _brute_force(z: torch.Tensor, ids: torch.Tensor, peaks: torch.Tensor, k: int) -> list[list[tuple]]:
    """Per feature: (activation, id, position) of the k largest activations > 0, ties by ascending id."""
    out = []
    for f in range(z.shape[1]):
        rows = [(float(z[i, f]), int(ids[i]), int(peaks[i, f])) for i in range(z.shape[0]) if z[i, f] > 0]
        out.append(sorted(rows, key=lambda r: (-r[0], r[1]))[:k])
    return out


def _as_rows(state: TopState) -> list[list[tuple]]:
    rows = zip(state.values.tolist(), state.ids.tolist(), state.positions.tolist(), strict=True)
    return [[(v, i, p) for v, i, p in zip(*row, strict=True) if i != EMPTY] for row in rows]


def _data(n: int = 200, f: int = 40, seed: int = 0, density: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    # few distinct values so ties are common; the others are 0 (the feature did not fire)
    z = torch.randint(1, 4, (n, f), generator=g).float() * (torch.rand(n, f, generator=g) < density)
    ids = example_keys([f"item/{i}" for i in range(n)])
    peaks = torch.randint(0, 6, (n, f), generator=g, dtype=torch.int32)
    return z, ids, peaks


@pytest.mark.parametrize("density", [0.6, 0.05])  # 0.05: mostly one entering entry per feature and batch
@pytest.mark.parametrize("k", [1, 3, 7])
def test_streamed_update_equals_brute_force_sort_with_ties_by_ascending_id(k, density):
    z, ids, peaks = _data(n=600, density=density)
    state = TopState.empty(z.shape[1], k)
    for start in range(0, z.shape[0], 13):  # uneven batches
        top_examples_update(state, z[start : start + 13], ids[start : start + 13], peaks[start : start + 13])
    assert _as_rows(state) == _brute_force(z, ids, peaks, k)


def test_merge_of_shards_equals_one_pass_whatever_the_sharding():
    z, ids, peaks = _data(seed=1)
    whole = top_examples(z, ids, 5, peaks)
    for shards in (2, 3):
        parts = [top_examples(z[r::shards], ids[r::shards], 5, peaks[r::shards]) for r in range(shards)]
        merged = parts[0]
        for part in parts[1:]:
            merged = top_examples_merge(merged, part)
        assert all(torch.equal(a, b) for a, b in zip(vars(merged).values(), vars(whole).values(), strict=True))


def test_never_fired_feature_keeps_empty_slots_and_memory_does_not_grow():
    top = TopExamples(3, k=2)
    for seed in range(5):
        z = torch.rand(16, 3, generator=torch.Generator().manual_seed(seed))
        z[:, 1] = 0
        top.update(z, [f"s{seed}/{i}" for i in range(16)])
    assert top.examples(1) == [] and top.state.values.shape == (3, 2)
    assert len(top.examples(0)) == 2 and top.examples(0)[0][1] >= top.examples(0)[1][1]


def test_state_dict_round_trip_and_wrong_k_is_refused():
    z, ids, peaks = _data(seed=2)
    top = TopExamples(z.shape[1], k=4)
    top.update(z, ids, peaks)
    again = TopExamples.from_state_dict(top.state_dict())
    assert again.examples(0) == top.examples(0)
    with pytest.raises(ValueError, match="--calibration.top_examples"):
        TopExamples(z.shape[1], k=3).load_state_dict(top.state_dict())
