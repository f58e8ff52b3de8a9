r"""Dequantization: a continuous flow trained on integer data, and the bound it gives.

Convention. A data point is ``x ∈ {0, …, K−1}^D`` (``K = num_levels`` grey levels, ``D``
values, e.g. ``H·W·C``). The flow models the continuous ``y = (x + u)/K ∈ [0, 1]^D``, with
noise ``u ∈ [0, 1)^D`` (the flow may hold its own logit preprocessing). Its density ``p``
defines a discrete model ``P(x) = ∫_{[0,1)^D} p((x + u)/K) K^{−D} du`` (the mass of the
cell of ``x``), and Jensen's inequality gives lower bounds on ``log P(x)``:

* uniform dequantization, ``u ~ U[0, 1)^D``:
  ``log P(x) ≥ E_u[log p((x + u)/K)] − D log K``;
* variational dequantization (Ho et al. 2019, Flow++), ``u ~ q(u | x)``:
  ``log P(x) ≥ E_q[log p((x + u)/K) − D log K − log q(u | x)]`` (uniform is ``q = 1``);
* importance weighting with ``S`` samples (Burda et al. 2016), tighter as ``S`` grows and
  equal to ``log P(x)`` in the limit: ``log P(x) ≥ E[log (1/S) Σ_s w_s]``,
  ``w_s = p((x + u_s)/K) K^{−D} / q(u_s | x)`` (:func:`nflax.metrics.importance_weighted_nll`).

Here ``q`` is a conditional flow over the flattened noise's logit ``v`` (event ``(D,)``,
``context_dim = D``), with ``u = σ(v)`` so that ``u ∈ (0, 1)``:
``log q(u | x) = log q_v(v | c) − Σ_i log σ'(v_i)``, ``log σ'(v) = −softplus(v) − softplus(−v)``.
Its context is the point, rescaled: ``c = 2(x + ½)/K − 1`` (flattened). Sampling ``u`` runs
the inverse (latent → data) pass of ``q``: choose a flow with a fast inverse (realnvp, nsf;
not maf). :func:`fit_dequantized` trains the flow (and ``q``) on the bound through the one
training engine (:mod:`nflax.engine`), with :func:`nflax.fit`'s minibatches, validation,
early stopping and checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nflax.distributions import Flow
from nflax.engine import (
    ModelDef,
    Objective,
    data_fingerprint,
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
from nflax.training import History, _history, _likelihood_objective, _report, _Split
from nflax.variables import needs_data_init

Array = jax.Array


def check_levels(levels, num_levels: int, event_shape, name: str = "levels") -> np.ndarray:
    """``levels`` as float32 after checking: shape ``(n, *event_shape)``, integer values in
    ``0 … num_levels − 1``. Every error names ``name`` and what was wrong."""
    k = check_num_levels(num_levels)
    arr = np.asarray(levels)
    if arr.dtype.kind not in "biuf":  # integers are checked as they are (MNIST: 47M values)
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: not a numeric array ({e})") from None
    event = tuple(event_shape)
    if arr.ndim != len(event) + 1 or arr.shape[1:] != event or arr.shape[0] == 0:
        raise ValueError(
            f"{name}: expected shape (n, {', '.join(map(str, event))}) with n ≥ 1 for a flow "
            f"with event shape {event}, received {arr.shape}"
        )
    if arr.dtype.kind == "f":
        _first_bad(name, arr, ~np.isfinite(arr) | (arr != np.round(arr)), "not an integer level")
    _first_bad(name, arr, (arr < 0) | (arr > k - 1), f"outside 0..{k - 1} (num_levels={k})")
    return arr.astype(np.float32)


def _first_bad(name: str, arr: np.ndarray, bad: np.ndarray, what: str) -> None:
    if bad.any():
        where = np.argwhere(bad)[0]
        raise ValueError(
            f"{name}: {int(bad.sum())} value(s) {what}; the first is {arr[tuple(where)].item()} at "
            f"index {tuple(int(i) for i in where)}"
        )


def check_num_levels(num_levels) -> int:
    """``num_levels`` as an int ≥ 2, or a ``ValueError`` saying what it was."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int | np.integer):
        raise ValueError(f"num_levels must be an integer ≥ 2, received {num_levels!r}")
    if int(num_levels) < 2:
        raise ValueError(f"num_levels must be an integer ≥ 2, received {num_levels!r}")
    return int(num_levels)


