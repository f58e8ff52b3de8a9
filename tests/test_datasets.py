"""Data sets: exact log-densities against closed forms, and each sampler against its density.

Every NLL gap in the suite is measured against ``Dataset.log_prob``, so it is pinned here at
1e-6 to formulas written independently in float64 (scipy). Each sampler is then checked
against the density with a binned χ² test of stated power: at level α = 1e-3 (a correct sampler
fails with probability 1e-3; the seeds are fixed, so the outcome is too), and the test computes
its own power against a named small mistake (noncentral χ²) and requires it to be ≥ 0.99.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

import nflax

N = 20_000  # samples per χ² test
ALPHA = 1e-3


# -- closed forms, float64 ---------------------------------------------------------------------
def banana_logpdf(x, sd1=1.0):
    x1, x2 = x[..., 0], x[..., 1]
    return stats.norm.logpdf(x2, 0.0, 4.0) + stats.norm.logpdf(x1, x2**2 / 4.0, sd1)


def eight_logpdf(x, std=0.25):
    angles = np.arange(8) * np.pi / 4
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    comp = stats.norm.logpdf(x[..., None, :], centers, std).sum(-1)
    return special.logsumexp(comp, axis=-1) - math.log(8)


def cond_banana_logpdf(x, c, curvature=1.0):
    x1, x2, k = x[..., 0], x[..., 1], c[..., 0]
    return stats.norm.logpdf(x2, 0.0, 4.0) + stats.norm.logpdf(x1, curvature * k * x2**2 / 4, 1)


def _points(key, n=64):
    """Bulk points and far ones (the tails are where a wrong constant shows most)."""
    x = np.asarray(jax.random.normal(key, (n, 2)), np.float64) * [3.0, 4.0] + [4.0, 0.0]
    far = np.array([[30.0, -12.0], [-6.0, 9.0], [0.0, 0.0], [60.0, 15.0]])
    return np.concatenate([x, far]).astype(np.float32)


def test_banana_log_prob_is_the_closed_form():
    x = _points(jax.random.key(0))
    got = np.asarray(nflax.datasets.get("banana").log_prob(x))
    np.testing.assert_allclose(got, banana_logpdf(x.astype(np.float64)), rtol=1e-6, atol=1e-6)


def test_eight_gaussians_log_prob_is_the_closed_form():
    x = _points(jax.random.key(1)) / 3.0
    got = np.asarray(nflax.datasets.get("eight_gaussians").log_prob(x))
    np.testing.assert_allclose(got, eight_logpdf(x.astype(np.float64)), rtol=1e-6, atol=1e-6)


def test_conditional_banana_log_prob_is_the_closed_form():
    x = _points(jax.random.key(2))
    c = np.asarray(jax.random.uniform(jax.random.key(3), (len(x), 1), minval=0.5, maxval=1.5))
    got = np.asarray(nflax.datasets.get_conditional("conditional_banana").log_prob(x, c))
    want = cond_banana_logpdf(x.astype(np.float64), c.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_moons_has_no_density_and_the_others_do():
    assert not nflax.datasets.get("moons").has_density
    with pytest.raises(ValueError, match="'moons' has no exact density"):
        nflax.datasets.get("moons").log_prob(jnp.zeros((2, 2)))
    assert nflax.datasets.names() == ["banana", "eight_gaussians", "moons"]
    assert all(nflax.datasets.get(n).has_density for n in ("banana", "eight_gaussians"))


# -- the binned χ² test ------------------------------------------------------------------------
# Cells are rectangles in coordinates y = T(x) with |det ∂T/∂x| = 1 (the identity, or for the
# bananas u = x1 − k·x2²/4 beside x2, where the curved set is a product of normals), so a
# cell's probability is the integral of p_x(T⁻¹(y)) over a rectangle: midpoint rule, O(h²).
def _cell_probs(logpdf_y, lims, bins, h):
    """Probability of each of the ``bins[0] × bins[1]`` cells of the box ``lims`` (in y),
    by the midpoint rule on sub-cells of side at most ``h``; the last entry is everything
    outside the box."""
    axes = []
    for (lo, hi), k in zip(lims, bins, strict=True):
        m = k * math.ceil((hi - lo) / k / h)
        axes.append(lo + (np.arange(m) + 0.5) * (hi - lo) / m)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
    dens = np.exp(logpdf_y(grid)) * cell
    m0, m1 = len(axes[0]) // bins[0], len(axes[1]) // bins[1]
    cells = dens.reshape(bins[0], m0, bins[1], m1).sum(axis=(1, 3)).ravel()
    return np.append(cells, max(1.0 - cells.sum(), 0.0))


def _cell_index(y, lims, bins):
    idx = []
    for col, (lo, hi), k in zip(y.T, lims, bins, strict=True):
        idx.append(np.floor((col - lo) / (hi - lo) * k).astype(int))
    i, j = idx
    inside = (i >= 0) & (i < bins[0]) & (j >= 0) & (j < bins[1])
    return np.where(inside, i * bins[1] + j, bins[0] * bins[1])


def _merge_small(p, *others, min_expected=5.0):
    """Cells expected to hold fewer than ``min_expected`` samples are pooled into one."""
    small = p * N < min_expected
    return [np.append(q[~small], q[small].sum()) for q in (p, *others)]


def chi2_test(counts, p, q_alt):
    """``(statistic, critical value at ALPHA, power against q_alt)`` of the χ² test."""
    p, q, counts = _merge_small(p, q_alt, counts)
    df = len(p) - 1
    stat = float(np.sum((counts - N * p) ** 2 / (N * p)))
    crit = float(stats.chi2.ppf(1 - ALPHA, df))
    noncentrality = N * float(np.sum((q - p) ** 2 / p))
    power = float(stats.ncx2.sf(crit, df, noncentrality))
    return stat, crit, power


def _check(samples, p, q_alt, alt_samples, index):
    counts = np.bincount(index(np.asarray(samples)), minlength=len(p)).astype(float)
    stat, crit, power = chi2_test(counts, p, q_alt)
    assert stat < crit, (stat, crit)
    assert power >= 0.99, power
    # ... and a sampler with that mistake does fail
    alt = np.bincount(index(np.asarray(alt_samples)), minlength=len(p)).astype(float)
    assert chi2_test(alt, p, q_alt)[0] > crit


def _to_u(x, k=1.0):
    """The banana's straightened coordinates ``(x1 − k·x2²/4, x2)`` (unit Jacobian)."""
    return np.stack([x[..., 0] - k * x[..., 1] ** 2 / 4, x[..., 1]], axis=-1)


