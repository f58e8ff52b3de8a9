"""Elementwise transformers, shared by coupling and autoregressive layers (the layers' contract
itself: test_bijections)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from nflax.bijections import (
    AdditiveCoupling,
    AdditiveTransformer,
    AffineCoupling,
    AffineTransformer,
    Coupling,
    MaskedAutoregressive,
    SplineCoupling,
    SplineTransformer,
    Stack,
    Transformer,
    half_mask,
)
from nflax.bijections.transformers import TRANSFORMERS, get_transformer, split_params
from nflax.nets import MLP

CASES = {
    "affine": AffineTransformer(),
    "additive": AdditiveTransformer(),
    "spline": SplineTransformer(bins=4, bound=2.0),
}


def _state(transformer, dim):
    return {k: v[...] + 0.3 for k, v in transformer.variables(dim).items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformer_round_trip_and_log_derivative(name):
    t = CASES[name]
    dim, batch = 3, 5
    # moderate parameters: float32 round trips lose about ulp / τ' (test_splines has the rest)
    theta = 0.5 * jax.random.normal(jax.random.key(0), (batch, dim, t.num_params))
    params = split_params(theta, t.sizes)
    state = _state(t, dim)
    x = 1.5 * jax.random.normal(jax.random.key(1), (batch, dim))
    z, ld = t.forward(x, params, **state)
    assert z.shape == ld.shape == (batch, dim)
    back, ld_inv = t.inverse(z, params, **state)
    np.testing.assert_allclose(back, x, atol=1e-5)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-5)
    # log τ'(x) is the derivative of the map, coordinate by coordinate (elementwise)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(t.forward(v, params, **state)[0])))(x)
    np.testing.assert_allclose(ld, jnp.log(grad), atol=1e-5)
    # all-zero parameters: the identity
    zero = split_params(jnp.zeros_like(theta), t.sizes)
    z0, ld0 = t.forward(x, zero, **{k: v - 0.3 for k, v in state.items()})
    np.testing.assert_allclose(z0, x, atol=1e-5)
    np.testing.assert_allclose(ld0, 0.0, atol=1e-6)


def test_affine_transformer_formula_and_bound():
    t = AffineTransformer()
    assert t.sizes == (1, 1) and t.num_params == 2 and list(t.variables(3)) == ["c"]
    x = jnp.array([3.0, -1.0])
    mu, raw, c = jnp.array([1.0, 0.5]), jnp.array([0.4, 40.0]), jnp.array([0.0, np.log(2.0)])
    z, ld = t.forward(x, (mu[:, None], raw[:, None]), c=c)
    alpha = np.exp(c) * np.tanh(raw / np.exp(c))  # |α| ≤ e^c: the second one saturates at 2
    np.testing.assert_allclose(alpha[1], 2.0, rtol=1e-6)
    np.testing.assert_allclose(z, (x - mu) * np.exp(-alpha), rtol=1e-6)
    np.testing.assert_allclose(ld, -alpha, rtol=1e-6)


def test_additive_and_spline_transformers():
    z, ld = AdditiveTransformer().forward(jnp.array([2.0, -1.0]), (jnp.array([[0.5], [1.0]]),))
    assert z.tolist() == [1.5, -2.0] and ld.tolist() == [0.0, 0.0]
    spline = SplineTransformer(bins=5, bound=2.0)
    assert spline.sizes == (5, 5, 4) and spline.num_params == 14
    params = split_params(jax.random.normal(jax.random.key(0), (2, 14)), spline.sizes)
    y, _ = spline.forward(jnp.array([-7.0, 7.0]), params)
    assert y.tolist() == [-7.0, 7.0]  # the identity outside [-bound, bound]
    with pytest.raises(ValueError, match="SplineTransformer: bins must be ≥ 2, received 1"):
        SplineTransformer(bins=1)
    with pytest.raises(ValueError, match="nsf: bound must be > 0, received 0"):
        SplineTransformer(bound=0, who="nsf")


def test_transformers_compare_by_value_so_layers_stack():
    assert SplineTransformer(4, 2.0) == SplineTransformer(4, 2) != SplineTransformer(5, 2.0)
    assert hash(AffineTransformer()) == hash(AffineTransformer())
    assert AffineTransformer() != AdditiveTransformer()
    assert repr(SplineTransformer(4)) == "SplineTransformer(bins=4, bound=3.0)"
    rngs = nnx.Rngs(0)
    layers = [
        MaskedAutoregressive(2, transformer=SplineTransformer(4), hidden=(4,), rngs=rngs)
        for _ in range(3)
    ]
    assert Stack(layers).num_layers == 3  # separate transformer objects, one structure


def test_get_transformer_by_name_or_object():
    assert set(TRANSFORMERS) >= {"affine", "additive", "spline"}
    assert get_transformer("spline", bins=4, bound=2.0) == SplineTransformer(4, 2.0)
    assert get_transformer("affine", bins=4) == AffineTransformer()  # options it lacks: ignored
    t = AdditiveTransformer()
    assert get_transformer(t) is t
    with pytest.raises(ValueError, match="MaskedAutoregressive: bins must be ≥ 2"):
        get_transformer("spline", "MaskedAutoregressive", bins=1)
    with pytest.raises(ValueError, match=r"Coupling: transformer must be one of \('affine'"):
        get_transformer("cubic", "Coupling")


def test_coupling_takes_any_transformer():
    """Coupling with a transformer object equals the dedicated class, and the masked
    coordinates pass through unchanged."""
    mask = half_mask(4)
    net = MLP(4, 4 * 11, hidden=(8,), rngs=nnx.Rngs(0))
    perturb(net, jax.random.key(0))
    generic = Coupling(mask, net, SplineTransformer(bins=4))
    named = Coupling(mask, net, "spline", context_dim=None)  # by name: the default spline
    dedicated = SplineCoupling(mask, net, bins=4)
    x = 2.0 * jax.random.normal(jax.random.key(1), (6, 4))
    z, ld = generic.forward(x)
    np.testing.assert_array_equal(z, dedicated.forward(x)[0])
    np.testing.assert_array_equal(ld, dedicated.forward(x)[1])
    np.testing.assert_array_equal(z[:, mask == 1], x[:, mask == 1])
    assert not np.allclose(z[:, mask == 0], x[:, mask == 0])
    assert named.transformer == SplineTransformer(bins=8)
    with pytest.raises(ValueError, match=r"Coupling: conditioner must output dim\*23"):
        named.forward(x)


def test_additive_is_the_affine_without_scale():
    """AdditiveCoupling = Coupling(additive) with μ = −t; MAF takes the additive too."""
    mask = half_mask(3)
    net = MLP(3, 3, hidden=(8,), rngs=nnx.Rngs(0))
    perturb(net, jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (4, 3))
    z, _ = AdditiveCoupling(mask, net).forward(x)
    t = net(x * mask)
    np.testing.assert_allclose(z, x + (1 - mask) * t, rtol=1e-6)
    maf = MaskedAutoregressive(3, transformer="additive", hidden=(8,), rngs=nnx.Rngs(0))
    perturb(maf, jax.random.key(4))
    z, ld = maf.forward(x)
    np.testing.assert_array_equal(ld, 0.0)  # volume preserving
    np.testing.assert_allclose(maf.inverse(z)[0], x, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: AffineCoupling(m, MLP(2, 4, rngs=nnx.Rngs(0))),
        lambda m: AdditiveCoupling(m, MLP(2, 2, rngs=nnx.Rngs(0))),
        lambda m: SplineCoupling(m, MLP(2, 46, rngs=nnx.Rngs(0))),
        lambda m: Coupling(m, MLP(2, 4, rngs=nnx.Rngs(0)), "affine"),
    ],
    ids=["affine", "additive", "spline", "generic"],
)
def test_an_all_ones_mask_is_rejected(make):
    with pytest.raises(ValueError, match=r"Coupling: mask \[1\.0, 1\.0\] is all ones"):
        make([1.0, 1.0])
    assert make([0.0, 0.0]).event_shape == (2,)  # all zeros: conditioned on the context only


def test_parameter_paths_stay_where_they_were():
    """The transformer's variables live on the layer: checkpoints keep their paths."""
    rngs = nnx.Rngs(0)
    coupling = AffineCoupling(half_mask(2), MLP(2, 4, hidden=(4,), rngs=rngs))
    maf = MaskedAutoregressive(2, hidden=(4,), rngs=rngs)
    spline = MaskedAutoregressive(2, transformer="spline", hidden=(4,), rngs=rngs)
    top = {name: {p[0] for p, _ in nnx.to_flat_state(nnx.state(m))} for name, m in
           [("coupling", coupling), ("maf", maf), ("spline", spline)]}  # fmt: skip
    assert top == {
        "coupling": {"c", "conditioner", "mask"},
        "maf": {"c", "made"},
        "spline": {"made"},
    }


