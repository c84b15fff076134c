"""Streaming top-k activating calibration examples per SAE feature: O(F x k) state, exact merges.

For every feature the state keeps the k largest pooled activations seen, with each one's sample id and
the generation position where the feature peaked (0 = the last prompt position, which produces the first
answer token). Only samples where the feature fired (pooled activation > 0) are kept; a slot nobody filled
holds activation 0 and id `EMPTY`.

The order is total: activation descending, then sample id ascending. Sample ids are the 64-bit keys of
`bootstrap.sample_keys` (BLAKE2b of the example id, seed 0), so the kept set is a pure function of the
samples seen: batch order, DDP sharding and a resume from a checkpoint give the same slots, bit for bit.

1. `top_examples_update(state, z, ids, peaks)` first bounds which features can change: a feature whose
   batch maximum is below its k-th kept activation keeps its slots (one reduction over the batch). After a
   few hundred samples only a few features per batch get past that bound.
2. Those features' k slots and N new entries go through `_ordered_top`: sort by id, then a stable sort by
   activation, keep the first k.
3. `top_examples_merge(a, b)` is the same step on two states: rank-count independent because the order is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from corrsteer_pl.calibration.bootstrap import sample_keys

DEFAULT_TOP_EXAMPLES = 5
EMPTY = torch.iinfo(torch.int64).max  # the id of a slot nobody filled (it sorts after every real id)
_STATE_KEYS = ("values", "ids", "positions")
_TINY = torch.finfo(torch.float32).tiny  # "any activation > 0" as a floor that `>=` can use


def example_keys(ids: Sequence[str]) -> Tensor:
    """Per-sample int64 keys of example ids (bootstrap's BLAKE2b keys, seed 0, as signed int64)."""
    return torch.from_numpy(sample_keys(ids, seed=0).view(np.int64).copy())


@dataclass
class TopState:
    """values [F, k] float32 (descending per row), ids [F, k] int64, positions [F, k] int32."""

    values: Tensor
    ids: Tensor
    positions: Tensor

    @classmethod
    def empty(cls, num_features: int, k: int, device: torch.device | str = "cpu") -> TopState:
        return cls(
            torch.zeros(num_features, k, dtype=torch.float32, device=device),
            torch.full((num_features, k), EMPTY, dtype=torch.int64, device=device),
            torch.zeros(num_features, k, dtype=torch.int32, device=device),
        )

    def clone(self) -> TopState:
        return TopState(self.values.clone(), self.ids.clone(), self.positions.clone())


def _ordered_top(values: Tensor, ids: Tensor, positions: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of (c, m) entries, the first k by activation descending, then id ascending."""
    by_id = ids.argsort(dim=1)  # ids are unique per row except EMPTY, whose slots all hold 0 and position 0
    values, ids, positions = values.gather(1, by_id), ids.gather(1, by_id), positions.gather(1, by_id)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]  # (c, k)
    return values.gather(1, order), ids.gather(1, order), positions.gather(1, order)


@torch.no_grad()
def top_examples_update(state: TopState, z: Tensor, ids: Tensor, peaks: Tensor | None = None) -> TopState:
    """Add a batch in place: pooled activations z [N, F], sample keys ids [N] (int64), peak positions [N, F]
    (None = all 0, one-token answers); returns `state`."""
    k = state.values.shape[1]
    if k == 0 or z.shape[0] == 0:
        return state
    z = z.detach().to(state.values.device, torch.float32)
    floor = torch.where(state.values[:, -1] > 0, state.values[:, -1], _TINY)  # (F,): k-th kept, or "fired"
    best, best_row = z.max(dim=0)  # (F,)
    cols = (best >= floor).nonzero().squeeze(1)  # features whose slots can change
    if cols.numel() == 0:
        return state
    ids = ids.to(state.ids.device)
    count = (z.index_select(1, cols) >= floor[cols]).sum(0)  # (c,): entries that may enter
    one = cols[count == 1]  # mostly these once the slots are full: the entry is the batch maximum
    if one.numel():
        position = None if peaks is None else peaks.to(z.device).reshape(-1)[best_row[one] * z.shape[1] + one]
        _insert_one(state, best[one], ids[best_row[one]], position, one)
    many = cols[count > 1]
    if many.numel():
        batch = _batch_top(z.index_select(1, many), ids, peaks, many, k)  # each (c, k)
        rows = (
            torch.cat([field.index_select(0, many), b], dim=1) for field, b in zip(_fields(state), batch, strict=True)
        )
        for tensor, top in zip(_fields(state), _ordered_top(*rows, k), strict=True):
            tensor.index_copy_(0, many, top)
    return state


def _insert_one(state: TopState, value: Tensor, sample: Tensor, position: Tensor | None, cols: Tensor) -> None:
    """Columns where one entry of the batch (value, sample key, position: each (c,)) may enter: insert it at
    its rank among the k sorted slots."""
    slots_v, slots_id = state.values.index_select(0, cols), state.ids.index_select(0, cols)  # (c, k)
    better = (slots_v > value[:, None]) | ((slots_v == value[:, None]) & (slots_id < sample[:, None]))
    rank = better.sum(1, keepdim=True)  # (c, 1): k = it does not enter
    slot = torch.arange(state.values.shape[1], device=rank.device)[None, :]  # (1, k)
    source = slot - (slot > rank).to(slot.dtype)  # slots after the new entry take their left neighbour
    here = slot == rank
    position = torch.zeros_like(cols, dtype=torch.int32) if position is None else position.to(torch.int32)
    for tensor, new in zip(_fields(state), (value, sample, position), strict=True):
        old = tensor.index_select(0, cols)
        tensor.index_copy_(0, cols, torch.where(here, new[:, None], old.gather(1, source)))


def _batch_top(z: Tensor, ids: Tensor, peaks: Tensor | None, cols: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's own top k per column of z [N, c], as (c, k) values, ids and positions, in one `topk`.

    The key is exact and unique per column: a positive float32's bits order like its value, so the int64
    (bits << 32) | (N - 1 - rank of the id in the batch) orders by activation, then by ascending id.
    """
    n = z.shape[0]
    tie = n - 1 - ids.argsort().argsort()  # (N,): larger for smaller ids
    fired = z > 0
    key = torch.where(fired, (z.view(torch.int32).to(torch.int64) << 32) | tie[:, None], -1)  # (N, c)
    best = key.topk(min(k, n), dim=0).indices  # (k', c)
    kept = fired.gather(0, best)
    values = torch.where(kept, z.gather(0, best), 0.0).T
    new_ids = torch.where(kept, ids[best], EMPTY).T
    positions = torch.zeros_like(best, dtype=torch.int32)
    if peaks is not None:
        peaks = peaks.to(z.device).index_select(1, cols).gather(0, best).to(torch.int32)
        positions = torch.where(kept, peaks, 0)
    return values.contiguous(), new_ids.contiguous(), positions.T.contiguous()


def top_examples_merge(a: TopState, b: TopState) -> TopState:
    """The top k of the samples of both states (disjoint samples), as a new state; symmetric and exact."""
    if a.values.shape != b.values.shape:
        raise ValueError(f"cannot merge top examples of shape {tuple(b.values.shape)} into {tuple(a.values.shape)}")
    device, k = a.values.device, a.values.shape[1]
    top = _ordered_top(*(torch.cat([x, y.to(device)], dim=1) for x, y in zip(_fields(a), _fields(b), strict=True)), k)
    return TopState(*top)


def top_examples(z: Tensor, ids: Tensor, k: int, peaks: Tensor | None = None) -> TopState:
    """One-shot: the top-k state of all of z [N, F] at once."""
    return top_examples_update(TopState.empty(z.shape[1], k, z.device), z, ids, peaks)


def _fields(state: TopState) -> tuple[Tensor, Tensor, Tensor]:
    return state.values, state.ids, state.positions


class TopExamples:
    """The state of one layer's top examples, a thin wrapper over the pure functions (k = 0 turns it off)."""

    def __init__(self, num_features: int, k: int = DEFAULT_TOP_EXAMPLES, device: torch.device | str = "cpu") -> None:
        if k < 0:
            raise ValueError(f"--calibration.top_examples must be >= 0 (0 turns it off), got {k}")
        self.num_features, self.k = num_features, k
        self.state = TopState.empty(num_features, k, device)

    def update(self, z: Tensor, ids: Sequence[str] | Tensor, peaks: Tensor | None = None) -> None:
        keys = ids if isinstance(ids, Tensor) else example_keys(ids)
        if len(keys) != z.shape[0]:
            raise ValueError(f"expected one sample id per row of z: {z.shape[0]} rows, {len(keys)} ids")
        top_examples_update(self.state, z, keys, peaks)

    def merge(self, other: TopExamples) -> TopExamples:
        self.state = top_examples_merge(self.state, other.state)
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> TopExamples:
        """Merge the states of all ranks (every rank ends with the same slots); no-op without DDP."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1 or self.k == 0:
            return self
        gathered = []
        for tensor in _fields(self.state):
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            gathered.append(parts)
        merged = TopState(*(parts[0] for parts in gathered))
        for rank in range(1, len(gathered[0])):
            merged = top_examples_merge(merged, TopState(*(parts[rank] for parts in gathered)))
        self.state = merged
        return self

    def examples(self, feature: int) -> list[tuple[int, float, int]]:
        """(sample key, activation, peak position) of one feature's filled slots, best first."""
        s = self.state
        rows = zip(s.ids[feature].tolist(), s.values[feature].tolist(), s.positions[feature].tolist(), strict=True)
        return [(i, v, p) for i, v, p in rows if i != EMPTY and v > 0]

    def state_dict(self) -> dict[str, Tensor]:
        return {key: getattr(self.state, key).clone() for key in _STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if sorted(state) != sorted(_STATE_KEYS) or state["values"].shape != (self.num_features, self.k):
            raise ValueError(
                f"bad top-examples state (keys {sorted(state)}): expected {list(_STATE_KEYS)} of shape "
                f"[{self.num_features}, {self.k}]; resume with the original --calibration.top_examples"
            )
        device = self.state.values.device
        self.state = TopState(*(state[key].to(device, copy=True) for key in _STATE_KEYS))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], device: torch.device | str = "cpu") -> TopExamples:
        top = cls(*state["values"].shape, device=device)
        top.load_state_dict(state)
        return top

    def to(self, device: torch.device | str) -> TopExamples:
        self.state = TopState(*(t.to(device) for t in _fields(self.state)))
        return self
