"""MADE: the autoregressive property; MaskedAutoregressive (MAF) and Invert of it (IAF)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax.bijections import Invert, MaskedAutoregressive
from nflax.nets import MADE, MaskedLinear, made_degrees


def _jacobian(net, x, context=None):
    """``∂ out[i, k] / ∂ x[j]`` at one point, shape ``(d, num_params, d)``."""
    return jax.jacobian(lambda v: net(v, context))(x)


@pytest.mark.parametrize(
    "dim, hidden, order",
    [(1, (8,), None), (2, (8,), None), (5, (16, 16), None), (5, (16,), [3, 1, 5, 2, 4])],
)
def test_made_is_autoregressive_in_degree_order(dim, hidden, order):
    net = MADE(dim, 3, hidden=hidden, order=order, rngs=nnx.Rngs(0))
    perturb(net, jax.random.key(1), scale=0.5)
    degrees = np.asarray(order if order is not None else range(1, dim + 1))
    np.testing.assert_array_equal(net.degrees[...], degrees)
    allowed = degrees[:, None] > degrees[None, :]  # output i may depend on input j
    jacobian = jax.jit(lambda x: _jacobian(net, x))  # one compile for the three points
    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (dim,))
        jac = np.abs(np.asarray(jacobian(x))).max(axis=1)  # (d, d)
        # strictly triangular in the degree order: no dependence where it is not allowed ...
        np.testing.assert_array_equal(jac[~allowed], 0.0)
        # ... and (with enough hidden units) dependence everywhere it is allowed
        assert np.all(jac[allowed] > 0)


@pytest.mark.parametrize("dim", [1, 3])
def test_made_context_reaches_every_output(dim):
    net = MADE(dim, 2, hidden=(8,), context_dim=2, rngs=nnx.Rngs(0))
    perturb(net, jax.random.key(0), scale=0.5)
    x = jax.random.normal(jax.random.key(1), (dim,))
    c = jnp.array([0.3, -0.7])
    jc = np.abs(np.asarray(jax.jit(jax.jacobian(lambda c: net(x, c)))(c))).max(axis=(1, 2))
    assert np.all(jc > 0), "some output ignores the context"
    jx = np.abs(np.asarray(jax.jit(lambda x, c: _jacobian(net, x, c))(x, c))).max(axis=1)
    assert np.all(np.triu(jx) == 0)  # still autoregressive


def test_made_shapes_init_and_errors():
    net = MADE(3, 4, hidden=(8,), rngs=nnx.Rngs(0))
    out = net(jnp.ones((2, 5, 3)))
    assert out.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer
    assert [d.tolist() for d in made_degrees(3, (4,))] == [[1, 2, 3], [1, 2, 1, 2]]
    assert made_degrees(3, (4,), context=True)[1].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"MADE: order must be a permutation of 1\.\.3"):
        MADE(3, 2, order=[1, 1, 2], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"MADE: expected input of shape \(\*batch, 3\)"):
        net(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="MADE: this net is conditional"):
        MADE(3, 2, hidden=(4,), context_dim=1, rngs=nnx.Rngs(0))(jnp.ones(3))


@pytest.mark.parametrize("transformer", ["affine", "spline"])
def test_maf_inverse_is_exact_and_iaf_swaps_directions(transformer):
    maf = MaskedAutoregressive(4, transformer=transformer, hidden=(8,), rngs=nnx.Rngs(0))
    perturb(maf, jax.random.key(3))
    x = jax.random.normal(jax.random.key(0), (6, 4))
    z, ld = maf.forward(x)
    # the sequential inverse recovers x exactly (to float error) after dim passes
    x2, ld_inv = maf.inverse(z)
    np.testing.assert_allclose(x2, x, atol=1e-5)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-4)
    # the layer's Jacobian is triangular: z_i depends on x_j only for j ≤ i
    jac = np.abs(np.asarray(jax.jit(jax.jacobian(lambda v: maf.forward(v)[0]))(x[0])))
    np.testing.assert_array_equal(np.triu(jac, 1), 0.0)
    iaf = Invert(maf)
    np.testing.assert_allclose(iaf.forward(z)[0], x2, atol=1e-6)
    np.testing.assert_allclose(iaf.inverse(x)[0], z, atol=1e-6)


def test_maf_affine_log_scale_is_bounded():
    maf = MaskedAutoregressive(2, hidden=(8,), rngs=nnx.Rngs(0))
    perturb(maf, jax.random.key(0), scale=50.0)
    nnx.update(maf, {"c": jnp.zeros(2)})
    _, ld = maf.forward(100 * jax.random.normal(jax.random.key(1), (9, 2)))
    assert np.all(np.abs(ld) <= 2.0 + 1e-5)  # |α_i| ≤ e^{c_i} = 1 per coordinate


def test_maf_errors():
    with pytest.raises(ValueError, match="MaskedAutoregressive: dim must be ≥ 1, received 0"):
        MaskedAutoregressive(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MaskedAutoregressive: bins must be ≥ 2"):
        MaskedAutoregressive(2, transformer="spline", bins=1, rngs=nnx.Rngs(0))


# -- constructors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("nice", {}),
        ("maf", {}),
        ("iaf", {}),
        ("nsf", {}),
        ("nsf", {"variant": "autoregressive", "bins": 4, "bound": 4.0}),
    ],
)
@pytest.mark.parametrize("dim", [1, 2])
def test_constructors_rebuild_from_spec(name, kwargs, dim):
    flow = nflax.flows.build(name, dim=dim, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0), **kwargs)
    spec = json.loads(flow.spec)
    assert spec["constructor"] == name
    again = nflax.flows.build(name, **spec["kwargs"], rngs=nnx.Rngs(0))
    assert again.spec == flow.spec
    assert nnx.graphdef(again) == nnx.graphdef(flow)
    x = jax.random.normal(jax.random.key(0), (4, dim))
    np.testing.assert_allclose(again.log_prob(x), flow.log_prob(x), atol=1e-6)
    # every flow starts as the identity map (zero-initialised conditioners)
    z, ld = flow.bijection.forward(x)
    np.testing.assert_allclose(z, x, atol=1e-5)
    np.testing.assert_allclose(ld, 0.0, atol=1e-5)


def test_autoregressive_flows_reverse_the_order_between_layers():
    flow = nflax.flows.maf(3, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    degrees = np.asarray(flow.bijection.layer.made.degrees[...])
    np.testing.assert_array_equal(degrees, [[1, 2, 3], [3, 2, 1]])


def test_constructor_errors():
    with pytest.raises(ValueError, match="nsf: variant must be 'coupling' or 'autoregressive'"):
        nflax.flows.nsf(2, variant="both", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="maf: dim must be ≥ 1, received 0"):
        nflax.flows.maf(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="iaf: context_dim must be ≥ 1 or None, received 0"):
        nflax.flows.iaf(2, context_dim=0, rngs=nnx.Rngs(0))


def test_masked_linear_multiplies_the_kernel_by_its_mask():
    mask = np.array([[1, 0, 1], [1, 1, 0]], np.float32)  # (in, out)
    layer = MaskedLinear(mask, rngs=nnx.Rngs(0))
    perturb(layer, jax.random.key(2), scale=0.5)
    x = jnp.array([[1.0, 2.0], [-0.5, 3.0]])
    want = x @ (layer.kernel[...] * mask) + layer.bias[...]
    np.testing.assert_allclose(layer(x), want, rtol=1e-6)
    # output 1 never sees input 0, output 2 never sees input 1
    jac = np.asarray(jax.jacobian(lambda v: layer(v))(x[0]))  # (out, in)
    np.testing.assert_array_equal(jac != 0, mask.T.astype(bool))
    assert "mask" not in nnx.state(layer, nnx.Param)  # a Buffer: never trained
    zero = MaskedLinear(mask, zero_init=True, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(zero(x), 0.0)
    with pytest.raises(ValueError, match=r"MaskedLinear: mask must be 2D \(in, out\)"):
        MaskedLinear(np.ones(3), rngs=nnx.Rngs(0))


def test_get_activation_by_name_and_the_cli_agrees():
    from nflax import cli
    from nflax.nets import ACTIVATIONS, get_activation

    x = jnp.array([-2.0, 0.5, 3.0])
    want = {
        "tanh": np.tanh(x),
        "silu": x / (1 + np.exp(-x)),
        "gelu": jax.nn.gelu(x),
        "elu": np.where(x > 0, x, np.expm1(x)),
        "relu": np.maximum(x, 0),
        "softplus": np.log1p(np.exp(x)),
    }
    assert list(ACTIVATIONS) == list(want) == list(cli.ACTIVATIONS)  # the flag's choices too
    for name, values in want.items():
        np.testing.assert_allclose(get_activation(name)(x), values, rtol=1e-6)
    assert get_activation(jnp.sin) is jnp.sin  # a function is taken as it is
    with pytest.raises(ValueError, match="realnvp: unknown activation 'swish'; known: tanh, silu"):
        get_activation("swish", "realnvp")
