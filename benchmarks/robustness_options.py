"""The options tried for a robust default `nflax train`: one training recipe, many seeds.

    python benchmarks/robustness_options.py [--seeds 0-9] [--jobs 2] [--label NAME]
        [--activation tanh|silu|elu|gelu] [--weight-decay W] [--decay-kernels-only]
        [--lr LR] [--val-fraction F] [--patience P] [--layers L] [--hidden H ...]
        [--batch-size B] [--ema D] [--student-t] [--max-grad-norm G]

Each seed trains the way ``nflax train`` does on the banana set (the same data, test set, keys,
realnvp with a leading ActNorm, adamw with 200 warm-up steps and a cosine decay over 4000
steps, a validation split with patience, the best parameters kept), in this process, with
one option changed, and scores the result on the run's 16384 test points against the exact
density. Options the command line has no flag for (``--ema``, ``--student-t``,
``--decay-kernels-only``) are why this is not ``benchmarks/robustness.py``. With no options
it is the recipe ``nflax train`` had before issue 11 (tanh, weight decay 1e-4), and it gives
the same gaps as ``robustness.py -- --activation tanh --weight-decay 1e-4``, seed by seed.

Prints one line per configuration: the median and worst gap over the seeds, the tails'
share of the mean gap (``|x2| ≥ 12``), the worst test point, and each seed's gap and best step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from robustness import parse_seeds  # noqa: E402


def build_flow(opts: dict, seed: int):
    """realnvp with a leading ActNorm (as ``nflax train``), optionally on a Student-t base."""
    from flax import nnx

    import nflax
    from nflax.distributions import Flow, StudentT

    flow = nflax.flows.realnvp(
        2,
        num_layers=opts["layers"],
        hidden=tuple(opts["hidden"]),
        actnorm=True,
        activation=opts["activation"],
        rngs=nnx.Rngs(seed),
    )
    if opts["student_t"]:  # the same layers over a Student-t base with a learned df
        flow = Flow(StudentT(2, df=30.0, learn_df=True), flow.bijection)
    return flow


def optimizer(opts: dict):
    """adamw on nflax train's schedule; weight decay on every parameter, or on the
    conditioners' kernels only (as ``nflax.training.default_optimizer``)."""
    import optax

    from nflax.training import kernel_mask, warmup_cosine

    mask = kernel_mask if opts["decay_kernels_only"] else None
    lr = warmup_cosine(opts["lr"], opts["steps"])
    return optax.adamw(lr, weight_decay=opts["weight_decay"], mask=mask)


def run_seed(opts: dict, seed: int) -> dict:
    """Train one seed the way ``nflax train`` does and score it on the run's test set."""
    import jax

    import nflax

    ds = nflax.datasets.get("banana")
    key_data, key_test, key_fit, _ = jax.random.split(jax.random.key(seed), 4)  # as the CLI
    x = np.asarray(ds.sample(key_data, 1024))
    x_test = np.asarray(ds.sample(key_test, 16384))
    flow = build_flow(opts, seed)
    extra = {k: opts[k] for k in ("ema", "max_grad_norm", "batch_size") if opts[k] is not None}
    t0 = time.perf_counter()
    hist = nflax.fit(
        flow,
        x,
        key=key_fit,
        steps=opts["steps"],
        optimizer=optimizer(opts),
        patience=opts["patience"],
        val_fraction=opts["val_fraction"],
        progress=False,
        **extra,
    )
    model = nflax.nll(flow, x_test).astype(np.float64)
    gap = model + np.asarray(ds.log_prob(x_test), np.float64)
    tails = np.abs(x_test[:, 1]) >= 12
    return {
        "seed": seed,
        "gap": float(gap.mean()),
        "tails": float(gap[tails].sum() / len(gap)),
        "worst_nll": float(model.max()),
        "best_step": hist.best_step,
        "seconds": time.perf_counter() - t0,
    }


def line(label: str, rows: list[dict]) -> str:
    g = np.array([r["gap"] for r in rows])
    return (
        f"{label}: median {np.median(g):+.4f}, worst {g.max():+.4f}, best {g.min():+.4f}; "
        f"tails {np.mean([r['tails'] for r in rows]):+.4f}; worst point "
        f"{max(r['worst_nll'] for r in rows):.0f}\n  gaps "
        + " ".join(f"{v:+.3f}" for v in g)
        + "\n  best steps "
        + " ".join(str(r["best_step"]) for r in rows)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    p.add_argument("--label", default=None)
    p.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--decay-kernels-only", action="store_true")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=1000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--student-t", action="store_true")
    p.add_argument("--max-grad-norm", type=float, default=None)
    args = p.parse_args(argv)
    opts = {k: v for k, v in vars(args).items() if k not in ("seeds", "jobs", "label", "json")}
    seeds = parse_seeds(args.seeds)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(run_seed, [opts] * len(seeds), seeds))
    label = args.label or " ".join(sys.argv[1:]) or "tutorial recipe (tanh, wd 1e-4)"
    print(line(label, rows))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": label, "options": opts, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
