"""Paths a new user takes that once broke: dim-1 flows, 1-D and many-column data files through
the CLI, CSV headers, and two runs on one folder (issue 11)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import matplotlib.image
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax.cli import main
from nflax.datafiles import DataFileError, load_array, load_table
from nflax.runs import RunFolderError, claim_run_folder


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
@pytest.mark.slow  # 27 s; test_parallel.py matches meshes against one device by default
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


# ---- data files through the CLI: one column, many columns, a CSV header --------------------
def _train(*args: str) -> int:
    """A small, quick `nflax train`."""
    return main(["train", "--steps", "60", "--layers", "2", "--hidden", "8", "--quiet", *args])


_NSF_DEFAULTS = {"variant": "coupling", "bins": 8, "bound": 3.0, "context_dim": None}


def test_one_column_data_through_the_cli(tmp_path):
    data = tmp_path / "points.npy"
    np.save(data, _split_normal(0, 300)[:, 0])  # a 1D array: 300 points of dimension 1
    run = tmp_path / "run"
    assert _train("--data", str(data), "--out", str(run)) == 0
    for name in ("trajectory.png", "samples.png", "density.png", "loss.png", "metrics.json"):
        assert (run / name).is_file(), name
    # one coordinate: a coupling could only be affine, so the default flow is a spline flow
    config = json.loads((run / "config.json").read_text())
    spec = json.loads((run / "flow/nflax.json").read_text())["spec"]
    assert config["flow"] == "nsf" and spec["constructor"] == "nsf"
    assert config["flow_kwargs"].items() <= spec["kwargs"].items()
    assert _NSF_DEFAULTS.items() <= spec["kwargs"].items()
    out = tmp_path / "s.csv"
    assert main(["sample", str(run), "-n", "50", "-o", str(out)]) == 0
    s = np.loadtxt(out, delimiter=",")  # no header: the .npy file named no columns
    assert s.shape == (50,) and np.all(np.isfinite(s))


def test_one_dimensional_density_plot_is_the_curve_over_a_histogram():
    flow = nflax.flows.realnvp(1, num_layers=1, hidden=(4,), rngs=nnx.Rngs(0))  # N(0, 1) at init
    x = np.random.default_rng(0).normal(size=(2000, 1)).astype(np.float32)
    ax = nflax.plotting.plot_density(flow, x, labels=["height"]).axes[0]
    xs, ys = ax.get_lines()[0].get_data()
    np.testing.assert_allclose(ys, np.exp(-(xs**2) / 2) / np.sqrt(2 * np.pi), rtol=1e-4)
    area = sum(p.get_height() * p.get_width() for p in ax.patches)  # the data's histogram
    assert 0.97 < area <= 1.0 + 1e-6, area
    assert ax.get_xlabel() == "height"


def test_samples_plot_is_a_pair_plot_beyond_two_dimensions():
    key, rng = jax.random.key(0), np.random.default_rng(0)
    flow = nflax.flows.realnvp(3, num_layers=1, hidden=(4,), rngs=nnx.Rngs(0))
    fig = nflax.plotting.plot_samples(flow, key, 100, data=rng.normal(size=(80, 3)), labels="abc")
    axes = np.asarray(fig.axes).reshape(3, 3)
    for i in range(3):
        for j in range(3):
            assert axes[i, j].axison == (j <= i), (i, j)  # a corner: nothing above the diagonal
            if j < i:  # data and samples, dimension j against dimension i
                assert len(axes[i, j].collections) == 2
    assert [ax.get_xlabel() for ax in axes[2]] == ["a", "b", "c"]
    assert [axes[i, 0].get_ylabel() for i in (1, 2)] == ["b", "c"]
    flow2 = nflax.flows.realnvp(2, num_layers=1, hidden=(4,), rngs=nnx.Rngs(0))
    (ax,) = nflax.plotting.plot_samples(flow2, key, 100, labels=["u", "v"]).axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("u", "v")


def test_csv_header_names_the_plots_and_comes_back_from_sample(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 3)) * [1.0, 10.0, 100.0]
    data = tmp_path / "table.csv"
    np.savetxt(data, x, delimiter=",", header="alpha, beta,gamma", comments="")
    run = tmp_path / "run"
    assert _train("--data", str(data), "--out", str(run)) == 0
    assert json.loads((run / "config.json").read_text())["columns"] == ["alpha", "beta", "gamma"]
    # a 3x3 pair plot, not the 4-inch single panel (440 px at 110 dpi)
    assert matplotlib.image.imread(run / "samples.png").shape[0] > 500
    out = tmp_path / "s.csv"
    assert main(["sample", str(run), "-n", "20", "-o", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "alpha,beta,gamma"
    s, names = load_table(out)
    assert s.shape == (20, 3) and names == ["alpha", "beta", "gamma"]


def test_load_table_returns_the_header_names(tmp_path):
    (tmp_path / "h.csv").write_text("u, v\n1,2\n3,4\n")
    (tmp_path / "bad.csv").write_text("u,v,w\n1,2\n")
    np.save(tmp_path / "a.npy", np.ones((3, 2)))
    arr, names = load_table(tmp_path / "h.csv")
    assert names == ["u", "v"] and arr.tolist() == [[1, 2], [3, 4]]
    assert load_table(tmp_path / "a.npy")[1] is None
    np.testing.assert_array_equal(load_array(tmp_path / "h.csv"), arr)
    with pytest.raises(DataFileError, match="header names 3 column"):
        load_table(tmp_path / "bad.csv")


# ---- one nflax process per run folder ---------------------------------------------------------
LONG_RUN = ["--steps", "100000000", "--no-early-stopping", "--checkpoint-every", "1000000"]


def _cli(*args: str) -> subprocess.Popen:
    """`nflax train` (a tiny model, no plots) in its own process."""
    argv = [sys.executable, "-m", "nflax.cli", "train", "--layers", "1", "--hidden", "4"]
    return subprocess.Popen(
        [*argv, "--no-plots", "--quiet", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _refused(proc: subprocess.Popen, run: Path) -> None:
    """``proc`` exited with status 2 and the one-line "in use" message."""
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    assert err == f"nflax: error: run folder {run} is in use by another nflax process\n"


def test_two_runs_on_one_folder_the_second_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    procs = [_cli("--out", str(run), *LONG_RUN) for _ in range(2)]  # started together
    try:
        deadline = time.time() + 180
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        finished = [p for p in procs if p.poll() is not None]
        assert len(finished) == 1, f"{len(finished)} of the 2 runs ended (expected 1: refused)"
        (winner,) = [p for p in procs if p is not finished[0]]
        _refused(finished[0], run)
        _wait_for(run / "config.json", winner)
        config = (run / "config.json").read_bytes()
        # later commands, here in this process (the lock is the other process's): refused too
        base = ["train", "--layers", "1", "--hidden", "4", "--no-plots", "--quiet"]
        for late in (["--resume", str(run)], ["--out", str(run), "--seed", "7"]):
            capsys.readouterr()
            assert main([*base, *late]) == 2
            assert capsys.readouterr().err == (
                f"nflax: error: run folder {run} is in use by another nflax process\n"
            )
        assert winner.poll() is None  # still training, undisturbed
        assert (run / "config.json").read_bytes() == config
        assert not (run / "metrics.json").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def _claim_refused(run: Path, fresh: bool, message: str) -> None:
    with pytest.raises(RunFolderError, match=message), claim_run_folder(run, fresh=fresh):
        pass


def test_refused_claims_leave_the_folder_as_it_was(tmp_path):
    run = tmp_path / "run"
    with claim_run_folder(run, fresh=True):
        (run / "config.json").write_text("{}")
        for fresh in (True, False):
            _claim_refused(run, fresh, "in use by another nflax process")
    _claim_refused(run, True, "already exists and is not empty")
    with claim_run_folder(run, fresh=False):  # resuming a finished run is allowed
        pass
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _claim_refused(other, True, "not empty")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # no lock file left there


def test_vi_refuses_a_folder_in_use(tmp_path, capsys):
    run = tmp_path / "run"
    with claim_run_folder(run, fresh=True):
        assert main(["vi", "--target", "ring", "--steps", "5", "--out", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"nflax: error: run folder {run} is in use by another nflax process\n"
    )
    assert sorted(p.name for p in run.iterdir()) == [".nflax.lock"]
