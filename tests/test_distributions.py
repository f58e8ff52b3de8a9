"""Base distributions: densities integrate to 1, samples have the right moments, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from nflax.bijections import Affine
from nflax.distributions import (
    DiagNormal,
    Flow,
    GaussianMixture,
    StandardNormal,
    StudentT,
    Uniform,
)

N_SAMPLES = 200_000


def _mixture(dim):
    gm = GaussianMixture(dim, 3, rngs=nnx.Rngs(0))
    perturb(gm, jax.random.key(1), scale=0.5)
    return gm


def _make(name, dim):
    return {
        "diag_normal": lambda: DiagNormal(dim, loc=0.5, log_scale=jnp.log(0.7)),
        "mixture": lambda: _mixture(dim),
        "student_t": lambda: StudentT(dim, df=5.0),
        "uniform": lambda: Uniform(-1.0, 2.0, dim=dim),
        "standard_normal": lambda: StandardNormal(dim),
    }[name]()


# (half width of the grid, number of points per axis) in 1D and 2D
GRIDS = {
    "diag_normal": ((8.0, 4001), (8.0, 321)),
    "mixture": ((10.0, 4001), (10.0, 401)),
    "student_t": ((200.0, 40001), (40.0, 801)),
    # grid points fall on the bounds -1 and 2; trapezoid error ≈ spacing at the jumps
    "uniform": ((4.0, 4001), (4.0, 1601)),
    "standard_normal": ((8.0, 4001), (8.0, 321)),
}


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_density_integrates_to_one(name, dim):
    dist = _make(name, dim)
    half, n = GRIDS[name][dim - 1]
    t = np.linspace(-half, half, n, dtype=np.float32)
    if dim == 1:
        p = np.exp(np.asarray(dist.log_prob(jnp.asarray(t)[:, None]), np.float64))
        total = np.trapezoid(p, t)
    else:
        grid = jnp.stack(jnp.meshgrid(t, t, indexing="ij"), axis=-1)
        p = np.exp(np.asarray(jax.jit(dist.log_prob)(grid), np.float64))
        total = np.trapezoid(np.trapezoid(p, t, axis=1), t)
    assert total == pytest.approx(1.0, abs=0.01)


def _moments(name, dist):
    """Exact mean and variance per coordinate."""
    if name == "diag_normal":
        return dist.loc[...], jnp.exp(2 * dist.log_scale[...])
    if name == "mixture":
        w = jax.nn.softmax(dist.logits[...])[:, None]
        mu, var = dist.means[...], jnp.exp(2 * dist.log_scales[...])
        mean = jnp.sum(w * mu, 0)
        return mean, jnp.sum(w * (var + mu**2), 0) - mean**2
    if name == "student_t":
        nu = dist.df
        return jnp.zeros_like(nu), nu / (nu - 2)
    if name == "uniform":
        lo, hi = dist.low[...], dist.high[...]
        return (lo + hi) / 2, (hi - lo) ** 2 / 12
    return jnp.zeros(dist.event_shape), jnp.ones(dist.event_shape)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sample_moments(name):
    dist = StudentT(2, df=12.0) if name == "student_t" else _make(name, 2)
    x = dist.sample(jax.random.key(7), (N_SAMPLES,))
    assert x.shape == (N_SAMPLES, 2)
    assert np.all(np.isfinite(dist.log_prob(x)))
    mean, var = _moments(name, dist)
    sd = np.sqrt(np.asarray(var))
    np.testing.assert_allclose(x.mean(0), mean, atol=float(5 * sd.max() / np.sqrt(N_SAMPLES)))
    np.testing.assert_allclose(x.var(0), var, rtol=0.03)


def test_log_probs_match_reference_formulas():
    x = jnp.array([[0.3, -1.2], [2.0, 0.1]])
    dn = DiagNormal(2, loc=jnp.array([0.5, -1.0]), log_scale=jnp.array([0.0, 0.3]))
    ref = jax.scipy.stats.norm.logpdf(x, dn.loc[...], jnp.exp(dn.log_scale[...])).sum(-1)
    np.testing.assert_allclose(dn.log_prob(x), ref, rtol=1e-6)
    st = StudentT(2, df=jnp.array([3.0, 7.0]))
    ref = jax.scipy.stats.t.logpdf(x, jnp.array([3.0, 7.0])).sum(-1)
    np.testing.assert_allclose(st.log_prob(x), ref, rtol=1e-5)
    gm = _mixture(2)
    w = jax.nn.softmax(gm.logits[...])
    dens = sum(
        w[k]
        * jnp.exp(
            jax.scipy.stats.norm.logpdf(x, gm.means[...][k], jnp.exp(gm.log_scales[...][k])).sum(-1)
        )
        for k in range(3)
    )
    np.testing.assert_allclose(gm.log_prob(x), jnp.log(dens), rtol=1e-5)


def test_uniform_is_minus_inf_outside_the_box_and_samples_inside():
    u = Uniform(jnp.array([0.0, -1.0]), jnp.array([1.0, 3.0]))
    lp = u.log_prob(jnp.array([[0.5, 0.0], [1.5, 0.0], [0.5, -2.0], [0.0, 3.0]]))
    np.testing.assert_allclose(lp[jnp.array([0, 3])], -np.log(4.0))
    assert np.all(np.isneginf(lp[1:3]))
    s = u.sample(jax.random.key(0), (1000,))
    assert np.all((s >= u.low[...]) & (s <= u.high[...]))


def test_learnable_parameters_get_gradients():
    x = jax.random.normal(jax.random.key(0), (32, 2))
    for dist in [DiagNormal(2), _mixture(2), StudentT(2, 4.0, learn_df=True)]:
        graphdef, params, rest = nnx.split(dist, nnx.Param, ...)

        def nll(p, graphdef=graphdef, rest=rest):
            return -nnx.merge(graphdef, p, rest).log_prob(x).mean()

        grads = jax.grad(nll)(params)
        leaves = jax.tree.leaves(grads)
        assert leaves and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in leaves)
    # fixed df is not a parameter
    assert not jax.tree.leaves(nnx.state(StudentT(2, 4.0), nnx.Param))


def test_bases_work_inside_a_flow():
    for base in [DiagNormal(2), _mixture(2), StudentT(2), Uniform(-3.0, 3.0, dim=2)]:
        flow = Flow(base, Affine(2, loc=0.5))
        x, lp = flow.sample_and_log_prob(jax.random.key(0), 5)
        np.testing.assert_allclose(lp, flow.log_prob(x), rtol=1e-5, atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"DiagNormal.log_prob: expected input of shape"):
        DiagNormal(2).log_prob(jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="GaussianMixture: num_components"):
        GaussianMixture(2, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="StudentT: df must be positive"):
        StudentT(2, df=-1.0)
    with pytest.raises(ValueError, match=r"StudentT: df must be a scalar or have shape \(2,\)"):
        StudentT(2, df=jnp.ones(3))
    with pytest.raises(ValueError, match="Uniform: expected finite bounds with low < high"):
        Uniform(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="Uniform: scalar low and high need dim="):
        Uniform(0.0, 1.0)
