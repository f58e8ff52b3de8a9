"""nflax.fit_vi (reverse KL), the sticking-the-landing gradient, VI targets, `nflax vi`."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nflax
from nflax.bijections import ActNorm, Chain
from nflax.cli import main
from nflax.datasets import (
    correlated_gaussian_moments,
    get_target,
    grid_log_normalizer,
    target_names,
)
from nflax.distributions import StandardNormal
from nflax.engine import split_model
from nflax.vi import (
    _log_weights,
    check_log_density,
    default_vi_optimizer,
    default_vi_schedule,
    fit_vi,
    importance_diagnostics,
    vi_diagnostics,
)


def _flow(seed=0, layers=4, hidden=(16,)):
    return nflax.flows.realnvp(2, num_layers=layers, hidden=hidden, rngs=nnx.Rngs(seed))


def _adam(lr, steps):
    return optax.adam(optax.cosine_decay_schedule(lr, steps))


def _params(flow):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(flow, nnx.Param))]


# -- fits --------------------------------------------------------------------------------------
def test_correlated_gaussian_mean_and_covariance_are_recovered():
    # Two coupling layers (less to compile than four). Measured over seeds 0-2 (initialisation
    # and key), native and SSE4.2 kernels alike: mean error / std at most 0.0056, covariance
    # relative error at most 0.013, ELBO − log Z from −0.0033 to −0.0026, ESS at least 0.990,
    # log Z error at most 0.0006
    target = get_target("correlated_gaussian", dim=2)
    flow = _flow(layers=2)
    hist = fit_vi(
        flow,
        target.log_density,
        key=jax.random.key(0),
        steps=1000,
        optimizer=_adam(1e-2, 1000),
        progress=False,
    )
    assert hist.stop_reason == "steps" and hist.steps_run == 1000
    assert hist.elbo.shape == (1000,) and np.all(np.isfinite(hist.elbo))
    assert hist.eval_steps[0] == 0 and hist.eval_steps[-1] == 999
    x = np.asarray(flow.sample(jax.random.key(5), 200_000))
    mean, cov = np.asarray(target.mean), np.asarray(target.covariance)
    std = np.sqrt(np.diag(cov))
    mean_err = np.abs(x.mean(0) - mean) / std
    cov_err = np.linalg.norm(np.cov(x.T) - cov) / np.linalg.norm(cov)
    print(f"mean error / std {mean_err}, covariance relative error {cov_err:.4f}")
    assert np.all(mean_err < 0.05) and cov_err < 0.05
    # the ELBO is a lower bound that is nearly tight; the weights are nearly uniform
    log_z = target.log_normalizer
    assert log_z - 0.02 < hist.elbo[-100:].mean() < log_z + 0.005
    assert hist.ess_fraction[-1] > 0.9 and abs(hist.log_z[-1] - log_z) < 0.02


def _energy1_fit(steps, seed=0):
    """`nflax vi`'s setup on energy1: warm-up + cosine from 1e-2, the path derivative. (A
    cosine decay without the warm-up was unstable: over seeds 0-4 with XLA's SSE4.2 kernels its
    ESS after 2000 steps ranged from 0.015 to 0.93; with it, 0.53 to 0.95.)"""
    target = get_target("energy1")
    flow = _flow(seed, layers=6, hidden=(32,))
    hist = fit_vi(
        flow,
        target.log_density,
        key=jax.random.key(seed),
        steps=steps,
        num_samples=512,
        optimizer=default_vi_optimizer(steps, 1e-2),
        stick_the_landing=True,
        progress=False,
    )
    assert hist.stick_the_landing and hist.steps_run == steps
    assert np.all(np.isfinite(hist.elbo)) and np.all(np.isfinite(hist.ess_fraction))
    diag = vi_diagnostics(flow, target.log_density, key=jax.random.key(9))
    gap = target.log_normalizer - diag["elbo"]
    print(f"energy1 {steps} steps: log Z − ELBO {gap:.4f}, {diag}")
    assert gap > -3 * diag["elbo_std_error"]  # a lower bound, whatever the fit
    diag["log_z_error"] = abs(diag["log_z"] - target.log_normalizer)
    return gap, diag


def test_energy1_with_stick_the_landing_gets_half_the_samples_effective():
    # Measured over seeds 0-4, native and SSE4.2 kernels: ESS 0.53-0.95, gap 0.026-0.079 (seed
    # 0 has the largest gap). One seed's figure would sit inside that spread, so the median of
    # three is asserted (measured: ESS 0.87, gap 0.035).
    fits = [_energy1_fit(2000, seed) for seed in range(3)]
    assert np.median([d["ess_fraction"] for _, d in fits]) > 0.5
    assert np.median([gap for gap, _ in fits]) < 0.1
    assert np.median([d["log_z_error"] for _, d in fits]) < 0.03


# 15000 steps of fitting; test_energy1_with_stick_the_landing_gets_half_the_samples_effective
# fits the same setup for 2000 steps in the default run (median gap below 0.1 nats, log Z to 0.03)
@pytest.mark.slow
def test_energy1_elbo_within_005_nats_of_log_z():
    # Over seeds 0-4 (native and SSE4.2 kernels) four seeds end 0.014-0.018 below log Z; seed 0
    # loses part of one of energy1's two lobes (gap 0.34 natively, 0.71 ≈ log 2 with SSE4.2:
    # reverse KL is mode-seeking). The median of three seeds is what holds.
    fits = [_energy1_fit(5000, seed) for seed in range(3)]
    assert np.median([gap for gap, _ in fits]) < 0.05, fits
    assert np.median([d["log_z_error"] for _, d in fits]) < 0.03, fits


def test_stick_the_landing_gradient_vanishes_when_q_equals_p():
    # A fresh RealNVP is the identity (zero-initialised output layers): q = N(0, I) = p.
    model = split_model(_flow(layers=2, hidden=(8,)))

    def log_density(x):
        return -0.5 * jnp.sum(x**2, axis=-1)

    def loss(p, stl):
        lw, _ = _log_weights(model, p, model.rest, jax.random.key(3), 64, log_density, stl)
        return -jnp.mean(lw)

    grads = jax.jit(lambda p: [jax.grad(loss)(p, stl) for stl in (True, False)])(model.params)
    g_stl, g_total = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)]) for g in grads)
    assert np.max(np.abs(g_stl)) < 1e-5  # the path derivative: zero at the optimum, per sample
    assert np.max(np.abs(g_total)) > 1e-2  # the score term: zero only in expectation


def test_same_key_same_result_across_chunks_with_actnorm():
    target = get_target("ring")
    runs = []
    for _ in range(2):
        # ActNorm has no data to initialise on: it starts as the identity and is trained
        inner = _flow(seed=3, layers=2, hidden=(8,)).bijection
        flow = nflax.Flow(StandardNormal(2), Chain([ActNorm(2), inner]))
        kw = dict(key=jax.random.key(4), steps=30, num_samples=64, chunk_size=16)
        hist = fit_vi(flow, target.log_density, stick_the_landing=True, progress=False, **kw)
        runs.append((hist, _params(flow)))
    (h1, p1), (h2, p2) = runs
    assert h1.steps_run == 30 and np.all(np.isfinite(h1.elbo))
    actnorm = flow.bijection.layers[0]
    assert bool(actnorm.initialized[...]) and np.any(np.asarray(actnorm.log_scale[...]) != 0)
    np.testing.assert_array_equal(h1.elbo, h2.elbo)
    np.testing.assert_array_equal(h1.ess_fraction, h2.ess_fraction)
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_guard_stops_and_keeps_finite_parameters():
    def log_density(x):  # NaN for the rare sample with x0 < −3.5
        return jnp.log(x[:, 0] + 3.5) - 0.5 * x[:, 1] ** 2

    flow = _flow(layers=2, hidden=(8,))
    before = _params(flow)
    hist = fit_vi(flow, log_density, key=jax.random.key(0), steps=500, progress=False)
    assert hist.stop_reason == "non_finite"
    assert 0 < hist.steps_run < 500 and hist.non_finite_step == hist.steps_run
    assert len(hist.elbo) == hist.steps_run and np.all(np.isfinite(hist.elbo))
    after = _params(flow)
    assert all(np.all(np.isfinite(p)) for p in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    "log_density, match",
    [
        (lambda x: x, r"log_density must map a batch of shape \(256, 2\) to floats of shape"),
        (lambda x: jnp.sum(x, axis=-1, keepdims=True), r"received shape \(256, 1\)"),
        (lambda x: jnp.sum(x), r"received shape \(\)"),
        (lambda x: jnp.sum(x, axis=-1) > 0, "dtype bool"),
        (lambda x: x @ jnp.ones(3), "log_density failed on a batch of shape"),
        ("not a function", "log_density must be callable"),
    ],
)
def test_bad_log_density_is_rejected_before_compiling(log_density, match):
    with pytest.raises(ValueError, match=match):
        fit_vi(_flow(layers=1), log_density, key=jax.random.key(0), steps=5)
    # the same check, on its own, names its caller
    with pytest.raises(ValueError, match=match) as e:
        check_log_density(log_density, 2, 256, "vi_diagnostics")
    assert str(e.value).startswith("vi_diagnostics: ")


def test_check_log_density_accepts_a_good_one():
    assert check_log_density(get_target("ring").log_density, 2, 16) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "fit_vi: steps must be a positive integer"),
        (dict(steps=5, num_samples=-1), "fit_vi: num_samples must be a positive integer"),
        (dict(steps=5, max_grad_norm=0.0), "max_grad_norm must be > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_vi(_flow(layers=1), get_target("ring").log_density, key=jax.random.key(0), **kwargs)


def test_importance_diagnostics():
    log_w = jnp.log(jnp.array([1.0, 1.0, 0.0 + 1e-30, 2.0]))
    elbo, ess, log_z = importance_diagnostics(log_w)
    np.testing.assert_allclose(elbo, (np.log(1e-30) + np.log(2.0)) / 4, rtol=1e-6)  # mean log w
    np.testing.assert_allclose(ess, 16 / 6 / 4, rtol=1e-5)  # (Σw)²/Σw² = 16/6
    np.testing.assert_allclose(log_z, np.log(1.0), atol=1e-6)  # mean w = 1


# -- targets -----------------------------------------------------------------------------------
def test_targets_have_the_right_shapes_and_normalisers():
    x = jax.random.normal(jax.random.key(0), (7, 2)) * 2
    for name in target_names():
        t = get_target(name)
        assert t.dim == 2 and t.log_density(x).shape == (7,), name
        assert np.all(np.isfinite(np.asarray(t.log_density(x)))), name
        # the stored log Z (4000² cells in float64, or exact) against a coarse float32 grid
        low, high = (-8.0, 8.0) if name != "correlated_gaussian" else (-10.0, 10.0)
        coarse = grid_log_normalizer(t.log_density, low, high, resolution=300)
        assert abs(coarse - t.log_normalizer) < 1e-3, (name, coarse, t.log_normalizer)


def test_correlated_gaussian_in_three_dimensions_is_exact():
    mean, cov = correlated_gaussian_moments(3)
    np.testing.assert_allclose(mean, [1.5, 0.5, -0.5])  # linspace(1, −1, 3) + ½
    std = np.array([1.5, 1.0, 0.5])  # linspace(1.5, 0.5, 3)
    corr = np.array([[1, 0.8, 0.64], [0.8, 1, 0.8], [0.64, 0.8, 1]])  # 0.8^|i−j|
    np.testing.assert_allclose(cov, std[:, None] * corr * std[None, :])
    np.testing.assert_allclose(correlated_gaussian_moments(1)[0], [1.5])
    np.testing.assert_allclose(correlated_gaussian_moments(1)[1], [[2.25]])
    t = get_target("correlated_gaussian", dim=3)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    ref = jax.scipy.stats.multivariate_normal.logpdf(x, t.mean, t.covariance)
    np.testing.assert_allclose(t.log_prob(x), ref, rtol=1e-5, atol=1e-5)
    assert t.mean.shape == (3,) and t.covariance.shape == (3, 3)
    assert abs(float(t.covariance[0, 1]) / (1.5 * 1.0)) == pytest.approx(0.8, rel=1e-5)


def test_unknown_target_and_options():
    with pytest.raises(ValueError, match="unknown target 'nope'; known targets: corr"):
        get_target("nope")
    with pytest.raises(ValueError, match="takes no options"):
        get_target("energy1", dim=3)
    with pytest.raises(ValueError, match="dim must be"):
        get_target("correlated_gaussian", dim=0)


# -- the command and the example ---------------------------------------------------------------
def test_cli_vi_writes_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["vi", "--target", "ring", "--steps", "30", "--layers", "2", "--hidden", "8"]
    argv += ["--num-samples", "64", "--stick-the-landing", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    for name in [
        "config.json",
        "history.csv",
        "metrics.json",
        "samples.png",
        "density.png",
        "trajectory.png",
        "loss.png",
        "flow/nflax.json",
    ]:
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert cfg["target"] == "ring" and cfg["stick_the_landing"] and cfg["steps"] == 30
    assert cfg["num_samples"] == 64 and cfg["flow_kwargs"]["num_layers"] == 2
    assert m["log_z"] == pytest.approx(get_target("ring").log_normalizer)
    assert np.isfinite(m["elbo"]) and 0 < m["ess_fraction"] <= 1 and np.isfinite(m["kl_q_p"])
    assert m["kl_q_p"] == pytest.approx(m["log_z"] - m["elbo"])  # KL(q ‖ p) = log Z − ELBO
    assert m["elbo"] < m["log_z"] + 3 * m["elbo_std_error"]  # a lower bound
    rows = (out / "history.csv").read_text().strip().splitlines()
    assert rows[0] == "step,elbo,ess_fraction,log_z" and len(rows) == 31
    flow = nflax.load(out / "flow")
    assert flow.sample(jax.random.key(0), 3).shape == (3, 2)
    # errors: one line, exit 2, nothing written
    for argv, message in [
        (["vi", "--target", "nope"], "unknown target 'nope'; known targets:"),
        (["vi", "--target", "energy2", "--dim", "3"], "takes no options"),
        (["vi", "--out", str(out)], "already exists"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_example_runs_small(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "variational_inference.py"
    spec = importlib.util.spec_from_file_location("variational_inference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    diag = mod.main(steps=100, out=str(tmp_path / "vi.png"))
    assert (tmp_path / "vi.png").stat().st_size > 1000
    assert np.isfinite(diag["elbo"]) and diag["kl_q_p"] > -0.01


def test_default_vi_optimizer_is_adam_on_the_default_schedule():
    """With a constant gradient Adam's step is the learning rate itself (m̂/√v̂ = 1), so the
    updates trace the schedule: 0 at step 0, the peak after the warm-up, half of it mid-decay."""
    for peak in (3e-3, 1e-2):
        tx = default_vi_optimizer(1000, learning_rate=peak)
        lr = default_vi_schedule(1000, peak)
        params = {"w": jnp.zeros(3)}
        state = tx.init(params)
        grads = {"w": jnp.ones(3)}
        update = jax.jit(tx.update)  # one compile, not a dispatch of every small op 551 times
        steps = []
        for _ in range(551):
            updates, state = update(grads, state, params)
            steps.append(float(updates["w"][0]))
        for t in (0, 100, 550):
            assert -steps[t] == pytest.approx(float(lr(t)), rel=1e-4, abs=1e-9)
        assert -steps[100] == pytest.approx(peak, rel=1e-4) and steps[0] == 0.0
