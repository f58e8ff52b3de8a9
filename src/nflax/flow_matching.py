r"""Flow matching: train a continuous flow's vector field by regression, no ODE solve per step.

Conditional flow matching (Lipman et al. 2023; Liu et al. 2023; Tong et al. 2024) with
straight (optimal-transport) paths from the base to the data. In the time convention of
:class:`~nflax.bijections.ContinuousFlow` (``t = 0`` base, ``t = 1`` data), a data point
``x`` (after the layers that precede the continuous flow, e.g. ActNorm) and a base draw ``z``
are joined by

    ``x_t = (1 − t)·z + t·x``,   velocity ``dx_t/dt = x − z``,

and the field is fitted to that velocity at a uniform time ``t``:

    ``loss(θ) = E_{x, z, t} ‖v_θ(x_t, t[, c]) − (x − z)‖²``.

Its minimiser's ODE carries the base to the data distribution. With ``ot=True`` the noise of
each minibatch is first paired with its data by an entropic optimal-transport plan (Sinkhorn),
so that paths cross less (straighter flows, fewer solver steps).

``fit_flow_matching`` is one objective over :mod:`nflax.engine`, as :func:`nflax.fit`: the
same minibatches, validation split, patience, best parameters, NaN guard, checkpoints,
resume and ``mesh=``. Its validation metric is the flow-matching loss on the held-out rows
(fixed noise and times, so evaluations compare); the exact validation NLL (an ODE solve) is
recorded every ``nll_every`` steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from nflax import parallel
from nflax.bijections.base import Chain
from nflax.bijections.continuous import ContinuousFlow
from nflax.distributions import Flow
from nflax.engine import (
    Model,
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
from nflax.training import (
    History,
    _fingerprint,
    _fit_rows,
    _likelihood_objective,
    _nll,
    _num_val,
    _Split,
    _split_rows,
    _val_fraction,
    warmup_cosine,
)
from nflax.variables import needs_data_init

Array = jax.Array
WHO = "fit_flow_matching"
# Steps between validations by default (or one epoch, if longer): the validation loss takes
# thousands of field evaluations, more than a training step on a 1024-point set.
DEFAULT_EVAL_EVERY = 50


@dataclass
class FlowMatchingHistory(History):
    """What happened during :func:`fit_flow_matching`: :class:`~nflax.training.History`'s
    fields, where ``loss`` and ``val_loss`` are flow-matching losses (squared velocity error
    per point), and ``val_nll[i]``, the exact validation NLL at step ``nll_steps[i]``."""

    loss_name: ClassVar[str] = "flow-matching loss"
    nll_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val_nll: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    ot: bool = False


def split_continuous(flow: Flow, who: str = WHO) -> tuple[list, ContinuousFlow]:
    """The layers before the flow's :class:`~nflax.bijections.ContinuousFlow` and the
    continuous flow itself: the bijection must be one, or a ``Chain`` that ends with one."""
    b = flow.bijection
    if isinstance(b, ContinuousFlow):
        return [], b
    if isinstance(b, Chain) and isinstance(b.layers[-1], ContinuousFlow):
        return list(b.layers[:-1]), b.layers[-1]
    raise ValueError(
        f"{who}: needs a flow whose bijection is a ContinuousFlow or a Chain ending with one "
        f"(e.g. nflax.flows.cnf), received {type(b).__name__}"
    )


def sinkhorn_pairing(x: Array, z: Array, key: Array, *, reg: float = 0.05, iters: int = 50):
    """For each row of ``x``, the index of a row of ``z`` drawn from the entropic
    optimal-transport plan between the two (uniform) batches for the squared distance
    (scaled to mean 1), with regularisation ``reg``, after ``iters`` log-domain Sinkhorn
    iterations. ``z[sinkhorn_pairing(x, z, key)]`` pairs each data point with nearby noise.

    >>> x = jnp.array([[0.0, 0.0], [5.0, 5.0]]); z = jnp.array([[5.1, 5.0], [0.1, 0.0]])
    >>> sinkhorn_pairing(x, z, jax.random.key(0)).tolist()
    [1, 0]
    """
    cost = jnp.sum(jnp.square(x[:, None, :] - z[None, :, :]), axis=-1)
    logk = -cost / (reg * jnp.maximum(jnp.mean(cost), 1e-12))
    n, m = cost.shape
    log_a, log_b = -jnp.log(n) * jnp.ones(n), -jnp.log(m) * jnp.ones(m)

    def body(_, fg):
        f, g = fg
        f = log_a - jax.nn.logsumexp(logk + g[None, :], axis=1)
        g = log_b - jax.nn.logsumexp(logk + f[:, None], axis=0)
        return f, g

    f, g = jax.lax.fori_loop(0, iters, body, (jnp.zeros(n), jnp.zeros(m)))
    return jax.random.categorical(key, logk + f[:, None] + g[None, :], axis=1)


def _gathered(a: Array, mesh: Mesh | None) -> Array:
    """``a`` with its rows on every device (for the pairing, which couples all rows)."""
    if mesh is None:
        return a
    if parallel.is_explicit(mesh):
        return jax.sharding.reshard(a, parallel.replicated(mesh))
    return jax.lax.with_sharding_constraint(a, parallel.replicated(mesh))


def _paths(model: Model, params, rest, xb, cb, key, ot: bool, mesh=None, train: bool = True):
    """The regression problem of one batch: the field's input ``(x_t, t, c)`` and target
    ``x − z``, for the data ``xb`` mapped through the layers before the continuous flow (held
    fixed: flow matching trains the field, and the context embedding); with a mesh, the noise
    and times are split over its rows like the batch."""
    flow = model.merge(params, rest, train=train)
    prefix, cont = split_continuous(flow)
    c = flow._features(cb)
    u = xb
    for layer in prefix:
        u = layer.forward(u, c)[0]
    u = jax.lax.stop_gradient(u)
    k_z, k_t, k_ot = jax.random.split(key, 3)
    n = u.shape[0]
    z = flow.base.sample(k_z, (n,), None if c is None else _gathered(c, mesh))
    if ot:  # a one-hot product, not a gather: it keeps its shape and placement
        pairing = sinkhorn_pairing(_gathered(u, mesh), z, k_ot)
        z = jax.nn.one_hot(pairing, n, dtype=z.dtype) @ z
    t = jax.random.uniform(k_t, (n,), u.dtype)
    if mesh is not None:
        z, t = parallel.shard_rows((z, t), mesh)
    xt = (1.0 - t[:, None]) * z + t[:, None] * u
    return cont.vector_field(xt, t, c), u - z, mutable_state(flow)


def _fm_loss(model, params, rest, xb, cb, w, key, ot, mesh=None, train=True):
    """The mean squared velocity error (weights ``w``) and the model's state after the call."""
    v, target, new_rest = _paths(model, params, rest, xb, cb, key, ot, mesh, train)
    err = jnp.sum(jnp.square(v - target), axis=-1)
    return (err.mean() if w is None else jnp.sum(err * w) / jnp.sum(w)), new_rest