class _Cubic(Transformer):
    """A test transformer: ``z = x + softplus(a)·x³``, monotone, no closed-form inverse
    needed beyond bisection; registered by name."""

    name = "_cubic_for_tests"
    sizes = (1,)

    def forward(self, x, params):
        a = jax.nn.softplus(params[0][..., 0])
        return x + a * x**3, jnp.log1p(3 * a * x**2)

    def inverse(self, z, params):
        a = jax.nn.softplus(params[0][..., 0])
        lo, hi = -jnp.abs(z) - 1, jnp.abs(z) + 1
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (
                jnp.where(mid + a * mid**3 < z, mid, lo),
                jnp.where(mid + a * mid**3 < z, hi, mid),
            )
        x = (lo + hi) / 2
        return x, -jnp.log1p(3 * a * x**2)


def test_a_new_transformer_is_one_class():
    cubic = _Cubic()
    assert isinstance(cubic, Transformer) and cubic.num_params == 1 and cubic.variables(2) == {}
    assert TRANSFORMERS["_cubic_for_tests"] is _Cubic  # registered by its name
    try:
        maf = MaskedAutoregressive(2, transformer="_cubic_for_tests", hidden=(8,), rngs=nnx.Rngs(0))
        perturb(maf, jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (5, 2))
        z, ld = maf.forward(x)
        jac = jax.jit(jax.vmap(jax.jacfwd(lambda v: maf.forward(v)[0])))(x)
        np.testing.assert_allclose(ld, jnp.linalg.slogdet(jac)[1], atol=1e-5)
        np.testing.assert_allclose(maf.inverse(z)[0], x, atol=1e-5)
        coupling = Coupling(half_mask(2), MLP(2, 2, hidden=(4,), rngs=nnx.Rngs(0)), cubic)
        assert coupling.forward(x)[0].shape == (5, 2)
    finally:
        del TRANSFORMERS["_cubic_for_tests"]
