"""Image flows: the multi-scale density integrates to one, tempered sampling, the shape
contract's errors, training on images and checkpoints (the layer contract itself is in
``test_bijections.py::test_image_contract``)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax.bijections import (
    ActNorm,
    Affine,
    AffineCoupling,
    Chain,
    Invert,
    Invertible1x1Conv,
    Logit,
    MultiScale,
    SplineCoupling,
    Squeeze,
    Stack,
    channel_mask,
    checkerboard_mask,
)
from nflax.distributions import Flow, StandardNormal, compiled_log_prob, compiled_sample
from nflax.nets import ConvResNet, GlowConvNet
from nflax.variables import needs_data_init


def _glow(shape=(2, 2, 1), seed=0, **kw):
    kw = dict(levels=2, depth=2, hidden=8, blocks=1) | kw
    return nflax.flows.glow(shape, rngs=nnx.Rngs(seed), **kw)


def _initialised(flow, scale=0.1):
    """ActNorm initialised on uniform images, then every parameter moved off its start."""
    shape = flow.event_shape
    flow.log_prob(jax.random.uniform(jax.random.key(0), (32, *shape)))
    perturb(flow, jax.random.key(1), scale=scale)
    return flow


def test_multiscale_density_over_a_2x2_image_integrates_to_one():
    """Brute force over the whole support of a 2-level glow on 2×2×1 images.

    With the logit preprocessing, ``u = α + (1 − 2α)x ∈ (0, 1)``: the support is the cube
    ``[−a, 1 + a]⁴``, ``a = α/(1 − 2α)``. The density piles up near the faces (the logit's
    slope ``1/(u(1 − u))``), so the midpoint grid runs in ``t`` with ``x = lo + (hi − lo)·s(t)``,
    ``s(t) = 3t² − 2t³`` (weight ``s'(t) = 6t(1 − t)``), which resolves the faces. Measured
    (noise 0.1 on every parameter): 24 points per axis give 1.0013 (16: 1.0074, 32: 1.0004);
    without the substitution 24 points give 1.047.
    """
    flow = _initialised(_glow())
    alpha = 0.05
    a = alpha / (1 - 2 * alpha)
    lo, hi, n = -a, 1 + a, 24
    t = (np.arange(n) + 0.5) / n
    axis = lo + (hi - lo) * (3 * t**2 - 2 * t**3)
    weight = (hi - lo) * 6 * t * (1 - t) / n
    grid = np.stack(np.meshgrid(*[axis] * 4, indexing="ij"), -1).reshape(-1, 2, 2, 1)
    w = np.prod(np.stack(np.meshgrid(*[weight] * 4, indexing="ij"), -1).reshape(-1, 4), -1)
    total = 0.0
    for xs, ws in zip(np.split(grid.astype(np.float32), 4), np.split(w, 4), strict=True):
        total += float(np.sum(np.exp(np.asarray(compiled_log_prob(flow, xs), np.float64)) * ws))
    assert abs(total - 1.0) < 0.01, total


def test_multiscale_is_one_bijection_image_to_vector():
    flow = _glow((4, 4, 2), depth=1)
    assert flow.event_shape == (4, 4, 2) and flow.base.event_shape == (32,)
    assert flow.bijection.latent_shape == (32,)
    multiscale = flow.bijection.layers[1]
    assert isinstance(multiscale, MultiScale) and len(multiscale.levels) == 2
    # level 0: squeeze (2, 2, 8), steps, prior; level 1 gets the kept half (2, 2, 4)
    assert multiscale.levels[0].latent_shape == (2, 2, 8)
    assert multiscale.levels[1].event_shape == (2, 2, 4)
    x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 2))
    z, _ = flow.bijection.forward(x)
    # the factored-out half of level 0 leads the latent vector, unchanged after its level
    h, _ = multiscale.levels[0].forward(flow.bijection.layers[0].forward(x)[0])
    np.testing.assert_allclose(z[:, :16], h[..., 4:].reshape(3, 16), atol=1e-6)


def test_temperature_scales_the_noise_and_log_prob_is_the_models():
    flow = _initialised(_glow())
    graphdef, state = nnx.split(flow)

    @jax.jit
    def run(state, key):
        f = nnx.merge(graphdef, state)
        x, lp = f.sample_and_log_prob(key, 64, temperature=0.7)
        cold, plain = f.sample(key, 5, temperature=1.0), f.sample(key, 5)
        return (
            x,
            lp,
            f.bijection.forward(x)[0],
            f.log_prob(x),
            f.base.sample(key, (64,)),
            cold,
            plain,
        )

    x, lp, z, log_p, eps, cold, plain = run(state, jax.random.key(3))
    np.testing.assert_allclose(z, 0.7 * eps, atol=2e-4)  # z ~ N(0, 0.7² I)
    np.testing.assert_allclose(lp, log_p, atol=2e-3, rtol=1e-4)  # the model's log p(x)
    np.testing.assert_array_equal(cold, plain)
    compiled = compiled_sample(flow, jax.random.key(3), 64, temperature=0.7)
    np.testing.assert_allclose(compiled, x, atol=1e-5)
    a = 0.05 / 0.9  # the logit's inverse lands in the support [−a, 1 + a] (α = 0.05)
    assert bool(jnp.all((x >= -a) & (x <= 1 + a)))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be positive"):
            flow.sample(jax.random.key(0), 2, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be positive"):
            compiled_sample(flow, jax.random.key(0), 2, temperature=bad)


def test_bad_shapes_name_the_layer_the_expected_and_the_received_shape():
    with pytest.raises(ValueError, match=r"Squeeze: height and width must be even.*\(3, 4, 1\)"):
        Squeeze((3, 4, 1))
    with pytest.raises(ValueError, match=r"glow: levels=3 .* divisible by 4.*\(6, 6, 1\)"):
        nflax.flows.glow((6, 6, 1), levels=3, rngs=nnx.Rngs(0))
    flow = _glow((4, 4, 1))
    for bad in ((2, 3, 4, 1), (2, 4, 4, 3)):  # odd height, wrong channels
        msg = r"Chain\.forward: expected input of shape \(\*batch, 4, 4, 1\).*received shape "
        with pytest.raises(ValueError, match=msg + re.escape(str(bad))):
            flow.log_prob(jnp.zeros(bad))
    with pytest.raises(
        ValueError, match=r"Squeeze.inverse: .*\(\*batch, 2, 2, 4\).*\(2, 4, 4, 1\)"
    ):
        Squeeze((4, 4, 1)).inverse(jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"Invertible1x1Conv: expected an image event shape"):
        Invertible1x1Conv((4, 4), rngs=nnx.Rngs(0))


def test_shape_changing_composition_rules():
    sq = Squeeze((4, 4, 1))
    assert sq.latent_shape == (2, 2, 4)
    assert Chain([Affine((4, 4, 1)), sq, ActNorm((2, 2, 4))]).latent_shape == (2, 2, 4)
    with pytest.raises(
        ValueError,
        match=r"layer 1 \(ActNorm\) has event shape \(4, 4, 1\), "
        r"expected \(2, 2, 4\), the latent shape of layer 0 \(Squeeze\)",
    ):
        Chain([sq, ActNorm((4, 4, 1))])
    inv = Invert(sq)
    assert (inv.event_shape, inv.latent_shape) == ((2, 2, 4), (4, 4, 1))
    with pytest.raises(ValueError, match="Stack: layers must keep the shape"):
        Stack([Squeeze((4, 4, 1)), Squeeze((4, 4, 1))])
    with pytest.raises(ValueError, match=r"base event shape \(16,\) does not match .* \(2, 2, 4\)"):
        Flow(StandardNormal(16), sq)
    with pytest.raises(ValueError, match="level 0 .* outputs 3 channels"):
        MultiScale([ActNorm((2, 2, 3)), ActNorm((2, 2, 1))])
    with pytest.raises(ValueError, match=r"level 1 .* expected \(2, 2, 2\)"):
        MultiScale([ActNorm((2, 2, 4)), ActNorm((2, 2, 4))])


def test_layer_formulas():
    x = jax.random.normal(jax.random.key(0), (3, 4, 6, 2))
    z, ld = Squeeze((4, 6, 2)).forward(x)
    np.testing.assert_array_equal(z[:, 1, 2, 2 * 2 + 1], x[:, 3, 4, 1])  # (2a + b)·C + c
    np.testing.assert_array_equal(ld, 0.0)
    conv = Invertible1x1Conv((4, 6, 2), rngs=nnx.Rngs(0))
    perturb(conv, jax.random.key(1))
    z, ld = conv.forward(x)
    w = conv.weight()
    np.testing.assert_allclose(z, jnp.einsum("cd,bhwd->bhwc", w, x), atol=1e-5)
    np.testing.assert_allclose(ld, 24 * jnp.linalg.slogdet(w)[1], rtol=1e-5)
    np.testing.assert_allclose(ld, 24 * jnp.sum(conv.log_abs_s[...]), rtol=1e-6)
    norm = ActNorm((4, 6, 2))
    z, ld = norm.forward(3.0 + 2.0 * x)
    np.testing.assert_allclose(jnp.mean(z, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(z, axis=(0, 1, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(ld, -24 * jnp.sum(norm.init_log_scale[...]), rtol=1e-6)
    assert checkerboard_mask((2, 2, 3))[0, 1].tolist() == [0.0] * 3
    assert channel_mask((1, 1, 3), 1)[0, 0].tolist() == [0.0, 1.0, 1.0]
    logit = Logit((2, 2, 1), alpha=0.1)
    u = jnp.full((1, 2, 2, 1), 0.5)
    np.testing.assert_allclose(logit.forward(u)[1], 4 * np.log(0.8 / 0.25), rtol=1e-6)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 0.5\)"):
        Logit(2, alpha=0.5)


def _blobs(n, key):
    """Images in [0, 1] with strongly correlated pixels: one brightness per image."""
    k1, k2 = jax.random.split(key)
    level = jax.random.uniform(k1, (n, 1, 1, 1), minval=0.1, maxval=0.9)
    return np.asarray(jnp.clip(level + 0.03 * jax.random.normal(k2, (n, 4, 4, 1)), 0.0, 1.0))


@pytest.mark.slow  # ~15-20 s of CPU: compiles fit's training program for a glow
def test_fit_trains_a_tiny_glow_on_images_and_lowers_the_nll():
    x = _blobs(256, jax.random.key(0))
    flow = _glow((4, 4, 1), depth=1)
    before = -float(jnp.mean(flow.log_prob(x)))  # initialises the ActNorms on all of x
    hist = nflax.fit(
        flow, x, key=jax.random.key(1), steps=150, optimizer=optax.adam(3e-3), progress=False
    )
    after = -float(jnp.mean(compiled_log_prob(flow, x)))
    assert hist.loss[-1] < hist.loss[0] and after < before - 5.0, (before, after)


def test_glow_checkpoint_round_trip_with_actnorm_state(tmp_path):
    kw = dict(levels=2, depth=2, hidden=4, blocks=2, split_prior=False, squeeze_last=False,
              logit=True, alpha=0.02, activation="silu", conditioner="resnet",
              coupling="spline", bins=5, bound=2.5)  # fmt: skip
    flow = _initialised(_glow((2, 2, 2), **kw))
    assert not needs_data_init(flow)
    nflax.save(tmp_path / "ck", flow)
    loaded = nflax.load(tmp_path / "ck")
    assert not needs_data_init(loaded)  # the initialised ActNorm state came back
    spec = json.loads(loaded.spec)
    assert spec == {"constructor": "glow", "kwargs": {"event_shape": [2, 2, 2], **kw}}
    assert nnx.graphdef(loaded) == nnx.graphdef(flow)
    x = jax.random.uniform(jax.random.key(5), (8, 2, 2, 2))
    want = np.asarray(compiled_log_prob(flow, x))
    np.testing.assert_array_equal(np.asarray(compiled_log_prob(loaded, x)), want)


def test_realnvp_image_spec_round_trips_through_build():
    kw = dict(levels=1, depth=3, hidden=4, blocks=1, actnorm=False, split_prior=True,
              squeeze_last=True, logit=False, alpha=0.1, activation="elu", conditioner="glow",
              coupling="affine", bins=6, bound=4.0)  # fmt: skip
    flow = nflax.flows.realnvp_image((2, 2, 2), rngs=nnx.Rngs(0), **kw)
    spec = json.loads(flow.spec)
    assert spec == {"constructor": "realnvp_image", "kwargs": {"event_shape": [2, 2, 2], **kw}}
    rebuilt = nflax.flows.build(spec["constructor"], **spec["kwargs"], rngs=nnx.Rngs(0))
    assert rebuilt.spec == flow.spec
    assert "glow" in nflax.flows.IMAGE_CONSTRUCTORS and "glow" not in nflax.flows.CONSTRUCTORS


def test_conv_resnet_keeps_the_image_size_and_starts_at_zero():
    net = ConvResNet(3, 6, width=4, blocks=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4, 3))  # two batch axes
    y = net(x)
    assert y.shape == (2, 5, 3, 4, 6) and float(jnp.abs(y).max()) == 0.0
    live = ConvResNet(3, 6, width=4, blocks=1, zero_init_output=False, rngs=nnx.Rngs(0))
    assert float(jnp.abs(live(x)).max()) > 0.0
    with pytest.raises(
        ValueError, match=r"ConvResNet: expected input of shape \(\*batch, H, W, 3\)"
    ):
        net(jnp.zeros((2, 4, 4, 2)))


def test_glow_conv_net_is_3x3_then_1x1_then_3x3_and_starts_at_zero():
    net = GlowConvNet(3, 6, width=4, layers=2, rngs=nnx.Rngs(0))
    assert [layer.kernel.shape for layer in net.hidden] == [(4, 4), (4, 4)]  # the 1×1 layers
    assert net.conv_in.kernel.shape == (3, 3, 3, 4) and net.conv_out.kernel.shape == (3, 3, 4, 6)
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4, 3))  # two batch axes
    y = net(x)
    assert y.shape == (2, 5, 3, 4, 6) and float(jnp.abs(y).max()) == 0.0
    live = GlowConvNet(3, 6, width=4, layers=0, zero_init_output=False, rngs=nnx.Rngs(0))
    assert float(jnp.abs(live(x)).max()) > 0.0 and len(live.hidden) == 0
    # only the 3×3 layers see neighbours: one changed pixel reaches a 5×5 window, no further
    x0 = jnp.zeros((1, 7, 7, 3))
    changed = jnp.abs(live(x0.at[0, 3, 3].set(1.0)) - live(x0))[0].max(-1) > 0
    np.testing.assert_array_equal(np.argwhere(np.asarray(changed)).min(0), [1, 1])
    np.testing.assert_array_equal(np.argwhere(np.asarray(changed)).max(0), [5, 5])
    with pytest.raises(
        ValueError, match=r"GlowConvNet: expected input of shape \(\*batch, H, W, 3\)"
    ):
        net(jnp.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="GlowConvNet: expected positive channels"):
        GlowConvNet(3, 6, width=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("constructor", ["glow", "realnvp_image"])
def test_image_flows_take_a_coupling_and_a_conditioner(constructor):
    make = getattr(nflax.flows, constructor)
    kw = dict(levels=2, depth=1, hidden=4, blocks=1, rngs=nnx.Rngs(0))
    for coupling, conditioner in [("spline", "glow"), ("affine", "resnet"), ("spline", "resnet")]:
        flow = make((4, 4, 1), coupling=coupling, conditioner=conditioner, bins=5, **kw)
        layers = [m for _, m in nnx.iter_graph(flow)]
        couplings = [m for m in layers if isinstance(m, nflax.bijections.Coupling)]
        want = SplineCoupling if coupling == "spline" else AffineCoupling
        assert couplings and all(type(c) is want for c in couplings)
        net = GlowConvNet if conditioner == "glow" else ConvResNet
        assert all(type(c.conditioner) is net for c in couplings)
        if coupling == "spline":  # 3·bins − 1 numbers per channel
            assert all(c.transformer.bins == 5 for c in couplings)
    # the new pairing (a spline on the Glow net) round-trips, compiled (the affine and ResNet
    # parts are each checked on their own above and in the registry)
    flow = make((4, 4, 1), coupling="spline", conditioner="glow", bins=5, **kw)
    x = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1))
    z, ld, back, ld_inv = _round_trip(flow.bijection, x)
    np.testing.assert_allclose(back, x, atol=1e-5)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-4)
    with pytest.raises(ValueError, match=f"{constructor}: coupling must be one of"):
        make((4, 4, 1), coupling="additive", **kw)
    with pytest.raises(ValueError, match=f"{constructor}: conditioner must be one of"):
        make((4, 4, 1), conditioner="mlp", **kw)
    with pytest.raises(ValueError, match=f"{constructor}: bins must be ≥ 2"):
        make((4, 4, 1), coupling="spline", bins=1, **kw)


def _round_trip(bijection, x):
    """``forward`` then ``inverse``, in one compiled program (eagerly every op compiles alone)."""

    @nnx.jit
    def run(b, x):
        z, ld = b.forward(x)
        return z, ld, *b.inverse(z)

    return run(bijection, x)


def test_squeeze_last_squeezes_the_last_level_too_and_checks_the_size():
    flow = _glow((4, 4, 1), squeeze_last=True)
    multiscale = flow.bijection.layers[1]
    assert [b.latent_shape for b in multiscale.levels] == [(2, 2, 4), (1, 1, 8)]
    assert isinstance(multiscale.levels[1].layers[0], Squeeze)
    x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1))
    z, ld, back, ld_inv = _round_trip(flow.bijection, x)
    assert z.shape == (3, 16)
    np.testing.assert_allclose(back, x, atol=1e-5)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-4)
    with pytest.raises(ValueError, match=r"levels=2 \(squeeze_last=True\) squeezes 2 times.*by 4"):
        nflax.flows.realnvp_image((2, 2, 1), levels=2, squeeze_last=True, rngs=nnx.Rngs(0))
