"""How sure the statistics are: p-values of Pearson r, Benjamini-Hochberg q-values, a paired sign test.

- `pearson_p_values(r, n)`: one-sided p for r > 0 (Student t with n - 2 degrees of freedom), as
  `scipy.stats.pearsonr(..., alternative="greater")`, computed in float64 with torch alone: torch has
  no incomplete beta function, so `_betainc` evaluates the regularized incomplete beta by its
  continued fraction (modified Lentz), vectorised over all features.
- `bh_q_values(p)`: Benjamini-Hochberg q-values, as `scipy.stats.false_discovery_control(p)`;
  `layer_q_values` / `pooled_q_values` apply it per layer and over all layers together.
- `sign_test_p(better, worse)` and `paired_improvement(...)`: an exact one-sided sign (McNemar) test that a
  steering beats the unsteered model on the items whose score changed.
- `holm_adjusted(p)`: Holm's step-down adjusted p-values, as
  `statsmodels.stats.multitest.multipletests(p, method="holm")[1]`: rejecting every hypothesis whose adjusted p is
  below alpha keeps the chance of any false rejection in the family at most alpha, whatever the dependence.

The t-test assumes roughly normal data. For a feature that fires on only a handful of samples the
distribution of r under "no correlation" is skewed, and its one-sided p is smaller than the exact
(permutation) p; such features deserve a minimum activation frequency before their p is believed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from corrsteer_pl.calibration.stats import CorrelationStats

# The continued fraction stops when a step changes it by less than this (relative).
_CF_EPS = 1e-15
# Lentz's guard against division by zero.
_CF_TINY = 1e-300


# ---------------------------------------------------------------- p-values of Pearson r


def pearson_p_values(r: Tensor, n: int) -> Tensor:
    """One-sided p-values for r > 0 of Pearson correlations r (any shape) from n samples each (float64).

    p = P(T >= t) for t = r sqrt((n - 2) / (1 - r²)) and T ~ Student t with n - 2 degrees of
    freedom, i.e. `scipy.stats.pearsonr(z, y, alternative="greater").pvalue`. p = 1 where r == 0
    (what `CorrelationStats.pearson` reports for a constant feature or constant labels; an exactly
    zero r of a non-constant feature, where scipy says 0.5, is also given 1) and everywhere if n < 3.
    """
    r = torch.as_tensor(r, dtype=torch.float64).clamp(-1.0, 1.0)
    if n < 3:
        return torch.ones_like(r)
    a = torch.full_like(r, (n - 2) / 2)
    b = torch.full_like(r, 0.5)
    # P(T >= |t|) = I_x(df/2, 1/2) / 2 with x = df / (df + t²) = 1 - r², and 1 - x = r².
    upper = 0.5 * _betainc(a, b, (1 - r) * (1 + r), r * r)
    p = torch.where(r > 0, upper, 1 - upper)
    return torch.where(r == 0, torch.ones_like(p), p)


def layer_p_values(stats: Mapping[int, CorrelationStats]) -> dict[int, Tensor]:
    """Each layer's per-feature one-sided p-values for r > 0, from its streaming statistics."""
    return {layer: pearson_p_values(s.pearson(), s.num_samples) for layer, s in stats.items()}


def _betainc(a: Tensor, b: Tensor, x: Tensor, x_c: Tensor) -> Tensor:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1], given x_c = 1 - x exactly.

    The continued fraction converges fast for x < (a + 1) / (a + b + 2); elsewhere the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) is used (taking 1 - x from `x_c`, so no digits are lost).
    """
    swap = x > (a + 1) / (a + b + 2)
    a_, b_ = torch.where(swap, b, a), torch.where(swap, a, b)
    x_, xc_ = torch.where(swap, x_c, x), torch.where(swap, x, x_c)
    log_beta = torch.lgamma(a_) + torch.lgamma(b_) - torch.lgamma(a_ + b_)
    # x^a (1-x)^b / (a B(a, b)); 0 (not NaN) at x = 0, where log(0) = -inf.
    log_front = torch.xlogy(a_, x_) + torch.xlogy(b_, xc_) - log_beta - torch.log(a_)
    value = torch.exp(log_front) * _beta_continued_fraction(a_, b_, x_)
    return torch.where(swap, 1 - value, value).clamp(0.0, 1.0)


def _lentz_fix(t: Tensor) -> Tensor:
    """Lentz's guard: replaces values too close to 0 by a tiny number."""
    return torch.where(t.abs() < _CF_TINY, torch.full_like(t, _CF_TINY), t)


