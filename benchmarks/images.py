"""Image flows on ``digits``: test bits/dim of nflax's flows against baselines and normflows.

Data: ``nflax.datasets.load_images("digits")``, scikit-learn's 8×8 digits, integer levels
0..16 (K = 17, D = 64), with the library's fixed split (``perm =
np.random.default_rng(0).permutation(1797)``: test = ``perm[:360]``, validation =
``perm[360:540]``, train = ``perm[540:]``, 1257 images); the normflows worker gets the same
arrays.

Dequantization (every row): the model sees ``y = (x + u)/K ∈ [0, 1]^D``, ``u ~ U[0, 1)^D``,
fresh noise every step; bits/dim = ``(NLL_y + D ln K) / (D ln 2)`` with ``NLL_y`` the negative
log-density of ``y`` in nats. Test figures: the single-sample bound (averaged over
``--iw-samples`` noise draws) and the importance-weighted NLL
``−log (1/S) Σ_s p((x + u_s)/K) K^{−D}`` with ``S = --iw-samples`` (tighter; the headline).

Rows (``--rows`` picks some):

* ``uniform``: the uniform distribution over the 17 levels, exactly log2 17 = 4.087 bits/dim.
* ``gaussian``: a full-covariance Gaussian on ``y``, the closed-form MLE over the training
  images and their noise (mean ``(x̄ + ½)/K``, covariance ``(Σ_x + I/12)/K² + ridge·I``: the
  limit of fitting to ever more noise draws), a ridge of ``1e-6``.
* ``glow``, ``realnvp_image``: nflax's multi-scale image flows (``nflax.flows.glow``,
  ``nflax.flows.realnvp_image``).
* ``maf``, ``realnvp``, ``nsf``: nflax's flat flows on the 64-vector, after a ``Logit``
  (the same preprocessing as the image flows).
* ``normflows_glow``: normflows' Glow (PyTorch), run by ``_normflows_glow.py`` in a separate
  environment (``--torch-python``, or ``benchmarks/.venv-normflows``, created on first use
  with the CPU build of torch 2.13.0 and normflows).

Same budget for every trained row: ``--steps`` Adam steps (peak learning rate ``--lr``) of
``--batch-size`` images, the validation bound (fixed noise) every ``--eval-every`` steps and
the best parameters restored. nflax trains through ``nflax.fit_dequantized``, with
``nflax train``'s warm-up + cosine schedule (``--schedule``) and a moving average of the
parameters (``--ema 0.999``: validated, restored and scored in place of the last iterate);
normflows' worker keeps its example's constant rate and no average. Every row is
scored by the one estimator below (:func:`dequantized_scores`), not the library's
``importance_weighted_nll``, because the Gaussian and normflows' Glow are not nflax flows.

``--quick`` is a smoke test (tiny models, a few steps); ``--markdown`` prints the table;
``--grid-dir DIR`` saves an 8×8 grid of samples (temperature 1.0) per trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nflax

HERE = Path(__file__).resolve().parent
K_LEVELS, SHAPE = 17, (8, 8, 1)
D = math.prod(SHAPE)
IMAGE_ROWS = ("glow", "realnvp_image")
FLAT_ROWS = ("maf", "realnvp", "nsf")
ALL_ROWS = ("uniform", "gaussian", *IMAGE_ROWS, *FLAT_ROWS, "normflows_glow")
TORCH_WHEEL = "torch==2.13.0+cpu"  # the CPU build: pip must never pull a CUDA torch here


@dataclass
class Row:
    name: str
    config: str = ""
    params: int | None = None
    steps: int | None = None
    compile_s: float | None = None
    train_s: float | None = None
    steps_per_s: float | None = None
    bound_bpd: float | None = None
    iw_bpd: float | None = None
    note: str = ""
    samples: np.ndarray | None = field(default=None, repr=False)


def bits(nll_discrete):
    """Bits/dim from the NLL in data (discrete) space, nats."""
    return float(np.mean(nll_discrete)) / (D * math.log(2))


def digits_split():
    """``(train, validation, test)`` levels, each ``(n, 8, 8, 1)`` uint8: the library's fixed
    split (:func:`nflax.datasets.load_images`; the normflows worker reads the same)."""
    data = nflax.datasets.load_images("digits")
    return data.train, data.validation, data.test


def dequantized_scores(log_prob_y, levels: np.ndarray, samples: int, key) -> tuple[float, float]:
    """Test bits/dim of a density on ``y``: (mean single-sample bound, importance-weighted).
    ``log_prob_y`` maps ``(n, *event)`` to ``(n,)``; one call per noise draw."""
    x = jnp.asarray(levels, jnp.float32)
    log_w = []
    for s in range(samples):
        u = jax.random.uniform(jax.random.fold_in(key, s), x.shape)
        log_p = np.asarray(log_prob_y((x + u) / K_LEVELS), np.float64)
        log_w.append(log_p - D * math.log(K_LEVELS))
    log_w = np.stack(log_w, 1)
    iw = math.log(samples) - (np.logaddexp.reduce(log_w, axis=1))
    return bits(-log_w.mean(1)), bits(iw)


# ---- rows without training -------------------------------------------------------------------
def uniform_row() -> Row:
    return Row(
        "uniform over 17 levels",
        "exact",
        0,
        bound_bpd=math.log2(K_LEVELS),
        iw_bpd=math.log2(K_LEVELS),
        note="log2 17, no model",
    )


def gaussian_row(train, test, args) -> Row:
    t0 = time.perf_counter()
    x = train.reshape(len(train), D).astype(np.float64)
    mean = (x.mean(0) + 0.5) / K_LEVELS
    cov = (np.cov(x, rowvar=False, bias=True) + np.eye(D) / 12) / K_LEVELS**2 + 1e-6 * np.eye(D)
    chol = np.linalg.cholesky(cov)
    fit_s = time.perf_counter() - t0
    half_log_det = np.log(np.diag(chol)).sum()

    def log_prob(y):
        r = np.linalg.solve(chol, (np.asarray(y, np.float64).reshape(len(y), D) - mean).T)
        return -0.5 * (r**2).sum(0) - half_log_det - 0.5 * D * math.log(2 * math.pi)

    bound, iw = dequantized_scores(log_prob, test, args.iw_samples, jax.random.key(args.seed))
    z = np.random.default_rng(args.seed).standard_normal((args.num_grid, D))
    return Row(
        "full-covariance Gaussian",
        "closed-form MLE, ridge 1e-6",
        D + D * (D + 1) // 2,
        train_s=fit_s,
        bound_bpd=bound,
        iw_bpd=iw,
        samples=(mean + z @ chol.T).reshape(-1, *SHAPE),
    )


# ---- nflax's flows -----------------------------------------------------------------------------
def nflax_configs(args) -> dict[str, dict]:
    """Constructor keyword arguments of each nflax row (``--quick``: tiny)."""
    if args.quick:
        return {
            "glow": dict(levels=2, depth=1, hidden=8, coupling=args.coupling),
            "realnvp_image": dict(levels=2, depth=1, hidden=8, blocks=1, coupling=args.coupling),
            "maf": dict(num_layers=2, hidden=(16,)),
            "realnvp": dict(num_layers=2, hidden=(16,)),
            "nsf": dict(num_layers=2, hidden=(16,)),
        }
    image = dict(hidden=args.hidden, coupling=args.coupling, squeeze_last=True)
    return {
        "glow": dict(levels=2, depth=args.depth, **image),
        "realnvp_image": dict(levels=2, depth=args.depth // 2 or 1, conditioner="glow", **image),
        "maf": dict(num_layers=5, hidden=(256, 256)),
        "realnvp": dict(num_layers=8, hidden=(256, 256)),
        "nsf": dict(num_layers=5, hidden=(256, 256)),
    }


def build_nflax(name: str, kwargs: dict, seed: int) -> nflax.Flow:
    """An image flow on ``(8, 8, 1)``, or a flat flow on the 64-vector behind the same logit
    preprocessing as the image flows (``α = 0.05``)."""
    rngs = nnx.Rngs(seed)
    if name in IMAGE_ROWS:
        return getattr(nflax.flows, name)(SHAPE, **kwargs, rngs=rngs)
    flat = getattr(nflax.flows, name)(D, **kwargs, rngs=rngs)
    logit = nflax.bijections.Logit(D, alpha=0.05)
    return nflax.Flow(flat.base, nflax.bijections.Chain([logit, flat.bijection]))


def optimizer(args) -> optax.GradientTransformation:
    """Adam at ``--lr``, constant or on ``nflax train``'s warm-up + cosine schedule
    (:func:`nflax.training.default_optimizer` without weight decay: a linear rise over
    ``min(200, steps/10)`` steps, then a cosine decay to 0 at ``--steps``)."""
    return nflax.training.default_optimizer(args.steps, args.lr, 0.0, args.schedule)


def train_nflax(flow, train, val, flat: bool, args):
    """Train in place by uniformly dequantized likelihood (:func:`nflax.fit_dequantized`, the
    best validation bound restored); returns ``(steps_run, compile s, train s, steps/s)``."""
    shape = (D,) if flat else SHAPE
    x, x_val = train.reshape(-1, *shape), val.reshape(-1, *shape)
    hist = nflax.fit_dequantized(
        flow, x, K_LEVELS, key=jax.random.key(args.seed), steps=args.steps, validation=x_val,
        eval_every=args.eval_every, optimizer=optimizer(args), batch_size=args.batch_size,
        progress=False, ema=args.ema or None,
    )  # fmt: skip
    return hist.steps_run, hist.compile_seconds, hist.train_seconds, hist.steps_per_second


def nflax_row(name: str, kwargs: dict, data, args) -> Row:
    train, val, test = data
    config = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    flow = build_nflax(name, kwargs, args.seed)
    label = f"nflax {name}" + ("" if name in IMAGE_ROWS else " (64-vector)")
    params = sum(p.size for p in jax.tree.leaves(nnx.state(flow, nnx.Param)))
    steps, compile_s, seconds, rate = train_nflax(flow, train, val, name in FLAT_ROWS, args)
    note = "fit_dequantized, best validation bound restored" + (
        f", average {args.ema:g}" if args.ema else ""
    )
    flow.eval()
    event = (D,) if name in FLAT_ROWS else SHAPE

    def log_prob(y):
        return nflax.distributions.compiled_log_prob(flow, y.reshape(len(y), *event))

    bound, iw = dequantized_scores(log_prob, test, args.iw_samples, jax.random.key(args.seed + 1))
    samples = np.asarray(flow.sample(jax.random.key(args.seed + 2), args.num_grid))
    return Row(
        label,
        config,
        params,
        steps,
        compile_s,
        seconds,
        rate,
        bound,
        iw,
        note,
        samples.reshape(-1, *SHAPE),
    )


# ---- normflows' Glow (PyTorch, its own environment) ---------------------------------------------
def torch_python(args) -> str:
    """The Python of the benchmark's PyTorch environment, created on first use."""
    if args.torch_python:
        return args.torch_python
    venv = HERE / ".venv-normflows"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} (torch CPU + normflows) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        if subprocess.run([*pip, TORCH_WHEEL]).returncode != 0:
            raise SystemExit(
                f"could not install {TORCH_WHEEL} (the CPU build); not falling back "
                "to a CUDA torch. Pass --torch-python PATH to an existing one."
            )
        subprocess.run([*pip, "normflows"], check=True)  # torch is already satisfied
    check = "import torch, normflows; assert torch.version.cuda is None, torch.version.cuda"
    subprocess.run([str(python), "-c", check], check=True)
    return str(python)


