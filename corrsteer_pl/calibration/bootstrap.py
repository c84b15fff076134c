"""Streaming Poisson bootstrap of per-feature Pearson r: how stable each layer's top feature is.

Replicate b weighs sample s by w_bs ~ Poisson(1). The weights are a pure function of (sample id,
replicate, seed), so DDP sharding, batch order and a resume from a checkpoint all give the same
replicates:

1. The id string is hashed once per sample with BLAKE2b (8-byte digest, the seed as salt) to a
   64-bit key: stable across processes, machines and Python versions (`hash()` is salted per process).
2. Replicate b's uniform number is output b + 1 of SplitMix64 started at that key: a counter-based
   generator, so any (sample, replicate) is computed directly, vectorised over the batch in numpy
   uint64 arithmetic, whose wrap-around is defined (torch has no unsigned 64-bit multiply on every
   device). The B x batch weights are made on the CPU and moved to the statistics' device.
3. The uniform number's top 53 bits go through Poisson(1)'s inverse CDF.

`BootstrapStats` keeps, per replicate, the weighted sums Pearson r needs (Σw, Σw(y-L), Σw(y-L)²;
Σw(z-K), Σw(z-K)², Σw(z-K)(y-L) per feature) in float64 around the same shifts as
`CorrelationStats` (K per feature and L fixed at the first batch's means, re-expressed exactly
for merge and all_reduce): O(B·F) memory, 3 x B x F float64 (204 MB for B = 20 and 26 x 16,384
features). The weighted sums of a block of columns are two matrix products, (2B x batch) @
(batch x cols) and (B x batch) @ (batch x cols), on a float64 copy of the block as in `stats.py`.
The matrix products ignore the sparsity of SAE activations: measured on one CPU core, extracting
the non-zeros (`torch.nonzero`) already costs ~70% of the whole plain update, so a sparse
formulation does not win at batch 32.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from corrsteer_pl.calibration.stats import _BLOCK, _check_inputs, _pearson_from_sums

DEFAULT_REPLICATES = 20

# SplitMix64 (Steele, Lea & Flood 2014) constants.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _poisson1_cdf() -> np.ndarray:
    """P(X <= k) for X ~ Poisson(1), k = 0, 1, ..., up to where it rounds to 1 in float64."""
    cdf, term, k = [], math.exp(-1.0), 0
    total = term
    while total < 1.0 and k < 40:
        cdf.append(total)
        k += 1
        term /= k
        total += term
    return np.array(cdf, dtype=np.float64)


_POISSON1_CDF = _poisson1_cdf()

_SCALARS = ("n", "shift_y")
_REPLICATE_SUMS = ("weight", "sum_y", "sum_yy")  # (B,)
_FEATURE_SUMS = ("sum_z", "sum_zy", "sum_zz")  # (B, F): rows of `_sums`, in this order
_STATE_KEYS = ("seed", *_SCALARS, "shift_z", *_REPLICATE_SUMS, *_FEATURE_SUMS)


# ---------------------------------------------------------------- replicate weights


def sample_keys(ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """64-bit keys of sample ids: BLAKE2b of the UTF-8 id, salted with the seed (uint64 array)."""
    salt = int(seed).to_bytes(8, "little", signed=True)
    digests = b"".join(hashlib.blake2b(str(i).encode(), digest_size=8, salt=salt).digest() for i in ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (uint64 arrays, wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def replicate_weights(ids: Sequence[str], replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> Tensor:
    """Poisson(1) bootstrap weights [replicates, len(ids)] (float64, CPU), a pure function of (id, b, seed)."""
    keys = sample_keys(ids, seed)  # (N,)
    counters = np.arange(1, replicates + 1, dtype=np.uint64)[:, None]  # (B, 1)
    with np.errstate(over="ignore"):
        bits = _splitmix64(keys[None, :] + counters * _GOLDEN)  # (B, N)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # in [0, 1)
    counts = np.searchsorted(_POISSON1_CDF, uniform, side="right")
    return torch.from_numpy(counts.astype(np.float64))


# ---------------------------------------------------------------- the statistics


class BootstrapStats:
    """Streaming Pearson r of z [N, F] against y [N] under B Poisson(1) bootstrap replicates.

    `update(z, y, ids)` needs each sample's id (a string, the same whatever the rank or batch);
    `pearson()` gives the replicates' r [B, F]. B = 0 turns it off: updates cost nothing.
    """

    def __init__(
        self,
        num_features: int,
        replicates: int = DEFAULT_REPLICATES,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        """num_features: F; replicates: B (0 turns it off); seed: draws other replicates for the same ids."""
        if replicates < 0:
            raise ValueError(f"the number of bootstrap replicates must be >= 0 (0 turns it off), got {replicates}")
        self.num_features = num_features
        self.replicates = replicates
        self.seed = int(seed)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget all samples (the shifts are chosen again at the next update)."""
        f64 = {"dtype": torch.float64, "device": self.device}
        self.n = torch.zeros((), **f64)
        self.shift_y = torch.zeros((), **f64)
        self.shift_z = torch.zeros(self.num_features, **f64)
        for key in _REPLICATE_SUMS:
            setattr(self, key, torch.zeros(self.replicates, **f64))
        self._sums = torch.zeros(len(_FEATURE_SUMS), self.replicates, self.num_features, **f64)

    @property
    def num_samples(self) -> int:
        """Number of samples seen (unweighted)."""
        return int(self.n.item())

    @property
    def sum_z(self) -> Tensor:
        """Σ w (z - K) per replicate and feature [B, F]."""
        return self._sums[0]

    @property
    def sum_zy(self) -> Tensor:
        """Σ w (z - K)(y - L) [B, F]."""
        return self._sums[1]

    @property
    def sum_zz(self) -> Tensor:
        """Σ w (z - K)² [B, F]."""
        return self._sums[2]

    # ---------------------------------------------------------------- accumulation

    @torch.no_grad()
    def update(self, z: Tensor, y: Tensor, ids: Sequence[str]) -> None:
        """Add a batch: activations z [N, F] (any float dtype/device), labels y [N], sample ids (N strings)."""
        _check_inputs(z, y, self.num_features)
        if len(ids) != z.shape[0]:
            raise ValueError(f"expected one sample id per row of z: {z.shape[0]} rows, {len(ids)} ids")
        if self.replicates == 0 or z.shape[0] == 0:
            return
        z = z.detach().to(self.device)
        y = y.detach().to(self.device, torch.float64)
        w = replicate_weights(ids, self.replicates, self.seed).to(self.device)  # (B, N)
        first = self.num_samples == 0
        if first:
            self.shift_y = y.mean()
        yc = y - self.shift_y  # (N,)
        left = torch.cat([w, w * yc])  # (2B, N): rows give Σw(z-K) and Σw(z-K)(y-L)
        linear = self._sums[:2].view(2 * self.replicates, self.num_features)  # (2B, F) view
        work = torch.empty(z.shape[0], min(_BLOCK, self.num_features), dtype=torch.float64, device=self.device)
        for start in range(0, self.num_features, _BLOCK):
            cols = slice(start, start + _BLOCK)
            block = work[:, : z[:, cols].shape[1]]  # (N, cols)
            block.copy_(z[:, cols])
            if first:
                self.shift_z[cols] = block.mean(0)
            block.sub_(self.shift_z[cols])  # z - K
            linear[:, cols].addmm_(left, block)
            self._sums[2, :, cols].addmm_(w, block.square_())
        self.n += z.shape[0]
        self.weight += w.sum(1)
        self.sum_y += w @ yc
        self.sum_yy += w @ (yc * yc)

    def _shifted_sums(self, shift_z: Tensor, shift_y: Tensor) -> dict[str, Tensor]:
        """The sums re-expressed around (shift_z, shift_y), without modifying self (as in `stats.py`)."""
        dz = self.shift_z - shift_z.to(self.device, torch.float64)  # (F,)
        dy = self.shift_y - shift_y.to(self.device, torch.float64)  # ()
        weight = self.weight[:, None]  # (B, 1): W plays the part of n
        sum_y = self.sum_y[:, None]
        return {
            "sum_y": self.sum_y + self.weight * dy,
            "sum_yy": self.sum_yy + 2 * dy * self.sum_y + self.weight * dy * dy,
            "sum_z": self.sum_z + weight * dz,
            "sum_zz": self.sum_zz + 2 * dz * self.sum_z + weight * dz * dz,
            "sum_zy": self.sum_zy + dz * sum_y + dy * self.sum_z + weight * dz * dy,
        }

    def reshift(self, shift_z: Tensor, shift_y: Tensor | float) -> BootstrapStats:
        """Re-express the state around another shift (exact algebra); returns self."""
        shift_z = torch.as_tensor(shift_z, dtype=torch.float64, device=self.device)
        shift_y = torch.as_tensor(shift_y, dtype=torch.float64, device=self.device)
        if shift_z.shape != (self.num_features,) or shift_y.dim() != 0:
            raise ValueError(
                f"expected shift_z of shape [{self.num_features}] and a scalar shift_y, "
                f"got {tuple(shift_z.shape)} and {tuple(shift_y.shape)}"
            )
        shifted = self._shifted_sums(shift_z, shift_y)
        self.sum_y, self.sum_yy = shifted["sum_y"], shifted["sum_yy"]
        self._sums = torch.stack([shifted[key] for key in _FEATURE_SUMS])
        self.shift_z, self.shift_y = shift_z.clone(), shift_y.clone()
        return self

    def _check_compatible(self, other: BootstrapStats) -> None:
        """Raise a ValueError unless `other` has the same features, replicates and seed."""
        mine = (self.num_features, self.replicates, self.seed)
        theirs = (other.num_features, other.replicates, other.seed)
        if mine != theirs:
            raise ValueError(
                f"cannot merge bootstrap statistics with (features, replicates, seed) = {theirs} into {mine}"
            )

    def merge(self, other: BootstrapStats) -> BootstrapStats:
        """Add the samples of `other` (same features, replicates and seed) into self, exactly; returns self."""
        self._check_compatible(other)
        if other.num_samples == 0:
            return self
        if self.num_samples == 0:
            self.load_state_dict(other.state_dict())
            return self
        shifted = other._shifted_sums(self.shift_z, self.shift_y)
        self.n += other.n.to(self.device)
        self.weight += other.weight.to(self.device)
        self.sum_y += shifted["sum_y"].to(self.device)
        self.sum_yy += shifted["sum_yy"].to(self.device)
        self._sums += torch.stack([shifted[key] for key in _FEATURE_SUMS]).to(self.device)
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> BootstrapStats:
        """Sum the state over all ranks of `group` (call once, after the last update); returns self.

        As `CorrelationStats.all_reduce`: every rank adopts the shift of the lowest rank with samples,
        then one all_reduce sums all additive tensors. No-op unless torch.distributed is initialized
        with more than one process.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
            return self
        counts = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, self.n.reshape(1), group=group)
        nonempty = [i for i, c in enumerate(counts) if c.item() > 0]
        if not nonempty:
            return self
        src = nonempty[0] if group is None else dist.get_global_rank(group, nonempty[0])
        shift = torch.cat([self.shift_z, self.shift_y.reshape(1)])
        dist.broadcast(shift, src=src, group=group)
        self.reshift(shift[:-1], shift[-1])
        additive = [self.n.reshape(1), self.weight, self.sum_y, self.sum_yy, self._sums.reshape(-1)]
        flat = torch.cat(additive)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        n, weight, sum_y, sum_yy, sums = flat.split([t.numel() for t in additive])
        self.n = n.reshape(()).clone()
        self.weight, self.sum_y, self.sum_yy = weight.clone(), sum_y.clone(), sum_yy.clone()
        self._sums = sums.reshape(self._sums.shape).clone()
        return self

    # ---------------------------------------------------------------- results

    def pearson(self) -> Tensor:
        """Each replicate's per-feature Pearson r [B, F] (float64); 0 where constant or total weight < 2."""
        rows = [
            _pearson_from_sums(
                self.weight[b],
                self.shift_z,
                self.shift_y,
                self.sum_z[b],
                self.sum_zz[b],
                self.sum_y[b],
                self.sum_yy[b],
                self.sum_zy[b],
            )
            for b in range(self.replicates)
        ]
        if not rows:
            return torch.zeros(0, self.num_features, dtype=torch.float64, device=self.device)
        return torch.stack(rows)

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of all state tensors (O(B·F), independent of the number of samples); the seed included."""
        state = {key: getattr(self, key).clone() for key in _STATE_KEYS if key != "seed"}
        state["seed"] = torch.tensor(self.seed, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the state with `state`, checking its keys, shapes (features, replicates) and seed."""
        missing = sorted(set(_STATE_KEYS) - set(state))
        unexpected = sorted(set(state) - set(_STATE_KEYS))
        if missing or unexpected:
            raise ValueError(f"bad BootstrapStats state: missing keys {missing}, unexpected keys {unexpected}")
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"bootstrap state was drawn with seed {int(state['seed'])}, these statistics use {self.seed}"
            )
        for key in _STATE_KEYS[1:]:
            expected = getattr(self, key).shape
            if state[key].shape != expected:
                raise ValueError(
                    f"state '{key}' has shape {tuple(state[key].shape)}, expected {tuple(expected)} "
                    f"(num_features={self.num_features}, replicates={self.replicates})"
                )
        for key in (*_SCALARS, "shift_z", *_REPLICATE_SUMS):
            setattr(self, key, state[key].to(self.device, torch.float64, copy=True))
        self._sums = torch.stack([state[key].to(self.device, torch.float64) for key in _FEATURE_SUMS])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], device: torch.device | str = "cpu") -> BootstrapStats:
        """Statistics restored from `state_dict()` output, their features, replicates and seed read from it."""
        replicates, num_features = state["sum_z"].shape
        stats = cls(num_features, replicates, device=device, seed=int(state["seed"]))
        stats.load_state_dict(state)
        return stats

    def to(self, device: torch.device | str) -> BootstrapStats:
        """Move the state to `device`; returns self."""
        self.device = torch.device(device)
        for key in (*_SCALARS, "shift_z", *_REPLICATE_SUMS, "_sums"):
            setattr(self, key, getattr(self, key).to(self.device))
        return self


