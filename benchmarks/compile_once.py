"""Compile once: many short ``fit`` calls against one long one, and ``nflax train`` with a cold
and a warm compilation cache.

In one process (the banana set, ``--num-points`` points, ``nflax.flows.realnvp(2)`` with its
defaults, ``fit``'s default optimizer, full batch), timed wall to wall, compile included:

* ``one fit``: ``fit(flow, x, steps=calls · short)`` once;
* ``N fits``: ``fit(flow, x, steps=short)`` ``calls`` times on the same flow and data, as a
  notebook user continuing training does; the first call compiles, the others reuse;
* ``N fits, nothing reused``: the same, with the program store emptied before every call (what
  every call paid before compile-once);
* ``tutorial loop``: the tutorial's pattern on the same flow: a ``jax.jit``-ed step called from
  a Python loop that reads the loss every step, ``calls · short`` steps.

Every repeat first empties nflax's program store and JAX's caches, so each row pays its own
compiles; the rows of a repeat run back to back in a rotating order, and the ratio to ``one
fit`` is taken within each repeat (the machine is shared: medians over repeats).

Across processes: ``nflax train --steps S --quiet`` (figures included) twice into one fresh
cache folder: the first run compiles and writes, the second loads. Per run: the seconds JAX
spent compiling (XLA compile, or loading from the cache: ``backend_compile_duration``
events), the number of programs and of cache hits, the seconds spent tracing and lowering,
the wall time, and whether ``metrics.json`` is identical apart from its timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

import nflax
from nflax import engine

TIMING = {"steps_per_second", "compile_seconds", "train_seconds"}
PROBE = """
import json, sys, time
from jax import monitoring
seconds = {"compile": 0.0, "trace_lower": 0.0}
def on(event, s, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        seconds["compile"] += s
    elif event in ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration"):
        seconds["trace_lower"] += s
monitoring.register_event_duration_secs_listener(on)
from nflax import _compile
from nflax.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "wall": time.perf_counter() - t0, "programs": _compile.LOG.compiles,
                  "hits": _compile.LOG.cache_hits, **seconds}))
