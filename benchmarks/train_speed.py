"""Training speed: ``nflax.fit`` against the tutorial's per-step Python loop, in one process.

Both sides train the same model: RealNVP with ``--layers`` affine couplings (alternating masks,
scale ``tanh(s / e^c) · e^c``), MLP conditioners (``--hidden``, tanh), a standard normal base,
``optax.adamw(1e-3)`` (the tutorial's optimizer), on the "banana" data.

* baseline: the tutorial's pattern, re-created here: Flax Linen modules, a ``jax.jit``-ed train
  step (loss + grad + optax update) called once per step from a Python loop that reads the loss
  every step (for its patience check); minibatches are shuffled and sliced on the host with
  numpy each step, so each step copies its batch host → device.
* Linen step in scan (the loop-free limit): the baseline's own step inside ``lax.scan``,
  ``chunk`` steps per call (about 500, fit's chunk size), batches gathered on the device: its
  compute without the Python loop, the most that removing the loop alone can gain.
* nflax: ``nflax.fit(flow, x, batch_size=..., progress=False)`` with ``fit``'s default
  optimizer (``optax.adamw(--lr)``, ``nflax.training.default_fit_optimizer``) and the library
  defaults
  (``Stack(unroll="auto")``), started from the baseline's initial weights (``--no-same-init``
  for its own).
* optional rows: ``--scanned-row`` fit with the layer scan not unrolled (``unroll=False``),
  ``--patience-row`` fit with a patience on the training loss.
* ``--nll-seeds``: final NLL of both over several seeds (init and batch order), to tell a
  difference from noise.

Reported per batch size: steps/s and their ratio, compile seconds (AOT ``lower().compile()``
for both), the NLL of the training data after the same number of steps, and the achieved FLOP/s
as a fraction of a float32 matmul peak measured in this run (a timed square ``jnp.dot``). The
train step's FLOPs come from XLA's ``cost_analysis()`` of the baseline's compiled train step
(same model and optimizer, so the same useful work per step; the analytic matmul count is
printed next to it); steps/s of whole runs (best of ``--repeats`` interleaved) and of the best
``--window`` steps. Then the lockstep measure (``lockstep``: baseline, limit and fit advanced
in turns inside one fit run; medians of per-round ratios) and a summary against the targets
(default fit ≥ 1.2× the baseline at full batch and ≥ 1.55× at batch 128, and within 10 % of
the loop-free limit), and compile time and steps/s against depth (``--depths``), through
``fit``, with the layers scanned and unrolled (``--depth-flows realnvp nsf`` adds nsf).
Nothing here is specific to a backend; ``benchmarks/gpu.py`` is the GPU benchmark.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import nflax
from nflax.training import default_fit_optimizer

LOG_2PI = float(np.log(2 * np.pi))


# ---------------------------------------------------------------------------------------------
# Baseline: the tutorial's Linen model and per-step loop
# ---------------------------------------------------------------------------------------------
class LinenMLP(nn.Module):
    hidden: Sequence[int]
    out: int

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.tanh(nn.Dense(h)(x))
        return nn.Dense(self.out, kernel_init=nn.initializers.zeros)(x)


class LinenCoupling(nn.Module):
    mask: tuple[float, ...]
    hidden: Sequence[int]

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        m = jnp.asarray(self.mask, x.dtype)
        out = LinenMLP(self.hidden, 2 * dim)(x * m)
        s, t = out[..., :dim], out[..., dim:]
        ec = jnp.exp(self.param("c", nn.initializers.zeros, (dim,)))
        s = jnp.tanh(s / ec) * ec
        s, t = s * (1 - m), t * (1 - m)
        return (x + t) * jnp.exp(s), s.sum(-1)


class LinenRealNVP(nn.Module):
    dim: int
    layers: int
    hidden: Sequence[int]

    @nn.compact
    def __call__(self, x):
        log_det = jnp.zeros(x.shape[:-1], x.dtype)
        for i in range(self.layers):
            mask = tuple(float((j + i) % 2 == 0) for j in range(self.dim))
            x, ld = LinenCoupling(mask, self.hidden)(x)
            log_det = log_det + ld
        log_base = -0.5 * jnp.sum(x**2, -1) - 0.5 * self.dim * LOG_2PI
        return log_base + log_det  # log p(x)


def baseline_setup(args, data: np.ndarray, batch: int):
    model = LinenRealNVP(data.shape[1], args.layers, tuple(args.hidden))
    params = model.init(jax.random.key(args.seed), jnp.asarray(data[:batch]))["params"]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.adamw(args.lr)
    )

    def loss_fn(params, x):
        return -jnp.mean(model.apply({"params": params}, x))

    def train_step(state, x):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x)
        return state.apply_gradients(grads=grads), loss

    return model, state, train_step


class BaselineLoop:
    """The tutorial's loop, resumable: ``run(k)`` runs ``k`` more steps (loader position,
    patience counters and state carry over), reading the loss every step."""

    def __init__(self, args, data: np.ndarray, batch: int, patience: int):
        self.model, self.state, train_step = baseline_setup(args, data, batch)
        self.data, self.batch, self.n = data, batch, data.shape[0]
        self.full = batch >= self.n
        self.step_fn = jax.jit(train_step)
        self.data_dev = jnp.asarray(data)  # full batch: device-resident, no per-step copy
        # Warm-up call (compiles ``step_fn``); its result is discarded, the budget is unchanged.
        x0 = self.data_dev if self.full else data[:batch]
        jax.block_until_ready(self.step_fn(self.state, x0))
        self.rng = np.random.default_rng(args.seed)
        self.patience, self.best, self.bad = patience, np.inf, 0
        self.perm, self.pos = None, self.n

    def run(self, steps: int) -> None:
        state, batch, n = self.state, self.batch, self.n
        for _ in range(steps):
            if self.full:
                xb = self.data_dev
            else:  # the usual host-side loader: shuffle per epoch, slice per step (drop last)
                if self.pos + batch > n:
                    self.perm, self.pos = self.rng.permutation(n), 0
                xb = self.data[self.perm[self.pos : self.pos + batch]]
                self.pos += batch
            state, loss = self.step_fn(state, xb)
            loss = float(loss)  # the tutorial reads the loss every step for its patience check
            if loss < self.best:
                self.best, self.bad = loss, 0
            else:
                self.bad += 1
                if self.bad > self.patience:
                    break
        jax.block_until_ready(state)
        self.state = state

    def nll(self) -> float:
        model = self.model
        nll_fn = jax.jit(lambda p, x: -jnp.mean(model.apply({"params": p}, x)))
        return float(nll_fn(self.state.params, self.data_dev))


def run_baseline(args, data: np.ndarray, batch: int, steps: int) -> dict:
    _, state, train_step = baseline_setup(args, data, batch)
    # Compile time, AOT, on a fresh jit object (the loop uses its own ``jax.jit``).
    t0 = time.perf_counter()
    compiled = jax.jit(train_step).lower(state, jnp.asarray(data[:batch])).compile()
    compile_s = time.perf_counter() - t0
    loop = BaselineLoop(args, data, batch, patience=steps)
    t0 = time.perf_counter()
    marks = [t0]  # the time after every ``args.window`` steps
    for done in range(0, steps, args.window):
        loop.run(min(args.window, steps - done))
        marks.append(time.perf_counter())
    seconds = time.perf_counter() - t0
    whole = np.diff(marks)[: steps // args.window]
    return dict(
        steps_per_s=steps / seconds,
        window_per_s=args.window / whole.min() if whole.size else steps / seconds,
        compile_s=compile_s,
        nll=loop.nll(),
        flops=_flops(compiled),
    )


class LimitLoop:
    """The baseline's own Linen train step, many steps per ``lax.scan`` call, batches gathered
    on the device: its compute without the Python loop (no one trains like this; it bounds
    what removing the loop alone can gain). About ``args.window`` steps per call (``chunk``),
    as ``fit``'s chunks; ``run()`` runs one call and waits for it, as fit's driver does."""

    def __init__(self, args, data: np.ndarray, batch: int, steps: int):
        self.model, state, train_step = baseline_setup(args, data, batch)
        n = data.shape[0]
        nb = max(n // batch, 1)  # batches per epoch (drop last, like the loop)
        self.chunk = chunk = nb * max(1, min(args.window, steps) // nb)
        self.data_dev = data_dev = jnp.asarray(data)

        def run_chunk(state, key):
            keys = jax.random.split(key, chunk // nb)
            perms = jax.vmap(lambda k: jax.random.permutation(k, n))(keys)
            idx = perms[:, : nb * batch].reshape(chunk, batch)

            def body(state, i):
                return train_step(state, data_dev[i] if batch < n else data_dev)

            return jax.lax.scan(body, state, idx)

        self.key = jax.random.key(args.seed)
        t0 = time.perf_counter()
        self.compiled = jax.jit(run_chunk).lower(state, self.key).compile()
        self.compile_s = time.perf_counter() - t0
        jax.block_until_ready(self.compiled(state, self.key))  # warm-up, discarded
        self.state, self.calls = state, 0

    def run(self) -> None:
        self.state, _ = self.compiled(self.state, jax.random.fold_in(self.key, self.calls))
        jax.block_until_ready(self.state)
        self.calls += 1

    def nll(self) -> float:
        model = self.model
        nll_fn = jax.jit(lambda p, x: -jnp.mean(model.apply({"params": p}, x)))
        return float(nll_fn(self.state.params, self.data_dev))


def run_baseline_scanned(args, data: np.ndarray, batch: int, steps: int) -> dict:
    loop = LimitLoop(args, data, batch, steps)
    n_chunks = -(-steps // loop.chunk)
    t0 = time.perf_counter()
    marks = [t0]
    for _ in range(n_chunks):
        loop.run()
        marks.append(time.perf_counter())
    seconds = time.perf_counter() - t0
    return dict(
        steps_per_s=n_chunks * loop.chunk / seconds,
        window_per_s=loop.chunk / np.diff(marks).min(),
        compile_s=loop.compile_s,
        nll=loop.nll(),
        steps=n_chunks * loop.chunk,
    )


def lockstep(args, data: np.ndarray, batch: int, rounds: int) -> dict:
    """The three sides advanced in turns, one window each per round, inside one ``fit`` run:
    fit runs ``rounds + 2`` chunks of ``args.window`` steps, and its callback (between
    chunks) runs one window of the baseline's loop and one call of the limit, timed. A fit
    chunk's time runs from the end of one callback to the start of the next (the driver's
    work between chunks included, the callback's own time not). Round ``k`` pairs fit's chunk
    ``k + 1`` with the windows run just before it; the first and last chunks (no callback on
    one side) are left out. The medians of the per-round ratios cancel load changes slower
    than a round. fit and the baseline run
    ``args.window`` steps per window (500: fit's default chunk size), the limit its chunk (a
    whole number of epochs, 496 at batch 128 of 1024 points)."""
    base = BaselineLoop(args, data, batch, patience=10**9)
    limit = LimitLoop(args, data, batch, args.window)
    w = args.window
    flow = make_flow(args)
    if args.same_init:
        copy_linen_init(flow, base.state.params)
    times = {"base": [], "scan": [], "ours": []}
    exits: list[float] = []

    def callback(step, metrics):
        enter = time.perf_counter()
        if exits:
            times["ours"].append(enter - exits[-1])
        t0 = time.perf_counter()
        base.run(w)
        t1 = time.perf_counter()
        limit.run()
        t2 = time.perf_counter()
        times["base"].append(t1 - t0)
        times["scan"].append(t2 - t1)
        exits.append(time.perf_counter())

    nflax.fit(
        flow, data, key=jax.random.key(args.seed), steps=(rounds + 2) * w, chunk_size=w,
        optimizer=default_fit_optimizer(args.lr), batch_size=batch, progress=False,
        callback=callback,
    )  # fmt: skip
    steps = {"base": w, "scan": limit.chunk, "ours": w}
    rate = {k: steps[k] / np.asarray(v[: len(times["ours"])]) for k, v in times.items()}
    ratio = lambda a, b: float(np.median(rate[a] / rate[b]))  # noqa: E731
    return dict(
        batch=batch,
        rounds=len(rate["ours"]),
        median={k: float(np.median(v)) for k, v in rate.items()},
        best={k: float(np.max(v)) for k, v in rate.items()},
        scan_x=ratio("scan", "base"),
        ours_x=ratio("ours", "base"),
        of_limit=ratio("ours", "scan"),
    )


# ---------------------------------------------------------------------------------------------
# nflax
# ---------------------------------------------------------------------------------------------
def set_unroll(flow, unroll: bool | None) -> None:
    """``unroll`` for every ``Stack`` of ``flow``: ``None`` keeps the library default
    (``"auto"``), ``True`` unrolls, ``False`` scans."""
    if unroll is None:
        return
    for _, m in nnx.iter_graph(flow):
        if isinstance(m, nflax.bijections.Stack):
            m.unroll = m.num_layers if unroll else 1


def make_flow(args, layers: int | None = None, unroll: bool | None = None, kind="realnvp"):
    n_layers = args.layers if layers is None else layers
    ctor = getattr(nflax.flows, kind)
    flow = ctor(2, num_layers=n_layers, hidden=tuple(args.hidden), rngs=nnx.Rngs(args.seed))
    set_unroll(flow, unroll)
    return flow


def copy_linen_init(flow, linen_params) -> None:
    """Give ``flow`` (a realnvp) the baseline's initial weights, so both runs start equal."""
    layer = flow.bijection.layer
    denses = [*layer.conditioner.hidden, layer.conditioner.out]
    names = [f"LinenCoupling_{i}" for i in range(flow.bijection.num_layers)]

    def stacked(*path):
        arrs = []
        for name in names:
            a = linen_params[name]
            for k in path:
                a = a[k]
            arrs.append(a)
        return jnp.stack(arrs)

    layer.c.value = stacked("c")
    for j, dense in enumerate(denses):
        dense.kernel.value = stacked("LinenMLP_0", f"Dense_{j}", "kernel")
        dense.bias.value = stacked("LinenMLP_0", f"Dense_{j}", "bias")


