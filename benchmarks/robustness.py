"""How robust is the default `nflax train`? The same command over many seeds, scored exactly.

    python benchmarks/robustness.py [--seeds 0-9] [--jobs 2] [--label NAME]
                                    [--fresh-test] [--markdown] [--json FILE] [-- EXTRA FLAGS]

Each seed runs ``nflax train --seed S --out DIR --quiet --no-plots EXTRA`` as a user would (a
subprocess, the installed command), then this script loads the trained flow from ``DIR/flow``
and scores it on the run's own 16384-point banana test set (the one ``metrics.json`` reports;
the recomputed test NLL must match it) against the exact density. ``--fresh-test`` scores a
second, independent set of 16384 points as well, so that no choice is tuned to one test set.

Per seed: the mean gap (test NLL − exact NLL, nats), the median of the per-point gaps, the
worst test point (model NLL and exact NLL there), the step whose parameters were kept, the
steps run, and the mean gap split by region of ``|x2|`` (each region's share of the mean,
so the four add up to it). Then the median, worst and spread over seeds.

Everything after ``--`` is passed to ``nflax train`` (e.g. ``-- --lr 1e-3 --no-actnorm``):
this is how the options in ``benchmarks/README.md`` were compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REGIONS = [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0), (12.0, float("inf"))]
NUM_TEST = 16384


def parse_seeds(text: str) -> list[int]:
    """``"0-9"`` → ``[0, …, 9]``; ``"0,3,5"`` → ``[0, 3, 5]``."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def train(seed: int, out: Path, extra: list[str]) -> float:
    """One `nflax train` run in its own process; returns its wall time in seconds."""
    exe = shutil.which("nflax") or sys.executable
    cmd = [exe] if exe.endswith("nflax") else [exe, "-m", "nflax.cli"]
    cmd += ["train", "--seed", str(seed), "--out", str(out), "--quiet", "--no-plots", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"seed {seed}: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def test_points(seed: int, fresh: bool):
    """The run's own test set (the CLI's key derivation), or an independent fresh one."""
    import jax

    import nflax

    if fresh:
        key = jax.random.fold_in(jax.random.key(10_000 + seed), 1)
    else:
        key = jax.random.split(jax.random.key(seed), 4)[1]  # = nflax.cli's key_test
    return np.asarray(nflax.datasets.get("banana").sample(key, NUM_TEST))


def score(run: Path, seed: int, fresh: bool) -> dict:
    """Gap statistics of the flow saved in ``run`` on a test set of the banana."""
    import nflax

    flow = nflax.load(run / "flow")
    x = test_points(seed, fresh)
    model = np.asarray(nflax.nll(flow, x), np.float64)
    exact = -np.asarray(nflax.datasets.get("banana").log_prob(x), np.float64)
    gap = model - exact
    a = np.abs(x[:, 1])
    worst = int(np.argmax(model))
    row = {
        "gap": float(gap.mean()),
        "median_gap": float(np.median(gap)),
        "test_nll": float(model.mean()),
        "worst_nll": float(model[worst]),
        "worst_exact": float(exact[worst]),
        "regions": [float(gap[(a >= lo) & (a < hi)].sum() / len(x)) for lo, hi in REGIONS],
    }
    return row


def run_seed(seed: int, extra: list[str], fresh: bool, keep: Path | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"nflax-robust-{seed}-"))
    run = (keep / f"seed{seed}") if keep else tmp / "run"
    try:
        seconds = train(seed, run, extra)
        metrics = json.loads((run / "metrics.json").read_text())
        own = score(run, seed, fresh=False)
        if abs(own["test_nll"] - metrics["test_nll"]) > 1e-3:  # same points as the run's?
            raise RuntimeError(
                f"seed {seed}: recomputed test NLL {own['test_nll']:.5f} differs from "
                f"metrics.json's {metrics['test_nll']:.5f}"
            )
        row = {
            "seed": seed,
            "seconds": seconds,
            "best_step": metrics["best_step"],
            "steps_run": metrics["steps_run"],
            "stop_reason": metrics["stop_reason"],
            **own,
        }
        if fresh:
            row["fresh"] = score(run, seed, fresh=True)
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summary(rows: list[dict], key: str = "gap", fresh: bool = False) -> dict:
    v = np.array([(r["fresh"] if fresh else r)[key] for r in rows])
    return {
        "median": float(np.median(v)),
        "mean": float(np.mean(v)),
        "worst": float(np.max(v)),
        "best": float(np.min(v)),
        "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
    }


def markdown(rows: list[dict], label: str, extra: list[str], fresh: bool) -> str:
    head = "| seed | gap | median gap | worst point (exact) | best step | steps | "
    head += " | ".join(f"\\|x2\\| {lo:g}–{hi:g}" for lo, hi in REGIONS).replace("–inf", "+")
    head += " |" + (" fresh gap |" if fresh else "")
    lines = [
        f"**{label}** (`nflax train {' '.join(extra)}`)".replace("`nflax train `", "defaults"),
        "",
        head,
        "|" + "---:|" * (head.replace("\\|", "").count("|") - 1),
    ]
    for r in rows:
        cells = [
            str(r["seed"]),
            f"{r['gap']:+.4f}",
            f"{r['median_gap']:+.4f}",
            f"{r['worst_nll']:.1f} ({r['worst_exact']:.1f})",
            str(r["best_step"]),
            f"{r['steps_run']} ({r['stop_reason']})",
            *(f"{g:+.4f}" for g in r["regions"]),
        ]
        if fresh:
            cells.append(f"{r['fresh']['gap']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    s = summary(rows)
    lines.append("")
    lines.append(
        f"gap over {len(rows)} seeds: median **{s['median']:+.4f}**, worst **{s['worst']:+.4f}**, "
        f"best {s['best']:+.4f}, mean {s['mean']:+.4f}, sd {s['sd']:.4f}"
    )
    if fresh:
        f = summary(rows, fresh=True)
        lines.append(
            f"fresh test set: median {f['median']:+.4f}, worst {f['worst']:+.4f}, sd {f['sd']:.4f}"
        )
    secs = [r["seconds"] for r in rows]
    lines.append(f"wall time per run: {np.median(secs):.1f} s median ({max(secs):.1f} s max)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5 (default 0-9)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--label", default="default", help="name of this configuration")
    p.add_argument("--fresh-test", action="store_true", help="also score a fresh test set")
    p.add_argument("--keep", default=None, help="keep the run folders under this folder")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda s: run_seed(s, extra, args.fresh_test, keep), seeds))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": args.label, "extra": extra, "rows": rows}) + "\n")
    if args.markdown:
        print(markdown(rows, args.label, extra, args.fresh_test))
    else:
        s = summary(rows)
        print(f"{args.label}: median gap {s['median']:+.4f}, worst {s['worst']:+.4f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
