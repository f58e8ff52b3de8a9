"""Rational-quadratic splines: tails, bin edges, monotonicity, gradients, spline layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from nflax.bijections import (
    Invert,
    MaskedAutoregressive,
    SplineCoupling,
    half_mask,
    num_spline_params,
    rq_spline_forward,
    rq_spline_inverse,
    rq_spline_log_derivative,
)
from nflax.bijections.splines import _knots
from nflax.bijections.transformers import SplineTransformer, split_params
from nflax.nets import MLP

K, B = 8, 3.0

# compiled once per input shape and reused by every test (eagerly, each of the spline's ops is
# compiled on its own for every new shape)
forward = jax.jit(rq_spline_forward)
inverse = jax.jit(rq_spline_inverse)
log_derivative = jax.jit(rq_spline_log_derivative)


def _params(key, scale=1.0, batch=()):
    k1, k2, k3 = jax.random.split(key, 3)
    return (
        scale * jax.random.normal(k1, (*batch, K)),
        scale * jax.random.normal(k2, (*batch, K)),
        scale * jax.random.normal(k3, (*batch, K - 1)),
    )


def _edges(params):
    """Knot x- and y-positions of a single (unbatched) spline."""
    w, h, _ = params
    return _knots(w, B, 1e-3)[0], _knots(h, B, 1e-3)[0]


def test_zero_parameters_are_the_identity():
    x = jnp.linspace(-5.0, 5.0, 101)
    y, ld = rq_spline_forward(x, *_params(jax.random.key(0), scale=0.0))
    np.testing.assert_allclose(y, x, atol=1e-5)
    np.testing.assert_allclose(ld, 0.0, atol=1e-6)


def test_identity_tails_outside_the_interval():
    params = _params(jax.random.key(1))
    x = jnp.array([-1e4, -50.0, -3.0001, 3.0001, 7.0, 1e4])
    y, ld = rq_spline_forward(x, *params)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ld, 0.0)
    x2, ld2 = rq_spline_inverse(x, *params)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(ld2, 0.0)


def test_monotone_onto_and_continuous():
    params = _params(jax.random.key(2), scale=1.5)
    x = jnp.linspace(-4.0, 4.0, 200_001)
    y, ld = forward(x, *params)
    assert np.all(np.diff(np.asarray(y)) >= 0)
    assert np.all(np.isfinite(ld))
    # [-B, B] onto [-B, B]: the boundary knots are fixed points
    yb, ldb = forward(jnp.array([-B, B]), *params)
    np.testing.assert_allclose(yb, [-B, B], atol=1e-6)
    # derivative 1 at the boundary, up to float32: the last bin's size comes from the softmax
    # (for narrow bins' relative precision), not from the pinned knots, so ξ(B) = 1 only to a
    # few ulps (3.3e-5 in log dy/dx with XLA's SSE4.2 kernels, under 1e-5 natively)
    np.testing.assert_allclose(ldb, 0.0, atol=1e-4)
    # continuous at every knot, in value and derivative: compare each knot with the float just
    # below it (which lies in the bin to the left)
    kx, ky = _edges(params)
    below = jnp.asarray(np.nextafter(np.asarray(kx), np.float32(-np.inf)))
    y_at, ld_at = forward(kx, *params)
    y_below, ld_below = forward(below, *params)
    np.testing.assert_allclose(y_at, ky, atol=1e-5)
    np.testing.assert_allclose(y_below, y_at, atol=1e-5)
    np.testing.assert_allclose(ld_below, ld_at, atol=1e-3)


@functools.cache
def _derivative(fn):
    """``dy/dx`` of the spline map ``fn`` at each input by autodiff, compiled (eagerly, every
    op of the vectorised backward pass would be dispatched and compiled on its own); the
    parameters are batched like the inputs or shared by all of them."""

    def one(v, *p):
        return jax.grad(lambda u: fn(u, *p)[0])(v)

    @jax.jit
    def derivative(x, *params):
        axes = tuple(0 if p.ndim > 1 else None for p in params)
        return jax.vmap(one, in_axes=(0, *axes))(x, *params)

    return derivative


def test_log_derivative_matches_autodiff():
    params = _params(jax.random.key(3), batch=(400,))
    x = jnp.linspace(-3.5, 3.5, 400)
    ld = log_derivative(x, *params)
    dy = _derivative(rq_spline_forward)(x, *params)
    np.testing.assert_allclose(ld, np.log(dy), atol=2e-4)
    y, _ = forward(x, *params)
    _, ld_inv = inverse(y, *params)
    dx = _derivative(rq_spline_inverse)(y, *params)
    np.testing.assert_allclose(ld_inv, np.log(dx), atol=2e-3)
    np.testing.assert_allclose(ld_inv, -ld, atol=2e-3)


def test_autodiff_derivative_at_knots_and_boundary():
    # Regression: jnp.clip halves the gradient at a tie, so an input exactly on ±B or on a knot
    # (ξ exactly 0 or 1) got autodiff dy/dx = g'(x)/2: a log 2 mismatch with the analytic log-det.
    params = _params(jax.random.key(7), scale=1.5)
    kx, ky = _edges(params)
    below = jnp.asarray(np.nextafter(np.asarray(kx), np.float32(-np.inf)))
    above = jnp.asarray(np.nextafter(np.asarray(kx), np.float32(np.inf)))
    x = jnp.concatenate([kx, below[1:], above[:-1]])
    ld = log_derivative(x, *params)
    dy = _derivative(rq_spline_forward)(x, *params)
    np.testing.assert_allclose(np.log(dy), ld, atol=1e-4)
    ld_inv = inverse(ky, *params)[1]
    dx = _derivative(rq_spline_inverse)(ky, *params)
    np.testing.assert_allclose(np.log(dx), ld_inv, atol=1e-3)


def test_round_trip_within_float32_conditioning():
    # A float32 inverse cannot beat ulp(B) / g'(x) (about 1e-3 where the spline is flat); check
    # the error against that, for parameters large enough to give very flat and very steep bins.
    x = jnp.linspace(-B, B, 4000)
    for scale in (0.5, 1.0, 2.0, 4.0):
        params = _params(jax.random.key(4), scale=scale, batch=(4000,))
        y, ld = forward(x, *params)
        x2, ld2 = inverse(y, *params)
        y, ld, x2, ld2 = map(np.asarray, (y, ld, x2, ld2))
        limit = 16 * np.spacing(np.float32(B)) * (np.exp(-ld) + 1.0)
        assert np.all(np.abs(x2 - np.asarray(x)) <= limit)
        well = ld > -2.0  # where the spline is not flat the log-dets agree tightly
        np.testing.assert_allclose(ld2[well], -ld[well], atol=1e-3)
    # moderate parameters, as after a little training: round trip to 1e-5
    params = _params(jax.random.key(5), scale=0.5, batch=(4000,))
    x2, _ = inverse(forward(x, *params)[0], *params)
    np.testing.assert_allclose(x2, x, atol=1e-5)


@functools.cache
def _grad_program(fn):
    loss = lambda v, p: jnp.sum(fn(v, *p)[0] + fn(v, *p)[1])  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _grads(fn, v, params):
    """Gradients of the sum of outputs and log-derivatives, as a training step takes them:
    compiled (eagerly, every op of the backward pass would be dispatched and compiled alone),
    one program per map for the 65 inputs every test here passes."""
    assert v.shape == (65,)
    return _grad_program(fn)(v, params)


@pytest.mark.parametrize("fn", [rq_spline_forward, rq_spline_inverse], ids=["fwd", "inv"])
def test_gradients_finite_at_edges_and_outside(fn):
    params = _params(jax.random.key(5))
    kx, ky = _edges(params)
    edges = kx if fn is rq_spline_forward else ky
    # the knots, far outside, just outside, the middle; then points inside, up to 65 inputs
    v = jnp.concatenate([edges, jnp.array([-1e6, -3.5, 3.5, 1e6, 0.0])])
    v = jnp.concatenate([v, jnp.linspace(-2.9, 2.9, 65 - len(v))])
    gv, gp = _grads(fn, v, params)
    assert np.all(np.isfinite(gv))
    for g in gp:
        assert np.all(np.isfinite(g))
    # outside the interval the parameters get no gradient and the input gradient is 1
    far = np.geomspace(3.01, 1e5, 30, dtype=np.float32)
    outside = jnp.asarray(np.concatenate([[-1e6, -3.5, 3.5, 1e6, 4.0], far, -far]), jnp.float32)
    gv, gp = _grads(fn, outside, params)
    np.testing.assert_allclose(gv, 1.0)
    for g in gp:
        np.testing.assert_array_equal(g, 0.0)


def test_gradients_finite_for_extreme_parameters():
    w, h, d = _params(jax.random.key(6), scale=30.0)
    x = jnp.linspace(-3.2, 3.2, 65)
    for fn in (rq_spline_forward, rq_spline_inverse):
        gv, gp = _grads(fn, x, (w, h, d))
        assert np.all(np.isfinite(gv)) and all(np.all(np.isfinite(g)) for g in gp)


def test_parameter_shape_errors():
    w, h, d = _params(jax.random.key(0))
    with pytest.raises(ValueError, match=r"derivatives \(\.\.\., K - 1\)"):
        rq_spline_forward(jnp.zeros(3), w, h, jnp.zeros(K))
    with pytest.raises(ValueError, match="bound must be > 0"):
        rq_spline_forward(jnp.zeros(3), w, h, d, bound=0.0)
    sizes = SplineTransformer(8).sizes
    with pytest.raises(
        ValueError, match=r"23 parameters per coordinate .*\(8, 8, 7\)\), received 22"
    ):
        split_params(jnp.zeros((3, 22)), sizes)
    assert num_spline_params(8) == 23 == SplineTransformer(8).num_params
    parts = split_params(jnp.arange(23.0)[None].repeat(3, 0), sizes)
    assert [p.shape for p in parts] == [(3, 8), (3, 8), (3, 7)]
    assert [float(p[0, 0]) for p in parts] == [0.0, 8.0, 16.0]  # widths, heights, derivatives


# -- spline layers ------------------------------------------------------------------------


def _spline_layers(dim):
    rngs = nnx.Rngs(0)
    net = MLP(dim, dim * num_spline_params(K), hidden=(8,), rngs=rngs)
    maf = MaskedAutoregressive(dim, transformer="spline", hidden=(8,), rngs=rngs)
    return {
        "coupling": SplineCoupling(half_mask(dim), net, bins=K, bound=B),
        "maf": maf,
        "iaf": Invert(MaskedAutoregressive(dim, transformer="spline", hidden=(8,), rngs=rngs)),
    }


@pytest.mark.parametrize("kind", ["coupling", "maf", "iaf"])
def test_layer_gradients_finite_far_outside_and_on_the_boundary(kind):
    layer = _spline_layers(3)[kind]
    perturb(layer, jax.random.key(1))
    x = jnp.array([[-1e5, 0.0, 1e5], [-B, B, 0.0], [2.0, -3.2, 3.2]])
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p, x, inverse):
        m = nnx.merge(graphdef, p, rest)
        z, ld = m.inverse(x) if inverse else m.forward(x)
        return jnp.sum(jnp.tanh(z)) + jnp.sum(ld)

    for inverse in (False, True):
        gp, gx = jax.grad(loss, argnums=(0, 1))(params, x, inverse)
        assert np.all(np.isfinite(gx))
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gp))


@pytest.mark.parametrize("kind", ["coupling", "maf", "iaf"])
def test_layers_start_at_identity(kind):
    layer = _spline_layers(2)[kind]
    x = 2.0 * jax.random.normal(jax.random.key(0), (5, 2))
    z, ld = layer.forward(x)
    np.testing.assert_allclose(z, x, atol=1e-5)
    np.testing.assert_allclose(ld, 0.0, atol=1e-5)


def test_spline_layer_errors():
    net = MLP(2, 5, hidden=(4,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"SplineCoupling: conditioner must output .* = 46"):
        SplineCoupling(half_mask(2), net).forward(jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="SplineCoupling: bins must be ≥ 2, received 1"):
        SplineCoupling(half_mask(2), net, bins=1)
    with pytest.raises(ValueError, match="SplineCoupling: bound must be > 0, received -1"):
        SplineCoupling(half_mask(2), net, bound=-1.0)
    with pytest.raises(ValueError, match="MaskedAutoregressive: transformer must be one of"):
        MaskedAutoregressive(2, transformer="cubic", rngs=nnx.Rngs(0))