def run_nflax(args, data: np.ndarray, batch: int, steps: int, unroll=None, **kw) -> dict:
    flow = make_flow(args, unroll=unroll)
    nflax.engine.PROGRAMS.clear()  # every whole run compiles, as a first call does
    if args.same_init:
        _, state, _ = baseline_setup(args, data, batch)
        copy_linen_init(flow, state.params)
    # The callback runs between chunks (not after the last) and gets the rate since the
    # first chunk began: elapsed = step / rate, so every chunk's duration is known.
    elapsed = [0.0]
    kw.setdefault("chunk_size", args.window)
    t0 = time.perf_counter()
    hist = nflax.fit(
        flow,
        data,
        key=jax.random.key(args.seed),
        steps=steps,
        optimizer=default_fit_optimizer(args.lr),
        batch_size=batch,
        progress=False,
        callback=lambda step, m: elapsed.append(step / m["steps_per_second"]),
        **kw,
    )
    wall = time.perf_counter() - t0
    assert hist.steps_run == steps, (hist.steps_run, hist.stop_reason)
    elapsed.append(hist.train_seconds)
    chunk_s = np.diff(elapsed)[: steps // kw["chunk_size"]]  # whole chunks only
    return dict(
        steps_per_s=hist.steps_per_second,
        window_per_s=kw["chunk_size"] / chunk_s.min() if chunk_s.size else hist.steps_per_second,
        compile_s=hist.compile_seconds,
        setup_s=wall - hist.train_seconds,
        nll=float(np.mean(nflax.nll(flow, data))),
    )


def depth_sweep(args, data: np.ndarray) -> list[dict]:
    """Compile time and steps/s of ``fit`` against depth, layers scanned and unrolled, and
    which one ``Stack``'s default picks; plus the baseline's Linen step (unrolled by
    construction). Per depth and mode: ``fit(steps=1)`` gives the compile's CPU seconds (the
    process's CPU time over the call: steadier than wall time on a shared machine), and
    ``fit(steps=--depth-steps)`` the steps/s; compile wall seconds are the first call's
    ``History.compile_seconds`` (the training program, AOT, and its first step). The engine
    keeps compiled programs (steps are a traced argument), so the first call starts from an
    empty program cache and the second reuses its program."""
    rows = []
    batch = min(args.depth_batch, args.num_points)

    def fit(kind, n_layers, mode, steps):
        flow = make_flow(args, n_layers, unroll=mode == "unroll", kind=kind)
        if steps == 1:  # compile afresh, not reuse the speed table's or a repeat's program
            nflax.engine.PROGRAMS.clear()
        c0 = time.process_time()
        hist = nflax.fit(
            flow, data, key=jax.random.key(0), steps=steps,
            optimizer=default_fit_optimizer(args.lr), batch_size=batch, progress=False,
        )  # fmt: skip
        return hist, time.process_time() - c0

    for kind in args.depth_flows:
        for n_layers in args.depths:
            row = dict(kind=kind, layers=n_layers)
            for _ in range(args.depth_repeats):
                for mode in ("scan", "unroll"):
                    h1, cpu = fit(kind, n_layers, mode, 1)
                    h2, _ = fit(kind, n_layers, mode, args.depth_steps)
                    assert h2.chunk_program == "reused", h2.chunk_program
                    new = (h1.compile_seconds, h2.steps_per_second, cpu)
                    old = row.get(mode, new)
                    # the least compile time and the most steps/s over the repeats
                    row[mode] = (min(old[0], new[0]), max(old[1], new[1]), min(old[2], new[2]))
            stack = make_flow(args, n_layers, kind=kind).bijection
            row["default"] = "unroll" if stack.unroll == n_layers else "scan"
            if kind == "realnvp":
                row["linen"] = baseline_compile(args, data, n_layers)
            rows.append(row)
    return rows


def baseline_compile(args, data: np.ndarray, n_layers: int) -> float:
    a = argparse.Namespace(**{**vars(args), "layers": n_layers})
    _, state, train_step = baseline_setup(a, data, data.shape[0])
    t0 = time.perf_counter()
    jax.jit(train_step).lower(state, jnp.asarray(data)).compile()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------
def _flops(compiled) -> float:
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, list | tuple):
            ca = ca[0]
        return float(ca.get("flops", float("nan")))
    except Exception:  # cost analysis is best effort on some backends
        return float("nan")