def _from_u(y, k=1.0):
    return np.stack([y[..., 0] + k * y[..., 1] ** 2 / 4, y[..., 1]], axis=-1)


def _f32(x):
    return np.asarray(x, np.float32)


BANANA_CELLS = dict(lims=((-3.5, 3.5), (-12.0, 12.0)), bins=(10, 8))


def test_banana_sampler_matches_its_density():
    """Power ≥ 0.99 against x1 | x2 noise of std 1.05 instead of 1 (0.992)."""
    ds = nflax.datasets.get("banana")
    p = _cell_probs(lambda g: np.asarray(ds.log_prob(_f32(_from_u(g)))), h=0.02, **BANANA_CELLS)
    q = _cell_probs(lambda g: banana_logpdf(_from_u(g), sd1=1.05), h=0.02, **BANANA_CELLS)
    x = np.asarray(ds.sample(jax.random.key(0), N))
    extra = math.sqrt(1.05**2 - 1.0)  # widen x1 | x2 to std 1.05
    x_alt = x + [extra, 0.0] * np.asarray(jax.random.normal(jax.random.key(1), (N, 2)))
    _check(x, p, q, x_alt, lambda s: _cell_index(_to_u(s), **BANANA_CELLS))


EIGHT_CELLS = dict(lims=((-3.0, 3.0), (-3.0, 3.0)), bins=(12, 12))


