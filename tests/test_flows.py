"""Every constructor: trained briefly, its density integrates to one; the CLI accepts it."""

import inspect
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import nflax
from nflax.cli import main

NAMES = sorted(nflax.flows.CONSTRUCTORS)
# maximum likelihood through an ODE solver, then a density on 90000 points: ~1 min on 2 cores
# (test_continuous.py trains and integrates a small cnf in the fast suite)
SLOW_TO_TRAIN = {"cnf"}


def _small(name):
    params = inspect.signature(nflax.flows.CONSTRUCTORS[name]).parameters
    # cnf: looser solver tolerances than its defaults (1e-7), for speed: 150 steps of maximum
    # likelihood through the solver, then a density on 90000 grid points
    small = dict(num_layers=3, hidden=(16, 16), rtol=1e-5, atol=1e-5)
    kw = {k: v for k, v in small.items() if k in params}
    if name == "planar":
        kw["num_layers"] = 8
    return nflax.flows.build(name, dim=2, rngs=nnx.Rngs(0), **kw)


@pytest.fixture(scope="module")
def data():
    return np.asarray(nflax.datasets.get("eight_gaussians").sample(jax.random.key(0), 512))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_TRAIN else n for n in NAMES]
)
def test_trained_density_integrates_to_one(name, data):
    flow = _small(name)
    hist = nflax.fit(
        flow, data, key=jax.random.key(1), steps=150, optimizer=optax.adam(3e-3), progress=False
    )
    assert hist.loss[-1] < hist.loss[0]  # it trained
    lim, res = 6.0, 300
    xs, ys, logp = nflax.plotting.density_grid(flow, (-lim, lim), (-lim, lim), res)
    total = float(np.exp(logp).sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]))
    assert abs(total - 1.0) < 0.02, total


@pytest.mark.parametrize("name", NAMES)
def test_cli_trains_every_flow(name, tmp_path, capsys):
    out = tmp_path / name
    params = inspect.signature(nflax.flows.CONSTRUCTORS[name]).parameters
    # a continuous flow (cnf) is one layer and refuses --layers (test_cli_flags)
    layers = ["--layers", "2"] if "num_layers" in params else []
    args = ["train", "--flow", name, "--steps", "20", *layers, "--hidden", "8"]
    args += ["--num-points", "256", "--out", str(out), "--quiet", "--no-plots"]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "metrics.json").is_file() and (out / "flow" / "nflax.json").is_file()
    assert json.loads((out / "config.json").read_text())["flow"] == name
    loaded = nflax.load(out / "flow")
    assert json.loads(loaded.spec)["constructor"] == name
    if layers:
        assert json.loads(loaded.spec)["kwargs"]["num_layers"] == 2
