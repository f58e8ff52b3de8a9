"""fit_flow_matching: the objective over the engine (validation, best parameters, exact
resume, NaN guard, mesh), minibatch-OT pairing, context, and (slow) the quality targets:
banana, conditional banana, 4-D correlated Gaussian."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nflax
from nflax.cli import _train_config as train_config
from nflax.cli import build_parser, main
from nflax.flow_matching import (
    FlowMatchingHistory,
    default_flow_matching_optimizer,
    fit_flow_matching,
    sinkhorn_pairing,
    split_continuous,
)


def _small(seed=0, **kw):
    return nflax.flows.cnf(2, hidden=(16, 16), actnorm=True, rngs=nnx.Rngs(seed), **kw)


@pytest.fixture(scope="module")
def banana():
    return np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 256))


def _params(flow):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(flow, nnx.Param))]


def test_fit_flow_matching_learns_validates_and_records_the_exact_nll(banana):
    flow = _small()
    hist = fit_flow_matching(
        flow,
        banana,
        key=jax.random.key(1),
        steps=120,
        val_fraction=0.25,
        eval_every=20,
        nll_every=60,
        chunk_size=60,
        progress=False,
    )
    assert isinstance(hist, FlowMatchingHistory) and hist.loss_name == "flow-matching loss"
    assert hist.steps_run == 120 and hist.stop_reason == "steps" and not hist.ot
    assert hist.loss[-20:].mean() < hist.loss[:20].mean() - 0.2
    np.testing.assert_array_equal(hist.val_steps, [0, 20, 40, 60, 80, 100, 119])
    np.testing.assert_array_equal(hist.nll_steps, [0, 60])  # multiples of nll_every
    assert hist.val_nll[1] < hist.val_nll[0]  # the exact NLL follows the regression
    # the flow holds the parameters of the best validation loss
    assert hist.restored_best and hist.best_step == hist.val_steps[np.argmin(hist.val_loss)]
    # the validation NLL recorded at step 60 is the flow's NLL on the held-out rows there:
    # step 0's is the NLL of the untrained flow (ActNorm, then the identity)
    held_out = banana[hist.val_index]
    fresh = _small()
    fresh.log_prob(banana[np.setdiff1d(np.arange(256), hist.val_index)][:192])  # ActNorm init
    np.testing.assert_allclose(hist.val_nll[0], nflax.nll(fresh, held_out).mean(), rtol=1e-4)
    assert np.isfinite(nflax.nll(flow, held_out)).all()


@pytest.mark.slow  # three compiled runs; the engine's resume is tested with fit in the fast suite
def test_exact_resume_and_same_key_same_parameters(banana, tmp_path):
    """30 steps with checkpoints, then resumed to 60, equal an uninterrupted run of 60."""
    kw = dict(key=jax.random.key(2), val_fraction=0.1, progress=False, ema=0.9)
    kw["optimizer"] = optax.adam(1e-3)  # no schedule over `steps`: 30 + 30 = 60
    whole = _small()
    fit_flow_matching(whole, banana, steps=60, checkpoint_every=30, **kw)
    fit_flow_matching(_small(), banana, steps=30, checkpoint_dir=tmp_path, **kw)
    resumed = _small()
    hist = fit_flow_matching(
        resumed, banana, steps=60, checkpoint_dir=tmp_path, checkpoint_every=30, resume=True, **kw
    )
    assert hist.steps_run == 60 and len(hist.loss) == 60
    for a, b in zip(_params(whole), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="fit_flow_matching: the checkpoints in"):
        fit_flow_matching(
            _small(), banana, steps=60, checkpoint_dir=tmp_path, resume=True, ot=True, **kw
        )


@pytest.mark.slow  # the engine's NaN guard and patience are tested with fit in the fast suite
def test_nan_guard_and_patience(banana):
    """A learning rate of 1e30 makes the loss non-finite: the run stops and keeps the last
    finite parameters; a rate of 0 never improves the validation loss: patience stops it."""
    flow = _small()
    hist = fit_flow_matching(
        flow, banana, key=jax.random.key(0), steps=50, optimizer=optax.sgd(1e30), progress=False
    )
    assert hist.stop_reason == "non_finite" and hist.non_finite_step is not None
    assert all(np.all(np.isfinite(p)) for p in _params(flow))
    hist = fit_flow_matching(
        _small(),
        banana,
        key=jax.random.key(0),
        steps=500,
        patience=10,
        eval_every=5,
        optimizer=optax.sgd(0.0),
        progress=False,
    )
    assert hist.stop_reason == "patience" and hist.steps_run == 11


def test_minibatch_ot_pairing_and_a_one_device_mesh(banana):
    x = jnp.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    z = jnp.array([[-5.1, 4.9], [0.1, 0.0], [5.1, 5.0]])
    np.testing.assert_array_equal(sinkhorn_pairing(x, z, jax.random.key(0)), [1, 2, 0])
    hist = fit_flow_matching(
        _small(),
        banana,
        key=jax.random.key(0),
        steps=60,
        batch_size=64,
        ot=True,
        mesh=jax.make_mesh((1,), ("data",)),
        progress=False,
    )
    assert hist.ot and hist.steps_run == 60 and np.all(np.isfinite(hist.loss))
    assert hist.loss[-10:].mean() < hist.loss[:10].mean()


def test_a_conditional_cnf_is_trained_with_its_context():
    ds = nflax.datasets.get_conditional("conditional_banana")
    x, c = (np.asarray(a) for a in ds.sample(jax.random.key(0), 256))
    flow = nflax.flows.cnf(
        2, hidden=(16,), actnorm=True, context_dim=1, embedding=(4,), rngs=nnx.Rngs(0)
    )
    hist = fit_flow_matching(flow, x, context=c, key=jax.random.key(1), steps=80, progress=False)
    assert hist.loss[-10:].mean() < hist.loss[:10].mean()
    assert float(jnp.abs(flow.embedding.out.kernel[...]).sum()) > 0
    lp = flow.log_prob(x[:4], c[:4])
    assert np.all(np.isfinite(lp)) and not np.allclose(lp, flow.log_prob(x[:4], c[:4] + 0.5))
    with pytest.raises(ValueError, match="this flow is conditional"):
        fit_flow_matching(flow, x, key=jax.random.key(1), steps=5, progress=False)


def test_errors_and_the_default_optimizer(banana):
    realnvp = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fit_flow_matching: needs a flow whose bijection is a"):
        fit_flow_matching(realnvp, banana, key=jax.random.key(0), steps=5)
    with pytest.raises(ValueError, match="nll_every must be a positive integer"):
        fit_flow_matching(_small(), banana, key=jax.random.key(0), steps=5, nll_every=0)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        fit_flow_matching(_small(), banana, key=jax.random.key(0), steps=5, resume=True)
    prefix, cnf = split_continuous(_small())
    assert [type(b).__name__ for b in prefix] == ["ActNorm"] and cnf.layer_names()[0]
    lr = default_flow_matching_optimizer(1000)
    state = lr.init({"w": jnp.zeros(2)})
    updates, _ = lr.update({"w": jnp.ones(2)}, state)
    assert float(jnp.abs(updates["w"]).max()) == 0.0  # the warm-up starts at rate 0


# -- the quality targets (slow) --------------------------------------------------------------


def _banana_run(seed):
    """``nflax train --flow cnf``'s recipe, as benchmarks/cnf.py runs it: 1024 points,
    16384 test points, the run's own keys."""
    from nflax.runs.train import FLOW_MATCHING

    key_data, key_test, key_fit, _ = jax.random.split(jax.random.key(seed), 4)
    ds = nflax.datasets.get("banana")
    x, xt = ds.sample(key_data, 1024), ds.sample(key_test, 16384)
    flow = nflax.flows.cnf(2, actnorm=True, rngs=nnx.Rngs(seed))
    fit_flow_matching(
        flow, x, key=key_fit, steps=8000, val_fraction=0.1, progress=False, **FLOW_MATCHING,
    )  # fmt: skip
    return flow, nflax.evaluate(flow, xt, log_prob_true=ds.log_prob), xt


