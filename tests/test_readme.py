"""The README's Quick start, run exactly as written (its code block is read from README.md)."""

import re
from pathlib import Path

import jax
import numpy as np

import nflax

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    text = README.read_text()
    match = re.search(r"## Quick start \(Python\)\s+```python\n(.*?)```", text, re.S)
    assert match, "README.md has no Quick start python block"
    return match.group(1)


def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes trajectory.png and my_flow/ where it runs
    ns = {"__name__": "quick_start"}
    exec(compile(quick_start(), str(README), "exec"), ns)
    data, flow, history = ns["data"], ns["flow"], ns["history"]
    assert data.shape == (1024, 2)
    # 10 % held out, early stopping, the best validation parameters restored
    assert len(history.val_index) == 102 and history.restored_best
    assert history.stop_reason in ("patience", "steps") and history.steps_run <= 4000
    assert ns["log_p"].shape == (1024,) and np.all(np.isfinite(ns["log_p"]))
    assert ns["x"].shape == (1000, 2) and np.all(np.isfinite(ns["x"]))
    layers = ns["layers"]
    assert len(layers) == 9 and np.array_equal(layers[0], data)  # the input, then 8 layers
    np.testing.assert_allclose(layers[-1], flow.bijection.forward(data)[0], atol=1e-5)
    assert (tmp_path / "trajectory.png").stat().st_size > 10_000
    # the saved and reloaded flow is the same density, bit for bit
    np.testing.assert_array_equal(np.asarray(ns["same"].log_prob(data)), np.asarray(ns["log_p"]))
    # and it learned the banana: on fresh points, close to the exact NLL
    ds = nflax.datasets.get("banana")
    fresh = ds.sample(jax.random.key(9), 8192)
    gap = float(nflax.nll(flow, fresh).mean() + ds.log_prob(fresh).mean())
    assert gap < 0.15, gap
    # nflax.evaluate: the same gap on its own 16384 test points, the worst point above the mean
    m = ns["metrics"]
    assert m["num_test_points"] == 16384 and m["test_minus_true_nll"] < 0.15, m
    assert m["test_nll_median"] < m["test_nll_trimmed_1pct"] < m["test_nll"] < m["test_nll_worst"]
