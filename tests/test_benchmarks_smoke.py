"""Smoke tests: the training-speed benchmarks run end to end at tiny sizes and print their tables.

No timing is asserted; speed is measured by running the benchmarks, not by tests.
"""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *flags: str) -> str:
    env = dict(os.environ, MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_speed_quick_prints_table():
    text = _run("train_speed.py", "--quick", "--markdown")
    assert "| batch | impl | steps/s | × baseline |" in text, text
    rows = [line for line in text.splitlines() if line.startswith("| 16 |")]
    impls = [r.split("|")[2].strip() for r in rows]
    assert impls == ["baseline", "Linen step in scan", "nflax.fit"], text
    assert "FLOP/step: XLA cost_analysis()" in text, text
    assert "default fit" in text and "of the limit" in text, text  # the summary
    assert "| flow | layers | scan compile s | unroll compile s |" in text, text
    assert "| realnvp | 2 |" in text, text  # the depth sweep


def test_gpu_benchmark_tiny_runs_on_cpu():
    text = _run("gpu.py", "--tiny", "--markdown")
    assert text.startswith("device: "), text
    assert "| flow | layers | hidden | batch | layer scan |" in text, text
    rows = [line for line in text.splitlines() if line.startswith(("| realnvp |", "| nsf |"))]
    assert len(rows) == 2 and all("(default)" in r for r in rows), text


def test_images_quick_without_normflows(tmp_path):
    # one image flow and one flat flow (the other rows share their code); the glow's affine
    # couplings compile faster than the default splines (42 CPU s in all, not 57), which
    # test_image_flows and test_cli_images cover; the grid folder is made when missing
    rows = ["uniform", "gaussian", "glow", "maf", "normflows_glow"]
    args = ["--quick", "--markdown", "--skip-normflows", "--coupling", "affine"]
    args += ["--grid-dir", str(tmp_path / "grids")]
    text = _run("images.py", *args, "--rows", *rows)
    assert "digits: train 1257, validation 180, test 360; K = 17, D = 64" in text, text
    assert "| model | configuration | params | steps | compile s | train s |" in text, text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    assert "| 4.087 | 4.087 |" in rows["uniform over 17 levels"], text
    for name in ("full-covariance Gaussian", "nflax maf (64-vector)", "nflax glow"):
        bpd = float(rows[name].split("|")[-3])  # the single-sample bound, bits/dim
        assert 0 < bpd < 20, rows[name]
    assert "fit_dequantized" in rows["nflax glow"], text
    assert "skipped (--skip-normflows)" in rows["normflows Glow (PyTorch)"], text
    grids = sorted(p.name for p in (tmp_path / "grids").glob("images_*.png"))
    assert grids == ["images_gaussian.png", "images_glow.png", "images_maf.png"], grids
