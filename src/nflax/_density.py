"""How much mass a flow's density has, for :func:`nflax.testing.check_flow`: the trapezoid
rule on a grid in 1-D and 2-D, importance sampling from a wide Student-t above that.

Each estimator returns ``(mass, uncertainty, non_finite)``: the estimate, its quadrature
error estimate (grid) or standard error (importance sampling), and the number of points
where ``log p`` was NaN or ``+inf`` (counted as zero density).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nflax.distributions import Flow, compiled_log_prob, compiled_sample

LogProb = Callable[[np.ndarray], np.ndarray]
STUDENT_DF = 5.0  # the proposal's degrees of freedom: tails heavier than most flows'
WIDEN = 1.5  # the proposal's scale against the samples' covariance
STANDARD_ERRORS = 4  # importance sampling's uncertainty, in standard errors
GRID_SIZE = {1: 4001, 2: 301}
CHUNK = 8192  # log p is computed this many points at a time (one compiled program)


def flow_mass(
    flow: Flow, rows: jax.Array | None, key: jax.Array, num: int, grid_size: int | None
) -> tuple[str, tuple[tuple[float, float], ...], list[int]]:
    """How the mass was estimated, ``(mass, uncertainty)`` and the count of non-finite
    log-densities for each context row (one, ``None``, for an unconditional flow)."""
    if int(num) < 2:
        raise ValueError(f"check_flow: num_samples must be ≥ 2, received {num}")
    event = tuple(flow.event_shape)
    d = math.prod(event)
    size = GRID_SIZE.get(d) if grid_size is None else int(grid_size)
    if d <= 2 and (size < 3 or size % 2 == 0):
        raise ValueError(f"check_flow: grid_size must be odd and ≥ 3, received {grid_size}")
    estimates, bad = [], []
    for i, row in enumerate([None] if rows is None else list(rows)):
        k_sample, k_draw = jax.random.split(jax.random.fold_in(key, i))
        samples = np.asarray(compiled_sample(flow, k_sample, int(num), row), np.float64)
        samples = samples.reshape(int(num), d)
        log_prob = _log_prob(flow, row, event)
        if d <= 2:
            m, u, b = grid_mass(log_prob, samples, size)
        else:
            m, se, b = importance_mass(log_prob, samples, k_draw, int(num))
            u = STANDARD_ERRORS * se
        estimates.append((m, u))
        bad.append(b)
    return _method(d, size, int(num)), tuple(estimates), bad


def _method(d: int, size: int | None, num: int) -> str:
    if d == 1:
        return f"the trapezoid rule on {size} points"
    if d == 2:
        return f"the trapezoid rule on a {size}×{size} grid"
    return f"importance sampling, {num} draws from a Student-t"


def _log_prob(flow: Flow, row: jax.Array | None, event: tuple[int, ...]) -> LogProb:
    """``log p`` of rows of flattened points, ``CHUNK`` at a time (the last one padded)."""

    def log_prob(points: np.ndarray) -> np.ndarray:
        n = len(points)
        size = min(CHUNK, n)
        padded = np.concatenate([points, np.repeat(points[-1:], -n % size, axis=0)])
        ctx = None if row is None else jnp.broadcast_to(row, (size, row.shape[-1]))
        out = [
            np.asarray(compiled_log_prob(flow, chunk.reshape(size, *event), ctx))
            for chunk in np.split(padded.astype(np.float32), len(padded) // size)
        ]
        return np.concatenate(out)[:n]

    return log_prob


def grid_mass(log_prob: LogProb, samples: np.ndarray, size: int) -> tuple[float, float, int]:
    """The trapezoid rule on ``size`` points per axis (odd) spanning the samples' range; the
    error estimate is the difference from every other grid point's rule. The mass beyond
    the samples' extremes is left out: about ``2d/(n + 1)`` for ``n`` samples."""
    d = samples.shape[1]
    axes = [np.linspace(samples[:, i].min(), samples[:, i].max(), size) for i in range(d)]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)
    log_p, bad = _cleaned(log_prob(mesh))
    density = np.exp(log_p).reshape((size,) * d)
    fine = _trapezoid(density, axes)
    coarse = _trapezoid(density[(slice(None, None, 2),) * d], [a[::2] for a in axes])
    return fine, abs(fine - coarse), bad


def importance_mass(
    log_prob: LogProb, samples: np.ndarray, key: jax.Array, num: int
) -> tuple[float, float, int]:
    """``E_q[p/q]`` over ``num`` draws from a multivariate Student-t ``q`` (``STUDENT_DF``
    degrees of freedom) centred on the samples, its scale ``WIDEN`` times their covariance's;
    the uncertainty is the standard error of the mean."""
    d = samples.shape[1]
    mean = samples.mean(axis=0)
    cov = np.atleast_2d(np.cov(samples, rowvar=False)) * WIDEN**2
    cov += 1e-9 * max(np.trace(cov) / d, 1e-12) * np.eye(d)
    chol = np.linalg.cholesky(cov)
    k_normal, k_gamma = jax.random.split(key)
    eps = np.asarray(jax.random.normal(k_normal, (num, d)), np.float64)
    chi2 = 2.0 * np.asarray(jax.random.gamma(k_gamma, STUDENT_DF / 2, (num,)), np.float64)
    u = eps / np.sqrt(chi2 / STUDENT_DF)[:, None]
    draws = mean + u @ chol.T
    log_q = _student_log_density(u, chol)
    log_p, bad = _cleaned(log_prob(draws.astype(np.float32)))
    log_w = log_p - log_q
    shift = np.max(log_w) if np.isfinite(np.max(log_w)) else 0.0
    w = np.exp(log_w - shift)
    scale = math.exp(shift)
    return float(w.mean() * scale), float(w.std(ddof=1) * scale / math.sqrt(num)), bad


def _student_log_density(u: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """Log density of ``mean + L u`` under the multivariate t with scale ``L Lᵀ``, where the
    draws were ``u = ε / sqrt(χ²/ν)`` (so ``δ² = ‖u‖²``)."""
    d, nu = u.shape[1], STUDENT_DF
    log_det = float(np.sum(np.log(np.diag(chol))))
    norm = math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - 0.5 * d * math.log(nu * math.pi)
    return norm - log_det - 0.5 * (nu + d) * np.log1p(np.sum(u**2, axis=1) / nu)


def _cleaned(log_p: np.ndarray) -> tuple[np.ndarray, int]:
    """``log p`` in float64 with NaN and ``+inf`` counted and set to ``−inf`` (zero density)."""
    log_p = np.asarray(log_p, np.float64)
    bad = np.isnan(log_p) | (log_p == np.inf)
    return np.where(bad, -np.inf, log_p), int(np.count_nonzero(bad))


def _trapezoid(values: np.ndarray, axes: list[np.ndarray]) -> float:
    """The trapezoid rule over a regular grid, one axis after another."""
    for a in reversed(axes):
        h = (a[-1] - a[0]) / (len(a) - 1) if len(a) > 1 else 0.0
        weights = np.full(len(a), h)
        weights[[0, -1]] = h / 2
        values = values @ weights
    return float(values)
