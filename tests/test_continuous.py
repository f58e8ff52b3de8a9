"""ContinuousFlow: log-det against the Jacobian of the solved map, round trip, a density that
integrates to one, Hutchinson's estimator unbiased with its noise fixed per solve, finite
gradients in the banana's far tail, trajectories at chosen times, maximum likelihood (FFJORD).

The bijection contract (registry: log-det against ``slogdet`` of ``jax.jacfwd`` through the
solve, round trip, gradients, trajectories, jit = eager) covers it too, as a slow test. Every
ODE program takes seconds to compile, so the fast tests are few and small.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax.bijections import ActNorm, Chain, ContinuousFlow
from nflax.bijections.continuous import EXACT_TRACE_MAX_DIM, exact_trace, hutchinson_trace
from nflax.distributions import Flow, StandardNormal
from nflax.vector_fields import VectorField, time_features


def _cnf(dim=2, seed=0, scale=0.2, **kw):
    """A small continuous flow whose field is far from zero."""
    layer = ContinuousFlow(VectorField(dim, hidden=(16,), rngs=nnx.Rngs(seed)), **kw)
    perturb(layer, jax.random.key(seed + 1), scale=scale)
    return layer


class LinearField(nnx.Module):
    """``v(x, t) = A x``: a user's own field; its flow is ``x(t) = exp(tA) x(0)``."""

    def __init__(self, a):
        self.a = nnx.Param(jnp.asarray(a, jnp.float32))
        self.dim, self.context_dim = self.a.shape[0], None

    def __call__(self, x, t, context=None):
        return x @ self.a[...].T


@pytest.mark.parametrize(
    "adjoint, jacobian",
    [("direct", jax.jacfwd), pytest.param("recursive", jax.jacrev, marks=pytest.mark.slow)],
)
def test_log_det_is_the_slogdet_of_the_jacobian_of_the_solved_map_and_round_trips(
    adjoint, jacobian
):
    """Default solver and tolerances; the Jacobian of the solved map by ``jax.jacfwd``
    (through the "direct" adjoint) or ``jax.jacrev`` (through the default one)."""
    layer = _cnf(adjoint=adjoint)
    x = 2.0 * jax.random.normal(jax.random.key(0), (6, 2))
    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        z, ld = m.forward(x)
        x2, ld_inv = m.inverse(z)
        jac = jax.vmap(jacobian(lambda v: m.forward(v)[0]))(x)
        return z, ld, x2, ld_inv, jnp.linalg.slogdet(jac)[1]

    z, ld, x2, ld_inv, jac_ld = run(state, x)
    assert float(jnp.max(jnp.abs(z - x))) > 0.1  # the map is far from the identity
    np.testing.assert_allclose(ld, jac_ld, atol=1e-4)
    np.testing.assert_allclose(x2, x, atol=1e-4)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-4)


def test_a_linear_field_is_the_matrix_exponential_and_hutchinson_noise_is_fixed_per_solve():
    """``v = A x``: forward is ``z = exp(−A) x`` with ``log det = −tr A``. Hutchinson's
    integrand ``εᵀAε`` is then constant in time, so with one ε for the whole solve the
    log-det is exactly ``−εᵀAε`` for that ε (redrawn noise would average it toward −tr A)."""
    a = np.array([[0.3, -0.8], [0.5, -0.1]], np.float32)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    exact = ContinuousFlow(LinearField(a))
    z, ld = exact.forward(x)
    expm = jax.scipy.linalg.expm(-jnp.asarray(a))
    np.testing.assert_allclose(z, x @ expm.T, atol=1e-5)
    np.testing.assert_allclose(ld, -np.trace(a), atol=1e-5)
    hutch = ContinuousFlow(LinearField(a), trace="hutchinson", noise="gaussian")
    key = jax.random.key(7)
    _, ld_h = hutch.forward(x, key=key)
    eps = jax.random.normal(key, (5, 2))
    np.testing.assert_allclose(ld_h, -jnp.einsum("ni,ij,nj->n", eps, a, eps), atol=1e-5)
    assert len(set(np.round(np.asarray(ld_h), 4))) > 1  # the draws differ between points


