"""benchmarks/scaling.py --quick runs and prints its checks and table (no timing assertions)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


def test_scaling_benchmark_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--markdown"],
        capture_output=True,
        text=True,
        timeout=600,  # about 40 s on 2 busy cores; the limit only guards against a hang
        cwd=tmp_path,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    # The compiled programs: no all-reduce on one device, at least one on two, batch split.
    assert "K=1 (64 of 64 rows per device): fit's training program: 0 all-reduce" in out
    k2 = next(line for line in out.splitlines() if line.startswith("K=2 (32 of 64 rows"))
    assert k2.endswith("-> OK") and "batch slice present" in k2
    assert "virtual CPU devices share this machine's cores" in out
    # The markdown table: header, rule, one row per device count.
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| devices | rows/device | compile s | steps/s | points/s")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["1", "2"]
    row2 = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert row2[1] == "32" and int(row2[7]) > 0  # rows per device; all-reduces in fit's HLO
    assert float(row2[8]) < 1e-4  # the 2-device loss trajectory matches the 1-device one
