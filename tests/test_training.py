"""nflax.fit: early stopping, best parameters, minibatches, NaN guard, determinism, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax.bijections import Chain
from nflax.engine import run_chunk
from nflax.training import batch_indices, check_data, epoch_permutation, permutation


def _small_flow(seed=0):
    # two coupling layers: a smaller program to compile than four, and fit_learns's NLL still
    # drops by 26.5 over seeds 0-2 (native and SSE4.2 kernels), against the 1.0 asserted
    return nflax.flows.realnvp(2, num_layers=2, hidden=(16, 16), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def banana():
    return np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 512))


def _params(flow):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(flow, nnx.Param))]


def test_fit_learns_and_reports(banana):
    flow = _small_flow()
    before = nflax.nll(flow, banana).mean()
    # chunks of 10: test_callback_and_progress's settings, so that it reuses this program
    hist = nflax.fit(flow, banana, key=jax.random.key(1), steps=300, chunk_size=10, progress=False)
    after = nflax.nll(flow, banana).mean()
    assert hist.stop_reason == "steps" and hist.steps_run == 300
    assert hist.loss.shape == (300,) and np.all(np.isfinite(hist.loss))
    assert after < before - 1.0
    # the last logged loss is the loss of the parameters before the last update
    assert abs(hist.loss[-1] - after) < 0.05
    assert hist.steps_per_second > 0 and hist.compile_seconds > 0


def test_early_stopping_restores_best_validation_parameters(banana):
    kw = dict(key=jax.random.key(3), val_fraction=0.25, eval_every=5, progress=False)
    kw["optimizer"] = optax.adam(3e-3)
    # stops by patience after about 1100 steps (1106 natively, 1091 with SSE4.2 kernels)
    flow = _small_flow()
    hist = nflax.fit(flow, banana, steps=3000, patience=100, chunk_size=64, **kw)
    assert hist.stop_reason == "patience" and hist.restored_best
    assert hist.steps_run < 3000
    best = int(np.argmin(hist.val_loss))
    assert hist.best_step == hist.val_steps[best]
    assert hist.steps_run - 1 - hist.best_step >= 100 - 5
    # the flow holds the parameters that scored the best validation NLL
    val_nll = nflax.nll(flow, banana[hist.val_index]).mean()
    np.testing.assert_allclose(val_nll, hist.val_loss[best], rtol=1e-5)
    # ... which are exactly the parameters of a run stopped by hand at that step
    ref = _small_flow()
    ref_hist = nflax.fit(ref, banana, steps=hist.best_step, restore_best=False, **kw)
    assert ref_hist.steps_run == hist.best_step
    for a, b in zip(_params(flow), _params(ref), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_patience_stops_at_the_exact_step_on_a_plateau(banana, val_fraction):
    """With a learning rate of 0 the monitored loss (validation NLL, or the full-batch
    training loss without a split) never changes: the best step is 0, and patience 25 stops
    the run at step 25, which is still taken (26 steps run)."""
    hist = nflax.fit(
        _small_flow(),
        banana,
        key=jax.random.key(0),
        steps=5000,
        patience=25,
        val_fraction=val_fraction,
        optimizer=optax.sgd(0.0),
        chunk_size=64,
        progress=False,
    )
    assert hist.stop_reason == "patience"
    assert hist.best_step == 0 and hist.steps_run == 26
    assert np.all(hist.loss == hist.loss[0])  # a true plateau
    if val_fraction:
        assert len(hist.val_loss) == 26 and np.all(hist.val_loss == hist.val_loss[0])
    else:
        assert len(hist.val_loss) == 0


def test_permutation_is_uniform():
    """fit's shuffle: a permutation for one position bit up to many, the same for the same
    key, and uniform: the 6 orders of 3 items (12 000 draws) and the position of each of 10
    items (chi-square over the 10 × 10 table, 81 degrees of freedom: 99.9 % quantile 124)."""
    one = jax.jit(permutation, static_argnums=1)
    for n in (1, 2, 1024, 70_000):
        p = np.asarray(one(jax.random.key(n), n))
        assert p.dtype == np.int32 and np.array_equal(np.sort(p), np.arange(n)), n
    assert np.array_equal(one(jax.random.key(0), 1024), one(jax.random.key(0), 1024))
    keys = jax.random.split(jax.random.key(1), 12_000)
    draw = jax.jit(jax.vmap(permutation, (0, None)), static_argnums=1)
    counts = np.unique(np.asarray(draw(keys, 3)), axis=0, return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > 1_760 and counts.max() < 2_240  # 2000 ± 6 sd
    perms = np.asarray(draw(keys[:10_000], 10))
    cells = np.stack([(perms == i).sum(0) for i in range(10)])  # item i at position j
    chi2 = float((((cells - 1_000) ** 2) / 1_000).sum())
    assert chi2 < 124, chi2


def test_minibatch_epochs_visit_every_point_once():
    n, bsz = 37, 8
    key = jax.random.key(0)
    for epoch in range(3):
        perm = epoch_permutation(key, epoch, n, bsz)
        assert perm.shape == (40,)
        seen = []
        for b in range(5):
            idx, w = batch_indices(perm, b, n, bsz)
            assert idx.shape == (bsz,) and w.shape == (bsz,)
            seen.extend(np.asarray(idx)[np.asarray(w)].tolist())
        assert sorted(seen) == list(range(n))
    # different epochs use different orders
    assert not np.array_equal(epoch_permutation(key, 0, n, bsz), epoch_permutation(key, 1, n, bsz))


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_ragged_last_batch_is_masked_and_nothing_recompiles(banana):
    """512 points, batch 100: five full batches and a last one of 12 real rows (88 padding rows
    of weight 0) per epoch. With the learning rate at 0 the flow stays fixed, so each logged
    loss is the mean NLL of its batch's real rows under one flow: within every epoch the six
    losses, weighted by their real rows, add up to the NLL of all 512 points (every point once;
    padding counted, a batch skipped or a point seen twice would break it). The compiled chunk
    is built once: no compile happens after the first chunk, whatever the batch."""
    flow = _small_flow()
    total = float(np.sum(nflax.nll(flow, banana), dtype=np.float64))
    compiles, at_callback = [], []

    def listener(event, *_, **__):
        if event == _BACKEND_COMPILE:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        hist = nflax.fit(
            flow,
            banana,
            key=jax.random.key(2),
            steps=60,
            batch_size=100,
            chunk_size=6,
            optimizer=optax.sgd(0.0),
            callback=lambda step, m: at_callback.append(len(compiles)),
            progress=False,
        )
        after = len(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert hist.steps_run == 60 and len(at_callback) == 9
    assert at_callback[0] >= 1  # the listener saw the chunk compile
    assert at_callback == [at_callback[0]] * 9 and after == at_callback[0]
    sizes = np.array([100, 100, 100, 100, 100, 12], np.float64)
    for epoch in hist.loss.reshape(10, 6).astype(np.float64):
        np.testing.assert_allclose(np.sum(sizes * epoch), total, rtol=2e-6)
    # the 12-row batch is not a 100-row batch in disguise: its loss differs from every other
    assert len(np.unique(hist.loss.reshape(10, 6)[:, 5])) == 10


def test_same_seed_same_parameters(banana):
    runs = []
    for _ in range(2):
        flow = _small_flow(seed=7)
        nflax.fit(
            flow,
            banana,
            key=jax.random.key(5),
            steps=50,
            batch_size=64,
            patience=30,
            progress=False,
        )
        runs.append(_params(flow))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_guard_stops_and_keeps_finite_parameters(banana):
    poisoned = banana.copy()
    poisoned[17] = [1e30, 1e30]  # finite input, but its log-density overflows
    flow = _small_flow()
    # test_same_seed_same_parameters's settings (patience 30 never acts before the first NaN):
    # its compiled program is reused
    hist = nflax.fit(
        flow, poisoned, key=jax.random.key(0), steps=100, batch_size=64, patience=30,
        progress=False,
    )  # fmt: skip
    assert hist.stop_reason == "non_finite"
    assert hist.non_finite_step is not None and hist.non_finite_step < 8  # within the 1st epoch
    assert hist.steps_run == hist.non_finite_step
    assert all(np.all(np.isfinite(p)) for p in _params(flow))
    assert np.all(np.isfinite(nflax.nll(flow, banana)))


def _global_norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def test_gradient_clipping_bounds_the_update(banana):
    """One SGD step of rate 1 with ``max_grad_norm=0.1`` moves the parameters by exactly 0.1
    (global norm) when the gradient is larger, and by the gradient itself without clipping."""
    flow = _small_flow()
    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    loss = lambda p: -nnx.merge(graphdef, p, rest).log_prob(banana).mean()  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)  # one compile, not one per op of the backward pass
    g = _global_norm(jax.tree.leaves(grads))
    assert g > 1.0
    before = _params(flow)
    kw = dict(key=jax.random.key(0), steps=1, optimizer=optax.sgd(1.0), progress=False)
    nflax.fit(flow, banana, max_grad_norm=0.1, **kw)
    step = _global_norm([a - b for a, b in zip(_params(flow), before, strict=True)])
    assert step == pytest.approx(0.1, rel=1e-4)
    unclipped = _small_flow()
    nflax.fit(unclipped, banana, **kw)
    step = _global_norm([a - b for a, b in zip(_params(unclipped), before, strict=True)])
    assert step == pytest.approx(g, rel=1e-4)


def test_callback_and_progress(banana, capsys):
    calls = []

    def cb(step, metrics):
        calls.append((step, metrics["loss"]))
        return step >= 20  # stop after the second chunk

    hist = nflax.fit(
        _small_flow(),
        banana,
        key=jax.random.key(0),
        steps=100,
        chunk_size=10,
        callback=cb,
        progress=True,
    )
    assert hist.stop_reason == "callback" and hist.steps_run == 20
    assert [c[0] for c in calls] == [10, 20]
    # tqdm on stderr: "compiling" during the first compile, then steps done, rate and loss
    err = capsys.readouterr().err
    assert "compiling" in err and "training" in err
    assert "20/100" in err and "step/s" in err and "loss=" in err


def test_history_export(banana, tmp_path):
    hist = nflax.fit(
        _small_flow(),
        banana,
        key=jax.random.key(0),
        steps=12,
        batch_size=64,  # test_same_seed_same_parameters's settings: its program is reused
        patience=50,
        eval_every=4,
        progress=False,
    )
    d = hist.to_dict()
    assert d["steps_run"] == 12 and len(d["loss"]) == 12
    text = hist.to_csv(str(tmp_path / "h.csv"))
    lines = text.strip().splitlines()
    assert lines[0] == "step,loss,val_loss" and len(lines) == 13
    assert lines[1].split(",")[2] != ""  # step 0 is evaluated
    assert lines[2].split(",")[2] == ""
    assert (tmp_path / "h.csv").read_text() == text


@pytest.mark.parametrize(
    "data, match",
    [
        (np.zeros((10, 3)), r"expected shape \(n, 2\).*received \(10, 3\)"),
        (np.zeros(10), r"received \(10,\)"),
        (np.zeros((0, 2)), "no data points"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), "NaN or inf.*row 1"),
        (np.array([[0.0, np.inf]]), "NaN or inf"),
        ([["a", "b"]], "not a numeric array"),
    ],
)
def test_bad_data_is_rejected_before_compiling(data, match):
    with pytest.raises(ValueError, match=match):
        nflax.fit(_small_flow(), data, key=jax.random.key(0), steps=10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=10, batch_size=-1), "batch_size"),
        (dict(steps=10, val_fraction=1.5), "val_fraction"),
        (dict(steps=10, patience=0), "patience"),
        (dict(steps=10, max_grad_norm=0.0), "max_grad_norm"),
    ],
)
def test_bad_arguments(banana, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nflax.fit(_small_flow(), banana, key=jax.random.key(0), **kwargs)


def test_nll_in_batches_smaller_than_the_data(banana):
    flow = _small_flow()
    perturb(flow, jax.random.key(0), scale=0.2)
    whole = nflax.nll(flow, banana)
    assert whole.shape == (512,) and whole.dtype == np.float32
    np.testing.assert_allclose(whole, -np.asarray(flow.log_prob(banana)), rtol=1e-6)
    for batch_size in (100, 7, 512, 1000):  # a ragged last batch, tiny batches, one, more
        np.testing.assert_allclose(nflax.nll(flow, banana, batch_size=batch_size), whole, rtol=1e-6)


def test_batchnorm_is_trained_by_fit_and_left_in_evaluation_mode(banana):
    """BatchNorm first in the flow: fit trains with batch statistics (the running averages
    follow the data's moments), validates and leaves the flow in evaluation mode, where the
    density uses the running averages, so nll gives the best step's validation loss back."""
    bn = nflax.bijections.BatchNorm(2, momentum=0.9)
    flow = nflax.Flow(nflax.StandardNormal(2), Chain([bn, _small_flow().bijection]))
    hist = nflax.fit(
        flow,
        banana,
        key=jax.random.key(0),
        steps=300,
        batch_size=64,
        patience=1000,
        optimizer=optax.adam(3e-3),
        progress=False,
    )
    assert bn.use_running_average  # evaluation mode
    mean, var = np.asarray(bn.running_mean[...]), np.asarray(bn.running_var[...])
    np.testing.assert_allclose(mean, banana.mean(0), atol=0.25 * banana.std(0).max())
    np.testing.assert_allclose(var, banana.var(0), rtol=0.35)
    assert hist.loss[-20:].mean() < hist.loss[:20].mean() - 0.3  # it learned
    best = hist.val_loss[list(hist.val_steps).index(hist.best_step)]
    np.testing.assert_allclose(nflax.nll(flow, banana[hist.val_index]).mean(), best, rtol=1e-5)


@pytest.mark.slow  # test_flows.py::test_cli_trains_every_flow[realnvp] covers it
def test_trained_density_integrates_to_one():
    ds = nflax.datasets.get("eight_gaussians")
    x = ds.sample(jax.random.key(0), 1024)
    flow = nflax.flows.realnvp(2, num_layers=6, hidden=(32, 32), rngs=nnx.Rngs(0))
    nflax.fit(flow, x, key=jax.random.key(1), steps=400, optimizer=optax.adam(3e-3), progress=False)
    # the trained flow's tails are wide: ±5 held 98.8-99.5 % of its mass (depending on float
    # rounding), ±8 holds 99.997 %, ±12 all of it to 1e-6
    lim, res = 12.0, 1200
    xs, ys, logp = nflax.plotting.density_grid(flow, (-lim, lim), (-lim, lim), res)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    total = float(np.exp(logp).sum() * cell)
    assert abs(total - 1.0) < 0.01, total
    # and it learned something: the model puts mass where the data is
    assert float(jnp.mean(flow.log_prob(x))) > -3.0


def test_check_data_returns_float32_rows_or_names_the_problem():
    x = check_data([[1, 2], [3, 4]], (2,))
    assert x.dtype == np.float32 and x.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 2\) .* received \(2, 3\)"):
        check_data(np.zeros((2, 3)), (2,))
    with pytest.raises(ValueError, match=r"data: 1 row\(s\) contain NaN or inf \(first at row 1\)"):
        check_data([[0.0, 0.0], [np.nan, 1.0]], (2,), name="data")
    with pytest.raises(ValueError, match="no data points"):
        check_data(np.zeros((0, 2)), (2,))


def test_run_chunk_stops_at_the_total_or_when_the_status_changes():
    def count(carry):  # one step: the step counter goes up; status 1 ("stop") at step 3 if asked
        t = carry["step"]
        stop = carry["stop_at"] == t + 1
        new = dict(carry, step=t + 1, status=jnp.where(stop, 1, carry["status"]))
        return new, (t.astype(jnp.float32) * 10,)

    carry = {"step": jnp.int32(0), "status": jnp.int32(0), "stop_at": jnp.int32(-1)}
    out, (buf,) = jax.jit(lambda c: run_chunk(count, c, 5, 8, 1))(carry)
    assert int(out["step"]) == 5 and int(out["status"]) == 0
    np.testing.assert_array_equal(buf[:5], [0, 10, 20, 30, 40])
    assert np.all(np.isnan(buf[5:]))  # steps past the total are never run
    carry["stop_at"] = jnp.int32(3)
    out, (buf,) = jax.jit(lambda c: run_chunk(count, c, 5, 8, 1))(carry)
    assert int(out["step"]) == 3 and int(out["status"]) == 1
    np.testing.assert_array_equal(buf[:3], [0, 10, 20])
    assert np.all(np.isnan(buf[3:]))