@pytest.mark.parametrize("noise", ["rademacher", pytest.param("gaussian", marks=pytest.mark.slow)])
def test_hutchinson_is_unbiased(noise):
    """The mean of many draws of the Hutchinson log-det matches the exact log-det, within
    4 standard errors (from the draws' own spread); the estimator alone too."""
    exact = _cnf(seed=3, scale=0.3)
    hutch = ContinuousFlow(exact.vector_field, trace="hutchinson", noise=noise)
    x = 1.5 * jax.random.normal(jax.random.key(0), (3, 2))
    draws = 2000
    rows = jnp.tile(x, (draws, 1))  # one independent ε per row: `draws` draws per point
    graphdef, state = nnx.split(hutch)
    fwd = jax.jit(lambda s, x, k: nnx.merge(graphdef, s).forward(x, key=k)[1])
    ld_h = np.asarray(fwd(state, rows, jax.random.key(1))).reshape(draws, 3)
    ld = np.asarray(exact.forward(x)[1])
    mean, se = ld_h.mean(0), ld_h.std(0) / np.sqrt(draws)
    assert np.all(ld_h.std(0) > 1e-3)  # a real estimator, not the exact value
    assert np.all(np.abs(mean - ld) < 4 * se + 1e-4), (mean, ld, se)
    # the estimator at one point: E[εᵀJε] = tr J
    f = lambda u: exact.vector_field(u, 0.4)  # noqa: E731
    y = jnp.array([0.3, -1.2])
    eps = jax.random.rademacher(jax.random.key(2), (20000, 2), dtype=jnp.float32)
    if noise == "gaussian":
        eps = jax.random.normal(jax.random.key(2), (20000, 2))
    # compiled: eagerly every op of the vectorised Jacobian products is compiled on its own
    est = np.asarray(jax.jit(jax.vmap(lambda e: hutchinson_trace(f, y, e)[1]))(eps))
    tr = float(jax.jit(lambda y: exact_trace(f, y)[1])(y))
    assert abs(est.mean() - tr) < 4 * est.std() / np.sqrt(len(est)) + 1e-5


def test_auto_trace_is_exact_up_to_the_measured_dimension():
    def make(d):  # a user's field: no network to initialise (a compile per weight shape)
        return ContinuousFlow(LinearField(np.zeros((d, d), np.float32)))

    assert not make(EXACT_TRACE_MAX_DIM).uses_hutchinson
    assert make(EXACT_TRACE_MAX_DIM + 1).uses_hutchinson
    assert ContinuousFlow(make(2).vector_field, trace="hutchinson").uses_hutchinson


def test_density_integrates_to_one_on_a_grid():
    flow = Flow(StandardNormal(2), _cnf(seed=5, scale=0.3))
    assert float(jnp.max(jnp.abs(flow.sample(jax.random.key(0), 64)))) > 0  # it moves mass
    xs, ys, logp = nflax.plotting.density_grid(flow, (-7.0, 7.0), (-7.0, 7.0), 160)
    total = float(np.exp(logp).sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]))
    assert abs(total - 1.0) < 0.01, total


