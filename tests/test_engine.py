"""The engine's promises, for every objective alike: maximum likelihood (``fit``) and reverse KL
(``fit_vi``) share the NaN guard, patience on a plateau, exact resume from checkpoints, the
parameter average and the callback. (Meshes: tests/mesh_worker.py runs both on 4 devices.)"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nflax
from nflax.distributions import StandardNormal

OBJECTIVES = ["likelihood", "elbo"]
# N(0, I) data / target: a fresh realnvp is the identity, so q = p exactly at the start
DATA = np.asarray(jax.random.normal(jax.random.key(0), (256, 2)))
STANDARD_NORMAL = StandardNormal(2).log_prob


def wider_normal(x):
    """A wider Gaussian target: something to learn (a fresh flow is N(0, I))."""
    return STANDARD_NORMAL(x / 2.0)


def _flow(seed: int = 0):
    # one coupling layer: the engine's promises need a trainable flow, not a good one, and each
    # layer adds to every program compiled here
    return nflax.flows.realnvp(2, num_layers=1, hidden=(8,), rngs=nnx.Rngs(seed))


def _train(objective: str, flow, steps: int, data=DATA, log_density=STANDARD_NORMAL, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("optimizer", optax.adam(1e-2))
    if objective == "likelihood":
        return nflax.fit(flow, data, key=jax.random.key(1), steps=steps, **kw)
    kw.setdefault("num_samples", 64)
    return nflax.fit_vi(flow, log_density, key=jax.random.key(1), steps=steps, **kw)


def _params(flow) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(flow))]


def _losses(objective: str, hist) -> np.ndarray:
    return hist.loss if objective == "likelihood" else -hist.elbo


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_patience_stops_at_the_exact_step_on_a_plateau(objective):
    # learning rate 0: the monitored metric never changes after its first evaluation (the
    # validation NLL; for VI the evaluated ELBO, exactly 0 since q = p and log w ≡ 0)
    kw = dict(optimizer=optax.sgd(0.0), patience=30, eval_every=10)
    if objective == "likelihood":
        kw["val_fraction"] = 0.25
    hist = _train(objective, _flow(), 1000, **kw)
    assert hist.stop_reason == "patience" and hist.best_step == 0
    assert hist.steps_run == 31  # the evaluation at step 30 sees 30 steps without a gain
    assert hist.restored_best


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_nan_guard_stops_and_keeps_finite_parameters(objective):
    if objective == "likelihood":
        bad = DATA.copy()
        bad[5] = [1e30, 1e30]  # finite, but its log-density overflows
        hist = _train(objective, (flow := _flow()), 50, data=bad, batch_size=64)
    else:  # a target that is NaN beyond x₀ = 2: some of 64 samples land there
        log_density = lambda x: jnp.where(x[:, 0] > 2.0, jnp.nan, STANDARD_NORMAL(x))  # noqa: E731
        hist = _train(objective, (flow := _flow()), 50, log_density=log_density)
    assert hist.stop_reason == "non_finite"
    assert hist.steps_run == hist.non_finite_step < 50
    assert np.all(np.isfinite(_losses(objective, hist)))  # the non-finite step is not recorded
    assert all(np.all(np.isfinite(p)) for p in _params(flow))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_from_the_latest_checkpoint_is_exact(objective, tmp_path):
    kw = dict(checkpoint_every=20, log_density=wider_normal)  # chunks of 20: as in the next test
    full = _flow()
    h_full = _train(objective, full, 60, checkpoint_dir=tmp_path / "a", **kw)
    _train(objective, _flow(), 40, checkpoint_dir=tmp_path / "b", **kw)
    woke = []
    resumed = _flow(seed=7)  # another initialisation: the checkpoint wins
    h_res = _train(
        objective,
        resumed,
        60,
        checkpoint_dir=tmp_path / "b",
        resume=True,
        callback=lambda step, m: woke.append(step),
        **kw,
    )
    assert woke == []  # one chunk, 40 → 60, then the budget ends the run
    assert h_res.steps_run == 60
    np.testing.assert_array_equal(_losses(objective, h_full), _losses(objective, h_res))
    for a, b in zip(_params(full), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit
    with pytest.raises(ValueError, match="already holds training checkpoints"):
        _train(objective, _flow(), 80, checkpoint_dir=tmp_path / "b", **kw)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ema_zero_is_the_plain_iterate_and_a_callback_can_stop(objective):
    # the plain run is the previous test's program (same settings but checkpoints): reused
    a, b = _flow(), _flow()
    calls = []
    kw = dict(chunk_size=20, log_density=wider_normal)
    ha = _train(objective, a, 60, **kw)
    hb = _train(objective, b, 60, ema=0.0, callback=lambda s, m: calls.append(m) or s >= 40, **kw)
    assert hb.stop_reason == "callback" and hb.steps_run == 40 and len(calls) == 2
    np.testing.assert_array_equal(_losses(objective, ha)[:40], _losses(objective, hb))
    assert calls[-1]["steps_per_second"] > 0 and np.isfinite(calls[-1]["loss"])


def test_the_objective_in_docs_engine_md_runs_as_written(capsys):
    """docs/engine.md's whole custom objective trains a flow through the engine."""
    text = (Path(__file__).parent.parent / "docs" / "engine.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict = {}
    exec(compile(code, "docs/engine.md", "exec"), namespace)
    run = namespace["run"]
    assert run.steps_run == 300 and run.stop_reason == "steps"
    loss = run.outputs[0]
    assert np.all(np.isfinite(loss)) and loss[-20:].mean() < loss[:20].mean() - 1.0
    steps, reason, last = capsys.readouterr().out.split()
    assert (int(steps), reason) == (300, "steps") and float(last) == loss[-1]