def analytic_flops(args, batch: int) -> float:
    """Matmul FLOPs of one train step: forward 2·in·out per dense layer and point, ×3 with
    the backward pass (grad wrt inputs and weights); elementwise work and adamw not counted."""
    sizes = [2, *args.hidden, 4]
    fwd = sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return 3.0 * fwd * args.layers * batch


def matmul_peak(size: int, repeats: int) -> float:
    """Best float32 FLOP/s of a square ``jnp.dot`` of ``size``."""
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def machine() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    try:
        load = f"load avg {os.getloadavg()[0]:.2f}"
    except OSError:
        load = "load n/a"
    return (
        f"{dev.platform} {kind} × {jax.device_count()}, {os.cpu_count()} host CPUs, {load}; "
        f"jax {jax.__version__}, python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------------------------
IMPLS = (
    ("baseline", "base"),
    ("Linen step in scan", "scan"),
    ("nflax.fit", "ours"),
    ("fit, layers scanned", "scanned"),
    ("fit+patience", "pat"),
)
# The targets for the default fit: × baseline at full batch / at batch 128, and the
# fraction of the loop-free limit ("Linen step in scan") at both.
TARGETS = {"full": 1.2, "minibatch": 1.55, "of_limit": 0.9}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="*",
        default=[1024, 128],
        help="batch sizes of the speed table (none: only the depth sweep)",
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--num-points", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--same-init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start nflax from the baseline's initial weights (default on)",
    )
    p.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs per row; the fastest is kept"
    )
    p.add_argument(
        "--window",
        type=int,
        default=500,
        help="steps per timing window: fit's chunk size (500 is its default), the limit's "
        "steps per call, and the baseline's timing marks",
    )
    p.add_argument(
        "--lockstep-rounds",
        type=int,
        default=10,
        help="rounds of the lockstep measurement (baseline, limit and fit in turns, one window "
        "each; 0 skips it)",
    )
    p.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 16, 32])
    p.add_argument("--depth-flows", nargs="+", default=["realnvp"], help="e.g. realnvp nsf")
    p.add_argument("--depth-batch", type=int, default=128, help="batch size of the depth sweep")
    p.add_argument("--depth-steps", type=int, default=500, help="steps per depth-sweep fit")
    p.add_argument("--depth-repeats", type=int, default=1)
    p.add_argument("--peak-size", type=int, default=2048, help="square matmul for the peak")
    p.add_argument(
        "--scanned-row", action="store_true", help="also fit with the layer scan not unrolled"
    )
    p.add_argument("--patience-row", action="store_true", help="also fit with a patience")
    p.add_argument(
        "--scan-row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the loop-free limit, the baseline's Linen step inside lax.scan (default on)",
    )
    p.add_argument(
        "--nll-seeds",
        type=int,
        nargs="*",
        default=[],
        help="also train baseline and nflax.fit from these seeds (init, batch order) and print "
        "the spread of their final NLLs",
    )
    p.add_argument("--quick", action="store_true", help="tiny run (CI smoke test)")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.num_points, args.hidden, args.layers = 20, 64, [8], 2
        args.batch_sizes, args.depths, args.peak_size, args.repeats = [16], [2], 128, 1
        args.depth_steps, args.depth_batch, args.window = 20, 16, 10
        args.lockstep_rounds = 2

    data = np.asarray(
        nflax.datasets.get("banana").sample(jax.random.key(args.seed), args.num_points)
    )
    peak = matmul_peak(args.peak_size, 3 if args.quick else 10)
    print(f"machine: {machine()}", flush=True)
    print(f"float32 matmul ({args.peak_size}²), before the runs: {peak / 1e9:.1f} GFLOP/s")

    rows = []
    for batch in args.batch_sizes:
        batch = min(batch, args.num_points)
        runs = {
            "base": lambda b=batch: run_baseline(args, data, b, args.steps),
            "ours": lambda b=batch: run_nflax(args, data, b, args.steps),
        }
        if args.scan_row:
            runs["scan"] = lambda b=batch: run_baseline_scanned(args, data, b, args.steps)
        if args.scanned_row:
            runs["scanned"] = lambda b=batch: run_nflax(args, data, b, args.steps, unroll=False)
        if args.patience_row:
            runs["pat"] = lambda b=batch: run_nflax(
                args, data, b, args.steps, patience=args.steps, val_fraction=0.0
            )
        row = dict(batch=batch, analytic=analytic_flops(args, batch))
        for _ in range(args.repeats):  # interleaved, so that load changes hit every row alike
            for key, fn in runs.items():
                m = fn()
                best = row.get(key)
                if best is not None:
                    m["window_per_s"] = max(m["window_per_s"], best["window_per_s"])
                if best is None or m["steps_per_s"] > best["steps_per_s"]:
                    row[key] = m
                else:
                    best["window_per_s"] = m["window_per_s"]
        rows.append(row)

    locks = []
    if args.lockstep_rounds:
        for batch in args.batch_sizes:
            locks.append(lockstep(args, data, min(batch, args.num_points), args.lockstep_rounds))
    # The peak again at the end; the faster of the two is kept (the load changes while we run).
    peak = max(peak, matmul_peak(args.peak_size, 3 if args.quick else 10))
    load_runs = _load()
    depth = depth_sweep(args, data) if args.depths else []
    print(f"load after the speed runs: {load_runs}; after the depth sweep: {_load()}", flush=True)
    if rows:
        print_table(args, rows, peak)
    print_summary(args, rows, locks)
    print_depth(args, depth)
    if args.nll_seeds:
        print_nll_spread(args, data)


