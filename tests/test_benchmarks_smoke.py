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
