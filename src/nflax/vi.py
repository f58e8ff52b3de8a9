"""Variational inference: fit a flow ``q`` to an unnormalised density ``p̃`` by reverse KL.

The objective is the negative evidence lower bound,

    loss(θ) = E_{z ~ base} [ log q_θ(x) − log p̃(x) ],   x = f_θ⁻¹(z)   (latent → data),

so ``−loss = ELBO ≤ log Z`` with ``Z = ∫ p̃``, and ``log Z − ELBO = KL(q ‖ p)``. Samples are
reparameterised: the gradient flows through the inverse pass ``x = f_θ⁻¹(z)``.

* ``stick_the_landing=False`` is the "total derivative" estimator: ``x`` and ``log q(x)`` come
  from one inverse pass (``Flow.sample_and_log_prob``) and both are differentiated.
* ``stick_the_landing=True`` (the default) is the path-derivative estimator of Roeder, Wu &
  Duvenaud (2017, "Sticking the landing"): ``log q`` is evaluated at ``x`` by a forward pass
  with the parameters under ``jax.lax.stop_gradient``, which drops the score term
  ``∂ log q_θ/∂θ`` (zero in expectation). The gradient's variance then vanishes as ``q → p``.
  It costs one extra forward (data → latent) pass per step (``dim`` passes per layer for an
  IAF); on correlated Gaussians it cut the moment errors two- to three-fold
  (``benchmarks/README.md``).

The engine is :mod:`nflax.engine`, as for :func:`nflax.fit`: one jitted ``jax.lax.while_loop``
per chunk of steps, fresh samples drawn inside the compiled loop from ``fold_in(key, step)``, a
NaN guard, patience and best parameters on the ELBO of fresh evaluation samples, checkpoints
and exact resume; Python awake between chunks.

Diagnostics use importance weights ``w = p̃(x)/q(x)``, ``x ~ q``:
``log Z ≈ log mean w`` (``mean w`` is unbiased for ``Z``; its log is, in expectation, a lower
bound on ``log Z`` that is tighter than the ELBO: the importance-weighted bound of Burda et
al. 2016) and the effective sample size ``ESS = (Σw)²/Σw²``, reported as a fraction of the
number of samples (1 when ``q = p``; small when ``q`` misses mass of ``p``, such as a mode).
Reverse KL is mode-seeking: a flow may settle on some modes of a multimodal target, and then
the ELBO stays about ``log(1/mass covered)`` below ``log Z``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from nflax import _compile, parallel
from nflax._optim import scale_by_warmup_cosine, with_numbers
from nflax.distributions import Flow
from nflax.engine import (
    Model,
    ModelDef,
    Objective,
    Report,
    Run,
    make_settings,
    mutable_state,
    positive_int,
    split_model,
    train,
    with_clipping,
)
from nflax.engine import (
    checkpointing as make_checkpointing,
)
from nflax.variables import DataInit

Array = jax.Array
LogDensity = Callable[[Array], Array]


@dataclass
class VIHistory:
    """What happened during :func:`fit_vi`.

    ``elbo[t]`` is the ELBO estimate (``−loss``, nats) from the ``num_samples`` samples of step
    ``t``, with the parameters before that step's update. At the steps ``eval_steps`` a fresh
    batch of ``eval_samples`` samples gives ``eval_elbo`` (the monitored metric of patience and
    ``restore_best``), ``ess_fraction`` (ESS / number of samples) and ``log_z``
    (``log mean w``) for the parameters of that step. ``chunk_program`` and
    ``compile_seconds``: as in :class:`nflax.History` (a later ``fit_vi`` with a flow of the
    same structure, an equal ``log_density`` and optimizer, and the same sample counts and
    settings reuses the compiled program).
    """

    elbo: np.ndarray
    eval_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ess_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    log_z: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    eval_elbo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stop_reason: str = "steps"
    steps_run: int = 0
    best_step: int | None = None
    restored_best: bool = False
    non_finite_step: int | None = None
    num_samples: int = 0
    eval_samples: int = 0
    stick_the_landing: bool = False
    steps_per_second: float = float("nan")
    compile_seconds: float = float("nan")
    train_seconds: float = float("nan")
    chunk_program: str = "compiled"

    @property
    def loss(self) -> np.ndarray:
        """The negative ELBO per step (what was minimised)."""
        return -self.elbo

    def to_dict(self) -> dict:
        """Plain Python types (lists and numbers), ready for JSON."""
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}

    def to_csv(self, path: str | None = None) -> str:
        """Rows ``step,elbo,ess_fraction,log_z`` (the last two empty where not evaluated)."""
        ev = {
            int(t): (e, z)
            for t, e, z in zip(self.eval_steps, self.ess_fraction, self.log_z, strict=True)
        }
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "elbo", "ess_fraction", "log_z"])
        for t, elbo in enumerate(self.elbo.tolist()):
            extra = [repr(float(v)) for v in ev[t]] if t in ev else ["", ""]
            w.writerow([t, repr(elbo), *extra])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


def importance_diagnostics(log_w: Array) -> tuple[Array, Array, Array]:
    """``(elbo, ess_fraction, log_z)`` from log importance weights ``log w = log p̃ − log q``.

    ``elbo = mean(log w)``, ``log_z = logsumexp(log w) − log n`` and
    ``ess_fraction = exp(2·logsumexp(log w) − logsumexp(2·log w)) / n``, all in log space.

    >>> import jax.numpy as jnp
    >>> [round(float(v), 4) for v in importance_diagnostics(jnp.full(8, 1.5))]
    [1.5, 1.0, 1.5]
    """
    n = log_w.shape[0]
    lse = jax.nn.logsumexp(log_w)
    ess = jnp.exp(2 * lse - jax.nn.logsumexp(2 * log_w)) / n
    return jnp.mean(log_w), ess, lse - math.log(n)


def _log_weights(model: Model, params, rest, key, n, log_density, stl, mesh=None, train=True):
    """``log w = log p̃(x) − log q(x)`` for ``n`` reparameterised samples ``x ~ q`` (latent →
    data), and the model's mutable state after the call; ``mesh``: split the samples over its
    ``"data"`` axis."""
    flow = model.merge(params, rest, train=train)
    x, log_q = _sample_and_log_q(flow, key, n, mesh)
    new_rest = mutable_state(flow)
    if stl:  # log q at x with the parameters held fixed: only the path derivative remains
        held = model.merge(jax.lax.stop_gradient(params), new_rest, train=train)
        log_q = held.log_prob(x)
    return log_density(x) - log_q, new_rest


def _sample_and_log_q(model: Flow, key: Array, n: int, mesh: Mesh | None):
    """``n`` samples ``x ~ q`` and ``log q(x)`` from one inverse (latent → data) pass, as
    :meth:`Flow.sample_and_log_prob` (the same noise); with a mesh the noise rows are split
    over its ``"data"`` axis first, so the whole pass runs sharded."""
    if mesh is None:
        return model.sample_and_log_prob(key, n)
    z = parallel.shard_rows(model.base.sample(key, (n,)), mesh)
    x, log_det_inv = model.bijection.inverse(z)
    return x, model.base.log_prob(z) - log_det_inv


def default_vi_schedule(steps: int, learning_rate: float = 3e-3) -> optax.Schedule:
    """``fit_vi``'s default learning rate: a linear warm-up from 0 to ``learning_rate`` over
    ``min(100, steps // 10)`` steps, then a cosine decay to 0 at ``steps``.

    >>> lr = default_vi_schedule(1000)
    >>> [round(float(lr(t)), 6) for t in (0, 50, 100, 550, 1000)]
    [0.0, 0.0015, 0.003, 0.0015, 0.0]
    """
    steps = positive_int("steps", steps, "default_vi_schedule")
    warmup = min(100, steps // 10)
    if warmup == 0:
        return optax.cosine_decay_schedule(learning_rate, steps)
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps)


def default_vi_optimizer(steps: int, learning_rate: float = 3e-3) -> optax.GradientTransformation:
    """``fit_vi``'s default optimizer: Adam on :func:`default_vi_schedule`.

    Measured with nothing else set (``benchmarks/README.md``, "fit_vi defaults"): on
    correlated Gaussians in 4 and 8 dimensions, 3000 steps of 256 samples with the
    path-derivative gradient recover the mean to 0.3 % of the largest standard deviation and
    the covariance to 0.8 % of its largest entry; a constant ``adam(1e-3)`` missed them by
    3.4 % and 6.8 %.

    It is ``optax.adam`` step for step, with the learning rate and the step count held in the
    optimizer state, so one compiled program serves every value of them.
    """
    steps = positive_int("steps", steps, "default_vi_optimizer")
    warmup = min(100, steps // 10)  # as default_vi_schedule
    tx = optax.chain(optax.scale_by_adam(), scale_by_warmup_cosine())
    return with_numbers(tx, peak=learning_rate, warmup=warmup, total=steps)


def check_log_density(log_density: LogDensity, dim: int, n: int, who: str = "fit_vi") -> None:
    """Trace ``log_density`` once on a ``(n, dim)`` batch (no compute) and check it returns
    ``(n,)`` floats; a wrong shape or a failure raises ``ValueError``."""
    if not callable(log_density):
        raise ValueError(f"{who}: log_density must be callable, received {type(log_density)}")
    spec = jax.ShapeDtypeStruct((n, dim), jnp.float32)
    try:
        out = jax.eval_shape(log_density, spec)
    except Exception as e:  # any failure of the user's code is reported the same way
        raise ValueError(
            f"{who}: log_density failed on a batch of shape ({n}, {dim}): {type(e).__name__}: {e}"
        ) from e
    shape = getattr(out, "shape", None)
    if shape != (n,) or not jnp.issubdtype(out.dtype, jnp.floating):
        got = f"shape {shape}, dtype {getattr(out, 'dtype', type(out).__name__)}"
        raise ValueError(
            f"{who}: log_density must map a batch of shape ({n}, {dim}) to floats of shape "
            f"({n},), received {got}"
        )


def fit_vi(
    flow: Flow,
    log_density: LogDensity,
    *,
    key: Array,
    steps: int,
    num_samples: int = 256,
    optimizer: optax.GradientTransformation | None = None,
    stick_the_landing: bool = True,
    eval_every: int | None = None,
    eval_samples: int | None = None,
    max_grad_norm: float | None = None,
    chunk_size: int = 500,
    progress: bool | None = None,
    callback: Callable[[int, dict], bool | None] | None = None,
    mesh: Mesh | None = None,
    devices: str | Sequence | None = None,
    patience: int | None = None,
    restore_best: bool | None = None,
    ema: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
) -> VIHistory:
    """Fit ``flow`` to ``p̃ = exp(log_density)`` by minimising the negative ELBO, in place.

    Args:
      flow: the variational flow ``q``; its parameters are updated in place.
      log_density: ``log p̃``, a JAX function from a batch ``(n, dim)`` to ``(n,)`` (need not
        be normalised). Its output shape is checked once, before anything compiles.
      key: PRNG key; step ``t`` draws its samples from ``fold_in(key, t)`` (same key → same
        result).
      steps: number of optimizer steps.
      num_samples: samples per step for the Monte Carlo ELBO.
      optimizer: an optax transformation; default :func:`default_vi_optimizer` ``(steps)``,
        Adam with a short warm-up and a cosine decay to 0 over ``steps``.
      stick_the_landing: use the path-derivative gradient (the default; see the module
        docstring); ``False`` differentiates ``log q`` through the sample as well.
      eval_every: compute the ESS and ``log Z`` estimate every this many steps (and at the
        last step); default ``steps // 20`` capped at ``chunk_size``.
      eval_samples: samples for those estimates, default ``max(num_samples, 1024)``.
      max_grad_norm: clip gradients to this global norm.
      chunk_size: optimizer steps per compiled call (Python wakes up between chunks).
      progress: progress bar on stderr; default on when stderr is a terminal.
      callback: ``callback(step, metrics)`` between chunks; returning ``True`` stops.
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (Auto or Explicit, e.g.
        ``jax.make_mesh((4,), ("data",))``): each step's samples are split over it (the
        same samples as on one device), parameters and optimizer state are replicated.
        ``num_samples`` and ``eval_samples`` must divide by the number of devices on that
        axis (the default ``eval_samples`` is rounded up to a multiple).
      devices: ``"all"`` (or a list of devices) builds that mesh for you.
      patience: stop when the ELBO on ``eval_samples`` fresh samples, evaluated every
        ``eval_every`` steps, has not improved for this many steps.
      restore_best: leave the flow with the parameters of the best evaluated ELBO (default:
        on when ``patience`` is set).
      ema: keep an exponential moving average of the parameters (see :func:`nflax.fit`); it is
        what is evaluated, and what the flow ends with.
      checkpoint_dir, checkpoint_every, keep_checkpoints, resume: training checkpoints and
        exact resume, as in :func:`nflax.fit`. A resume checks the key, the sample counts,
        the estimator and the dimension; it cannot check that ``log_density`` is the same.

    Returns:
      A :class:`VIHistory`. A non-finite loss or gradient stops training (``stop_reason
      "non_finite"``) and leaves the last finite parameters.

    Layers with data-dependent initialisation (ActNorm) have no data here: they are marked
    initialised at the identity. Steps run in training mode; the evaluations and the flow
    afterwards are in evaluation mode.

    >>> import jax, nflax
    >>> flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> target = nflax.datasets.get_target("energy1")
    >>> hist = nflax.fit_vi(flow, target.log_density, key=jax.random.key(1), steps=10,
    ...                     progress=False)
    >>> hist.elbo.shape, hist.stop_reason
    ((10,), 'steps')
    >>> bool(hist.elbo.max() < target.log_normalizer)  # a lower bound on log Z
    True
    """
    who = "fit_vi"
    dim = _vector_dim(flow, who)
    mesh = parallel.resolve_mesh(mesh, devices, who)
    settings = make_settings(
        who,
        steps=steps,
        chunk_size=chunk_size,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        patience=patience,
        restore_best=patience is not None if restore_best is None else restore_best,
        ema=ema,
        mesh=mesh,
    )
    if settings.eval_every is None:
        settings = replace(settings, eval_every=max(1, min(settings.chunk_size, steps // 20)))
    num_samples = positive_int("num_samples", num_samples, who)
    eval_samples = _sample_counts(num_samples, eval_samples, mesh, who)
    tx = optimizer if optimizer is not None else default_vi_optimizer(settings.steps)
    tx = with_clipping(tx, max_grad_norm, who)
    check_log_density(log_density, dim, num_samples, who)
    stl = bool(stick_the_landing)
    fingerprint = {"key": np.asarray(jax.random.key_data(key)).tolist(), "dim": dim}
    fingerprint.update(num_samples=num_samples, eval_samples=eval_samples, stl=stl, ema=ema)
    checkpointing = make_checkpointing(
        checkpoint_dir, keep_checkpoints, resume, fingerprint, "fit_vi"
    )
    _start_data_init_at_identity(flow)
    model = split_model(flow)
    objective = _elbo_objective(model.definition, log_density, num_samples, eval_samples, stl, mesh)
    train_key, eval_key = jax.random.split(key)
    data = {"train_key": train_key, "eval_key": eval_key, "frozen": model.frozen}
    report = Report(_describe, callback)
    run = train(
        flow,
        model,
        objective,
        tx,
        data,
        settings,
        report=report,
        progress=progress,
        checkpointing=checkpointing,
    )
    return _vi_history(run, num_samples, eval_samples, stl)


def _vector_dim(flow, who: str) -> int:
    if not isinstance(flow, Flow):
        raise ValueError(f"{who}: expected an nflax Flow, received {type(flow).__name__}")
    if len(flow.event_shape) != 1:
        raise ValueError(
            f"{who}: needs a flow over vectors (event shape (dim,)), received {flow.event_shape}"
        )
    return flow.event_shape[0]


def _sample_counts(num_samples: int, eval_samples: int | None, mesh, who: str) -> int:
    """``eval_samples`` (default ``max(num_samples, 1024)``, rounded up to the device count),
    after checking that both counts divide by the number of devices."""
    ndev = parallel.data_size(mesh) if mesh is not None else 1
    if eval_samples is None:
        eval_samples = -(-max(num_samples, 1024) // ndev) * ndev
    eval_samples = positive_int("eval_samples", eval_samples, who)
    for name, n in (("num_samples", num_samples), ("eval_samples", eval_samples)):
        if n % ndev:
            raise ValueError(
                f"{who}: {name} {n} must be divisible by the {ndev} devices of the mesh's "
                f"'data' axis"
            )
    return eval_samples


def _start_data_init_at_identity(flow: Flow) -> None:
    """ActNorm has no data in VI: it starts initialised, at the identity."""
    for _, m in nnx.iter_graph(flow):
        flag = getattr(m, "initialized", None)
        if isinstance(flag, DataInit):
            flag[...] = jnp.ones_like(flag[...])


def _elbo_objective(
    model: ModelDef,
    log_density: LogDensity,
    num_samples: int,
    eval_samples: int,
    stl: bool,
    mesh: Mesh | None = None,
) -> Objective:
    """Reverse KL: the negative ELBO of ``num_samples`` fresh samples per step (step ``t``
    draws from ``fold_in(data["train_key"], t)``), validated by the ELBO, ESS fraction and
    ``log Z`` estimate of ``eval_samples`` samples (from ``fold_in(data["eval_key"], t)``).

    The functions capture the flow's structure, ``log_density``, the counts and the mesh;
    the keys and the flow's frozen state are ``data``, so one program serves every call."""

    def inputs(extra, t, data):
        return jax.random.fold_in(data["train_key"], t), extra

    def loss(params, rest, k, data):
        bound = model.bind(data["frozen"])
        log_w, new_rest = _log_weights(bound, params, rest, k, num_samples, log_density, stl, mesh)
        return -jnp.mean(log_w), new_rest

    def validate(params, rest, t, data):
        k = jax.random.fold_in(data["eval_key"], t)
        bound = model.bind(data["frozen"])
        log_w, _ = _log_weights(
            bound, params, rest, k, eval_samples, log_density, False, mesh, train=False
        )
        elbo, ess, log_z = importance_diagnostics(log_w)
        return -elbo, (ess, log_z)

    return Objective(loss, inputs, validate, num_diagnostics=2)


