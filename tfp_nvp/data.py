"""Datasets made from packages (never downloaded) and the exact figures they are judged against."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_moons

__all__ = ["MOONS_NOISE", "moons_standardizer", "two_moons", "moons_log_prob", "moons_entropy"]

MOONS_NOISE = 0.05

# sklearn's make_moons: the outer arc (cos t, sin t) and the inner arc (1 - cos t, 1/2 - sin t), t in [0, pi],
# equal halves, plus isotropic Gaussian noise. The moments below are those of that population (t uniform),
# so every call standardizes with the same affine map and the entropy bound refers to one fixed distribution.
_T = np.linspace(0.0, np.pi, 200_001)


def _arcs(t):
    outer = np.stack([np.cos(t), np.sin(t)], -1)
    inner = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], -1)
    return outer, inner


def moons_standardizer(noise: float = MOONS_NOISE) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and standard deviation of sklearn's two moons (uniform arc position plus noise)."""
    outer, inner = _arcs(_T)
    pts = np.concatenate([outer, inner])
    mean = pts.mean(0)
    std = np.sqrt(pts.var(0) + noise**2)
    return mean, std


def two_moons(n: int, noise: float = MOONS_NOISE, seed: int | None = 0, standardize: bool = True,
              dtype="float32") -> np.ndarray:
    """`n` points of sklearn's two moons, standardized with the population moments (`moons_standardizer`)."""
    if int(n) != n or n <= 0:
        raise ValueError(f"`n` must be a positive integer; got {n!r}.")
    x, _ = make_moons(int(n), noise=noise, random_state=seed)
    if standardize:
        mean, std = moons_standardizer(noise)
        x = (x - mean) / std
    return x.astype(dtype)


def _mixture_log_density(points: np.ndarray, noise: float, arc_points: int) -> np.ndarray:
    """log p(x) of the raw two moons: a midpoint rule over `arc_points` positions on each arc."""
    t = (np.arange(arc_points) + 0.5) * np.pi / arc_points
    centres = np.concatenate(_arcs(t))
    c2 = (centres**2).sum(1)
    log_norm = -np.log(2 * np.pi * noise**2) - np.log(len(centres))
    out = np.empty(len(points))
    for start in range(0, len(points), 8192):
        p = points[start:start + 8192]
        # |p - c|^2 through one matrix product: the whole computation is BLAS-bound.
        a = (p @ centres.T * 2.0 - (p**2).sum(1, keepdims=True) - c2) / (2 * noise**2)
        amax = a.max(1, keepdims=True)
        out[start:start + 8192] = log_norm + amax[:, 0] + np.log(np.exp(a - amax).sum(1))
    return out


def moons_log_prob(x: np.ndarray, noise: float = MOONS_NOISE, standardized: bool = True,
                   arc_points: int = 2000) -> np.ndarray:
    """Exact log-density of the two-moons population at `x` (standardized coordinates by default)."""
    x = np.asarray(x, np.float64)
    if standardized:
        mean, std = moons_standardizer(noise)
        # x_raw = x * std + mean, so p_std(x) = p_raw(x_raw) * prod(std).
        return _mixture_log_density(x * std + mean, noise, arc_points) + np.log(std).sum()
    return _mixture_log_density(x, noise, arc_points)


def moons_entropy(noise: float = MOONS_NOISE, standardize: bool = True, grid_step: float | None = None,
                  arc_points: int = 2000) -> float:
    """Differential entropy (nats) of the two-moons distribution: the best held-out NLL any model can reach.

    The density is a mixture over the two arcs, `p(x) = 1/2 E_t N(x; outer(t), s^2 I) + 1/2 E_t N(x; inner(t),
    s^2 I)`; the arc integral is a midpoint rule over `arc_points` positions per arc and the entropy
    `-∫ p log p` a Riemann sum on a grid (step `noise / 5` by default), both far finer than `noise`.
    Standardizing by `std` lowers the entropy by `sum(log std)`.
    """
    step = grid_step or noise / 5
    pad = 8 * noise
    xs = np.arange(-1.0 - pad, 2.0 + pad, step)
    ys = np.arange(-0.5 - pad, 1.0 + pad, step)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    log_p = _mixture_log_density(np.stack([gx.ravel(), gy.ravel()], -1), noise, arc_points)
    entropy = -np.sum(np.exp(log_p) * log_p) * step**2
    if standardize:
        entropy -= np.log(moons_standardizer(noise)[1]).sum()
    return float(entropy)