"""


# ---- in one process --------------------------------------------------------------------------
def _fresh_caches() -> None:
    engine.PROGRAMS.clear()
    jax.clear_caches()


def one_fit(x, steps: int) -> float:
    flow = nflax.flows.realnvp(2, rngs=nnx.Rngs(0))
    t0 = time.perf_counter()
    nflax.fit(flow, x, key=jax.random.key(1), steps=steps, progress=False)
    return steps / (time.perf_counter() - t0)


OUTSIDE: list[float] = []  # seconds of each reused call outside its compiled loop


def many_fits(x, calls: int, steps: int, reuse: bool = True) -> float:
    flow = nflax.flows.realnvp(2, rngs=nnx.Rngs(0))
    t0 = time.perf_counter()
    for i in range(calls):
        if not reuse:
            engine.PROGRAMS.clear()
        t1 = time.perf_counter()
        hist = nflax.fit(flow, x, key=jax.random.key(1 + i), steps=steps, progress=False)
        if hist.chunk_program == "reused":
            OUTSIDE.append(time.perf_counter() - t1 - hist.train_seconds)
    return calls * steps / (time.perf_counter() - t0)


def tutorial_loop(x, steps: int) -> float:
    """The tutorial's pattern on the same flow and optimizer: one jitted step per Python
    iteration, the loss read every step."""
    flow = nflax.flows.realnvp(2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    x = jax.numpy.asarray(x)

    @jax.jit
    def step(params, opt_state):
        loss_fn = lambda p: -nnx.merge(graphdef, p, rest).log_prob(x).mean()  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        float(loss)
    return steps / (time.perf_counter() - t0)


def in_process(args, x) -> dict[str, list[float]]:
    total = args.calls * args.short
    rows = {
        "one fit": lambda: one_fit(x, total),
        f"{args.calls} fits": lambda: many_fits(x, args.calls, args.short),
        f"{args.calls} fits, nothing reused": lambda: many_fits(
            x, args.calls, args.short, reuse=False
        ),
        "tutorial loop": lambda: tutorial_loop(x, total),
    }
    names = list(rows)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _fresh_caches()
            rates[name].append(rows[name]())
    return rates


# ---- across processes ------------------------------------------------------------------------
def nflax_train(out: Path, cache: Path, steps: int, plots: bool) -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NFLAX_")}
    env |= {"NFLAX_CACHE_DIR": str(cache), "MPLBACKEND": "Agg"}
    argv = ["train", "--steps", str(steps), "--quiet", "--out", str(out)]
    argv += [] if plots else ["--no-plots"]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    return counts, {k: v for k, v in metrics.items() if k not in TIMING}


def across_processes(args) -> list[tuple[dict, dict, bool]]:
    runs = []
    for _ in range(args.cli_repeats):
        root = Path(tempfile.mkdtemp(prefix="nflax-compile-once-"))
        try:
            cold, m_cold = nflax_train(root / "cold", root / "jax", args.cli_steps, args.plots)
            warm, m_warm = nflax_train(root / "warm", root / "jax", args.cli_steps, args.plots)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        runs.append((cold, warm, m_cold == m_warm))
    return runs


# ---- report ----------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("\n"):
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} CPUs, load average {load}; jax {jax.__version__} "
        f"({jax.default_backend()}), nflax {nflax.__version__}, python "
        f"{platform.python_version()}"
    )


def print_in_process(args, rates: dict[str, list[float]]) -> None:
    base = rates["one fit"]
    print(f"\n### {args.calls} × fit(steps={args.short}) against one fit(steps=", end="")
    print(f"{args.calls * args.short}), compile included ({args.repeats} repeats)\n")
    print("| run | steps/s (median) | min–max | × one fit, per repeat | × one fit (median) |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        span = f"{min(values):.0f}–{max(values):.0f}"
        each = ", ".join(f"{r:.2f}" for r in ratios)
        median = statistics.median(ratios)
        print(f"| {name} | {statistics.median(values):.0f} | {span} | {each} | {median:.2f} |")
    if OUTSIDE:
        print(
            f"\nA reused call spends {1000 * statistics.median(OUTSIDE):.0f} ms (median; "
            f"{1000 * max(OUTSIDE):.0f} ms at most) outside its compiled loop "
            "(wall − History.train_seconds)."
        )


def print_across(args, runs) -> None:
    print(f"\n### `nflax train --steps {args.cli_steps}`, cold then warm cache folder\n")
    print("| run | compile s | programs | cache hits | trace+lower s | wall s | metrics.json |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for i, (cold, warm, same) in enumerate(runs):
        for name, c in (("cold", cold), ("warm", warm)):
            verdict = "" if name == "cold" else ("identical" if same else "**differs**")
            print(
                f"| {i + 1} {name} | {c['compile']:.2f} | {c['programs']} | {c['hits']} | "
                f"{c['trace_lower']:.2f} | {c['wall']:.1f} | {verdict} |"
            )
    share = [w["compile"] / c["compile"] for c, w, _ in runs]
    print(f"\nwarm compile time / cold: {', '.join(f'{100 * s:.1f} %' for s in share)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10, help="short fit calls")
    p.add_argument("--short", type=int, default=250, help="steps per short call")
    p.add_argument("--num-points", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cli-steps", type=int, default=1000)
    p.add_argument("--cli-repeats", type=int, default=2)
    p.add_argument(
        "--no-plots", dest="plots", action="store_false", help="nflax train without figures"
    )
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.short, args.repeats, args.num_points = 2, 20, 1, 256
        args.cli_steps, args.cli_repeats, args.plots = 30, 1, False
    x = np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), args.num_points))
    print(f"machine: {machine()}")
    print_in_process(args, in_process(args, x))
    if not args.skip_cli:
        print_across(args, across_processes(args))
    print(f"\nload average at the end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
