"""Conditional flows: context through every layer, conditional bases, embeddings, fit on (x, c)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax.distributions import ConditionalDiagNormal, Flow
from nflax.nets import MLP


def _cflow(seed=0, context_dim=1, base=False, embedding=None):
    # two coupling layers (both coordinates transformed): less to compile than three, and
    # test_minibatches_keep_rows_and_context_together's NLL still reaches −4.4 to −5.6 over
    # seeds 0-2 (native and SSE4.2 kernels), against the −2.0 asserted
    flow = nflax.flows.realnvp(
        2, num_layers=2, hidden=(16,), context_dim=context_dim, rngs=nnx.Rngs(seed)
    )
    if base or embedding is not None:
        b = ConditionalDiagNormal(2, context_dim, rngs=nnx.Rngs(seed + 1)) if base else flow.base
        flow = Flow(b, flow.bijection, embedding=embedding)
    return flow


@pytest.mark.parametrize("base", [False, True])
def test_conditional_density_integrates_to_one_for_each_context(base):
    flow = _cflow(base=base)
    perturb(flow, jax.random.key(0), scale=0.1)
    lim, res = 12.0, 480
    xs = np.linspace(-lim, lim, res)
    grid = np.stack(np.meshgrid(xs, xs), axis=-1).reshape(-1, 2).astype(np.float32)
    cell = (xs[1] - xs[0]) ** 2
    logp = jax.jit(lambda g, c: flow.log_prob(g, jnp.broadcast_to(c, (g.shape[0], 1))))
    totals = []
    for c in (-1.0, 0.0, 2.0):
        totals.append(float(np.exp(np.asarray(logp(grid, jnp.array([c])))).sum() * cell))
    np.testing.assert_allclose(totals, 1.0, atol=0.01)
    # and the density really depends on the context
    a = logp(grid[:50], jnp.array([-1.0]))
    b = logp(grid[:50], jnp.array([2.0]))
    assert not np.allclose(a, b)


def test_sampling_shapes_and_log_prob_agree():
    flow = _cflow(base=True)
    perturb(flow, jax.random.key(1), scale=0.2)
    ctx = jnp.array([[0.5], [1.0], [1.5]])
    x, lp = flow.sample_and_log_prob(jax.random.key(0), 5, ctx)
    assert x.shape == (3, 5, 2) and lp.shape == (3, 5)
    again = flow.log_prob(x, jnp.broadcast_to(ctx[:, None, :], (3, 5, 1)))
    np.testing.assert_allclose(lp, again, atol=1e-4)
    assert flow.sample(jax.random.key(0), 4, ctx[0]).shape == (4, 2)
    traj = flow.sample_trajectory(jax.random.key(0), 4, ctx[0])
    assert len(traj) == 3 and traj[-1].shape == (4, 2)  # the start and one per layer


def test_context_errors():
    flow = _cflow()
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="needs a context"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="unconditional"):
        nflax.flows.realnvp(2, num_layers=2, rngs=nnx.Rngs(0)).log_prob(x, jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match="context of shape"):
        flow.log_prob(x, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="conditional; pass context"):
        nflax.fit(flow, x, key=jax.random.key(0), steps=2)
    with pytest.raises(ValueError, match=r"expected shape \(4, 1\)"):
        nflax.fit(flow, x, context=np.zeros((3, 1)), key=jax.random.key(0), steps=2)
    with pytest.raises(ValueError, match=r"expected shape \(4, 1\), received \(4, 2\)"):
        nflax.fit(flow, x, context=np.zeros((4, 2)), key=jax.random.key(0), steps=2)
    with pytest.raises(ValueError, match="NaN"):
        nflax.fit(flow, x, context=np.full((4, 1), np.nan), key=jax.random.key(0), steps=2)


def test_conditional_density_grid_and_plot():
    flow = _cflow(base=True)
    perturb(flow, jax.random.key(4), scale=0.1)
    ctx = np.array([0.7], np.float32)
    xs, ys, logp = nflax.plotting.density_grid(flow, (-12, 12), (-12, 12), 300, context=ctx)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    assert abs(float(np.exp(logp).sum() * cell) - 1.0) < 0.01
    point = jnp.array([[xs[17], ys[40]]], jnp.float32)
    np.testing.assert_allclose(logp[40, 17], flow.log_prob(point, ctx[None])[0], rtol=1e-5)

    ds = nflax.datasets.get_conditional("conditional_banana")
    contexts = np.array([[0.5], [1.0], [1.5]], np.float32)
    fig = nflax.plotting.plot_conditional_density(
        flow, contexts, xlim=(-5, 20), ylim=(-8, 8), resolution=40, true_log_prob=ds.log_prob
    )
    images = [ax.images[0].get_array() for ax in fig.axes]
    assert len(images) == 6  # learned and true, for each of three contexts
    _, _, lp = nflax.plotting.density_grid(flow, (-5, 20), (-8, 8), 40, context=contexts[2])
    np.testing.assert_allclose(images[2], np.exp(lp), rtol=1e-5)  # row 1 = learned
    assert not np.allclose(images[3], images[5])  # the true density changes with the context
    with pytest.raises(ValueError, match=r"contexts must be rows"):
        nflax.plotting.plot_conditional_density(flow, [0.5, 1.0], xlim=(0, 1), ylim=(0, 1))
    with pytest.raises(ValueError, match="give data or both"):
        nflax.plotting.plot_conditional_density(flow, contexts)


def test_embedding_network_is_trained():
    emb = MLP(3, 2, hidden=(8,), zero_init_output=False, rngs=nnx.Rngs(5))
    flow = _cflow(context_dim=2, embedding=emb)
    ds = nflax.datasets.get_conditional("conditional_banana")
    x, c = ds.sample(jax.random.key(0), 256)
    raw = np.concatenate([np.asarray(c), np.asarray(c) ** 2, np.ones_like(c)], axis=1)
    before = np.asarray(emb.out.kernel[...]).copy()
    hist = nflax.fit(
        flow, x, context=raw, key=jax.random.key(1), steps=30, batch_size=64, progress=False
    )
    assert np.all(np.isfinite(hist.loss))
    assert not np.allclose(before, np.asarray(flow.embedding.out.kernel[...]))


# Each constructor with an embedding network (context_dim, feature_dim, the error for a context
# of the wrong width) saved and loaded bit for bit: test_checkpoint.py's
# test_non_default_arguments_round_trip_bit_for_bit, where every case has an embedding.


def test_embedding_argument_errors():
    with pytest.raises(ValueError, match="embedding network needs context_dim"):
        nflax.flows.realnvp(2, embedding=(4,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positive layer sizes"):
        nflax.flows.maf(2, context_dim=1, embedding=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positive layer sizes"):
        nflax.flows.nsf(2, context_dim=1, embedding=(4, 0), rngs=nnx.Rngs(0))
    plain = nflax.flows.realnvp(2, num_layers=2, rngs=nnx.Rngs(0))
    emb = MLP(1, 2, hidden=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs conditional layers"):
        Flow(plain.base, plain.bijection, embedding=emb)
    cond = nflax.flows.realnvp(2, num_layers=2, context_dim=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gives 2 features, the layers expect context_dim 3"):
        Flow(cond.base, cond.bijection, embedding=emb)


def test_minibatches_keep_rows_and_context_together():
    # x = c exactly (plus tiny noise): only a flow that sees each row's own context can fit it
    key = jax.random.key(0)
    c = np.asarray(jax.random.normal(key, (512, 1)))
    x = np.concatenate([c, -c], axis=1) + 0.01 * np.asarray(jax.random.normal(key, (512, 2)))
    flow = _cflow(base=True)
    nflax.fit(
        flow,
        x,
        context=c,
        key=jax.random.key(1),
        steps=600,
        batch_size=100,
        optimizer=optax.adam(1e-2),
        progress=False,
    )
    assert nflax.nll(flow, x, c).mean() < -2.0  # far below any context-blind model


@pytest.mark.slow  # 50 s; test_cli.py::test_conditional_run trains one in the default run
def test_conditional_banana_reaches_the_exact_nll():
    ds = nflax.datasets.get_conditional("conditional_banana")
    x, c = ds.sample(jax.random.key(0), 4096)
    xt, ct = ds.sample(jax.random.key(1), 8192)
    flow = nflax.flows.realnvp(
        2, num_layers=8, hidden=(64, 64), context_dim=1, actnorm=True, rngs=nnx.Rngs(0)
    )
    sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 200, 3000)
    nflax.fit(
        flow,
        x,
        context=c,
        key=jax.random.key(2),
        steps=3000,
        patience=1000,
        optimizer=optax.adamw(sched, weight_decay=1e-4),
        progress=False,
    )
    gap = nflax.nll(flow, xt, ct).mean() + float(ds.log_prob(xt, ct).mean())
    assert gap < 0.1, gap