def check_dequantizer(dequantizer, event_shape, who: str) -> Flow | None:
    """``None`` for ``"uniform"`` (or ``None``); else a conditional flow over ``(D,)`` with
    ``context_dim = D``, checked."""
    if dequantizer is None or (isinstance(dequantizer, str) and dequantizer == "uniform"):
        return None
    d = math.prod(event_shape)
    if not isinstance(dequantizer, Flow):
        raise ValueError(
            f"{who}: dequantizer must be 'uniform' or a conditional nflax Flow, received "
            f"{dequantizer!r}"
        )
    if tuple(dequantizer.event_shape) != (d,) or dequantizer.context_dim != d:
        raise ValueError(
            f"{who}: the dequantizer must be a conditional flow with event shape ({d},) and "
            f"context_dim {d} (D = the values per point), received event shape "
            f"{tuple(dequantizer.event_shape)} and context_dim {dequantizer.context_dim}"
        )
    return dequantizer


def uniform_dequantize(key: Array, levels, num_levels: int) -> Array:
    """``y = (x + u)/K`` with ``u ~ U[0, 1)`` for every value: the flow's input.

    >>> y = uniform_dequantize(jax.random.key(0), jnp.array([[0, 16]]), 17)
    >>> bool(jnp.all((y >= jnp.array([0, 16]) / 17) & (y < jnp.array([1, 17]) / 17)))
    True
    """
    x = jnp.asarray(levels, jnp.float32)
    return (x + jax.random.uniform(key, x.shape)) / check_num_levels(num_levels)


def sample_noise(
    dequantizer: Flow | None, key: Array, x: Array, num_levels: int, num_samples: int = 1
) -> tuple[Array, Array]:
    """``num_samples`` draws of the noise ``u`` for each row of ``x`` (levels, ``(n, *event)``)
    and ``log q(u | x)``: shapes ``(n, num_samples, *event)`` and ``(n, num_samples)``.

    Uniform (``dequantizer=None``): ``u ~ U[0, 1)``, ``log q = 0``. Variational:
    ``v ~ q_v(· | c)`` by the dequantizer's inverse pass, ``u = σ(v)``,
    ``log q(u | x) = log q_v(v | c) − Σ log σ'(v)`` with ``c = 2(x + ½)/K − 1``.
    """
    n, event = x.shape[0], x.shape[1:]
    if dequantizer is None:
        u = jax.random.uniform(key, (n, num_samples, *event), x.dtype)
        return u, jnp.zeros((n, num_samples), x.dtype)
    context = (2.0 * (x + 0.5) / num_levels - 1.0).reshape(n, -1)
    v, log_qv = dequantizer.sample_and_log_prob(key, num_samples, context)
    log_sigmoid_derivative = -jax.nn.softplus(v) - jax.nn.softplus(-v)
    u = jax.nn.sigmoid(v).reshape(n, num_samples, *event)
    return u, log_qv - jnp.sum(log_sigmoid_derivative, axis=-1)


def log_weights(
    flow: Flow,
    dequantizer: Flow | None,
    key: Array,
    x: Array,
    num_levels: int,
    num_samples: int = 1,
) -> Array:
    """``log w = log p((x + u)/K) − D log K − log q(u | x)`` for ``num_samples`` noise draws per
    row of ``x`` (levels, ``(n, *event)``): shape ``(n, num_samples)``, nats. Its mean over
    ``u`` is the dequantization bound on ``log P(x)``.

    >>> from nflax import Flow
    >>> from nflax.bijections import Affine
    >>> from nflax.distributions import Uniform
    >>> flat = Flow(Uniform(0.0, 1.0, dim=3), Affine(3))  # p = 1 on [0, 1]^3
    >>> w = log_weights(flat, None, jax.random.key(0), jnp.array([[0.0, 3.0, 16.0]]), 17, 2)
    >>> [round(float(v), 4) for v in w[0]]  # −3·log 17
    [-8.4996, -8.4996]
    """
    u, log_q = sample_noise(dequantizer, key, x, num_levels, num_samples)
    n, event = x.shape[0], x.shape[1:]
    y = (x[:, None] + u) / num_levels
    log_p = flow.log_prob(y.reshape(n * num_samples, *event)).reshape(n, num_samples)
    return log_p - math.prod(event) * math.log(num_levels) - log_q


