"""Layer-specific checks for the linear, elementwise and planar/radial families.

The shared contract (round trip, log-det vs Jacobian, gradients) runs on every layer through
``registry.REGISTRY``; here: natural input domains, clamping, constraints and initialisation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import jacobian_log_det, perturb

import nflax
from nflax.bijections import (
    Affine,
    Invert,
    Logit,
    LULinear,
    Permute,
    Planar,
    Radial,
    Reverse,
    Sigmoid,
    Tanh,
)


def _check_exact(b, x, atol=1e-5):
    """Round trip, log-det vs Jacobian (both directions), inverse log-det = −forward."""
    z, ld = b.forward(x)
    x2, ld_inv = b.inverse(z)
    np.testing.assert_allclose(x2, x, atol=atol)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-4)
    want, want_inv = jax.jit(lambda x, z: _jacobian_log_dets(b, x, z))(x, z)
    np.testing.assert_allclose(ld, want, atol=1e-4)
    np.testing.assert_allclose(ld_inv, want_inv, atol=1e-4)


def _jacobian_log_dets(b, x, z):
    """``log|det|`` of the forward Jacobian at ``x`` and of the inverse one at ``z`` (compiled
    by the caller: eagerly, every op of their vectorised passes is compiled on its own)."""
    fwd = jacobian_log_det(lambda v: b.forward(v)[0], x)
    return fwd, jacobian_log_det(lambda v: b.inverse(v)[0], z)


# -- linear ----------------------------------------------------------------------------------


def test_permute_and_reverse():
    x = jnp.arange(12.0).reshape(3, 4)
    p = Permute(4, permutation=[2, 0, 3, 1])
    np.testing.assert_array_equal(p.forward(x)[0], x[:, jnp.array([2, 0, 3, 1])])
    np.testing.assert_array_equal(p.inverse(p.forward(x)[0])[0], x)
    r = Reverse(4)
    np.testing.assert_array_equal(r.forward(x)[0], x[:, ::-1])
    np.testing.assert_array_equal(r.forward(x)[1], jnp.zeros(3))
    # a key draws the permutation; the same key gives the same one
    a, b = Permute(6, key=jax.random.key(0)), Permute(6, key=jax.random.key(0))
    np.testing.assert_array_equal(a.permutation[...], b.permutation[...])
    assert not jax.tree.leaves(nnx.state(a, nnx.Param))  # a Buffer, not trained


def test_permute_errors():
    with pytest.raises(ValueError, match=r"Permute: expected a permutation of range\(3\)"):
        Permute(3, permutation=[0, 0, 1])
    with pytest.raises(ValueError, match=r"Permute: expected a permutation.*shape \(2,\)"):
        Permute(3, permutation=[0, 1])
    with pytest.raises(ValueError, match="Permute: give exactly one of key= .* or permutation="):
        Permute(3)
    with pytest.raises(ValueError, match="Reverse: dim must be a positive integer"):
        Reverse(0)


def test_lu_linear_identity_at_init_and_log_det_matches_slogdet():
    x = jax.random.normal(jax.random.key(0), (5, 4))
    layer = LULinear(4, rngs=nnx.Rngs(0))
    z, ld = layer.forward(x)
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(ld, 0.0)
    layer = LULinear(4, rngs=nnx.Rngs(0), permutation=[1, 3, 0, 2])
    perturb(layer, jax.random.key(1), scale=0.5)
    w = layer.weight()
    np.testing.assert_allclose(layer.forward(x)[1], jnp.linalg.slogdet(w)[1], atol=1e-5)
    np.testing.assert_allclose(layer.forward(x)[0], x @ w.T + layer.bias[...], atol=1e-5)
    # leading batch dims of any rank go through the triangular solves
    z3 = layer.forward(x.reshape(5, 1, 4))[0]
    np.testing.assert_allclose(layer.inverse(z3)[0], x.reshape(5, 1, 4), atol=1e-5)
    with pytest.raises(ValueError, match="LULinear: permutation must be"):
        LULinear(3, permutation="shuffled")
    with pytest.raises(ValueError, match="LULinear: permutation='random' needs rngs"):
        LULinear(3, permutation="random")


# -- elementwise -----------------------------------------------------------------------------


def test_affine_formula_and_errors():
    layer = Affine(2, loc=jnp.array([1.0, -1.0]), log_scale=jnp.array([0.0, jnp.log(2.0)]))
    z, ld = layer.forward(jnp.array([[3.0, 3.0]]))
    np.testing.assert_allclose(z, [[2.0, 2.0]])
    np.testing.assert_allclose(ld, [-np.log(2.0)], rtol=1e-6)
    with pytest.raises(ValueError, match=r"Affine: loc must broadcast to the event shape \(2,\)"):
        Affine(2, loc=jnp.zeros(3))
    with pytest.raises(ValueError, match="Affine: log_scale must be finite"):
        Affine(2, log_scale=jnp.nan)


def test_squashing_layers_on_their_natural_domains():
    x = 2.0 * jax.random.normal(jax.random.key(0), (7, 3))
    _check_exact(Tanh(3), x / 2)
    _check_exact(Sigmoid(3), x)
    _check_exact(Logit(3), jax.random.uniform(jax.random.key(1), (7, 3), minval=0.02, maxval=0.98))
    # Tanh/Sigmoid forward is stable far out (the log-det uses softplus forms)
    for layer in (Tanh(1), Sigmoid(1)):
        z, ld = layer.forward(jnp.array([[-60.0], [60.0]]))
        assert np.all(np.isfinite(z)) and np.all(np.isfinite(ld))
    # Invert(Tanh) maps bounded data to the real line
    _check_exact(Invert(Tanh(3)), jnp.tanh(x / 2))


@pytest.mark.parametrize(
    "layer, direction, bad",
    [
        (Tanh(2), "inverse", [[-1.0, 1.0], [-3.0, 2.0]]),
        (Sigmoid(2), "inverse", [[0.0, 1.0], [-1.0, 2.0]]),
        (Logit(2), "forward", [[0.0, 1.0], [-1.0, 2.0]]),
    ],
)
def test_out_of_domain_inputs_are_clamped_to_finite_values_and_gradients(layer, direction, bad):
    bad = jnp.array(bad)
    fn = getattr(layer, direction)
    out, ld = fn(bad)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(ld))
    grad = jax.grad(lambda v: jnp.sum(fn(v)[0]) + jnp.sum(fn(v)[1]))(bad)
    assert np.all(np.isfinite(grad))


# -- planar and radial -----------------------------------------------------------------------


def test_planar_constraint_holds_for_any_parameters():
    layer = Planar(3, rngs=nnx.Rngs(0))
    nnx.update(layer, {"u": jnp.array([-5.0, 0.0, 0.0]), "w": jnp.array([4.0, 0.0, 0.0])})
    _, wu_hat, softplus_wu = layer._u_hat()
    # wᵀu = −20: wᵀû = −1 + 2e-9 rounds to −1 in float32, yet the slope stays positive
    assert float(softplus_wu) > 0 and float(wu_hat) >= -1.0
    x = 3.0 * jax.random.normal(jax.random.key(0), (16, 3))
    _check_exact(layer, x, atol=1e-4)
    # w = 0 does not divide by zero
    nnx.update(layer, {"w": jnp.zeros(3)})
    z, ld = layer.forward(x)
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(ld))


def test_planar_inverse_gradients_match_finite_differences():
    layer = Planar(2, rngs=nnx.Rngs(0))
    perturb(layer, jax.random.key(3), scale=1.0)
    z = jax.random.normal(jax.random.key(4), (5, 2))
    graphdef, params = nnx.split(layer)

    def loss(p):
        x, ld = nnx.merge(graphdef, p).inverse(z)
        return jnp.sum(jnp.sin(x)) + jnp.sum(ld)

    loss = jax.jit(loss)  # one compile for the gradient and the ten shifted losses below
    grads = jax.jit(jax.grad(loss))(params)
    eps = 1e-2
    for path in [("b",), ("u",), ("w",)]:
        g = np.asarray(grads[path[0]][...]).reshape(-1)
        for i in range(g.size):

            def shifted(h, name=path[0], i=i):
                v = params[name][...].reshape(-1).at[i].add(h).reshape(params[name][...].shape)
                p = jax.tree.map(lambda a: a, params)
                p[name] = nnx.Param(v)
                return float(loss(p))

            fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
            assert g[i] == pytest.approx(fd, rel=2e-2, abs=2e-3)


def test_radial_constraint_and_far_points():
    layer = Radial(2, rngs=nnx.Rngs(0))
    # β̃ very negative: β → −α, the most contracting allowed map. x₀ = 0 so that z − x₀ is
    # exact (with |x₀| ≈ 1 its float32 rounding alone moves a contracted z by ~1e-7).
    nnx.update(
        layer,
        {"x0": jnp.zeros(2), "alpha_raw": jnp.asarray(0.5), "beta_raw": jnp.asarray(-8.0)},
    )
    alpha, beta = layer._alpha_beta()
    assert float(beta) > -float(alpha)
    x = layer.x0[...] + jnp.array([[1e-3, 0.0], [0.5, -0.2], [30.0, 40.0]])
    _check_exact(layer, x, atol=1e-4)
    # the centre itself: finite values and gradients
    z, ld = layer.forward(layer.x0[...][None])
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(ld))
    g = jax.grad(lambda v: jnp.sum(layer.forward(v)[1]))(layer.x0[...][None])
    assert np.all(np.isfinite(g))


# Each constructor's spec records every argument and rebuilds an equal flow: test_checkpoint.py
# (test_save_load_round_trip_is_bit_exact with the defaults, and
# test_non_default_arguments_round_trip_bit_for_bit with every argument away from its default).


def test_planar_flow_samples_and_densities_agree():
    flow = nflax.flows.planar(2, num_layers=4, rngs=nnx.Rngs(0))
    perturb(flow, jax.random.key(0), scale=0.5)
    x, lp = flow.sample_and_log_prob(jax.random.key(1), 64)
    np.testing.assert_allclose(lp, flow.log_prob(x), atol=1e-4)
    spec = json.loads(nflax.flows.build("planar", dim=2, num_layers=2, rngs=nnx.Rngs(0)).spec)
    assert spec == {
        "constructor": "planar",
        "kwargs": {"dim": 2, "num_layers": 2, "context_dim": None, "embedding": None},
    }
    # the classical (VI) direction: closed-form sampling through Invert
    vi = Invert(Planar(2, rngs=nnx.Rngs(1)))
    _check_exact(vi, jax.random.normal(jax.random.key(2), (5, 2)), atol=1e-4)
