"""Data-parallel training: 4 virtual CPU devices, and 2 processes joined by jax.distributed."""

import json
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import Mesh

from nflax import parallel

WORKER = str(Path(__file__).with_name("parallel_worker.py"))


def _run(mode, out, *extra, timeout=400):
    return subprocess.Popen(
        [sys.executable, WORKER, mode, str(out), *map(str, extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=400):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The workers' runs on one device, here in this process (one cold process fewer): the
    worker's own code, run by runpy with its "single" arguments."""
    import jax

    assert jax.device_count() == 1, "the reference is one device"
    out = tmp_path_factory.mktemp("par") / "single.json"
    argv = sys.argv
    try:
        sys.argv = [WORKER, "single", str(out)]
        runpy.run_path(WORKER, run_name="__main__")
    finally:
        sys.argv = argv
    return json.loads(out.read_text())


def test_four_virtual_devices_match_one(single, tmp_path):
    out = tmp_path / "v4.json"
    _finish(_run("virtual4", out))
    r = json.loads(out.read_text())
    assert r["device_count"] == 4
    for bs in ("None", "64"):  # full batch (padded to a multiple of 4) and minibatches
        np.testing.assert_allclose(r[f"loss_{bs}"], single[f"loss_{bs}"], rtol=1e-5)
        np.testing.assert_allclose(r[f"val_{bs}"], single[f"val_{bs}"], rtol=1e-5)
    np.testing.assert_allclose(r["log_prob_sharded"], r["log_prob_plain"], rtol=1e-6)
    assert r["samples_finite"]
    assert "batch_size 30 must be divisible by the 4 devices" in r["indivisible_error"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(single, tmp_path):
    port = _free_port()
    out = tmp_path / "multi.json"
    procs = [_run("multi", out, pid, 2, port) for pid in (0, 1)]
    for p in procs:
        _finish(p)
    r = json.loads(out.read_text())
    assert r["process_count"] == 2 and r["device_count"] == 2
    for bs in ("None", "64"):
        np.testing.assert_allclose(r[f"loss_{bs}"], single[f"loss_{bs}"], rtol=1e-5)


def test_argument_errors():
    import jax

    with pytest.raises(ValueError, match="'data'"):
        parallel.resolve_mesh(Mesh(np.asarray(jax.devices()), ("batch",)), None)
    with pytest.raises(ValueError, match="not both"):
        parallel.resolve_mesh(parallel.make_mesh(), "all")
    with pytest.raises(ValueError, match="'all' or a list"):
        parallel.make_mesh("some")
    with pytest.raises(ValueError, match="process_id must be in"):
        parallel.initialize("localhost:1234", 2, 5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parallel.initialize("localhost", 2, 0)
