"""nflax train's recipe as a library: default_optimizer (adamw, warm-up + cosine, weight decay on
the kernels only) and fit(ema=), the parameters' moving average, against hand computations."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import nflax
from nflax.training import default_fit_optimizer, default_optimizer, kernel_mask, warmup_cosine


def _flow():
    return nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def data():
    return np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 128))


def _params(flow) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(flow, nnx.Param))]


def _fit(flow, x, steps, **kw):
    kw.setdefault("optimizer", optax.adam(1e-2))
    return nflax.fit(flow, x, key=jax.random.key(1), steps=steps, progress=False, **kw)


def test_the_flow_ends_with_the_bias_corrected_average_of_the_iterates(data):
    decay, steps = 0.5, 5
    # p_t: the parameters before step t's update (what step t averages in), t = 0 … steps − 1
    iterates = [_params(_flow())]
    for t in range(1, steps):
        flow = _flow()
        _fit(flow, data, t, restore_best=False)
        iterates.append(_params(flow))
    weights = np.array([(1 - decay) * decay ** (steps - 1 - t) for t in range(steps)])
    weights /= 1 - decay**steps
    expected = [
        sum(w * p[i] for w, p in zip(weights, iterates, strict=True))
        for i in range(len(iterates[0]))
    ]
    flow = _flow()
    hist = _fit(flow, data, steps, ema=decay, restore_best=False)
    assert hist.steps_run == steps and not hist.restored_best
    for got, want in zip(_params(flow), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_ema_zero_is_the_plain_iterate_bit_for_bit(data):
    a, b = _flow(), _flow()
    ha = _fit(a, data, 30, patience=10)
    hb = _fit(b, data, 30, patience=10, ema=0.0)
    np.testing.assert_array_equal(ha.loss, hb.loss)
    np.testing.assert_array_equal(ha.val_loss, hb.val_loss)
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_validation_and_best_parameters_are_the_average(data):
    flow = _flow()
    hist = _fit(flow, data, 60, patience=1000, ema=0.9, eval_every=5)
    assert hist.restored_best and hist.best_step in hist.val_steps.tolist()
    # the restored (averaged) parameters score the best validation NLL that was recorded
    val = nflax.nll(flow, data[hist.val_index]).mean()
    np.testing.assert_allclose(val, hist.best_loss, rtol=1e-5)
    assert hist.best_loss == pytest.approx(float(np.min(hist.val_loss)))


@pytest.mark.parametrize("bad", [1.0, -0.1, True, 2])
def test_ema_must_be_a_decay_in_0_1(data, bad):
    with pytest.raises(ValueError, match=r"fit: ema must be a decay in \[0, 1\)"):
        _fit(_flow(), data, 1, ema=bad)


def test_weight_decay_shrinks_the_kernels_only():
    flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), actnorm=True, rngs=nnx.Rngs(0))
    params = nnx.state(flow, nnx.Param)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    mask = jax.tree.leaves(kernel_mask(params))
    assert [p for p, m in zip(paths, mask, strict=True) if m] == [
        p for p in paths if p.endswith("['kernel'].value")
    ]
    assert any("log_scale" in p for p in paths) and any("bias" in p for p in paths)
    # constant rate 0.01, decay 3: zero gradients move each kernel by −0.01·3·θ, nothing else
    tx = default_optimizer(100, learning_rate=0.01, weight_decay=3.0, schedule="constant")
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for m, u, p in zip(mask, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(u, -0.03 * np.asarray(p) if m else 0.0, rtol=1e-6, atol=0)


def test_warmup_cosine_is_nflax_trains_schedule():
    lr = warmup_cosine(2e-3, 4000)
    got = [float(lr(t)) for t in (0, 100, 200, 2100, 4000)]
    np.testing.assert_allclose(got, [0.0, 1e-3, 2e-3, 1e-3, 0.0], atol=1e-10)
    short = warmup_cosine(1.0, 20)  # the warm-up is at most a tenth of the steps
    assert float(short(2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule must be 'warmup-cosine' or 'constant'"):
        default_optimizer(10, schedule="linear")


def test_fit_default_optimizer_is_adamw(data):
    """fit's default (default_fit_optimizer) is optax.adamw(1e-3) leaf by leaf: its moments
    have the parameters' shapes, and it trains bit for bit as that optimizer given by hand."""
    flow = _flow()
    params = nnx.state(flow, nnx.Param)
    state = default_fit_optimizer().init(params)
    shapes = sorted(a.shape for a in jax.tree.leaves(params))
    moments = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim >= 1]
    assert sorted(m.shape for m in moments) == sorted(shapes * 2)  # mu and nu, per leaf
    ours, by_hand = _flow(), _flow()
    _fit(ours, data, 60, optimizer=None)
    _fit(by_hand, data, 60, optimizer=optax.adamw(1e-3))
    for a, b in zip(_params(ours), _params(by_hand), strict=True):
        np.testing.assert_array_equal(a, b)
    start = _params(_flow())
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(_params(ours), start, strict=True))
    assert moved > 1e-3  # the comparison is not between two untrained flows
