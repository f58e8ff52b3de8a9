"""One parametrized test of the whole bijection contract over ``registry.REGISTRY``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import jacobian_log_det, perturb
from registry import (  # noqa: E402
    CONDITIONAL,
    IDENTITY_AT,
    IMAGE_CONDITIONAL,
    IMAGE_REGISTRY,
    NO_GRADIENT,
    REGISTRY,
    SLOW,
    SLOW_CONDITIONAL,
    _coupling,
)

import nflax
from nflax.bijections import (
    AffineCoupling,
    Bijection,
    Chain,
    LeakyReLU,
    Stack,
)
from nflax.bijections.normalization import DataInit
from nflax.nets import MLP

DIMS = [1, 2, 5]


def _cases(table, slow):
    """(name, dim) for every entry of ``table`` and every dim; those in ``slow`` marked slow."""
    mark = lambda name, dim: pytest.mark.slow if (name, dim) in slow else ()  # noqa: E731
    return [pytest.param(n, d, marks=mark(n, d)) for n in sorted(table) for d in DIMS]


def _make(factory, dim, seed=0):
    b = factory(dim, nnx.Rngs(seed))
    perturb(b, jax.random.key(seed + 100))
    return b


def _event(shape):
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _inputs(shape, n=7, seed=1):
    """``n`` inputs of event shape ``shape`` (a dim, or a tuple such as ``(H, W, C)``)."""
    # Scale 2 so that LeakyReLU and tanh-bounded scales see both signs and large values.
    return 2.0 * jax.random.normal(jax.random.key(seed), (n, *_event(shape)))


def _wide(shape):
    """A wider batch for the gradient and "every layer moves" checks: after a few layers the
    batch drifts (at dim 1 a coupling is a constant shift), and a layer downstream that sees
    one sign only (LeakyReLU) would look dead on the round-trip inputs alone."""
    event = _event(shape)
    ramp = jnp.linspace(-12.0, 12.0, 9).reshape(9, *(1,) * len(event))
    return jnp.concatenate([_inputs(event), ramp * jnp.ones(event)])


def _contract_outputs(b, x, context=None, wide_context=None):
    """Everything the contract checks, computed in ONE compiled program (fast to test): the
    round trip and log-dets on ``x``, gradients and the trajectory on the wider batch.

    Data-dependent initialisation runs eagerly first; its state then enters as constants.
    """
    if any(getattr(m, "needs_data_init", False) for _, m in nnx.iter_graph(b)):
        b.forward(x, context)
    graphdef, frozen, params, rest = nnx.split(b, DataInit, nnx.Param, ...)
    event = tuple(b.event_shape)
    xw = _wide(event)

    def flat(fn):
        """``fn`` on one event, flattened in and out (the Jacobian of images and of
        shape-changing layers is that of the flattened map)."""
        return lambda v, *args: fn(v.reshape(event), *args).reshape(-1)

    @jax.jit
    def run(params, rest, x, c, xw, cw):
        def merged(p):
            return nnx.merge(graphdef, frozen, p, rest, copy=True)

        m = merged(params)
        z, ld = m.forward(x, c)
        x2, ld_inv = m.inverse(z, c)
        # The inverse's log-det needs no Jacobian of its own: with an exact round trip,
        # J_inverse(z) = J_forward(x)⁻¹, so checking ld against the Jacobian and
        # ld_inv = −ld covers it.
        rows = x.reshape(x.shape[0], -1)
        if c is None:
            jac_f = jacobian_log_det(flat(lambda v: m.forward(v)[0]), rows)
        else:
            jac_f = jacobian_log_det(flat(lambda v, ci: m.forward(v, ci)[0]), rows, c)
        z3, ld3 = m.forward(x.reshape(1, *x.shape), None if c is None else c[None])

        def nll(p):
            zp, ldp = merged(p).forward(xw, cw)
            return 0.5 * jnp.sum(zp**2) - jnp.sum(ldp), zp

        grads, zw = jax.grad(nll, has_aux=True)(params)
        traj = m.trajectory(xw, cw)
        out = dict(z=z, ld=ld, x2=x2, ld_inv=ld_inv, jac_f=jac_f, z3=z3, ld3=ld3)
        return out | dict(grads=grads, traj=traj, zw=zw)

    return run(params, rest, x, context, xw, wide_context)


def _check_contract(out, x, b):
    n, latent = x.shape[0], b.latent_shape
    assert out["z"].shape == (n, *latent) and out["ld"].shape == (n,)
    np.testing.assert_allclose(out["x2"], x, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["ld_inv"], -out["ld"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(out["ld"], out["jac_f"], atol=1e-4)
    # leading batch dims of any rank
    assert out["z3"].shape == (1, n, *latent) and out["ld3"].shape == (1, n)
    np.testing.assert_allclose(out["ld3"][0], out["ld"], atol=1e-5)


def _check_jit_equals_eager(b, out, x, context=None):
    # a few float32 ulps: jit fuses differently (with SSE4.2 kernels maf_affine_layer-5 gave
    # 9.3234243 against 9.3234215, 3 ulps)
    z_e, ld_e = b.forward(x, context)
    np.testing.assert_allclose(out["z"], z_e, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(out["ld"], ld_e, rtol=2e-6, atol=1e-5)


def _declared_dead(path, dim, conditional):
    return any(
        d == dim and not (only_unconditional and conditional) and path[-len(sfx) :] == sfx
        for d, only_unconditional, sfx in NO_GRADIENT
    )


def _check_gradients_per_layer(b, grads, dim, conditional=False):
    """Every parameter gets a finite, nonzero gradient, and so does every layer's slice of a
    ``Stack``'s stacked ``(L, …)`` parameters (one dead layer cannot hide among live ones).
    Parameters declared in ``registry.NO_GRADIENT`` are exempt from the nonzero part."""
    stacked = [tuple(p) + ("layer",) for p, m in nnx.iter_graph(b) if isinstance(m, Stack)]
    flat = list(nnx.to_flat_state(grads))
    assert flat, "bijection has no parameters"
    for path, g in flat:
        g = np.asarray(g[...])
        where = "/".join(map(str, path))
        assert np.all(np.isfinite(g)), f"{where}: non-finite gradient"
        if _declared_dead(tuple(path), dim, conditional):
            continue
        if any(path[: len(s)] == s for s in stacked):
            live = np.any(g.reshape(g.shape[0], -1) != 0, axis=1)
            dead = np.nonzero(~live)[0].tolist()
            assert not dead, f"{where}: layer(s) {dead} of the Stack get no gradient"
        else:
            assert np.any(g != 0), f"{where}: gets no gradient"


def _check_every_layer_moves(b, traj, dim):
    """Each elementary layer changes its input (an identity layer is a bug, unless declared)."""
    names = b.layer_names()
    assert len(traj) == len(names) + 1
    for i, name in enumerate(names):
        if np.shape(traj[i + 1]) != np.shape(traj[i]):
            continue  # a shape-changing layer (a squeeze) rearranges: not an identity layer
        if dim in IDENTITY_AT.get(name.removeprefix("Invert(").removesuffix(")"), ()):
            np.testing.assert_array_equal(traj[i + 1], traj[i])
            continue
        moved = float(np.max(np.abs(np.asarray(traj[i + 1]) - np.asarray(traj[i]))))
        assert moved > 1e-3, f"layer {i} ({name}) is the identity at dim {dim}"


@pytest.mark.parametrize("name, dim", _cases(REGISTRY, SLOW))
def test_contract(name, dim):
    """Round trip, log-det = log|det Jacobian|, inverse log-det, batch dims, jit = eager,
    gradients for every parameter and every layer of a Stack, every layer moves its input."""
    b = _make(REGISTRY[name], dim)
    assert isinstance(b, Bijection)
    x = _inputs(dim)
    out = _contract_outputs(b, x)
    _check_contract(out, x, b)
    _check_jit_equals_eager(b, out, x)
    _check_gradients_per_layer(b, out["grads"], dim)
    _check_every_layer_moves(b, out["traj"], dim)
    np.testing.assert_allclose(out["traj"][-1], out["zw"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, dim", _cases(CONDITIONAL, SLOW_CONDITIONAL))
def test_contract_with_context(name, dim):
    b = CONDITIONAL[name](dim, nnx.Rngs(0), 3)
    perturb(b, jax.random.key(5))
    x = _inputs(dim)
    c = jax.random.normal(jax.random.key(2), (7, 3))
    out = _contract_outputs(b, x, c, jax.random.normal(jax.random.key(3), (16, 3)))
    _check_contract(out, x, b)
    _check_jit_equals_eager(b, out, x, c)
    _check_gradients_per_layer(b, out["grads"], dim, conditional=True)
    _check_every_layer_moves(b, out["traj"], dim)
    graphdef, state = nnx.split(b)
    fwd = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).forward(x, c)[0])
    # the context matters
    assert not np.allclose(fwd(state, x, c + 1.0), out["z"])
    # a single context row broadcasts over the batch
    np.testing.assert_allclose(
        fwd(state, x, c[:1]), fwd(state, x, jnp.broadcast_to(c[:1], (7, 3))), atol=1e-6
    )
    with pytest.raises(ValueError, match="context"):
        b.forward(x)
    with pytest.raises(ValueError, match=r"context of shape \(\*batch, 3\)"):
        b.forward(x, c[:, :2])


# The whole flows at 4×4×2 take 10-20 s each to compile: slow (2×2×1 covers them fast).
# glow at 2×2×1 too (16 s): its layers are each in the registry, realnvp_image at 2×2×1 runs
SLOW_IMAGE_CASES = {("glow", (4, 4, 2)), ("glow", (2, 2, 1)), ("realnvp_image", (4, 4, 2))}
IMAGE_CASES = [
    pytest.param(
        (name, shape),
        id=f"{name}-{'x'.join(map(str, shape))}",
        marks=[pytest.mark.slow] if (name, shape) in SLOW_IMAGE_CASES else [],
    )
    for name, (_, shapes) in sorted(IMAGE_REGISTRY.items())
    for shape in shapes
]


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_contract(case):
    """The whole contract on images (H, W, C), for shape-changing layers too: the Jacobian is
    the flattened output's with respect to the flattened input."""
    name, shape = case
    b = IMAGE_REGISTRY[name][0](shape, nnx.Rngs(0))
    # noise 0.1, not 0.3: a 3×3 conv of width 8 sums 72 noisy weights per unit, and at 0.3 the
    # deep glow entry becomes so ill-conditioned that float32 loses the round trip (5e-4 at
    # |z| ~ 60 after one stack; exact in float64)
    perturb(b, jax.random.key(100), scale=0.1)
    x = _inputs(b.event_shape)
    out = _contract_outputs(b, x)
    _check_contract(out, x, b)
    _check_jit_equals_eager(b, out, x)
    _check_gradients_per_layer(b, out["grads"], b.event_shape[-1])
    _check_every_layer_moves(b, out["traj"], b.event_shape[-1])
    np.testing.assert_allclose(np.ravel(out["traj"][-1]), np.ravel(out["zw"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(IMAGE_CONDITIONAL))
def test_image_contract_with_context(name):
    b = IMAGE_CONDITIONAL[name]((4, 4, 2), nnx.Rngs(0), 3)
    perturb(b, jax.random.key(5))
    x = _inputs((4, 4, 2))
    c = jax.random.normal(jax.random.key(2), (7, 3))
    out = _contract_outputs(b, x, c, jax.random.normal(jax.random.key(3), (16, 3)))
    _check_contract(out, x, b)
    _check_gradients_per_layer(b, out["grads"], 2, conditional=True)
    assert not np.allclose(b.forward(x, c + 1.0)[0], out["z"])  # the context matters
    with pytest.raises(ValueError, match=r"context of shape \(\*batch, 3\)"):
        b.forward(x, c[:, :2])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_wrong_event_shape_is_a_clear_error(name):
    b = _make(REGISTRY[name], 2)
    with pytest.raises(
        ValueError, match=r"expected input of shape \(\*batch, 2\).*received shape \(7, 3\)"
    ):
        b.forward(jnp.zeros((7, 3)))
    with pytest.raises(ValueError, match=r"received shape \(7, 3\)"):
        b.inverse(jnp.zeros((7, 3)))


def test_trajectory_matches_layers():
    flow = nflax.flows.realnvp(2, num_layers=3, hidden=(8,), leaky_relu=True, rngs=nnx.Rngs(0))
    perturb(flow, jax.random.key(0))
    x = _inputs(2)
    traj = flow.trajectory(x)
    names = flow.layer_names()
    assert len(traj) == len(names) + 1 == 7
    assert names == ["AffineCoupling", "LeakyReLU"] * 3
    np.testing.assert_allclose(traj[0], x)
    np.testing.assert_allclose(traj[-1], flow.bijection.forward(x)[0], atol=1e-6)
    back = flow.bijection.inverse_trajectory(traj[-1])
    # the generating trajectory visits the same points in reverse order
    for a, b in zip(back, reversed(traj), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_stack_equals_chain():
    layers = [_coupling(2, nnx.Rngs(i), i % 2) for i in range(4)]
    for i, layer in enumerate(layers):
        perturb(layer, jax.random.key(i))
    chain_z, chain_ld = Chain(layers).forward(_inputs(2))
    stack_z, stack_ld = Stack(layers).forward(_inputs(2))
    np.testing.assert_allclose(stack_z, chain_z, atol=1e-6)
    np.testing.assert_allclose(stack_ld, chain_ld, atol=1e-5)


def test_stack_unroll_auto_unrolls_shallow_stacks_only_and_computes_the_same():
    def stack(n, **kw):
        return Stack([_coupling(2, nnx.Rngs(i), i % 2) for i in range(n)], **kw)

    limit = Stack.AUTO_UNROLL_LAYERS
    assert stack(limit).unroll == limit and stack(limit + 1).unroll == 1  # "auto", the default
    assert stack(3, unroll=True).unroll == 3 and stack(3, unroll=False).unroll == 1
    assert stack(4, unroll=2).unroll == 2
    for bad in ("always", 0):
        with pytest.raises(ValueError, match="unroll must be 'auto', a bool or an int"):
            stack(2, unroll=bad)
    scanned, unrolled = stack(4, unroll=False), stack(4, unroll=True)
    perturb(scanned, jax.random.key(0))
    nnx.update(unrolled, nnx.state(scanned))  # the same parameters, another compiled program
    for a, b in zip(scanned.forward(_inputs(2)), unrolled.forward(_inputs(2)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_stack_rejects_heterogeneous_layers():
    with pytest.raises(ValueError, match="differs in structure"):
        Stack([LeakyReLU(2), _coupling(2, nnx.Rngs(0))])


def test_leaky_relu_tutorial_init():
    b = LeakyReLU(2)
    assert float(jax.nn.sigmoid(b.a[...])) == pytest.approx(0.7310586)
    z, ld = b.forward(jnp.array([[-1.0, 2.0]]))
    np.testing.assert_allclose(z, [[-0.7310586, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(ld, [np.log(0.7310586)], rtol=1e-6)


def test_coupling_starts_at_identity_and_bounds_scale():
    b = _coupling(2, nnx.Rngs(0))
    x = _inputs(2)
    z, ld = b.forward(x)
    np.testing.assert_allclose(z, x)
    np.testing.assert_allclose(ld, 0.0)
    # |s| ≤ e^c: with huge conditioner outputs the per-dimension log-scale stays within ±1
    perturb(b, jax.random.key(0), scale=50.0)
    nnx.update(b, {"c": jnp.zeros(2)})
    _, ld = b.forward(100 * x)
    assert np.all(np.abs(ld) <= 1.0 + 1e-6)


def test_bad_masks_and_chains():
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling([0.5, 1.0], MLP(2, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="event shape"):
        Chain([LeakyReLU(2), LeakyReLU(3)])
    with pytest.raises(ValueError, match="empty"):
        Chain([])
