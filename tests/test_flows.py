"""Every constructor: the CLI trains it briefly, and its density integrates to one."""

import csv
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


def _integral(flow, lim: float) -> float:
    xs, ys, logp = nflax.plotting.density_grid(flow, (-lim, lim), (-lim, lim), 300)
    return float(np.exp(logp).sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]))


# test_cli_trains_every_flow trains each of these but cnf through `nflax train` and checks its
# density in the default run; here the same check after nflax.fit with adam
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_trained_density_integrates_to_one(name, data):
    flow = _small(name)
    hist = nflax.fit(
        flow, data, key=jax.random.key(1), steps=150, optimizer=optax.adam(3e-3), progress=False
    )
    assert hist.loss[-1] < hist.loss[0]  # it trained
    total = _integral(flow, 6.0)
    assert abs(total - 1.0) < 0.02, total


@pytest.mark.parametrize("name", NAMES)
def test_cli_trains_every_flow(name, tmp_path, capsys):
    """`nflax train` accepts every flow; 150 steps on the eight Gaussians (its own recipe: a
    validation split, adamw, warm-up and cosine decay), then the saved flow's density on a grid
    integrates to one (±8: the planar flow's tails are wide). cnf: 20 steps, no grid."""
    out = tmp_path / name
    params = inspect.signature(nflax.flows.CONSTRUCTORS[name]).parameters
    # a continuous flow (cnf) is one layer and refuses --layers (test_cli_flags)
    layers = ["--layers", "2"] if "num_layers" in params else []
    steps = "20" if name in SLOW_TO_TRAIN else "150"
    args = ["train", "--flow", name, "--steps", steps, *layers, "--hidden", "8"]
    args += ["--dataset", "eight_gaussians", "--num-points", "512"]
    args += ["--out", str(out), "--quiet", "--no-plots"]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "metrics.json").is_file() and (out / "flow" / "nflax.json").is_file()
    assert json.loads((out / "config.json").read_text())["flow"] == name
    loaded = nflax.load(out / "flow")
    assert json.loads(loaded.spec)["constructor"] == name
    if layers:
        assert json.loads(loaded.spec)["kwargs"]["num_layers"] == 2
    if name in SLOW_TO_TRAIN:  # its density after training: test_trained_density_... (slow)
        return
    with open(out / "history.csv") as f:
        loss = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(loss) == 150 and loss[-1] < loss[0]  # it trained
    total = _integral(loaded, 8.0)
    assert abs(total - 1.0) < 0.02, total