def bootstrap_pearson(
    z: Tensor, y: Tensor, ids: Sequence[str], replicates: int = DEFAULT_REPLICATES, seed: int = 0
) -> Tensor:
    """Each replicate's per-feature Pearson r [B, F] of z [N, F] against y [N], in one call."""
    _check_inputs(z, y, z.shape[-1] if z.dim() == 2 else None)
    stats = BootstrapStats(z.shape[1], replicates, device=z.device, seed=seed)
    stats.update(z, y, ids)
    return stats.pearson()


# ---------------------------------------------------------------- what selection reads


def top1_share(replicate_r: Tensor, candidates: Tensor | Sequence[int]) -> Tensor:
    """Share of replicates in which each candidate feature is the top-1 of its layer (float64, [k]).

    replicate_r: one layer's replicate correlations [B, F] (`BootstrapStats.pearson()`). Top-1 is
    the largest r (the first such feature on a tie), and only when it is > 0: selection never
    steers a feature with r <= 0, so a replicate without one counts for no candidate.
    """
    candidates = torch.as_tensor(candidates, dtype=torch.long, device=replicate_r.device).reshape(-1)
    if replicate_r.shape[0] == 0:
        raise ValueError("no bootstrap replicates (B = 0): the bootstrap is off")
    best, index = replicate_r.max(dim=1)  # (B,)
    index = torch.where(best > 0, index, torch.full_like(index, -1))
    return (index[None, :] == candidates[:, None]).to(torch.float64).mean(dim=1)


