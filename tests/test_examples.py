"""The examples run and say what they claim."""

import importlib.util
from pathlib import Path

import jax
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_change_of_variables_histogram_matches_formula(tmp_path):
    mod = _load("change_of_variables_1d")
    centers, hist, formula = mod.densities(jax.random.key(1), n=200_000, a=2.0, b=-1.0)
    np.testing.assert_allclose(formula, 0.5, rtol=1e-6)  # 1/|a| on [-1, 1]
    assert np.max(np.abs(hist - formula)) < 0.03
    # a contracting, flipping map: y = -0.5 x + 3 has density 2 on [2.5, 3]
    centers, hist, formula = mod.densities(jax.random.key(2), n=200_000, a=-0.5, b=3.0)
    np.testing.assert_allclose(formula, 2.0, rtol=1e-6)
    assert np.max(np.abs(hist - formula)) < 0.12
    mod.main(str(tmp_path / "cov.png"))
    assert (tmp_path / "cov.png").stat().st_size > 1000


def test_conditional_density_example_runs_small(tmp_path):
    mod = _load("conditional_density")
    gap = mod.main(steps=150, out=str(tmp_path / "c.png"), num_points=512)
    assert np.isfinite(gap) and gap < 1.0
    assert (tmp_path / "c.png").stat().st_size > 1000