def _objective(model: Model, split: _Split, key: Array, ot: bool, nll_every, mesh):
    """The flow-matching loss of a minibatch (the rows drawn as :func:`nflax.fit` draws them,
    fresh noise and times from ``fold_in(key, step)``), validated by the loss on the held-out
    rows (``val_draws`` fixed draws of noise and times, each paired as in training) and, every
    ``nll_every`` steps, their exact NLL."""
    k_rows, k_noise, k_val = jax.random.split(key, 3)
    rows = _likelihood_objective(model.definition, split.plan, mesh)
    n_val = split.data[1].shape[0] if split.has_val else 0
    val_draws = int(min(64, max(1, -(-4096 // max(n_val, 1)))))

    def inputs(extra, t, data):
        batch, extra = rows.inputs(extra, t, data)
        return (batch, jax.random.fold_in(k_noise, t)), extra

    def loss(params, rest, inputs, data):
        (xb, cb, w), k = inputs
        return _fm_loss(model, params, rest, xb, cb, w, k, ot, mesh)

    def validate(params, rest, t, data):
        _, x_val, _, c_val, _ = data["rows"]

        def draw(k):  # one fixed draw of noise and times for every held-out row
            return _fm_loss(model, params, rest, x_val, c_val, None, k, ot, train=False)[0]

        metric = jnp.mean(jax.vmap(draw)(jax.random.split(k_val, val_draws)))
        if nll_every is None:
            return metric, (jnp.float32(jnp.nan),)
        val_nll = jax.lax.cond(
            t % nll_every == 0,
            lambda: _nll(model, params, rest, x_val, None, c_val, train=False)[0],
            lambda: jnp.float32(jnp.nan),
        )
        return metric, (val_nll,)

    has_val = split.has_val
    objective = Objective(loss, inputs, validate if has_val else None, int(has_val), rows.extra)
    return objective, {"rows": split.data, "key": k_rows, "frozen": model.frozen}


def default_flow_matching_optimizer(
    steps: int, learning_rate: float = 2e-3
) -> optax.GradientTransformation:
    """``fit_flow_matching``'s default optimizer: Adam on :func:`~nflax.training.warmup_cosine`
    (a linear warm-up over ``min(200, steps // 10)`` steps, then a cosine decay to 0).

    >>> tx = default_flow_matching_optimizer(1000)
    >>> state = tx.init({"kernel": jnp.ones(2)})
    """
    return optax.adam(warmup_cosine(learning_rate, positive_int("steps", steps, WHO)))


def fit_flow_matching(
    flow: Flow,
    x,
    *,
    key: Array,
    steps: int,
    context=None,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None = None,
    ot: bool = False,
    patience: int | None = None,
    val_fraction: float | None = None,
    eval_every: int | None = None,
    nll_every: int | None = None,
    max_grad_norm: float | None = None,
    restore_best: bool | None = None,
    chunk_size: int = 500,
    progress: bool | None = None,
    callback: Callable[[int, dict], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
    mesh: Mesh | None = None,
    devices: str | Sequence | None = None,
    ema: float | None = None,
) -> FlowMatchingHistory:
    """Fit the continuous flow of ``flow`` to data ``x`` by conditional flow matching, in place.

    The flow's bijection must be a :class:`~nflax.bijections.ContinuousFlow` or a ``Chain``
    ending with one (e.g. :func:`nflax.flows.cnf`, with or without its ActNorm). Layers
    before the continuous flow are used as they are (an ActNorm is initialised on the first
    batch) and not trained; the vector field (and a context embedding) are. See the module
    docstring for the loss.

    ``flow``, ``x``, ``key``, ``steps``, ``context``, ``batch_size``, ``patience``,
    ``val_fraction``, ``eval_every``, ``max_grad_norm``, ``restore_best``, ``chunk_size``,
    ``progress``, ``callback``, ``checkpoint_dir``, ``checkpoint_every``,
    ``keep_checkpoints``, ``resume``, ``mesh``, ``devices`` and ``ema`` are as in
    :func:`nflax.fit`; the monitored metric is the flow-matching loss of the held-out rows
    (``patience`` and ``restore_best`` act on it), evaluated by default every 50 steps or
    once per epoch, whichever is longer.

    Args:
      optimizer: default :func:`default_flow_matching_optimizer` ``(steps)``.
      ot: pair each minibatch's noise with its data by an entropic optimal-transport plan
        (:func:`sinkhorn_pairing`) instead of at random. It costs a Sinkhorn solve on a
        ``batch × batch`` matrix per step: with full batches of ~900 rows it made steps ~30×
        slower on 2 CPU cores, so use it with ``batch_size`` of a few hundred.
      nll_every: every this many steps (at evaluation steps) also compute the exact NLL of the
        held-out rows (ODE solves: this compiles the solver into the training program), as a
        diagnostic; it is recorded in ``val_nll``, never monitored.

    Returns:
      A :class:`FlowMatchingHistory`.

    >>> import nflax, jax
    >>> from flax import nnx
    >>> flow = nflax.flows.cnf(2, hidden=(16,), actnorm=True, rngs=nnx.Rngs(0))
    >>> data = nflax.datasets.get("banana").sample(jax.random.key(0), 256)
    >>> hist = nflax.fit_flow_matching(flow, data, key=jax.random.key(1), steps=200,
    ...                                progress=False)
    >>> hist.steps_run, bool(hist.loss[-50:].mean() < hist.loss[:50].mean() - 0.2)
    (200, True)
    """
    split_continuous(flow)
    data, ctx, mesh = _fit_rows(flow, x, context, mesh, devices)
    settings = make_settings(
        WHO,
        steps=steps,
        chunk_size=chunk_size,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        patience=patience,
        restore_best=restore_best,
        ema=ema,
        mesh=mesh,
    )
    nll_every = None if nll_every is None else positive_int("nll_every", nll_every, WHO)
    val_fraction = _val_fraction(val_fraction, settings.patience)
    tx = optimizer if optimizer is not None else default_flow_matching_optimizer(settings.steps)
    tx = with_clipping(tx, max_grad_norm, WHO)
    bsz = None if batch_size is None else positive_int("batch_size", batch_size, WHO)
    key_split, key_train = jax.random.split(key)
    split = _split_rows(data, ctx, key_split, _num_val(len(data), val_fraction), bsz, mesh)
    settings = replace(
        settings,
        eval_every=settings.eval_every or max(split.num_batches, DEFAULT_EVAL_EVERY),
        restore_best=(split.has_val or patience is not None)
        if restore_best is None
        else settings.restore_best,
    )
    fingerprint = {}
    if checkpoint_dir is not None:  # hashing the data only for a run that checkpoints
        fingerprint = _fingerprint(data, ctx, key, val_fraction, split, ema)
        fingerprint.update(ot=bool(ot), nll_every=nll_every)
    checkpointing = make_checkpointing(checkpoint_dir, keep_checkpoints, resume, fingerprint, WHO)
    _initialize_prefix(flow, split)
    model = split_model(flow)
    objective, train_data = _objective(model, split, key_train, bool(ot), nll_every, mesh)
    run = train(
        flow,
        model,
        objective,
        tx,
        train_data,
        settings,
        report=Report(_describer(split.has_val), callback),
        progress=progress,
        checkpointing=checkpointing,
    )
    return _history(run, split, bool(ot))


def _initialize_prefix(flow: Flow, split: _Split) -> None:
    """Data-dependent initialisation (ActNorm) of the layers before the continuous flow, once,
    eagerly, on the first batch (no ODE solve)."""
    if not needs_data_init(flow):
        return
    x_train, _, c_train, _, _ = split.data
    bsz = split.batch_size
    flow.train()
    c = flow._features(None if c_train is None else c_train[:bsz])
    u = x_train[:bsz]
    for layer in split_continuous(flow)[0]:
        u = layer.forward(u, c)[0]


def _describer(has_val: bool):
    def describe(last: list[float]) -> dict:
        return {"loss": last[0], "val_loss": last[1] if has_val else None}

    return describe


def _history(run: Run, split: _Split, ot: bool) -> FlowMatchingHistory:
    loss, metric = run.outputs[0], run.outputs[1]
    evaluated = ~np.isnan(metric) if split.has_val else np.zeros(run.steps_run, bool)
    nll = run.outputs[2] if split.has_val else np.zeros(run.steps_run, np.float32)
    with_nll = ~np.isnan(nll) if split.has_val else np.zeros(run.steps_run, bool)
    return FlowMatchingHistory(
        loss=loss,
        val_loss=metric[evaluated],
        val_steps=np.nonzero(evaluated)[0],
        val_index=split.val_index,
        stop_reason=run.stop_reason,
        steps_run=run.steps_run,
        best_step=run.best_step,
        best_loss=run.best_metric,
        non_finite_step=run.steps_run if run.stop_reason == "non_finite" else None,
        restored_best=run.restored_best,
        steps_per_second=run.steps_per_second,
        compile_seconds=run.compile_seconds,
        train_seconds=run.train_seconds,
        nll_steps=np.nonzero(with_nll)[0],
        val_nll=nll[with_nll],
        ot=ot,
    )