def normflows_config(args, hidden: int) -> dict:
    sizes = (
        dict(levels=2, depth=1, hidden=8)
        if args.quick
        else dict(levels=2, depth=args.depth, hidden=hidden)
    )
    return dict(
        sizes,
        seed=args.seed,
        logit=True,
        alpha=0.05,
        lr=args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        iw_samples=args.iw_samples,
        num_grid=args.num_grid,
        threads=args.torch_threads,
    )


def normflows_row(data, args, hidden: int) -> Row:
    cfg = normflows_config(args, hidden)
    config = f"levels={cfg['levels']}, depth={cfg['depth']}, hidden={cfg['hidden']}"
    if args.skip_normflows:
        return Row("normflows Glow (PyTorch)", config, note="skipped (--skip-normflows)")
    python = torch_python(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits.npz")
        train, val, test = data
        np.savez(path, train=train, validation=val, test=test, num_levels=K_LEVELS)
        worker = [python, str(HERE / "_normflows_glow.py"), path, json.dumps(cfg)]
        out = subprocess.run(worker, capture_output=True, text=True, timeout=args.torch_timeout)
    if out.returncode != 0:
        raise SystemExit(f"normflows worker failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    note = f"torch {r['torch']}, normflows {r['normflows']}, {r['threads']} threads; {r['stop']}"
    return Row(
        "normflows Glow (PyTorch)",
        config,
        r["num_params"],
        r["steps_run"],
        None,  # eager: nothing to compile
        r["train_seconds"],
        r["steps_per_second"],
        r["test_bound_bpd"],
        r["test_iw_bpd"],
        note,
        np.asarray(r["samples"], np.float32),
    )


# ---- output ----------------------------------------------------------------------------------
def save_grid(samples: np.ndarray, path: Path, title: str) -> None:
    """An 8×8 grid of 8×8 images (values in [0, 1], clipped), grey, no axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(math.isqrt(len(samples)))
    imgs = np.clip(samples[: n * n, ..., 0], 0, 1).reshape(n, n, *SHAPE[:2])
    tiled = np.pad(imgs, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.3)
    tiled = tiled.transpose(0, 2, 1, 3).reshape(n * (SHAPE[0] + 2), n * (SHAPE[1] + 2))
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(tiled, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _fmt(v, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rows: list[Row], args, markdown: bool) -> None:
    head = [
        "model",
        "configuration",
        "params",
        "steps",
        "compile s",
        "train s",
        "steps/s",
        f"test bits/dim, IW S={args.iw_samples}",
        "test bits/dim, bound",
        "note",
    ]
    if args.estimate_at:
        head.insert(7, f"est. s at {args.estimate_at} steps")
    lines = []
    for r in rows:
        cells = [
            r.name,
            r.config,
            _fmt(r.params, ","),
            _fmt(r.steps, "d"),
            _fmt(r.compile_s, ".1f"),
            _fmt(r.train_s, ".1f"),
            _fmt(r.steps_per_s, ".1f"),
            _fmt(r.iw_bpd, ".3f"),
            _fmt(r.bound_bpd, ".3f"),
            r.note,
        ]
        if args.estimate_at:
            est = args.estimate_at / r.steps_per_s if r.steps_per_s else None
            cells.insert(7, _fmt(est, ",.0f"))
        lines.append(cells)
    if markdown:
        print("| " + " | ".join(head) + " |")
        print(
            "|"
            + "|".join("---" if i in (0, 1, len(head) - 1) else "---:" for i in range(len(head)))
            + "|"
        )
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        for cells in lines:
            print("  ".join(f"{h}={c}" for h, c in zip(head, cells, strict=True) if c))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny models, few steps")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--rows", nargs="+", choices=ALL_ROWS, default=list(ALL_ROWS))
    p.add_argument("--steps", type=int, default=None, help="default 4000 (--quick: 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--schedule", choices=("warmup-cosine", "constant"), default="warmup-cosine",
        help="nflax rows' learning rate: warm-up + cosine decay, or constant",
    )  # fmt: skip
    p.add_argument(
        "--ema", type=float, default=0.999,
        help="nflax rows: validate and keep the parameters' moving average (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--coupling", choices=("spline", "affine"), default="spline",
        help="the image flows' coupling (their constructors' coupling=)",
    )  # fmt: skip
    p.add_argument("--eval-every", type=int, default=None, help="default 100 (--quick: 10)")
    p.add_argument("--depth", type=int, default=8, help="Glow blocks per level")
    p.add_argument("--hidden", type=int, default=64, help="conv channels of the image flows")
    p.add_argument("--iw-samples", type=int, default=None, help="default 128 (--quick: 4)")
    p.add_argument("--num-grid", type=int, default=64, help="samples per grid")
    p.add_argument("--grid-dir", default=None, help="save sample grids here (e.g. benchmarks)")
    p.add_argument("--estimate-at", type=int, default=None, help="add est. s at this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-normflows", action="store_true", help="no PyTorch row")
    p.add_argument("--torch-python", default=None, help="Python with torch + normflows")
    p.add_argument(
        "--normflows-hidden",
        type=int,
        nargs="+",
        default=None,
        help="normflows' conv channels, a row each (default --hidden; 256 matches nflax "
        "glow's parameters at hidden 64)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads (0: torch's default; 2 spin-wait on a loaded machine)",
    )
    p.add_argument("--torch-timeout", type=int, default=6 * 3600)
    args = p.parse_args(argv)
    args.steps = args.steps or (20 if args.quick else 4000)
    args.eval_every = args.eval_every or (10 if args.quick else 100)
    args.iw_samples = args.iw_samples or (4 if args.quick else 128)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    data = digits_split()
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
    print(
        f"digits: train {len(data[0])}, validation {len(data[1])}, test {len(data[2])}; "
        f"K = {K_LEVELS}, D = {D}; {args.steps} steps of batch {args.batch_size}, adam "
        f"{args.lr:g} ({args.schedule}, ema {args.ema:g}), validation every {args.eval_every}; "
        f"IW S = {args.iw_samples}"
    )
    print(
        f"cpu: {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"jax {jax.__version__} {jax.default_backend()}; python {platform.python_version()}"
    )
    configs = nflax_configs(args)
    hiddens = args.normflows_hidden or [args.hidden]
    tasks = []  # (name, row maker): one normflows row per --normflows-hidden
    for name in args.rows:
        if name == "uniform":
            tasks.append((name, uniform_row))
        elif name == "gaussian":
            tasks.append((name, lambda: gaussian_row(data[0], data[2], args)))
        elif name == "normflows_glow":
            for h in hiddens:
                tag = name if len(hiddens) == 1 else f"{name}_h{h}"
                tasks.append((tag, lambda h=h: normflows_row(data, args, h)))
        else:
            tasks.append((name, lambda name=name: nflax_row(name, configs[name], data, args)))
    rows = []
    for name, make in tasks:
        t0 = time.perf_counter()
        rows.append(make())
        r = rows[-1]
        print(
            f"  {name}: {time.perf_counter() - t0:.1f} s in all; "
            f"compile {_fmt(r.compile_s, '.1f')} s, train {_fmt(r.train_s, '.1f')} s, "
            f"{_fmt(r.steps_per_s, '.2f')} steps/s, "
            f"bits/dim {_fmt(r.iw_bpd, '.3f')}",
            file=sys.stderr,
        )
        if args.grid_dir and r.samples is not None:
            path = Path(args.grid_dir) / f"images_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_grid(r.samples, path, f"{r.name}: test {_fmt(r.iw_bpd, '.3f')} bits/dim, T=1")
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    print_table(rows, args, args.markdown)


if __name__ == "__main__":
    main()