def test_eight_gaussians_sampler_matches_its_density():
    """Power ≥ 0.99 against components of std 0.265 instead of 0.25 (0.99999)."""
    ds = nflax.datasets.get("eight_gaussians")
    p = _cell_probs(lambda g: np.asarray(ds.log_prob(_f32(g))), h=0.01, **EIGHT_CELLS)
    q = _cell_probs(lambda g: eight_logpdf(g, std=0.265), h=0.01, **EIGHT_CELLS)
    x = np.asarray(ds.sample(jax.random.key(2), N))
    extra = math.sqrt(0.265**2 - 0.25**2)  # widen each component to std 0.265
    x_alt = x + extra * np.asarray(jax.random.normal(jax.random.key(3), (N, 2)))
    _check(x, p, q, x_alt, lambda s: _cell_index(s, **EIGHT_CELLS))


MOONS_CELLS = dict(lims=((-1.5, 2.5), (-1.0, 1.5)), bins=(12, 12))


def moons_cell_probs(noise, lims, bins, num_t=4000):
    """The moons law in closed form per cell: t ~ U(0, π), the upper or lower half circle with
    probability ½ each, plus N(0, noise²·I); cell probabilities are products of normal CDF
    differences, averaged over t (midpoint rule)."""
    t = (np.arange(num_t) + 0.5) * np.pi / num_t
    ex = np.linspace(*lims[0], bins[0] + 1)
    ey = np.linspace(*lims[1], bins[1] + 1)
    p = np.zeros(bins)
    for mx, my in [(np.cos(t), np.sin(t)), (1 - np.cos(t), 0.5 - np.sin(t))]:
        fx = np.diff(stats.norm.cdf((ex[None, :] - mx[:, None]) / noise), axis=1)  # (t, bins)
        fy = np.diff(stats.norm.cdf((ey[None, :] - my[:, None]) / noise), axis=1)
        p += 0.5 * np.einsum("ti,tj->ij", fx, fy) / num_t
    p = p.ravel()
    return np.append(p, max(1.0 - p.sum(), 0.0))


def test_moons_sampler_matches_its_law():
    """Moons has no log_prob; its law is written out in closed form per cell. Power ≥ 0.99
    against noise 0.107 instead of 0.1 (0.994)."""
    ds = nflax.datasets.get("moons")
    p = moons_cell_probs(0.1, **MOONS_CELLS)
    q = moons_cell_probs(0.107, **MOONS_CELLS)
    x = np.asarray(ds.sample(jax.random.key(4), N))
    extra = math.sqrt(0.107**2 - 0.1**2)
    x_alt = x + extra * np.asarray(jax.random.normal(jax.random.key(5), (N, 2)))
    _check(x, p, q, x_alt, lambda s: _cell_index(s, **MOONS_CELLS))


COND_CELLS = dict(lims=((-3.5, 3.5), (-12.0, 12.0)), bins=(8, 6))
C_EDGES = np.array([0.5, 5 / 6, 7 / 6, 1.5])
CURVATURE = 1.02  # the mistake the test must catch: curvature 1.02·c


def _cond_probs(logpdf, per_bin=6):
    """Cells of the straightened (u, x2) for each of three bins of c ~ U(0.5, 1.5) (p(c) = 1),
    then everything else. ``logpdf(x, c)`` is log p(x | c)."""
    parts = []
    for lo, hi in zip(C_EDGES[:-1], C_EDGES[1:], strict=True):
        for c in lo + (np.arange(per_bin) + 0.5) * (hi - lo) / per_bin:
            cells = _cell_probs(lambda g, c=c: logpdf(_from_u(g, c), c), h=0.03, **COND_CELLS)
            parts.append(cells[:-1] * (hi - lo) / per_bin)
    inner = np.concatenate(
        [sum(parts[i * per_bin : (i + 1) * per_bin]) for i in range(len(C_EDGES) - 1)]
    )
    return np.append(inner, max(1.0 - inner.sum(), 0.0))


def _cond_index(x, c):
    n_cells = COND_CELLS["bins"][0] * COND_CELLS["bins"][1]
    cell = _cell_index(_to_u(x, c[:, 0]), **COND_CELLS)
    k = np.clip(np.searchsorted(C_EDGES, c[:, 0], side="right") - 1, 0, 2)
    return np.where(cell == n_cells, 3 * n_cells, k * n_cells + cell)


