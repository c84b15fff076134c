"""Streaming Pearson correlation between SAE feature activations and answer correctness.

`CorrelationStats` keeps O(F) float64 sufficient statistics that can be updated batch by batch,
merged exactly across shards, and summed across processes; `pearson_corrcoef` is the one-shot form.
The same state also feeds the other rankings of `corrsteer_pl.calibration.rankings` (MI, Fisher, CAA).
"""

from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

# A feature (or the label) counts as constant when std <= _REL_STD * max(|mean|, tiny).
_REL_STD = 1e-12
# ... or when its spread is below the rounding noise of the shifted sums it was computed from.
_REL_NOISE = 1e-12
# Columns processed at once in `update`: the float64 working copies (2 x B x _BLOCK) stay in cache,
# which is ~4x faster on CPU than one [B, F] float64 temporary (B=32, F=425,984: ~28 vs ~130 ms
# before the per-class Σz² were added, ~35 ms with them).
_BLOCK = 16384

STATS_FILE = "statistics.safetensors"

# Unshifted Σz² per class (y > 0 / y <= 0), for the Fisher ranking. Sums of squares have no
# cancellation (every term >= 0), and E[z² | class] is used as is, never turned into a variance.
_CLASS_SQUARES = ("sum_zz_pos", "sum_zz_neg")
_VECTOR_SUMS = ("sum_z", "sum_zz", "sum_zy", "active", "sum_z_pos", "active_pos") + _CLASS_SQUARES
_SCALAR_SUMS = ("n", "sum_y", "sum_yy", "n_pos")
_SHIFTS = ("shift_z", "shift_y")
_STATE_KEYS = _SHIFTS + _SCALAR_SUMS + _VECTOR_SUMS
# Keys that statistics written before they existed lack: loaded as NaN ("unknown"), see load_state_dict.
_OPTIONAL_KEYS = _CLASS_SQUARES


def pearson_corrcoef(z: Tensor, y: Tensor) -> Tensor:
    """Per-feature Pearson r (float64, 0 for constant features) between z [B, F] and labels y [B]."""
    _check_inputs(z, y, z.shape[-1] if z.dim() == 2 else None)
    stats = CorrelationStats(z.shape[1], device=z.device)
    stats.update(z, y)
    return stats.pearson()


def _check_inputs(z: Tensor, y: Tensor, num_features: int | None) -> None:
    """Raise a ValueError naming the shapes unless z is [B, num_features] and y is [B]."""
    ok = z.dim() == 2 and y.dim() == 1 and y.shape[0] == z.shape[0]
    if not ok or (num_features is not None and z.shape[1] != num_features):
        expected = f"[B, {num_features if num_features is not None else 'F'}]"
        raise ValueError(
            f"expected z of shape {expected} and y of shape [B], got z {tuple(z.shape)} and y {tuple(y.shape)}"
        )


def _sum_sq_dev(n: Tensor, shifted_sum: Tensor, shifted_sq: Tensor, shift: Tensor) -> Tensor:
    """Σ(x - mean)² from shifted sums, set to 0 where x is constant up to rounding."""
    mean_c = shifted_sum / n
    # Σ(x-K)² - (Σ(x-K))²/n = Σ(x - mean)²
    ss = shifted_sq - shifted_sum * mean_c
    std = (ss.clamp_min(0) / n).sqrt()
    scale = (shift + mean_c).abs().clamp_min(torch.finfo(torch.float64).tiny)
    constant = (ss <= 0) | (std <= _REL_STD * scale) | (ss <= _REL_NOISE * shifted_sq)
    return torch.where(constant, torch.zeros_like(ss), ss)


def _pearson_from_sums(
    n: Tensor,
    shift_z: Tensor,
    shift_y: Tensor,
    sum_z: Tensor,
    sum_zz: Tensor,
    sum_y: Tensor,
    sum_yy: Tensor,
    sum_zy: Tensor,
) -> Tensor:
    """r = cov / sqrt(var_z var_y) from sums shifted by (shift_z, shift_y); 0 where undefined."""
    if n.item() < 2:
        return torch.zeros_like(sum_z)
    ss_z = _sum_sq_dev(n, sum_z, sum_zz, shift_z)
    ss_y = _sum_sq_dev(n, sum_y, sum_yy, shift_y)
    # Σ(z-K)(y-L) - Σ(z-K)Σ(y-L)/n = Σ(z - mean_z)(y - mean_y)
    cov = sum_zy - sum_z * (sum_y / n)
    denom = ss_z.sqrt() * ss_y.sqrt()  # two square roots: the product could under/overflow
    r = torch.where(denom > 0, cov / denom, torch.zeros_like(cov))
    return r.clamp(-1.0, 1.0)


