"""Data-parallel scaling: ``nflax.fit`` throughput against the number of devices.

Every device count K runs in its own Python subprocess (JAX fixes its devices at start-up), with
the same model, data, global batch, optimizer and PRNG keys:

* model: ``nflax.flows.realnvp(2, num_layers=--layers, hidden=--hidden)`` on the "banana" data
  (``--num-points`` points), ``optax.adam(1e-3)``, ``--steps`` steps with global minibatches of
  ``--batch-size`` rows, so each of the K devices gets ``batch_size / K`` rows per step.
* K > 0 devices: ``nflax.fit(..., devices=...)``: a 1D ``"data"`` mesh over K devices, batch
  sharded, state replicated. The row "1, no mesh" is plain ``fit`` without a mesh.
* default: K *virtual* CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=K``,
  ``JAX_PLATFORMS=cpu``). They all share the machine's cores, so this measures the overhead of
  the sharded program and checks it, not a speed-up. ``--real-devices``: the first K devices of
  the default backend (e.g. the GPUs of a node); nothing else changes.

Reported per K: compile seconds (``History.compile_seconds``, median over repeats), training
steps/s and points/s (best of ``--repeats`` fits, compile excluded), speed-up and efficiency
(speed-up / K) relative to K = 1 on a mesh, and two checks of the sharded program:

* the optimized HLO of fit's own compiled training program (``fit`` compiles it with
  ``jax.jit(...).lower(...).compile()``; the worker keeps the compiled object and reads
  ``.as_text()``), and of a small train step built the way ``fit`` builds its own (the batch
  constrained to ``NamedSharding(mesh, P("data"))`` with ``with_sharding_constraint``, the
  parameters replicated): the number of all-reduce ops (0 on one device, > 0 on several), and
  whether the program works on per-device ``[batch/K, 2]`` slices of the batch;
* the largest relative difference of the K-device loss trajectory from the K = 1 one.

A failed check makes the script exit with status 1 after the table.

Usage::

    python benchmarks/scaling.py                         # K = 1 2 4 8 virtual CPU devices
    python benchmarks/scaling.py --quick                 # tiny smoke run
    python benchmarks/scaling.py --real-devices --devices-list 1 2 4 8 --batch-size 65536 \\
        --hidden 256 256 --num-points 262144            # a multi-GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys

RESULT = "SCALING-RESULT "
ALL_REDUCE = re.compile(r"\ball-reduce(?:-start)?\(")


# ---------------------------------------------------------------------------------------------
# Worker: one device count, in a fresh process
# ---------------------------------------------------------------------------------------------
def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import nflax
    from nflax import parallel

    k = args.worker
    if k > jax.device_count():
        return {"k": k, "skipped": f"only {jax.device_count()} device(s) available"}
    devs = jax.devices()[: max(k, 1)]
    fit_devices = None if k == 0 else devs  # k == 0: plain fit, no mesh
    x = np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), args.num_points))

    def make_flow():
        return nflax.flows.realnvp(
            2, num_layers=args.layers, hidden=tuple(args.hidden), rngs=nnx.Rngs(args.seed)
        )

    # fit compiles its training program with ``jax.jit(...).lower(...).compile()``; keep the
    # compiled objects of this process (instrumentation only) to read fit's own HLO below.
    from jax import stages

    compiled: list = []
    lowered_compile = stages.Lowered.compile

    def compile_and_keep(self, *a, **kw):
        out = lowered_compile(self, *a, **kw)
        compiled.append(out)
        return out

    compile_s, rates, loss = [], [], None
    for i in range(args.repeats):
        flow = make_flow()
        stages.Lowered.compile = compile_and_keep if i == 0 else lowered_compile
        try:
            h = nflax.fit(
                flow,
                x,
                key=jax.random.key(args.seed + 1),
                steps=args.steps,
                batch_size=args.batch_size,
                optimizer=optax.adam(1e-3),
                progress=False,
                devices=fit_devices,
            )
        finally:
            stages.Lowered.compile = lowered_compile
        compile_s.append(h.compile_seconds)
        rates.append(h.steps_per_second)
        loss = h.loss.tolist()
    fit_text = next((t for t in map(_hlo_text, compiled) if "chunk" in t[:200]), None)

    # A small train step built the way fit builds its own: the batch constrained to
    # NamedSharding(mesh, P("data")), the parameters replicated.
    step_text = None
    if k > 0:
        mesh = parallel.make_mesh(devs)
        graphdef, params, rest = nnx.split(make_flow(), nnx.Param, ...)

        def loss_fn(p, xb):
            xb = jax.lax.with_sharding_constraint(xb, parallel.batch_sharded(mesh))
            return -jnp.mean(nnx.merge(graphdef, p, rest).log_prob(xb))

        def step(p, xb):
            value, grads = jax.value_and_grad(loss_fn)(p, xb)
            return value, jax.tree.map(lambda a, g: a - 1e-3 * g, p, grads)

        batch = jnp.asarray(x[: args.batch_size])
        p_r, x_r = jax.device_put((params, batch), parallel.replicated(mesh))
        step_text = jax.jit(step).lower(p_r, x_r).compile().as_text()

    rows = args.batch_size // max(k, 1)
    return {
        "k": k,
        "platform": devs[0].platform,
        "compile_s": statistics.median(compile_s),
        "steps_per_s": max(rates),
        "steps_per_s_all": rates,
        "per_device_rows": rows,
        "fit_hlo": _hlo_facts(fit_text, rows),
        "step_hlo": _hlo_facts(step_text, rows),
        "loss": loss,
    }


def _hlo_text(compiled) -> str:
    try:
        return compiled.as_text() or ""
    except Exception:  # a backend may not print some programs
        return ""


def _hlo_facts(text: str | None, rows: int) -> dict | None:
    """All-reduce ops in an optimized HLO text, and whether it holds a [rows, 2] f32 slice."""
    if text is None:
        return None
    return {"all_reduces": len(ALL_REDUCE.findall(text)), "slice": f"f32[{rows},2]" in text}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def start_worker(args, k: int) -> subprocess.Popen:
    env = dict(os.environ)
    if not args.real_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(k, 1)}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(k)]
    for name in ("steps", "batch_size", "layers", "num_points", "repeats", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--hidden", *map(str, args.hidden)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_worker(args, k: int, proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"scaling worker K={k} ran past --timeout {args.timeout} s") from None
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"scaling worker K={k} failed (exit {proc.returncode}):\n"
            f"{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(RESULT) :])


def run_all(args, ks: list[int]) -> list[dict]:
    """Run the workers, ``--jobs`` at a time (1: one after the other, for clean timings)."""
    results: dict[int, dict] = {}
    pending = list(ks)
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            k = pending.pop(0)
            running.append((k, start_worker(args, k)))
        k, proc = running.pop(0)
        results[k] = finish_worker(args, k, proc)
    return [results[k] for k in ks]


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def print_table(args, results: list[dict]) -> None:
    base = next((r for r in results if r["k"] == 1 and "skipped" not in r), None)
    head = [
        "devices",
        "rows/device",
        "compile s",
        "steps/s",
        "points/s",
        "speed-up",
        "efficiency",
        "all-reduces in fit's HLO",
        "max rel. Δloss vs K=1",
    ]
    rows = []
    for r in results:
        label = "1, no mesh" if r["k"] == 0 else str(r["k"])
        if "skipped" in r:
            rows.append([label, "skipped: " + r["skipped"]] + [""] * (len(head) - 2))
            continue
        pts = r["steps_per_s"] * args.batch_size
        speed, eff, dloss = "", "", ""
        if base is not None:
            speed_v = r["steps_per_s"] / base["steps_per_s"]
            speed = f"{speed_v:.2f}×"
            if r["k"] > 0:
                eff = f"{100 * speed_v / r['k']:.0f} %"
            a, b = base["loss"], r["loss"]
            if len(a) == len(b) and a:
                rel = max(abs(u - v) / max(abs(u), 1e-12) for u, v in zip(a, b, strict=True))
                dloss = f"{rel:.1e}"
        rows.append(
            [
                label,
                str(r["per_device_rows"]),
                f"{r['compile_s']:.2f}",
                fmt_rate(r["steps_per_s"]),
                fmt_rate(pts),
                speed,
                eff,
                "—" if r["fit_hlo"] is None else str(r["fit_hlo"]["all_reduces"]),
                dloss,
            ]
        )
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---:" for _ in head) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
        for row in rows:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def describe(args, results: list[dict]) -> str:
    ok = [r for r in results if "skipped" not in r]
    plat = ok[0]["platform"] if ok else "?"
    kind = "real" if args.real_devices else "virtual CPU"
    return (
        f"realnvp(2, num_layers={args.layers}, hidden={tuple(args.hidden)}), banana "
        f"{args.num_points} points, global batch {args.batch_size}, {args.steps} steps, "
        f"adam(1e-3); "
        f"best of {args.repeats} fit(s) per K; {kind} devices (platform {plat}); "
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU core(s), "
        f"Python {platform.python_version()}"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices-list", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per fit")
    p.add_argument("--batch-size", type=int, default=1024, help="global minibatch size")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--num-points", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="fits per K (best steps/s is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--real-devices",
        action="store_true",
        help="use the first K devices of the default backend (GPUs) instead of virtual CPUs",
    )
    p.add_argument("--no-plain", action="store_true", help="skip the '1, no mesh' row")
    p.add_argument("--quick", action="store_true", help="tiny run (CI smoke test)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per device count")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="device counts run at once (default 1; more only for smoke tests: they share cores)",
    )
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        print(RESULT + json.dumps(worker(args)), flush=True)
        return

    if args.quick:
        args.devices_list = [1, 2] if args.devices_list == [1, 2, 4, 8] else args.devices_list
        args.steps, args.batch_size, args.hidden = 20, 64, [8]
        args.layers, args.num_points, args.repeats, args.no_plain = 2, 256, 1, True
    for k in args.devices_list:
        if k < 1:
            p.error(f"--devices-list: device counts must be ≥ 1, received {k}")
        if args.batch_size % k:
            p.error(f"--batch-size {args.batch_size} is not divisible by {k} devices")
    if args.batch_size >= args.num_points:
        p.error("--batch-size must be smaller than --num-points (minibatch training)")

    ks = ([] if args.no_plain else [0]) + sorted(set(args.devices_list))
    results = run_all(args, ks)
    failed = [check_line(args, r) for r in results]
    print(describe(args, results))
    if args.jobs > 1:
        print(f"note: {args.jobs} device counts ran at once; their timings are not comparable.")
    if not args.real_devices:
        print(
            "note: virtual CPU devices share this machine's cores; throughput cannot scale "
            "here, the table shows the sharded program's overhead and checks it."
        )
    print()
    print_table(args, results)
    if any(failed):
        print("\nFAILED: a sharded program lacks its all-reduce or its per-device batch slice")
        sys.exit(1)


def check_line(args, r: dict) -> bool:
    """Print what the compiled programs of one device count show; True when a check failed."""
    k = r["k"]
    if "skipped" in r:
        print(f"K={k}: skipped ({r['skipped']})", flush=True)
        return False
    if k == 0:
        return False
    rows = r["per_device_rows"]
    parts, bad = [], False
    programs = (("fit's training program", r["fit_hlo"]), ("a sharded step", r["step_hlo"]))
    for name, facts in programs:
        if facts is None:
            parts.append(f"{name}: not captured")
            continue
        parts.append(
            f"{name}: {facts['all_reduces']} all-reduce op(s), "
            f"per-device f32[{rows},2] batch slice {'present' if facts['slice'] else 'ABSENT'}"
        )
        bad |= not facts["slice"] or (k > 1 and facts["all_reduces"] == 0)
    print(
        f"K={k} ({rows} of {args.batch_size} rows per device): "
        + "; ".join(parts)
        + (" -> FAILED" if bad else " -> OK"),
        flush=True,
    )
    return bad


if __name__ == "__main__":
    main()