class Dequantized(nnx.Module):
    """The flow and its noise model (``dequantizer``: a conditional flow, or ``None`` for
    uniform noise) as one module: what :func:`fit_dequantized` trains, as one set of
    parameters."""

    def __init__(self, flow: Flow, dequantizer: Flow | None = None):
        self.flow = flow
        self.dequantizer = dequantizer


def _neg_bound(model, params, rest, x, w, key, num_levels: int, train: bool = True):
    """The mean (weights ``w``) negative bound of the rows ``x``, nats per point, and the
    mutable state after the call."""
    joint = model.merge(params, rest, train=train)
    bound = log_weights(joint.flow, joint.dequantizer, key, x, num_levels)[:, 0]
    new_rest = mutable_state(joint)
    if w is None:
        return -jnp.mean(bound), new_rest
    return -jnp.sum(bound * w) / jnp.sum(w), new_rest


def _dequantized_objective(model: ModelDef, rows: Objective, num_levels: int) -> Objective:
    """The negative bound of a minibatch (``rows`` draws it, as :func:`nflax.fit` does) with
    fresh noise per step (``fold_in(data["noise_key"], t)``), validated on the held-out rows
    with fixed noise (``data["val_key"]``), so successive evaluations are comparable."""

    def inputs(extra, t, data):
        batch, extra = rows.inputs(extra, t, data)
        return (batch, jax.random.fold_in(data["noise_key"], t)), extra

    def loss(params, rest, batch_and_key, data):
        (xb, _, w), key = batch_and_key
        return _neg_bound(model.bind(data["frozen"]), params, rest, xb, w, key, num_levels)

    def validate(params, rest, t, data):
        bound, x_val = model.bind(data["frozen"]), data["rows"][1]
        metric, _ = _neg_bound(bound, params, rest, x_val, None, data["val_key"], num_levels, False)
        return metric, ()

    has_val = rows.validate is not None
    return Objective(loss, inputs, validate if has_val else None, extra=rows.extra)