def _describe(last: list[float]) -> dict:
    return {"elbo": -last[0], "ess_fraction": last[2], "log_z": last[3], "loss": last[0]}


def _vi_history(run: Run, num_samples: int, eval_samples: int, stl: bool) -> VIHistory:
    loss, eval_loss, ess, log_z = run.outputs
    evaluated = ~np.isnan(ess)
    return VIHistory(
        elbo=-loss,
        eval_steps=np.nonzero(evaluated)[0],
        ess_fraction=ess[evaluated],
        log_z=log_z[evaluated],
        eval_elbo=-eval_loss[evaluated],
        stop_reason=run.stop_reason,
        steps_run=run.steps_run,
        best_step=run.best_step,
        restored_best=run.restored_best,
        non_finite_step=run.steps_run if run.stop_reason == "non_finite" else None,
        num_samples=num_samples,
        eval_samples=eval_samples,
        stick_the_landing=stl,
        steps_per_second=run.steps_per_second,
        compile_seconds=run.compile_seconds,
        train_seconds=run.train_seconds,
        chunk_program=run.program,
    )


def _batch_log_weights(graphdef: _compile.Static, log_density: _compile.Static, n: int, state, key):
    """``log p̃(x) − log q(x)`` for ``n`` samples ``x ~ q`` of the flow ``(graphdef, state)``."""
    x, log_q = nnx.merge(graphdef.value, state).sample_and_log_prob(key, n)
    return log_density.value(x) - log_q