def test_trajectory_at_chosen_times_and_layer_names():
    layer = _cnf(seed=2, times=(0.5,))
    x = jax.random.normal(jax.random.key(0), (8, 2))
    assert layer.layer_names() == ["ODE t=1→0.5", "ODE t=0.5→0"]
    traj = layer.trajectory(x)
    assert len(traj) == 3
    fine = layer.trajectory(x, times=np.linspace(0, 1, 5))
    assert len(fine) == 5
    np.testing.assert_allclose(fine[2], traj[1], atol=1e-5)  # t = 0.5 both times
    np.testing.assert_allclose(fine[-1], traj[-1], atol=1e-5)
    back = layer.inverse_trajectory(traj[-1])
    for a, b in zip(back, reversed(traj), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # in a flow, inside a Chain after ActNorm: one panel per stretch of time
    flow = Flow(StandardNormal(2), Chain([ActNorm(2), layer]))
    assert flow.layer_names() == ["ActNorm", "ODE t=1→0.5", "ODE t=0.5→0"]
    assert len(flow.sample_trajectory(jax.random.key(1), 8)) == 4


def test_a_solve_that_runs_out_of_steps_gives_nan():
    layer = _cnf(scale=0.5, max_steps=2)
    z, ld = layer.forward(jnp.ones((2, 2)))
    assert np.all(np.isnan(z)) and np.all(np.isnan(ld))


def test_errors_name_the_layer_and_the_value():
    field = VectorField(2, hidden=(4,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="trace must be one of"):
        ContinuousFlow(field, trace="approximate")
    with pytest.raises(ValueError, match="noise must be one of"):
        ContinuousFlow(field, noise="uniform")
    with pytest.raises(ValueError, match="unknown solver 'rk4'; known: tsit5"):
        ContinuousFlow(field, solver="rk4")
    with pytest.raises(ValueError, match="trajectory times must lie in"):
        ContinuousFlow(field, times=(0.5, 2.0))
    with pytest.raises(ValueError, match="give dim"):
        ContinuousFlow(lambda x, t, c=None: x)
    with pytest.raises(ValueError, match="VectorField: expected x of shape"):
        field(jnp.ones((3, 5)), 0.0)
    conditional = ContinuousFlow(VectorField(2, hidden=(4,), context_dim=3, rngs=nnx.Rngs(0)))
    assert conditional.context_dim == 3
    with pytest.raises(ValueError, match="ContinuousFlow.forward: this layer is conditional"):
        conditional.forward(jnp.ones((4, 2)))


def test_time_features_and_a_fresh_field_is_zero():
    phi = time_features(jnp.array([0.0, 1.0]), 3)
    assert phi.shape == (2, 7)
    np.testing.assert_allclose(phi[0], [0, 1, 1, 1, 0, 0, 0], atol=1e-6)
    field = VectorField(3, hidden=(8, 8), context_dim=2, rngs=nnx.Rngs(0))
    out = field(jnp.ones((4, 3)), jnp.linspace(0, 1, 4), jnp.ones((4, 2)))  # a time per row
    assert out.shape == (4, 3) and float(jnp.abs(out).max()) == 0.0


# far-tail points of the banana: x2 out to 5σ (x1 ≈ x2²/4 = 100), and beyond the curve
TAIL = np.array([[100.0, 20.0], [100.0, -20.0], [64.0, 16.0], [-10.0, 18.0], [150.0, 0.0]])


def _ffjord(trace, steps):
    """``nflax.fit`` (maximum likelihood through the solve) of a small cnf after ActNorm on
    the banana plus its far tail: the NaN guard would stop at the first non-finite gradient."""
    data = np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 123))
    data = np.concatenate([data, TAIL.astype(np.float32)])
    flow = nflax.flows.cnf(2, hidden=(16, 16), actnorm=True, trace=trace, rngs=nnx.Rngs(0))
    hist = nflax.fit(
        flow, data, key=jax.random.key(1), steps=steps, optimizer=optax.adam(1e-2), progress=False
    )
    return flow, hist, data


def test_maximum_likelihood_through_the_solver_with_finite_gradients_in_the_far_tail():
    """FFJORD: ``nflax.fit`` differentiates the NLL through the ODE solve (exact trace); the
    gradients stay finite with the banana's far-tail points in every batch."""
    flow, hist, data = _ffjord("exact", 25)
    assert hist.stop_reason == "steps" and np.all(np.isfinite(hist.loss))
    assert hist.loss[-5:].mean() < hist.loss[:5].mean() - 0.3, hist.loss
    assert np.all(np.isfinite(np.asarray(flow.log_prob(data)[-len(TAIL) :])))


@pytest.mark.slow
def test_maximum_likelihood_with_hutchinson_draws_fresh_noise_every_step():
    flow, hist, data = _ffjord("hutchinson", 40)
    assert hist.stop_reason == "steps" and np.all(np.isfinite(hist.loss))
    assert hist.loss[-5:].mean() < hist.loss[:5].mean() - 0.3, hist.loss
    cnf = flow.bijection.layers[-1]
    # one draw per training step, and one in the pass that initialised ActNorm
    assert int(cnf.noise_count[...]) == 41
    assert cnf.deterministic  # fit leaves the flow in evaluation mode: a fixed log_prob
    np.testing.assert_array_equal(flow.log_prob(data[:4]), flow.log_prob(data[:4]))