def fit_dequantized(
    flow: Flow,
    levels,
    num_levels: int,
    *,
    key: Array,
    steps: int,
    dequantizer: str | Flow = "uniform",
    validation=None,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None = None,
    patience: int | None = None,
    eval_every: int | None = None,
    max_grad_norm: float | None = None,
    restore_best: bool | None = None,
    chunk_size: int = 500,
    progress: bool | None = None,
    callback: Callable[[int, dict], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
    ema: float | None = None,
) -> History:
    """Fit ``flow`` to integer data by maximising the dequantization bound, in place.

    Minimises ``−E[log p((x + u)/K) − D log K − log q(u | x)]`` (module docstring), nats per
    point, over minibatches of ``levels`` drawn as :func:`nflax.fit` draws them, with fresh
    noise ``u`` every step (drawn on the device from the step's key). With a conditional flow
    as ``dequantizer``, ``q`` is trained jointly with ``flow`` (one optimizer over both
    parameter sets); both are updated in place.

    Args:
      flow: the flow over ``y ∈ [0, 1]^D``; its event shape is the data's (``(H, W, C)`` or a
        flattened ``(D,)``).
      levels: integer levels, shape ``(n, *flow.event_shape)``, values in ``0 … K − 1``.
      num_levels: ``K``, e.g. 17 for ``digits``, 256 for MNIST.
      key: PRNG key for the minibatch order and the noise (same key → same result).
      steps: maximum number of optimizer steps.
      dequantizer: ``"uniform"``, or a conditional flow over ``(D,)`` with ``context_dim = D``
        for variational dequantization.
      validation: held-out levels (e.g. ``data.validation``): the monitored metric is their
        negative bound (fixed noise); without, the training loss of each step.

    The other arguments (``optimizer``, ``batch_size``, ``patience``, ``eval_every``,
    ``max_grad_norm``, ``restore_best``, ``chunk_size``, ``progress``, ``callback``,
    ``checkpoint_dir``, ``checkpoint_every``, ``keep_checkpoints``, ``resume``, ``ema``) are
    as in :func:`nflax.fit` (``restore_best`` defaults to on with a validation set or a
    patience).

    Returns:
      A :class:`nflax.History` whose ``loss`` and ``val_loss`` are the negative bound in nats
      per point in data (discrete) space: bits/dim is
      ``nflax.metrics.bits_per_dim(loss, D, num_levels=None)``. A non-finite loss or
      gradient stops training (``stop_reason "non_finite"``) with the last finite parameters.

    Layers with data-dependent initialisation (ActNorm) are initialised before the first
    step: those of ``flow`` on the first batch dequantized uniformly, those of the noise flow
    on logits of uniform noise. Not yet here: ``mesh=`` (one device).

    >>> import nflax
    >>> flow = nflax.flows.realnvp(4, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> x = jnp.array([[0, 1, 2, 3], [3, 2, 1, 0]] * 8)
    >>> hist = fit_dequantized(flow, x, 4, key=jax.random.key(0), steps=20, progress=False)
    >>> hist.steps_run, bool(hist.loss[-1] < hist.loss[0])
    (20, True)
    """
    who = "fit_dequantized"
    x, x_val, k, noise = _check_inputs(flow, levels, validation, num_levels, dequantizer, who)
    settings = make_settings(
        who,
        steps=steps,
        chunk_size=chunk_size,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        patience=patience,
        restore_best=bool(restore_best),
        ema=ema,
        mesh=None,
    )
    split = _rows(x, x_val, batch_size, who)
    if restore_best is None:
        settings = replace(settings, restore_best=x_val is not None or patience is not None)
    settings = replace(settings, eval_every=settings.eval_every or split.num_batches)
    k_rows, k_noise, k_val, k_init = jax.random.split(key, 4)
    _initialize_from_data(flow, noise, x[: split.batch_size], k, k_init)
    joint = Dequantized(flow, noise)
    model = split_model(joint)
    objective = _dequantized_objective(
        model.definition, _likelihood_objective(model.definition, split.plan, None), k
    )
    data = {"rows": split.data, "key": k_rows, "noise_key": k_noise, "val_key": k_val}
    fingerprint = {"data_sha256": data_fingerprint(x, x_val), "num_levels": k, "ema": ema}
    fingerprint.update(key=np.asarray(jax.random.key_data(key)).tolist())
    fingerprint.update(batch_size=split.batch_size, variational=noise is not None)
    tx = optimizer if optimizer is not None else optax.adamw(1e-3)
    run = train(
        joint,
        model,
        objective,
        with_clipping(tx, max_grad_norm, who),
        {**data, "frozen": model.frozen},
        settings,
        report=_report(split, callback),
        progress=progress,
        checkpointing=make_checkpointing(
            checkpoint_dir, keep_checkpoints, resume, fingerprint, who
        ),
    )
    return _history(run, split)


def _check_inputs(flow, levels, validation, num_levels, dequantizer, who: str):
    """The checked training and validation levels (float32), ``K`` and the noise flow."""
    if not isinstance(flow, Flow):
        raise ValueError(f"{who}: expected an nflax Flow, received {type(flow).__name__}")
    k = check_num_levels(num_levels)
    x = check_levels(levels, k, flow.event_shape)
    x_val = None
    if validation is not None:
        x_val = check_levels(validation, k, flow.event_shape, "validation")
    return x, x_val, k, check_dequantizer(dequantizer, flow.event_shape, who)


def _rows(x: np.ndarray, x_val: np.ndarray | None, batch_size: int | None, who: str) -> _Split:
    """The rows as :func:`nflax.fit` holds them (training, validation; no context), and the
    minibatch plan: ``batch_size`` rows (at most all of them) per step."""
    n = len(x)
    bsz = n if batch_size is None else min(positive_int("batch_size", batch_size, who), n)
    rows = (jnp.asarray(x), None if x_val is None else jnp.asarray(x_val), None, None, None)
    return _Split(rows, np.zeros(0, np.int64), n, bsz, bsz == n)


def _initialize_from_data(flow: Flow, noise: Flow | None, x: np.ndarray, k: int, key) -> None:
    """Data-dependent initialisation (ActNorm), once, eagerly: the flow on the first batch
    dequantized uniformly; the noise flow on the logits of uniform noise, given that batch."""
    k_flow, k_noise = jax.random.split(key)
    if needs_data_init(flow):
        flow.train()
        flow.log_prob(uniform_dequantize(k_flow, x, k))
    if noise is not None and needs_data_init(noise):
        noise.train()
        u = jax.random.uniform(
            k_noise, (len(x), math.prod(x.shape[1:])), minval=1e-3, maxval=1 - 1e-3
        )
        noise.log_prob(jnp.log(u) - jnp.log1p(-u), (2.0 * (x + 0.5) / k - 1.0).reshape(len(x), -1))