def test_conditional_banana_sampler_matches_its_density():
    """The joint of (x, c), and x at one fixed c. Power ≥ 0.99 against a sampler whose
    curvature is 1.02·c instead of c."""
    ds = nflax.datasets.get_conditional("conditional_banana")

    def lib(g, c):
        return np.asarray(ds.log_prob(_f32(g), np.full((*g.shape[:-1], 1), c, np.float32)))

    def alt(g, c):
        return cond_banana_logpdf(g, np.full((*g.shape[:-1], 1), c), curvature=CURVATURE)

    p, q = _cond_probs(lib), _cond_probs(alt)
    x, c = (np.asarray(a) for a in ds.sample(jax.random.key(6), N))
    assert stats.kstest(c[:, 0], stats.uniform(0.5, 1.0).cdf).pvalue > ALPHA
    x_alt = x + np.stack([(CURVATURE - 1) * c[:, 0] * x[:, 1] ** 2 / 4, np.zeros(N)], axis=1)
    _check(x, p, q, x_alt, lambda pts: _cond_index(pts, c))
    # one fixed context: sample_given against log p(x | c)
    k = 1.3
    p = _cell_probs(lambda g: lib(_from_u(g, k), k), h=0.03, **COND_CELLS)
    q = _cell_probs(lambda g: alt(_from_u(g, k), k), h=0.03, **COND_CELLS)
    xg = np.asarray(ds.sample_given(jax.random.key(7), np.array([k]), N))
    xg_alt = xg + np.stack([(CURVATURE - 1) * k * xg[:, 1] ** 2 / 4, np.zeros(N)], axis=1)
    _check(xg, p, q, xg_alt, lambda s: _cell_index(_to_u(s, k), **COND_CELLS))


def test_dataset_classes_wrap_a_sampler_and_a_density():
    def sampler(key, n):
        return 2.0 + jax.random.normal(key, (n, 1))

    ds = nflax.datasets.Dataset("shifted", 1, sampler, lambda x: stats_logpdf(x))
    assert ds.has_density and ds.sample(jax.random.key(0), 5).shape == (5, 1)
    x = jnp.array([[2.0], [0.0]])
    np.testing.assert_allclose(ds.log_prob(x), stats.norm.logpdf([2.0, 0.0], 2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="'shifted': number of points must be ≥ 1, received 0"):
        ds.sample(jax.random.key(0), 0)
    blind = nflax.datasets.Dataset("blind", 1, sampler)
    assert not blind.has_density
    with pytest.raises(ValueError, match="'blind' has no exact density"):
        blind.log_prob(x)
    # a conditional set: pairs, and draws for one fixed context
    cds = nflax.datasets.get_conditional("conditional_banana")
    assert isinstance(cds, nflax.datasets.ConditionalDataset)
    assert (cds.dim, cds.context_dim, cds.has_density) == (2, 1, True)
    xs, cs = cds.sample(jax.random.key(1), 7)
    assert xs.shape == (7, 2) and cs.shape == (7, 1)
    fixed = cds.sample_given(jax.random.key(2), np.array([1.2]), 7)
    assert fixed.shape == (7, 2)
    with pytest.raises(ValueError, match="unknown conditional dataset 'nope'; known: conditional"):
        nflax.datasets.get_conditional("nope")
    # a VI target: log_prob = log_density − log Z, and only where log Z is known
    t = nflax.datasets.Target(
        "half", 1, lambda x: -0.5 * x[..., 0] ** 2, 0.5 * math.log(2 * math.pi)
    )
    np.testing.assert_allclose(t.log_prob(x), stats.norm.logpdf([2.0, 0.0]), rtol=1e-6)
    unknown = nflax.datasets.Target("unknown", 1, lambda x: -(x[..., 0] ** 2))
    with pytest.raises(ValueError, match="target 'unknown' has no known log-normaliser"):
        unknown.log_prob(x)


def stats_logpdf(x):
    return jax.scipy.stats.norm.logpdf(x[..., 0], 2.0)