def _load() -> str:
    try:
        return "load avg " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load n/a"


def print_nll_spread(args, data) -> None:
    """Final NLL of the training data for several seeds: is a difference more than noise?"""
    print(f"\nNLL after {args.steps} steps, seeds {args.nll_seeds} (init and batch order):")
    for batch in args.batch_sizes:
        batch = min(batch, args.num_points)
        out = {}
        for seed in args.nll_seeds:
            a = argparse.Namespace(**{**vars(args), "seed": seed})
            out.setdefault("baseline", []).append(run_baseline(a, data, batch, args.steps)["nll"])
            out.setdefault("nflax.fit", []).append(run_nflax(a, data, batch, args.steps)["nll"])
        for name, v in out.items():
            vals = ", ".join(f"{x:.4f}" for x in v)
            print(
                f"  batch {batch:>6} {name:>10}: mean {np.mean(v):.4f} sd {np.std(v):.4f} ({vals})"
            )


def _liner(md: bool, lines: list[str], width: int = 15):
    def line(cells):
        if md:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append("  ".join(f"{c:>{width}}" for c in cells))

    return line


def print_table(args, rows, peak) -> None:
    md = args.markdown
    head = [
        "batch", "impl", "steps/s", "× baseline", f"best {args.window} steps, /s", "× baseline",
        "compile s", "compile+train s", f"NLL@{args.steps}", "FLOP/step", "FLOP/s / peak",
    ]  # fmt: skip
    lines: list[str] = []
    line = _liner(md, lines)
    line(head)
    if md:
        lines.append("|" + "|".join("---:" for _ in head) + "|")
    for r in rows:
        flops = r["base"]["flops"]
        for name, key in IMPLS:
            if key not in r:
                continue
            m = r[key]
            ratio = m["steps_per_s"] / r["base"]["steps_per_s"]
            w_ratio = m["window_per_s"] / r["base"]["window_per_s"]
            line([
                str(r["batch"]), name, f"{m['steps_per_s']:,.0f}", f"{ratio:.2f}×",
                f"{m['window_per_s']:,.0f}", f"{w_ratio:.2f}×",
                f"{m['compile_s']:.2f}", f"{m['compile_s'] + args.steps / m['steps_per_s']:.2f}",
                f"{m['nll']:.3f}" + ("" if m.get("steps", args.steps) == args.steps else
                                     f" ({m['steps']} steps)"),
                f"{flops / 1e6:.2f}M", f"{flops * m['steps_per_s'] / peak:.2%}",
            ])  # fmt: skip
    print(f"\nfloat32 matmul peak (best of before/after the runs): {peak / 1e9:.1f} GFLOP/s")
    print()
    print("\n".join(lines))
    print()
    print(
        "FLOP/step: XLA cost_analysis() of the baseline's compiled train step (the same model and"
        " optimizer); analytic matmul count: "
        + ", ".join(f"batch {r['batch']}: {r['analytic'] / 1e6:.2f}M" for r in rows)
    )