def _beta_continued_fraction(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf), by modified Lentz, elementwise.

    An element is done when its last step changed it by less than _CF_EPS; it then leaves the working
    set. That takes O(sqrt(max(a, b))) steps near x = (a + 1) / (a + b + 2) (at most ~80 for
    n <= 10^6 samples) and ~10 on average, so dropping the finished ones saves most of the work.
    """
    shape = x.shape
    out = torch.empty_like(x).reshape(-1)
    if out.numel() == 0:
        return out.reshape(shape)
    index = torch.arange(out.numel(), device=x.device)
    a, b, x = a.reshape(-1), b.reshape(-1), x.reshape(-1)
    c = torch.ones_like(x)
    d = 1 / _lentz_fix(1 - (a + b) * x / (a + 1))
    h = d.clone()
    max_steps = 100 + 20 * math.ceil(math.sqrt(float(torch.maximum(a, b).max())))
    for m in range(1, max_steps + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((a - 1 + m2) * (a + m2)),  # even step
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1 + m2)),  # odd step
        ):
            d = 1 / _lentz_fix(1 + aa * d)
            c = _lentz_fix(1 + aa / c)
            step = d * c
            h = h * step
        done = (step - 1).abs() < _CF_EPS
        if bool(done.any()):
            out[index[done]] = h[done]
            keep = (~done).nonzero().squeeze(1)
            index, a, b, x, c, d, h = (t.index_select(0, keep) for t in (index, a, b, x, c, d, h))
            if index.numel() == 0:
                return out.reshape(shape)
    raise RuntimeError(f"incomplete beta: continued fraction did not converge in {max_steps} steps")


# ---------------------------------------------------------------- Benjamini-Hochberg q-values


def bh_q_values(p: Tensor) -> Tensor:
    """Benjamini-Hochberg q-values (adjusted p-values) of p-values p (any shape, float64, same shape).

    q_(i) = min over j >= i of p_(j) m / j for the sorted p-values, capped at 1: monotone in p, and
    equal to `scipy.stats.false_discovery_control(p.ravel())`. A feature with q < alpha is a
    discovery at false discovery rate alpha.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    if p.numel() == 0:
        return p.clone()
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p-values must lie in [0, 1] (no NaN)")
    flat = p.reshape(-1)
    m = flat.numel()
    order = torch.argsort(flat, stable=True)
    ranks = torch.arange(1, m + 1, dtype=torch.float64, device=flat.device)
    scaled = flat[order] * (m / ranks)  # (m,) p_(i) m / i
    # running minimum from the largest p down: q_(i) = min_{j >= i} p_(j) m / j
    q_sorted = scaled.flip(0).cummin(0).values.flip(0).clamp(max=1.0)
    q = torch.empty_like(flat)
    q[order] = q_sorted
    return q.reshape(p.shape)


def layer_q_values(p_by_layer: Mapping[int, Tensor]) -> dict[int, Tensor]:
    """Benjamini-Hochberg within each layer: {layer: q} for {layer: p}."""
    return {layer: bh_q_values(p) for layer, p in p_by_layer.items()}


def pooled_q_values(p_by_layer: Mapping[int, Tensor]) -> dict[int, Tensor]:
    """Benjamini-Hochberg over the features of all layers together, split back into {layer: q}.

    The family is every feature of every layer (what variant S chooses from). Layers are listed in
    the mapping's order; the result has the same keys and shapes.
    """
    layers = list(p_by_layer)
    flat = [torch.as_tensor(p_by_layer[layer], dtype=torch.float64) for layer in layers]
    if not flat:
        return {}
    q = bh_q_values(torch.cat([p.reshape(-1) for p in flat]))
    parts = q.split([p.numel() for p in flat])
    return {layer: part.reshape(p.shape) for layer, part, p in zip(layers, parts, flat, strict=True)}


# ---------------------------------------------------------------- Holm's family-wise correction


def holm_adjusted(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family of p-values, in the input's order.

    For p sorted ascending, adj_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). A hypothesis with adjusted
    p < alpha is rejected at family-wise error rate alpha (strong control, any dependence between the tests).
    """
    values = [float(v) for v in p]
    if any(math.isnan(v) or not 0 <= v <= 1 for v in values):
        raise ValueError("p-values must lie in [0, 1] (no NaN)")
    m = len(values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: values[i])):
        running = max(running, min(1.0, (m - rank) * values[i]))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------- paired test on validation items


class PairedTest(NamedTuple):
    """Outcome of the one-sided paired sign test "steered beats unsteered"."""

    p_value: float
    """Exact one-sided sign-test p-value on the changed items (1.0 when none changed)."""
    passes: bool
    """p_value < alpha (strictly: at alpha <= 0.5 a single changed item can never pass)."""
    better: int
    """Items the steering scored higher on."""
    worse: int
    """Items the steering scored lower on."""


def sign_test_p(better: int, worse: int) -> float:
    """Exact one-sided sign (McNemar) test p-value: P(X >= better) for X ~ Binomial(better + worse, 1/2).

    `better` and `worse` count the items whose score went up / down under steering; unchanged items
    carry no information and are left out. 1 better 0 worse gives 0.5; 0 changed items give 1.0.
    """
    if better < 0 or worse < 0:
        raise ValueError(f"counts must be non-negative, got better={better}, worse={worse}")
    m = better + worse
    if m == 0:
        return 1.0
    term = math.comb(m, better)  # C(m, k) for k = better, better + 1, ..., m
    tail = 0
    for k in range(better, m + 1):
        tail += term
        term = term * (m - k) // (k + 1)
    return float(Fraction(tail, 2**m))


def paired_improvement(
    scores_steered: Tensor | Sequence[float], scores_unsteered: Tensor | Sequence[float], alpha: float
) -> PairedTest:
    """Does steering beat unsteered on the same items? Exact one-sided sign test at level `alpha`.

    Scores are per item (1/0 correctness, or any real score); only the items whose score changed
    count. Passes only if p < alpha, so at alpha <= 0.5 one changed item never decides.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (--selection.alpha) must lie in (0, 1), got {alpha}")
    steered = torch.as_tensor(scores_steered, dtype=torch.float64).reshape(-1)
    unsteered = torch.as_tensor(scores_unsteered, dtype=torch.float64).reshape(-1)
    if steered.shape != unsteered.shape:
        raise ValueError(
            f"paired scores need the same items: {steered.numel()} steered vs {unsteered.numel()} unsteered"
        )
    better, worse = int((steered > unsteered).sum()), int((steered < unsteered).sum())
    p = sign_test_p(better, worse)
    return PairedTest(p, p < alpha, better, worse)
