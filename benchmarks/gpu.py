"""GPU training speed: ``nflax.fit`` steps/s and the fraction of the chip's matmul peak.

realnvp (8 affine couplings) and nsf (5 spline couplings) with 512-wide conditioners
(``--hidden 512 512``, tanh), a standard normal base, ``optax.adam(1e-3)``, minibatches of
65 536 points drawn on the device from 262 144 "banana" points. Per flow: ``fit`` with the
library defaults (``Stack(unroll="auto")``) and, unless ``--no-scanned``, with the layer scan
not unrolled (``unroll=False``), to check the default's choice on this chip.

Reported per run: compile seconds (``History.compile_seconds``: the training program, AOT, and
its first throwaway step), steps/s and points/s (``History.steps_per_second``, compile
excluded), the FLOPs of one train step (XLA ``cost_analysis()`` of a jitted loss + grad + adam
step of the same flow, and the analytic matmul count), and the achieved FLOP/s as a fraction
of a large square matmul timed in the same run (``--peak-size``, 8192 by default), at the
default precision (the one the training's matmuls use; TF32 on recent NVIDIA chips) and at
``"highest"`` (true float32).

About 1–3 minutes on one H200 (budget: under 5; ``--max-seconds`` skips the remaining runs
past it). ``--tiny`` runs a tiny version (default rows only) on any backend in seconds: the
CPU smoke test.

    python benchmarks/gpu.py --markdown

Full MNIST with a Glow (issue 14), on the GPU, after downloading the four IDX files of MNIST
(``train-images-idx3-ubyte.gz`` …) into ``DIR`` once:

    nflax train --data-dir DIR --dataset mnist --flow glow --out runs/mnist-glow

Its defaults: levels 3, depth 8, hidden 64 (2.17M parameters), 20000 steps of 128 images, adam
1e-3, uniform dequantization, validation on the last 5000 training images; test bits/dim on the
10000 test images (importance-weighted, S = 32). Expected time, **not measured** (no GPU was
lent when this was written): one step is 166 GFLOP (XLA ``cost_analysis()`` of a jitted loss,
gradient and adam step, on CPU), so 20000 steps are 3.3 PFLOP, about 30 s of work at 100
TFLOP/s; small convolutions at batch 128 run far below an H200's peak and the loop launches
hundreds of kernels per step, so expect a few minutes to about ten for training, plus compile
(~1 min) and the test evaluation. On 2 CPU cores the same run would take about a day (the
mnist_5k default, a quarter of the depth and half the width at half the batch, runs 7.4 steps/s).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nflax

FLOWS = {"realnvp": 8, "nsf": 5}  # flow: number of layers (nsf's is its constructor default)


def matmul_peak(size: int, repeats: int, precision=None) -> float:
    """Best FLOP/s of a square float32 ``jnp.dot`` of ``size`` at ``precision``."""
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    dot = jax.jit(lambda u, v: jnp.dot(u, v, precision=precision))
    jax.block_until_ready(dot(a, b))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def make_flow(kind: str, layers: int, hidden: tuple[int, ...], unroll: bool | None):
    flow = getattr(nflax.flows, kind)(2, num_layers=layers, hidden=hidden, rngs=nnx.Rngs(0))
    if unroll is not None:
        for _, m in nnx.iter_graph(flow):
            if isinstance(m, nflax.bijections.Stack):
                m.unroll = m.num_layers if unroll else 1
    return flow


def step_flops(flow, batch: int, lr: float) -> float:
    """FLOPs of one loss + grad + adam step of ``flow`` at ``batch`` (XLA ``cost_analysis`` of
    the lowered program; no compile). A scan's body counts once: pass an unrolled flow."""
    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    tx = optax.adam(lr)

    def step(params, opt_state, x):
        def loss(p):
            return -jnp.mean(nnx.merge(graphdef, p, rest).log_prob(x))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    x = jax.ShapeDtypeStruct((batch, 2), jnp.float32)
    try:
        ca = jax.jit(step).lower(params, tx.init(params), x).cost_analysis()
        if isinstance(ca, list | tuple):
            ca = ca[0]
        return float(ca.get("flops", float("nan")))
    except Exception:  # cost analysis is best effort on some backends
        return float("nan")


def conditioner_sizes(flow) -> list[tuple[int, int]]:
    """(in, out) of every dense layer of one layer's conditioner."""
    sizes = []
    for _, m in nnx.iter_graph(flow.bijection.layer):
        if isinstance(m, nnx.Linear):
            sizes.append((m.in_features, m.out_features))
    return sizes


def analytic_flops(flow, layers: int, batch: int) -> float:
    """Matmul FLOPs of one step: forward 2·in·out per dense layer and point, ×3 with the
    backward pass; elementwise work (the splines) and adam not counted."""
    fwd = sum(2 * a * b for a, b in conditioner_sizes(flow))
    return 3.0 * fwd * layers * batch


