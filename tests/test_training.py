"""nflax.fit: early stopping, best parameters, minibatches, NaN guard, determinism, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nflax
from nflax.training import batch_indices, epoch_permutation


def _small_flow(seed=0, layers=4):
    return nflax.flows.realnvp(2, num_layers=layers, hidden=(16, 16), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def banana():
    return np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 512))


def _params(flow):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(flow, nnx.Param))]


def test_fit_learns_and_reports(banana):
    flow = _small_flow()
    before = nflax.nll(flow, banana).mean()
    hist = nflax.fit(flow, banana, key=jax.random.key(1), steps=300, progress=False)
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


def test_patience_without_validation_watches_training_loss(banana):
    flow = _small_flow()
    hist = nflax.fit(
        flow,
        banana,
        key=jax.random.key(0),
        steps=5000,
        patience=20,
        val_fraction=0.0,
        optimizer=optax.sgd(0.5),  # oscillates, so the loss soon stops improving
        progress=False,
    )
    assert hist.stop_reason in ("patience", "non_finite")
    assert hist.steps_run < 5000
    assert len(hist.val_loss) == 0


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


def test_minibatch_fit_with_ragged_last_batch(banana):
    flow = _small_flow()
    # 512 points, batch 100: 6 batches an epoch, the last of 12 points
    hist = nflax.fit(flow, banana, key=jax.random.key(2), steps=60, batch_size=100, progress=False)
    assert hist.steps_run == 60 and np.all(np.isfinite(hist.loss))
    assert hist.loss[-10:].mean() < hist.loss[:10].mean()


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
    hist = nflax.fit(
        flow, poisoned, key=jax.random.key(0), steps=100, batch_size=64, progress=False
    )
    assert hist.stop_reason == "non_finite"
    assert hist.non_finite_step is not None and hist.non_finite_step < 8  # within the 1st epoch
    assert hist.steps_run == hist.non_finite_step
    assert all(np.all(np.isfinite(p)) for p in _params(flow))
    assert np.all(np.isfinite(nflax.nll(flow, banana)))


def test_gradient_clipping_runs(banana):
    flow = _small_flow()
    hist = nflax.fit(
        flow, banana, key=jax.random.key(0), steps=20, max_grad_norm=0.1, progress=False
    )
    assert hist.steps_run == 20 and np.all(np.isfinite(hist.loss))


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
    err = capsys.readouterr().err
    assert "steps/s" in err and "loss" in err


def test_history_export(banana, tmp_path):
    hist = nflax.fit(
        _small_flow(),
        banana,
        key=jax.random.key(0),
        steps=12,
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


def test_trained_density_integrates_to_one():
    ds = nflax.datasets.get("eight_gaussians")
    x = ds.sample(jax.random.key(0), 1024)
    flow = nflax.flows.realnvp(2, num_layers=6, hidden=(32, 32), rngs=nnx.Rngs(0))
    nflax.fit(flow, x, key=jax.random.key(1), steps=400, optimizer=optax.adam(3e-3), progress=False)
    lim, res = 5.0, 500
    xs, ys, logp = nflax.plotting.density_grid(flow, (-lim, lim), (-lim, lim), res)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    total = float(np.exp(logp).sum() * cell)
    assert abs(total - 1.0) < 0.01, total
    # and it learned something: the model puts mass where the data is
    assert float(jnp.mean(flow.log_prob(x))) > -3.0
