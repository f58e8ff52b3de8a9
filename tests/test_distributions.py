"""Base distributions: densities integrate to 1, samples have the right moments, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from nflax.bijections import Affine, Chain, LULinear, Reverse
from nflax.distributions import (
    ConditionalDiagNormal,
    DiagNormal,
    Distribution,
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


# -- exact values at 1e-6, against jax.scipy.stats -------------------------------------------
def _x(shape, seed=0):
    return 3.0 * jax.random.normal(jax.random.key(seed), shape)


def test_standard_normal_log_prob_is_exact():
    x = _x((6, 3))
    want = jax.scipy.stats.norm.logpdf(x).sum(-1)
    np.testing.assert_allclose(StandardNormal(3).log_prob(x), want, rtol=1e-6, atol=1e-6)
    # an image event shape: the sum runs over the three event axes only
    xi = _x((4, 2, 2, 3), seed=1)
    want = jax.scipy.stats.norm.logpdf(xi).sum((1, 2, 3))
    np.testing.assert_allclose(StandardNormal((2, 2, 3)).log_prob(xi), want, rtol=1e-6, atol=1e-6)
    # one value by hand: log N(0; 0, I₂) = −log 2π
    assert float(StandardNormal(2).log_prob(jnp.zeros((1, 2)))[0]) == pytest.approx(
        -np.log(2 * np.pi), rel=1e-7
    )


def test_diag_normal_log_prob_is_exact():
    loc, log_scale = jnp.array([0.5, -1.0, 2.0]), jnp.array([0.0, 0.7, -0.4])
    dn = DiagNormal(3, loc=loc, log_scale=log_scale)
    x = _x((6, 3), seed=2)
    want = jax.scipy.stats.norm.logpdf(x, loc, jnp.exp(log_scale)).sum(-1)
    np.testing.assert_allclose(dn.log_prob(x), want, rtol=1e-6, atol=1e-6)


def test_conditional_diag_normal_log_prob_is_exact():
    cd = ConditionalDiagNormal(2, 3, hidden=(8,), rngs=nnx.Rngs(0))
    perturb(cd, jax.random.key(1), scale=0.5)
    x, c = _x((6, 2), seed=3), _x((6, 3), seed=4)
    out = cd.net(c)  # (μ, log σ) = net(c)
    mean, scale = out[:, :2], jnp.exp(out[:, 2:])
    assert np.ptp(np.asarray(mean)) > 0.1  # the context really moves the mean
    want = jax.scipy.stats.norm.logpdf(x, mean, scale).sum(-1)
    np.testing.assert_allclose(cd.log_prob(x, c), want, rtol=1e-6, atol=1e-6)
    # at construction the network outputs zero: a standard normal whatever the context
    fresh = ConditionalDiagNormal(2, 3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        fresh.log_prob(x, c), jax.scipy.stats.norm.logpdf(x).sum(-1), rtol=1e-6, atol=1e-6
    )


def test_flow_log_prob_of_known_affine_maps_is_exact():
    """``Flow.log_prob`` of a chain of affine maps is a Gaussian density in closed form."""
    a1 = Affine(3, loc=jnp.array([1.0, -2.0, 0.5]), log_scale=jnp.array([0.3, -0.2, 0.1]))
    lu = LULinear(3, rngs=nnx.Rngs(0), permutation=[2, 0, 1])
    perturb(lu, jax.random.key(5), scale=0.4)
    a2 = Affine(3, loc=jnp.array([0.2, 0.0, -0.7]), log_scale=jnp.array([-0.5, 0.4, 0.0]))
    flow = Flow(StandardNormal(3), Chain([a1, lu, Reverse(3), a2]))
    # z = A x + b, layer by layer, in float64
    d1 = np.diag(np.exp(-np.asarray(a1.log_scale[...], np.float64)))
    w = np.asarray(lu.weight(), np.float64)
    rev = np.eye(3)[::-1]
    d2 = np.diag(np.exp(-np.asarray(a2.log_scale[...], np.float64)))
    a = d2 @ rev @ w @ d1
    b = d2 @ (rev @ (w @ (-d1 @ np.asarray(a1.loc[...])) + np.asarray(lu.bias[...])))
    b = b - d2 @ np.asarray(a2.loc[...])
    # x = A⁻¹(z − b) with z ~ N(0, I): x ~ N(−A⁻¹b, (AᵀA)⁻¹)
    mean = -np.linalg.solve(a, b)
    cov = np.linalg.inv(a.T @ a)
    x = np.asarray(_x((8, 3), seed=6)) / 3.0 + mean.astype(np.float32)
    want = jax.scipy.stats.multivariate_normal.logpdf(x.astype(np.float64), mean, cov)
    np.testing.assert_allclose(flow.log_prob(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)


def test_gaussian_mixture_component_log_probs_are_exact():
    gm = _mixture(2)
    x = _x((5, 2), seed=7)
    comp = np.asarray(gm.component_log_probs(x))
    assert comp.shape == (5, 3)
    w = jax.nn.log_softmax(gm.logits[...])
    for k in range(3):
        sd = jnp.exp(gm.log_scales[...][k])
        want = w[k] + jax.scipy.stats.norm.logpdf(x, gm.means[...][k], sd).sum(-1)
        np.testing.assert_allclose(comp[:, k], want, rtol=1e-6, atol=1e-6)
    # the mixture's log_prob is their logsumexp
    np.testing.assert_allclose(
        gm.log_prob(x), jax.nn.logsumexp(comp, axis=-1), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"GaussianMixture.log_prob: expected input of shape"):
        gm.component_log_probs(jnp.zeros((2, 3)))


class _Laplace(Distribution):
    """A user's own base: independent standard Laplace coordinates."""

    def __init__(self, dim):
        self.event_shape = (dim,)

    def log_prob(self, x, context=None):
        return jnp.sum(-jnp.abs(x) - jnp.log(2.0), axis=-1)

    def sample(self, key, shape=(), context=None):
        return jax.random.laplace(key, (*tuple(shape), *self.event_shape))


def test_a_subclassed_distribution_works_as_a_flow_base():
    base = _Laplace(2)
    x = jnp.array([[0.0, 0.0], [1.0, -2.0]])
    np.testing.assert_allclose(base.log_prob(x), [-2 * np.log(2.0), -3 - 2 * np.log(2.0)])
    flow = Flow(base, Affine(2, loc=1.0, log_scale=np.log(2.0)))
    # x = 1 + 2 z: p(x) = Laplace((x − 1)/2) / 4
    want = jax.scipy.stats.laplace.logpdf((x - 1.0) / 2.0).sum(-1) - 2 * np.log(2.0)
    np.testing.assert_allclose(flow.log_prob(x), want, rtol=1e-6, atol=1e-6)
    s, lp = flow.sample_and_log_prob(jax.random.key(0), 4000)
    np.testing.assert_allclose(lp, flow.log_prob(s), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.median(np.asarray(s), axis=0), [1.0, 1.0], atol=0.1)
    # the base class is abstract: no density of its own
    with pytest.raises(NotImplementedError):
        Distribution().log_prob(x)


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

        grads = jax.jit(jax.grad(nll))(params)
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