def _div_by_count(num: Tensor, count: Tensor) -> Tensor:
    """num / count for non-negative integer counts, 0 where the count is 0."""
    return torch.where(count > 0, num / count.clamp_min(1), torch.zeros_like(num))


class _RowWeights(NamedTuple):
    """Per-sample weight vectors [B] that `update` contracts the activations with."""

    ones: Tensor
    pos: Tensor  # 1[y > 0]
    neg: Tensor  # 1[y <= 0]
    yc: Tensor  # y - Ky


class CorrelationStats:
    """Streaming per-feature statistics of pooled activations z [B, F] against labels y [B].

    Sums are kept in float64 around a shift (Kz per feature, Ky) fixed at the first non-empty
    batch's mean, so features with a large mean/std ratio do not lose precision to cancellation.
    Per-class sums (`sum_z_pos`, `sum_zz_pos`, `sum_zz_neg`) and the counts are unshifted.
    `source` names the file the state was loaded from, if any, for error messages.
    """

    def __init__(self, num_features: int, device: torch.device | str = "cpu") -> None:
        self.num_features = num_features
        self.device = torch.device(device)
        self.source: str | None = None
        self.reset()

    def reset(self) -> None:
        """Forget all samples (the shift is chosen again at the next update)."""
        for key in _STATE_KEYS:
            shape = () if key in _SCALAR_SUMS or key == "shift_y" else (self.num_features,)
            setattr(self, key, torch.zeros(shape, dtype=torch.float64, device=self.device))

    @property
    def num_samples(self) -> int:
        """Number of samples seen."""
        return int(self.n.item())

    @property
    def has_class_squares(self) -> bool:
        """False when Σz² per class is unknown (statistics saved before it was kept: NaN)."""
        return not any(bool(getattr(self, key).isnan().any()) for key in _CLASS_SQUARES)

    # ---------------------------------------------------------------- accumulation

    @torch.no_grad()
    def update(self, z: Tensor, y: Tensor) -> None:
        """Add a batch of activations z [B, F] (any float dtype/device) and labels y [B]."""
        _check_inputs(z, y, self.num_features)
        if z.shape[0] == 0:
            return
        z = z.detach().to(self.device)
        y = y.detach().to(self.device, torch.float64)
        first = self.num_samples == 0
        if first:
            self.shift_y = y.mean()
        pos = (y > 0).to(torch.float64)
        rows = _RowWeights(torch.ones_like(y), pos, 1 - pos, y - self.shift_y)
        work = torch.empty(2, z.shape[0], min(_BLOCK, self.num_features), dtype=torch.float64, device=self.device)
        for start in range(0, self.num_features, _BLOCK):
            cols = slice(start, start + _BLOCK)
            zb = z[:, cols]
            self._update_block(zb, cols, work[0, :, : zb.shape[1]], work[1, :, : zb.shape[1]], rows, first)
        self.n += z.shape[0]
        self.n_pos += pos.sum()
        self.sum_y += rows.yc.sum()
        self.sum_yy += rows.yc @ rows.yc

    def _update_block(self, zb: Tensor, cols: slice, w: Tensor, w2: Tensor, rows: _RowWeights, first: bool) -> None:
        """Accumulate the feature columns `cols`, using the float64 buffers w, w2 [B, cols]."""
        w.copy_(zb)  # w = z
        self.sum_z_pos[cols].addmv_(w.T, rows.pos)
        torch.gt(w, 0, out=w2)  # w2 = 1[z > 0] (comparing float64 is faster than float32 -> float64)
        self.active[cols].addmv_(w2.T, rows.ones)
        self.active_pos[cols].addmv_(w2.T, rows.pos)
        torch.mul(w, w, out=w2)  # w2 = z²
        self.sum_zz_pos[cols].addmv_(w2.T, rows.pos)
        self.sum_zz_neg[cols].addmv_(w2.T, rows.neg)
        if first:
            self.shift_z[cols] = w.mean(0)
        w.sub_(self.shift_z[cols])  # w = z - Kz
        self.sum_z[cols].addmv_(w.T, rows.ones)
        self.sum_zy[cols].addmv_(w.T, rows.yc)
        self.sum_zz[cols].addmv_(w.square_().T, rows.ones)

    def _shifted_sums(self, shift_z: Tensor, shift_y: Tensor) -> dict[str, Tensor]:
        """The shifted sums re-expressed around (shift_z, shift_y), without modifying self."""
        dz = self.shift_z - shift_z.to(self.device, torch.float64)
        dy = self.shift_y - shift_y.to(self.device, torch.float64)
        n = self.n
        return {
            # Σ(z-K2) = Σ(z-K1) + n(K1-K2)
            "sum_z": self.sum_z + n * dz,
            "sum_y": self.sum_y + n * dy,
            # Σ(z-K2)² = Σ(z-K1)² + 2(K1-K2)Σ(z-K1) + n(K1-K2)²
            "sum_zz": self.sum_zz + 2 * dz * self.sum_z + n * dz * dz,
            "sum_yy": self.sum_yy + 2 * dy * self.sum_y + n * dy * dy,
            # Σ(z-K2)(y-L2) = Σ(z-K1)(y-L1) + (K1-K2)Σ(y-L1) + (L1-L2)Σ(z-K1) + n(K1-K2)(L1-L2)
            "sum_zy": self.sum_zy + dz * self.sum_y + dy * self.sum_z + n * dz * dy,
        }

    def reshift(self, shift_z: Tensor, shift_y: Tensor | float) -> "CorrelationStats":
        """Re-express the state around another shift (exact algebra); returns self."""
        shift_z = torch.as_tensor(shift_z, dtype=torch.float64, device=self.device)
        shift_y = torch.as_tensor(shift_y, dtype=torch.float64, device=self.device)
        if shift_z.shape != (self.num_features,) or shift_y.dim() != 0:
            raise ValueError(
                f"expected shift_z of shape [{self.num_features}] and a scalar shift_y, "
                f"got {tuple(shift_z.shape)} and {tuple(shift_y.shape)}"
            )
        for key, value in self._shifted_sums(shift_z, shift_y).items():
            setattr(self, key, value)
        self.shift_z, self.shift_y = shift_z.clone(), shift_y.clone()
        return self

    def merge(self, other: "CorrelationStats") -> "CorrelationStats":
        """Add the samples of `other` into self (exact; `other` is left unchanged); returns self."""
        if other.num_features != self.num_features:
            raise ValueError(f"cannot merge {other.num_features} features into {self.num_features}")
        if other.num_samples == 0:
            return self
        if self.num_samples == 0:
            self.load_state_dict(other.state_dict())
            return self
        shifted = other._shifted_sums(self.shift_z, self.shift_y)
        for key in _SCALAR_SUMS + _VECTOR_SUMS:
            value = shifted[key] if key in shifted else getattr(other, key)
            getattr(self, key).add_(value.to(self.device))
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> "CorrelationStats":
        """Sum the state over all ranks of `group` (call once, after the last update); returns self.

        No-op unless torch.distributed is initialized with more than one process.
        """
        # Not a torchmetrics Metric with dist_reduce_fx="sum": shifted sums from different ranks
        # may only be added once every rank has re-expressed them around the same shift.
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
            return self
        counts = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts, self.n.reshape(1), group=group)
        nonempty = [i for i, c in enumerate(counts) if c.item() > 0]
        if not nonempty:
            return self
        # Everyone adopts the shift of the lowest rank that has samples.
        src = nonempty[0] if group is None else dist.get_global_rank(group, nonempty[0])
        shift = torch.cat([self.shift_z, self.shift_y.reshape(1)])
        dist.broadcast(shift, src=src, group=group)
        self.reshift(shift[:-1], shift[-1])
        # One collective for all additive tensors.
        keys = _SCALAR_SUMS + _VECTOR_SUMS
        flat = torch.cat([getattr(self, key).reshape(-1) for key in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        sizes = [getattr(self, key).numel() for key in keys]
        for key, part in zip(keys, flat.split(sizes), strict=True):
            setattr(self, key, part.reshape(getattr(self, key).shape).clone())
        return self

    # ---------------------------------------------------------------- results

    def pearson(self) -> Tensor:
        """Per-feature Pearson r in [-1, 1] (float64); 0 for constant features/labels or n < 2."""
        return _pearson_from_sums(
            self.n, self.shift_z, self.shift_y, self.sum_z, self.sum_zz, self.sum_y, self.sum_yy, self.sum_zy
        )

    def positive_mean(self, active_only: bool = False) -> Tensor:
        """Mean of z over samples with y > 0 (only those with z > 0 if active_only); the steering coefficient."""
        return _div_by_count(self.sum_z_pos, self.active_pos if active_only else self.n_pos)

    def frequency(self) -> Tensor:
        """Fraction of samples on which each feature fires (z > 0)."""
        return _div_by_count(self.active, self.n)

    def mean_z(self) -> Tensor:
        """Per-feature mean activation."""
        mean = self.shift_z + self.sum_z / self.n.clamp_min(1)
        return torch.where(self.n > 0, mean, torch.zeros_like(mean))

    def positive_rate(self) -> Tensor:
        """Fraction of samples with y > 0 (scalar tensor)."""
        return _div_by_count(self.n_pos, self.n)

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of all state tensors (O(F) memory, independent of the number of samples)."""
        return {key: getattr(self, key).clone() for key in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the state with `state`, checking its keys and number of features.

        A state saved before the per-class Σz² were kept (no `sum_zz_pos` / `sum_zz_neg`) still
        loads: those sums become NaN (unknown; zeros if it holds no samples), which every ranking
        but Fisher ignores and Fisher refuses with a message that says to recalibrate.
        """
        missing = sorted(set(_STATE_KEYS) - set(state))
        unexpected = sorted(set(state) - set(_STATE_KEYS))
        if missing and not unexpected and set(missing) <= set(_OPTIONAL_KEYS):
            fill = float("nan") if state["n"].item() > 0 else 0.0
            state = {**state, **{key: torch.full_like(state["sum_z"], fill, dtype=torch.float64) for key in missing}}
            missing = []
        if missing or unexpected:
            raise ValueError(f"bad CorrelationStats state: missing keys {missing}, unexpected keys {unexpected}")
        for key in _STATE_KEYS:
            expected = getattr(self, key).shape
            if state[key].shape != expected:
                raise ValueError(
                    f"state '{key}' has shape {tuple(state[key].shape)}, expected {tuple(expected)} "
                    f"(num_features={self.num_features})"
                )
        for key in _STATE_KEYS:
            setattr(self, key, state[key].to(self.device, torch.float64, copy=True))

    def to(self, device: torch.device | str) -> "CorrelationStats":
        """Move the state to `device`; returns self."""
        self.device = torch.device(device)
        for key in _STATE_KEYS:
            setattr(self, key, getattr(self, key).to(self.device))
        return self


def save_layer_stats(stats: dict[int, CorrelationStats], path: str | Path) -> None:
    """Writes every layer's state to one safetensors file (keys `layer.{L}.{state}`)."""
    flat = {
        f"layer.{layer}.{key}": value.cpu().contiguous()
        for layer, layer_stats in stats.items()
        for key, value in layer_stats.state_dict().items()
    }
    save_file(flat, str(path))


def load_layer_stats(path: str | Path) -> dict[int, CorrelationStats]:
    """Reads a file written by `save_layer_stats` back into one `CorrelationStats` per layer."""
    by_layer: dict[int, dict[str, Tensor]] = {}
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err}): run `train.py fit` again to rewrite it") from None
    for name, value in tensors.items():
        _, layer, key = name.split(".", 2)
        by_layer.setdefault(int(layer), {})[key] = value
    stats = {}
    for layer, state in sorted(by_layer.items()):
        stats[layer] = CorrelationStats(int(state["sum_z"].numel()))
        stats[layer].load_state_dict(state)
        stats[layer].source = str(path)
    return stats
