"""A continuous flow trained by flow matching against the default realnvp, as a user runs them.

    python benchmarks/cnf.py [--datasets banana,moons,eight_gaussians] [--seeds 0-4]
                             [--flows cnf,realnvp] [--markdown] [--json FILE]
    python benchmarks/cnf.py --trace-cost

Each (data set, flow, seed) runs ``nflax train --dataset D --flow F --seed S --quiet
--no-plots`` in its own process (the installed command, every default: for cnf that is flow
matching), timed from start to end (JAX import, training, and the 16384-point test
evaluation the run does). The script then loads the trained flow and reads ``metrics.json``:
the test NLL and its gap to the exact NLL (moons has no exact density: test NLL only), the
training steps and time; and measures, in this process after a warm-up call, the rate of
``log_prob`` and of ``sample`` on 16384 points (points per second, jitted). Runs of the two
flows alternate, so both see the same machine load.

``--trace-cost`` times one evaluation of the default vector field with its exact trace and
with Hutchinson's estimate, on 1024 points, at dims 2 … 64: the measurement behind
``nflax.bijections.continuous.EXACT_TRACE_MAX_DIM``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_RATE_POINTS = 16384


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` → ``[0, 1, 2, 3, 4]``; ``"0,3"`` → ``[0, 3]``."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def train(dataset: str, flow: str, seed: int, out: Path) -> float:
    """One ``nflax train`` run in its own process (``python -m nflax.cli``: the nflax this
    interpreter imports); returns its wall time in seconds."""
    cmd = [
        sys.executable,
        "-m",
        "nflax.cli",
        "train",
        "--dataset",
        dataset,
        "--flow",
        flow,
        "--seed",
        str(seed),
    ]
    cmd += ["--out", str(out), "--quiet", "--no-plots"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def rates(run: Path, dataset: str) -> tuple[float, float]:
    """Points per second of ``log_prob`` (on the set's points) and of ``sample`` (16384
    points each, jitted, warm)."""
    import jax
    from flax import nnx

    import nflax

    flow = nflax.load(run / "flow")
    graphdef, state = nnx.split(flow)
    x = np.asarray(nflax.datasets.get(dataset).sample(jax.random.key(0), NUM_RATE_POINTS))
    log_prob = jax.jit(lambda s, x: nnx.merge(graphdef, s).log_prob(x))
    sample = jax.jit(lambda s, k: nnx.merge(graphdef, s).sample(k, NUM_RATE_POINTS))
    out = []
    for fn, arg in ((log_prob, x), (sample, jax.random.key(1))):
        jax.block_until_ready(fn(state, arg))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, arg))
        out.append(NUM_RATE_POINTS / (time.perf_counter() - t0))
    return out[0], out[1]


def one(dataset: str, flow: str, seed: int, root: Path) -> dict:
    run = root / f"{dataset}-{flow}-{seed}"
    wall = train(dataset, flow, seed, run)
    m = json.loads((run / "metrics.json").read_text())
    lp_rate, sample_rate = rates(run, dataset)
    return {
        "dataset": dataset,
        "flow": flow,
        "seed": seed,
        "wall_seconds": wall,
        "test_nll": m["test_nll"],
        "gap": m.get("test_minus_true_nll"),
        "steps_run": m["steps_run"],
        "train_seconds": m["train_seconds"],
        "log_prob_per_second": lp_rate,
        "sample_per_second": sample_rate,
    }


def summary(rows: list[dict]) -> list[str]:
    """One markdown row per (data set, flow): medians over seeds, and the worst gap."""
    lines = [
        "| data set | flow | seeds | median gap | worst gap | median test NLL | median wall time "
        "| log_prob rate | sampling rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["flow"]), []).append(r)
    for (dataset, flow), rs in groups.items():
        gaps = [r["gap"] for r in rs if r["gap"] is not None]
        med = lambda k, rs=rs: float(np.median([r[k] for r in rs]))  # noqa: E731
        gap = f"{np.median(gaps):+.4f} | {max(gaps):+.4f}" if gaps else "– | –"
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(
            f"| {dataset} | {flow} | {seeds} | {gap} | {med('test_nll'):.4f} | "
            f"{med('wall_seconds'):.1f} s | {med('log_prob_per_second'):,.0f}/s | "
            f"{med('sample_per_second'):,.0f}/s |"
        )
    return lines


def trace_cost() -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nflax.bijections.continuous import exact_trace, hutchinson_trace
    from nflax.vector_fields import VectorField

    def best_of(fn, *args, n=20):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(fn(*args))
            times.append((time.perf_counter() - t0) / n)
        return min(times)

    print("| dim | exact trace | Hutchinson | exact / Hutchinson |\n|---:|---:|---:|---:|")
    for d in (2, 4, 8, 16, 32, 64):
        x = jax.random.normal(jax.random.key(0), (1024, d))
        eps = jax.random.rademacher(jax.random.key(1), (1024, d), dtype=jnp.float32)
        graphdef, state = nnx.split(VectorField(d, zero_init_output=False, rngs=nnx.Rngs(0)))

        def exact(state, x, graphdef=graphdef):
            f = nnx.merge(graphdef, state)
            return jax.vmap(lambda y: exact_trace(lambda u: f(u, 0.3), y))(x)

        def hutch(state, x, eps, graphdef=graphdef):
            f = nnx.merge(graphdef, state)
            return jax.vmap(lambda y, e: hutchinson_trace(lambda u: f(u, 0.3), y, e))(x, eps)

        a = best_of(jax.jit(exact), state, x)
        b = best_of(jax.jit(hutch), state, x, eps)
        print(f"| {d} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {a / b:.1f}× |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="banana,moons,eight_gaussians")
    p.add_argument("--flows", default="cnf,realnvp")
    p.add_argument("--seeds", default="0-4")
    p.add_argument("--markdown", action="store_true", help="print the summary table")
    p.add_argument("--json", default=None, help="write every run's numbers here")
    p.add_argument("--trace-cost", action="store_true")
    args = p.parse_args()
    if args.trace_cost:
        trace_cost()
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            for seed in parse_seeds(args.seeds):
                for flow in args.flows.split(","):
                    r = one(dataset, flow, seed, Path(tmp))
                    rows.append(r)
                    gap = "–" if r["gap"] is None else f"{r['gap']:+.4f}"
                    lp, smp = r["log_prob_per_second"], r["sample_per_second"]
                    print(
                        f"{dataset} {flow} seed {seed}: gap {gap}, test NLL {r['test_nll']:.4f}, "
                        f"{r['wall_seconds']:.1f} s, {r['steps_run']} steps, log_prob "
                        f"{lp:,.0f}/s, sample {smp:,.0f}/s",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        print("\n".join(summary(rows)))
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
