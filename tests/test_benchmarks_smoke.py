"""Smoke test: the training-speed benchmark runs end to end (``--quick``) and prints its table.

No timing is asserted; speed is measured by running the benchmark, not by tests.
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"


def test_train_speed_quick_prints_table():
    env = dict(os.environ, MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--markdown"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "| batch | impl | steps/s | × baseline |" in text, text
    rows = [line for line in text.splitlines() if line.startswith("| 16 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["baseline", "nflax.fit"], text
    assert "FLOP/step: XLA cost_analysis()" in text, text
