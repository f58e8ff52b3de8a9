"""Every flow constructor, the same training budget, three 2D data sets.

    python benchmarks/flows_2d.py [--steps 1500] [--num-points 2048] [--out flows_2d.png]
                                  [--markdown] [--quick]

For each constructor in ``nflax.flows.CONSTRUCTORS`` and each of "banana", "moons" and
"eight_gaussians": train with ``nflax.fit`` (adamw, warm-up + cosine schedule, 10 % validation
split, patience, best parameters kept), report the test NLL on 16384 fresh points, the exact
NLL of those points where the density is known, and the training time; draw the learned
densities side by side.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import nflax  # noqa: E402

DATASETS = ["banana", "moons", "eight_gaussians"]
# The same modest size for every flow: a few layers with a 2 × 64 conditioner where there is one.
SIZES = dict(num_layers=6, hidden=(64, 64))
PLANAR_LAYERS = 32


def build(name: str, seed: int):
    params = inspect.signature(nflax.flows.CONSTRUCTORS[name]).parameters
    kw = {k: v for k, v in SIZES.items() if k in params}
    if name == "planar":
        kw["num_layers"] = PLANAR_LAYERS
    if "actnorm" in params:
        kw["actnorm"] = True
    return nflax.flows.build(name, dim=2, rngs=nnx.Rngs(seed), **kw)


def run_one(name: str, dataset: str, steps: int, n: int, seed: int = 0):
    ds = nflax.datasets.get(dataset)
    kd, kt, kf = jax.random.split(jax.random.key(seed), 3)
    x = np.asarray(ds.sample(kd, n))
    xt = np.asarray(ds.sample(kt, 16384))
    flow = build(name, seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(200, steps // 10 + 1), steps)
    t0 = time.perf_counter()
    hist = nflax.fit(
        flow,
        x,
        key=kf,
        steps=steps,
        patience=max(steps // 3, 50),
        optimizer=optax.adamw(sched, weight_decay=1e-4),
        max_grad_norm=10.0,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    test = nflax.nll(flow, xt)
    row = dict(
        flow=name,
        dataset=dataset,
        test_nll=float(np.mean(test)),
        test_median=float(np.median(test)),
        seconds=seconds,
        steps=hist.steps_run,
        stop=hist.stop_reason,
        compile=hist.compile_seconds,
    )
    row["exact_nll"] = float(-np.mean(ds.log_prob(xt))) if ds.has_density else None
    return flow, x, row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--num-points", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/flows_2d.png")
    p.add_argument("--flows", nargs="+", default=sorted(nflax.flows.CONSTRUCTORS))
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.num_points, a.flows = 30, 256, a.flows[:2]
    rows, flows = [], {}
    for name in a.flows:
        for dataset in DATASETS:
            flow, x, row = run_one(name, dataset, a.steps, a.num_points)
            rows.append(row)
            flows[(name, dataset)] = (flow, x)
            print(
                f"{name:>8} {dataset:>16}: test NLL {row['test_nll']:.3f}"
                + (f" (exact {row['exact_nll']:.3f})" if row["exact_nll"] is not None else "")
                + f", {row['seconds']:.1f} s, {row['steps']} steps ({row['stop']})",
                flush=True,
            )
    if a.markdown:
        print("\n| flow | data | test NLL | exact NLL | gap | median NLL | train s | steps |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            exact = f"{r['exact_nll']:.3f}" if r["exact_nll"] is not None else "—"
            gap = f"{r['test_nll'] - r['exact_nll']:+.3f}" if r["exact_nll"] is not None else "—"
            print(
                f"| {r['flow']} | {r['dataset']} | {r['test_nll']:.3f} | {exact} | {gap} | "
                f"{r['test_median']:.3f} | {r['seconds']:.1f} | {r['steps']} ({r['stop']}) |"
            )
    if a.out:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2.2 * len(DATASETS) + 0.5, 2.2 * len(a.flows)), layout="constrained")
        axes = fig.subplots(len(a.flows), len(DATASETS), squeeze=False)
        lims = {
            "banana": ((-4, 30), (-11, 11)),
            "moons": ((-1.5, 2.5), (-1.2, 1.7)),
            "eight_gaussians": ((-3.2, 3.2), (-3.2, 3.2)),
        }
        for i, name in enumerate(a.flows):
            for j, dataset in enumerate(DATASETS):
                flow, _ = flows[(name, dataset)]
                xl, yl = lims[dataset]
                _, _, logp = nflax.plotting.density_grid(flow, xl, yl, 150)
                ax = axes[i, j]
                ax.imshow(
                    np.exp(logp), origin="lower", extent=(*xl, *yl), aspect="auto", cmap="magma"
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(dataset, fontsize=9)
                if j == 0:
                    ax.set_ylabel(name, fontsize=9)
        fig.savefig(a.out, dpi=100)
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