# compiled once per flow structure, log_density (compared by value) and batch size
_LOG_WEIGHTS = jax.jit(_batch_log_weights, static_argnums=(0, 1, 2))


def vi_diagnostics(
    flow: Flow, log_density: LogDensity, *, key: Array, num_samples: int = 65536
) -> dict[str, float]:
    """ELBO, ESS fraction and ``log Z`` estimate of ``flow`` as a proposal for ``p̃``, from
    ``num_samples`` samples (drawn in batches of at most 65536), with the standard error of
    the ELBO.

    >>> import jax, nflax
    >>> t = nflax.datasets.get_target("correlated_gaussian")
    >>> flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> d = vi_diagnostics(flow, t.log_density, key=jax.random.key(0), num_samples=100)
    >>> sorted(d)
    ['elbo', 'elbo_std_error', 'ess_fraction', 'log_z', 'num_samples']
    >>> d["num_samples"], d["elbo"] <= d["log_z"], 0 < d["ess_fraction"] <= 1  # Jensen
    (100, True, True)
    """
    num_samples = positive_int("num_samples", num_samples, "vi_diagnostics")
    dim = flow.event_shape[0]
    batch = min(num_samples, 65536)
    check_log_density(log_density, dim, batch, "vi_diagnostics")
    graphdef, state = nnx.split(flow)
    static = (_compile.Static(graphdef), _compile.Static(log_density), batch)
    parts, drawn, i = [], 0, 0
    while drawn < num_samples:
        log_w = _LOG_WEIGHTS(*static, state, jax.random.fold_in(key, i))
        parts.append(np.asarray(log_w, np.float64))
        drawn, i = drawn + batch, i + 1
    log_w = np.concatenate(parts)[:num_samples]
    n = len(log_w)
    with np.errstate(invalid="ignore", over="ignore"):
        top = np.max(log_w)
        lse = top + np.log(np.sum(np.exp(log_w - top)))
        lse2 = 2 * top + np.log(np.sum(np.exp(2 * (log_w - top))))
    return {
        "elbo": float(np.mean(log_w)),
        "elbo_std_error": float(np.std(log_w) / math.sqrt(n)),
        "ess_fraction": float(np.exp(2 * lse - lse2) / n),
        "log_z": float(lse - math.log(n)),
        "num_samples": n,
    }