@pytest.mark.slow
def test_banana_gap_and_round_trip_with_the_defaults():
    """Seed 0: gap 0.023 measured (seeds 0-4 in benchmarks/README.md); round trip of the
    test points within 1e-4 at the default tolerances."""
    flow, metrics, xt = _banana_run(0)
    assert metrics["test_minus_true_nll"] < 0.04, metrics
    z, ld = flow.bijection.forward(xt[:2048])
    x2, ld_inv = flow.bijection.inverse(z)
    assert float(jnp.max(jnp.abs(x2 - xt[:2048]))) < 1e-4
    assert float(jnp.max(jnp.abs(ld + ld_inv))) < 1e-4


@pytest.mark.slow
def test_conditional_banana_gap_below_a_tenth_of_a_nat():
    ds = nflax.datasets.get_conditional("conditional_banana")
    x, c = ds.sample(jax.random.key(0), 1024)
    xt, ct = ds.sample(jax.random.key(1), 8192)
    flow = nflax.flows.cnf(2, actnorm=True, context_dim=1, rngs=nnx.Rngs(0))
    fit_flow_matching(
        flow, x, context=c, key=jax.random.key(2), steps=4000, val_fraction=0.1, ema=0.999,
        restore_best=False, progress=False,
    )  # fmt: skip
    metrics = nflax.evaluate(flow, xt, ct, log_prob_true=ds.log_prob)
    assert metrics["test_minus_true_nll"] < 0.1, metrics