def run(args, kind: str, layers: int, unroll: bool | None, data: np.ndarray) -> dict:
    flow = make_flow(kind, layers, tuple(args.hidden), unroll)
    analytic = analytic_flops(flow, layers, args.batch)
    # counted on the unrolled flow: XLA's cost analysis counts a loop's body once
    flops = step_flops(make_flow(kind, layers, tuple(args.hidden), True), args.batch, args.lr)
    hist = nflax.fit(
        flow,
        data,
        key=jax.random.key(0),
        steps=args.steps,
        optimizer=optax.adam(args.lr),
        batch_size=args.batch,
        progress=False,
    )
    assert hist.steps_run == args.steps, (hist.steps_run, hist.stop_reason)
    stack = flow.bijection
    return dict(
        flow=kind,
        layers=layers,
        unroll="unrolled" if stack.unroll == stack.num_layers else "scanned",
        default=unroll is None,
        compile_s=hist.compile_seconds,
        steps_per_s=hist.steps_per_second,
        flops=flops,
        analytic=analytic,
        final_loss=float(np.mean(hist.loss[-10:])),
    )


def device_line() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    try:
        load = f"load avg {os.getloadavg()[0]:.2f}"
    except OSError:
        load = "load n/a"
    return (
        f"{dev.platform} {kind} × {jax.device_count()} ({os.cpu_count()} host CPUs, {load}); "
        f"jax {jax.__version__}, python {platform.python_version()}"
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--num-points", type=int, default=262144)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    p.add_argument("--flows", nargs="+", default=list(FLOWS), choices=list(FLOWS))
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per fit")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--peak-size", type=int, default=8192, help="square matmul for the peak")
    p.add_argument(
        "--scanned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fit with the layer scan not unrolled (default on)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=270.0,
        help="skip the runs that would start after this many seconds",
    )
    p.add_argument("--tiny", action="store_true", help="tiny sizes, seconds on a CPU (smoke test)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.num_points, args.hidden, args.steps = 64, 256, [16, 16], 10
        args.peak_size, args.scanned = 128, False
    t_start = time.perf_counter()
    print(f"device: {device_line()}", flush=True)
    repeats = 3 if args.tiny else 10
    peak = matmul_peak(args.peak_size, repeats)
    peak_hi = matmul_peak(args.peak_size, repeats, jax.lax.Precision.HIGHEST)
    print(
        f"float32 matmul {args.peak_size}²: {peak / 1e12:.2f} TFLOP/s at the default precision, "
        f"{peak_hi / 1e12:.2f} TFLOP/s at 'highest'",
        flush=True,
    )
    data = np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), args.num_points))

    rows, skipped = [], []
    for kind in args.flows:
        layers = 2 if args.tiny else FLOWS[kind]
        for unroll in (None, False) if args.scanned else (None,):
            name = f"{kind} ({'default' if unroll is None else 'scanned'})"
            if time.perf_counter() - t_start > args.max_seconds:
                skipped.append(name)
                continue
            row = run(args, kind, layers, unroll, data)
            rows.append(row)
            print(
                f"  {name}: compile {row['compile_s']:.1f} s, {row['steps_per_s']:,.1f} steps/s",
                flush=True,
            )
    # the peak again at the end; the faster is kept
    peak = max(peak, matmul_peak(args.peak_size, repeats))
    print_table(args, rows, peak, peak_hi)
    if skipped:
        print(f"skipped (past --max-seconds {args.max_seconds:.0f}): {', '.join(skipped)}")
    print(f"total: {time.perf_counter() - t_start:.1f} s")
    return rows


def print_table(args, rows, peak, peak_hi) -> None:
    head = [
        "flow", "layers", "hidden", "batch", "layer scan", "compile s", "steps/s", "points/s",
        "GFLOP/step (XLA)", "GFLOP/step (matmul)", "TFLOP/s", "of peak", "of 'highest' peak",
    ]  # fmt: skip
    lines = []

    def line(cells):
        if args.markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append("  ".join(f"{c:>12}" for c in cells))

    line(head)
    if args.markdown:
        lines.append("|" + "|".join("---:" for _ in head) + "|")
    for r in rows:
        flops = r["flops"] if np.isfinite(r["flops"]) else r["analytic"]
        achieved = flops * r["steps_per_s"]
        line([
            r["flow"], str(r["layers"]), "×".join(map(str, args.hidden)), f"{args.batch:,}",
            r["unroll"] + (" (default)" if r["default"] else ""), f"{r['compile_s']:.1f}",
            f"{r['steps_per_s']:,.1f}", f"{r['steps_per_s'] * args.batch:,.0f}",
            f"{r['flops'] / 1e9:.3g}", f"{r['analytic'] / 1e9:.3g}", f"{achieved / 1e12:.3g}",
            f"{achieved / peak:.1%}", f"{achieved / peak_hi:.1%}",
        ])  # fmt: skip
    print(
        f"\nmatmul peak ({args.peak_size}², best of before/after): {peak / 1e12:.2f} TFLOP/s "
        f"default precision, {peak_hi / 1e12:.2f} TFLOP/s 'highest'\n"
    )
    print("\n".join(lines))
    print(
        "\nTFLOP/s = XLA's FLOP/step (the analytic count if XLA gives none) × steps/s; of peak ="
        " that / the matmul peak at the default precision."
    )


if __name__ == "__main__":
    main()