def print_summary(args, rows, locks) -> None:
    """The default fit against the baseline and against the loop-free limit, per batch size,
    with the issue's targets: from the lockstep rounds (medians of per-round ratios, the
    measure that cancels load changes), then from the table's whole runs and best windows."""
    print(
        f"\nsummary: the default fit against the baseline's loop and the loop-free limit "
        f"(targets: ≥ {TARGETS['full']}× at full batch, ≥ {TARGETS['minibatch']}× at batch 128,"
        f" ≥ {TARGETS['of_limit']:.0%} of the limit)"
    )

    def verdict(batch, base, lim, ours, scan_x, ours_x, of_limit, measure):
        full = batch >= args.num_points
        want = TARGETS["full" if full else "minibatch"]
        word = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        # × baseline depends on the CPU: where the limit itself is under the target, no
        # implementation that only removes the loop can reach it
        reachable = "" if scan_x >= want else f", out of reach: the limit itself is {scan_x:.3f}×"
        print(
            f"  batch {batch:>5} ({'full' if full else 'minibatch'}), {measure}: baseline "
            f"{base:,.0f}/s; limit {lim:,.0f}/s = {scan_x:.2f}×; default fit {ours:,.0f}/s = "
            f"{ours_x:.2f}× (≥ {want}×: {word(ours_x >= want)}{reachable}), {of_limit:.0%} of "
            f"the limit (≥ {TARGETS['of_limit']:.0%}: {word(of_limit >= TARGETS['of_limit'])})"
        )

    for lk in locks:
        m = lk["median"]
        verdict(
            lk["batch"], m["base"], m["scan"], m["ours"], lk["scan_x"], lk["ours_x"],
            lk["of_limit"], f"lockstep, median of {lk['rounds']} rounds",
        )  # fmt: skip
    for r in rows if all("scan" in r for r in rows) else []:
        for measure, key in (("whole runs", "steps_per_s"), ("best windows", "window_per_s")):
            base, lim, ours = (r[k][key] for k in ("base", "scan", "ours"))
            verdict(r["batch"], base, lim, ours, lim / base, ours / base, ours / lim, measure)