def overall_top1_share(replicate_r: Mapping[int, Tensor], candidates: Sequence[tuple[int, int]]) -> Tensor:
    """Share of replicates in which each (layer, feature) candidate is the top-1 over all layers ([k]).

    For variant S, which steers the single best feature of the model. replicate_r maps each layer to
    its [B, F_layer] replicate correlations; all must share the same replicates (same ids and seed).
    """
    layers = sorted(replicate_r)
    if not layers:
        raise ValueError("no layers given")
    # Each replicate's best r and feature per layer, then the best layer (the lowest on a tie).
    per_layer = [replicate_r[layer].max(dim=1) for layer in layers]  # each ((B,), (B,))
    best = torch.stack([values for values, _ in per_layer])  # (L, B)
    features = torch.stack([index for _, index in per_layer])  # (L, B)
    top, layer_pos = best.max(dim=0)  # (B,)
    top_layer = torch.as_tensor(layers, device=top.device)[layer_pos]
    top_feature = features.gather(0, layer_pos[None, :])[0]
    shares = [
        ((top > 0) & (top_layer == layer) & (top_feature == feature)).to(torch.float64).mean()
        for layer, feature in candidates
    ]
    return torch.stack(shares) if shares else torch.zeros(0, dtype=torch.float64)


def r_interval(replicate_r: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of r at `level` from replicate correlations [B, ...]: (low, high).

    The (1 - level) / 2 and (1 + level) / 2 quantiles over replicates with linear interpolation
    (numpy's default), per feature. With B = 20 the 90% interval is close to the min and max.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if replicate_r.shape[0] == 0:
        raise ValueError("no bootstrap replicates (B = 0): the bootstrap is off")
    ordered = replicate_r.sort(dim=0).values
    return _sorted_quantile(ordered, (1 - level) / 2), _sorted_quantile(ordered, (1 + level) / 2)


def _sorted_quantile(ordered: Tensor, q: float) -> Tensor:
    """The q-quantile along dim 0 of values sorted along dim 0, by linear interpolation (numpy's default)."""
    last = ordered.shape[0] - 1
    position = q * last
    low = math.floor(position)
    high = min(low + 1, last)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])
