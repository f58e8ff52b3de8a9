"""One parametrized test of the whole bijection contract over ``registry.REGISTRY``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb
from registry import (  # noqa: E402
    CONDITIONAL,
    IMAGE_CONDITIONAL,
    IMAGE_REGISTRY,
    REGISTRY,
    SLOW,
    SLOW_CONDITIONAL,
    _coupling,
    exceptions,
)

import nflax
from nflax.bijections import (
    AffineCoupling,
    Bijection,
    Chain,
    LeakyReLU,
    Stack,
)
from nflax.nets import MLP
from nflax.testing import check_bijection

DIMS = [1, 2, 5]
# The default run checks every layer at dim 1 (one coordinate: a coupling's edge case) and 5
# (odd: unequal halves, every mask and permutation non-trivial); dim 2 only for the tutorial's
# own layers (the tutorial's set is 2-D); every other layer at dim 2 runs with -m slow.
TUTORIAL_LAYERS = {"leaky_relu", "realnvp", "realnvp_leaky", "affine_coupling"}


def _slow(name: str, dim: int, slow: set) -> bool:
    return (name, dim) in slow or (dim == 2 and name not in TUTORIAL_LAYERS)


def _cases(table, slow):
    """(name, dim) for every entry of ``table`` and every dim; the slow ones marked slow."""
    mark = lambda name, dim: pytest.mark.slow if _slow(name, dim, slow) else ()  # noqa: E731
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


def _check(b, dim, conditional=False):
    """``nflax.testing.check_bijection`` with the registry's declared exceptions at ``dim``:
    round trip, log-det = log|det Jacobian|, inverse log-det, batch dims, jit = eager,
    gradients for every parameter and every layer of a Stack, finite values and gradients
    far out (a ramp to ±12: at dim 1 a coupling is a constant shift, and a LeakyReLU
    downstream must see both signs), the trajectory, every layer moves its input; with a
    context, a broadcast context row and that the context matters."""
    report = check_bijection(b, key=jax.random.key(1), **exceptions(dim, conditional))
    assert report.num_parameters > 0, "the gradient check needs a parameter"
    declared = exceptions(dim, conditional)["identity_layers"]
    for name, moved in report.layer_movement:  # a declared identity layer is exactly one
        if name.removeprefix("Invert(").removesuffix(")") in declared:
            assert moved == 0.0, f"{name} declared the identity at dim {dim} moves by {moved}"
    return report


@pytest.mark.parametrize("name, dim", _cases(REGISTRY, SLOW))
def test_contract(name, dim):
    """The whole contract (``check_bijection``) on every layer of the registry."""
    b = _make(REGISTRY[name], dim)
    assert isinstance(b, Bijection)
    _check(b, dim)


@pytest.mark.parametrize("name, dim", _cases(CONDITIONAL, SLOW_CONDITIONAL))
def test_contract_with_context(name, dim):
    b = CONDITIONAL[name](dim, nnx.Rngs(0), 3)
    perturb(b, jax.random.key(5))
    assert _check(b, dim, conditional=True)["context_used"].passed
    x, c = _inputs(dim), jax.random.normal(jax.random.key(2), (7, 3))
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
    _check(b, b.event_shape[-1])


@pytest.mark.parametrize("name", sorted(IMAGE_CONDITIONAL))
def test_image_contract_with_context(name):
    b = IMAGE_CONDITIONAL[name]((4, 4, 2), nnx.Rngs(0), 3)
    perturb(b, jax.random.key(5))
    assert _check(b, 2, conditional=True)["context_used"].passed
    x, c = _inputs((4, 4, 2)), jax.random.normal(jax.random.key(2), (7, 3))
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