def print_depth(args, depth: list[dict]) -> None:
    if not depth:
        print("\ncompile vs depth: skipped (no --depths)")
        return
    print(
        f"\ncompile time and steps/s against depth: nflax.fit, batch {args.depth_batch}, "
        f"{args.depth_steps} steps, hidden {args.hidden}; compile s = History.compile_seconds "
        "(the training program, AOT, and its first step), compile CPU s = the process's CPU time"
        " over fit(steps=1); Linen step = the baseline's jitted step (its loop unrolls the "
        "layers), full batch, wall"
    )
    md = args.markdown
    head = [
        "flow", "layers", "scan compile s", "unroll compile s", "unroll − scan s",
        "scan compile CPU s", "unroll compile CPU s", "scan steps/s", "unroll steps/s",
        "unroll / scan", "default", "Linen step compile s",
    ]  # fmt: skip
    lines: list[str] = []
    line = _liner(md, lines, 10)
    line(head)
    if md:
        lines.append("|" + "|".join("---:" for _ in head) + "|")
    for r in depth:
        (cs, ss, ps), (cu, su, pu) = r["scan"], r["unroll"]
        linen = f"{r['linen']:.2f}" if "linen" in r else ""
        line([
            r["kind"], str(r["layers"]), f"{cs:.2f}", f"{cu:.2f}", f"{cu - cs:+.2f}",
            f"{ps:.2f}", f"{pu:.2f}", f"{ss:,.0f}", f"{su:,.0f}", f"{su / ss:.2f}×",
            r["default"], linen,
        ])  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
