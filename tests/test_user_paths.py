"""Paths a new user takes that once broke: dim-1 flows, 1-D and many-column data files through
the CLI, CSV headers, and two runs on one folder (issue 11)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from helpers import perturb

import nflax


# ---- realnvp(1): no identity coupling layers ------------------------------------------------
def test_realnvp_dim1_every_coupling_layer_moves_its_input():
    flow = nflax.flows.realnvp(1, num_layers=4, hidden=(8,), rngs=nnx.Rngs(0))
    perturb(flow, jax.random.key(1))
    x = np.linspace(-2, 2, 9, dtype=np.float32)[:, None]
    traj = [np.asarray(t) for t in flow.trajectory(x)]
    assert len(traj) == 5
    for i in range(4):
        moved = np.max(np.abs(traj[i + 1] - traj[i]))
        assert moved > 1e-3, f"coupling layer {i} is the identity (moved {moved:.2e})"


def _split_normal(key: int, n: int, mode: float = 3.0, left: float = 2.0, right: float = 0.5):
    """A skewed 1-D density: half-normals of scale ``left`` / ``right`` joined at ``mode``."""
    rng = np.random.default_rng(key)
    side = rng.random(n) < left / (left + right)
    h = np.abs(rng.standard_normal(n))
    return (mode + np.where(side, -left * h, right * h)).astype(np.float32)[:, None]


def test_realnvp_dim1_fits_a_skewed_density_better_than_a_gaussian():
    x, x_test = _split_normal(0, 1024), _split_normal(1, 4096)
    gaussian_nll = 0.5 * np.log(2 * np.pi * np.e * x.var())  # the best Gaussian's entropy
    flow = nflax.flows.realnvp(1, num_layers=1, hidden=(8,), leaky_relu=True, rngs=nnx.Rngs(0))
    nflax.fit(flow, x, key=jax.random.key(2), steps=600, optimizer=optax.adam(2e-2), progress=False)
    flow_nll = float(np.mean(nflax.nll(flow, x_test)))
    assert flow_nll < gaussian_nll - 0.025, (flow_nll, gaussian_nll)


# ---- meshes with Explicit and Auto axes: fit, fit_vi and nll ------------------------------
def test_meshes_of_both_axis_types_match_one_device(tmp_path):
    out = tmp_path / "mesh.json"
    worker = Path(__file__).with_name("mesh_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    r = json.loads(out.read_text())
    assert r["device_count"] == 4
    for axes in ("explicit", "auto"):
        for what, one in r["one"].items():
            np.testing.assert_allclose(r[axes][what], one, rtol=1e-5, err_msg=f"{axes}: {what}")
    assert "num_samples 30 must be divisible by the 4 devices" in r["indivisible_error"]