@pytest.mark.slow
def test_correlated_gaussian_4d_mean_and_covariance_from_samples():
    """Samples of a flow-matched cnf recover the mean and covariance of the 4-D correlated
    Gaussian within 3 % (of the largest standard deviation / covariance entry). 16384
    training points: with 4096 the data's own sample moments were already 2-3 % off."""
    mean, cov = nflax.datasets.correlated_gaussian_moments(4)
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal(mean, cov, size=16384).astype(np.float32)
    flow = nflax.flows.cnf(4, actnorm=True, rngs=nnx.Rngs(0))
    fit_flow_matching(
        flow, x, key=jax.random.key(1), steps=4000, batch_size=2048, ema=0.999,
        restore_best=False, progress=False,
    )  # fmt: skip
    s = np.asarray(flow.sample(jax.random.key(2), 2**16), np.float64)
    scale = np.sqrt(np.max(np.diag(cov)))
    assert np.max(np.abs(s.mean(0) - mean)) < 0.03 * scale
    assert np.max(np.abs(np.cov(s.T) - cov)) < 0.03 * np.max(np.abs(cov))


# -- the command line ------------------------------------------------------------------------
_CLI = ["train", "--flow", "cnf", "--hidden", "8", "--num-points", "256", "--quiet"]


def test_cli_objective_is_flow_matching_for_cnf_by_default_and_only_for_it(capsys):
    """The recipe each choice gets: objective, steps, hidden sizes and weight decay."""
    from nflax import runs

    def config(*flags):
        config, _ = train_config(build_parser().parse_args(["train", *flags]), runs)
        kw = config["flow_kwargs"]
        steps, decay, patience = config["steps"], config["weight_decay"], config["patience"]
        return config["objective"], steps, kw["hidden"], decay, patience

    assert config("--flow", "cnf") == ("flow-matching", 8000, [128, 128, 128], 0.0, None)
    assert config("--flow", "cnf", "--objective", "likelihood") == (
        "likelihood", 4000, [128, 128, 128], 3.0, 1000
    )  # fmt: skip
    assert config() == ("likelihood", 4000, [64, 64], 3.0, 1000)
    flags = ["--steps", "5", "--hidden", "8", "--weight-decay", "1", "--patience", "7"]
    assert config("--flow", "cnf", *flags) == ("flow-matching", 5, [8], 1.0, 7)
    assert main(["train", "--flow", "realnvp", "--objective", "flow-matching"]) == 2
    assert "--objective flow-matching trains a continuous flow" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_a_cnf_by_flow_matching_with_every_figure(tmp_path, capsys):
    out = tmp_path / "fm"
    args = [*_CLI, "--objective", "flow-matching", "--steps", "30", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "flow-matching" and config["weight_decay"] == 0.0
    for name in ("trajectory.png", "density.png", "samples.png", "loss.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["test_nll"])
    assert json.loads(nflax.load(out / "flow").spec)["constructor"] == "cnf"


@pytest.mark.slow
def test_cli_trains_a_cnf_by_likelihood(tmp_path, capsys):
    out = tmp_path / "ml"
    args = [*_CLI, "--objective", "likelihood", "--steps", "10", "--no-plots", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "likelihood" and config["weight_decay"] == 3.0
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["test_nll"])


@pytest.mark.slow
def test_cli_fits_a_cnf_by_variational_inference(tmp_path, capsys):
    # reverse KL through the ODE: samples and their log-density in one inverse solve
    out = tmp_path / "vi"
    args = ["vi", "--flow", "cnf", "--steps", "20", "--hidden", "8", "--no-plots", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_run"] == 20 and np.isfinite(metrics["elbo"])
    assert metrics["elbo"] <= metrics["log_z"] + 4 * metrics["elbo_std_error"]  # ELBO ≤ log Z
    assert json.loads(nflax.load(out / "flow").spec)["constructor"] == "cnf"


@pytest.mark.slow
def test_the_continuous_flows_page_runs():
    # docs/continuous.md's example, with 50 training steps instead of 8000
    text = (Path(__file__).parents[1] / "docs" / "continuous.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert "steps=8000" in code
    scope = {}
    exec(code.replace("steps=8000", "steps=50"), scope)
    assert scope["log_p"].shape == (8,) and np.isfinite(scope["log_p"]).all()
    assert scope["samples"].shape == (512, 2)
