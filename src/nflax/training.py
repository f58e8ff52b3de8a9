"""Maximum-likelihood training (``fit``), ``nll``, and ``nflax train``'s optimizer recipe.

``fit`` is one objective over :mod:`nflax.engine`: the mean NLL of a minibatch drawn on the
device (a fresh permutation per epoch, without replacement; a smaller last batch is masked),
validated on held-out rows. The engine runs the compiled chunks and keeps the best parameters,
patience, the NaN guard, checkpoints and resume.
"""

from __future__ import annotations

import csv
import functools
import io
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
from nflax.datafiles import nonfinite_rows
from nflax.distributions import Flow
from nflax.engine import (
    FROZEN,
    Model,
    ModelDef,
    Objective,
    Report,
    Run,
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
from nflax.variables import needs_data_init

Array = jax.Array
__all__ = [
    "History",
    "batch_indices",
    "check_data",
    "default_optimizer",
    "epoch_permutation",
    "fit",
    "kernel_mask",
    "nll",
    "permutation",
    "warmup_cosine",
]


@dataclass
class History:
    """What happened during :func:`fit`.

    ``loss[t]`` is the training NLL (nats per point) of the batch used at step ``t``, computed
    with the parameters before that step's update; ``val_loss[i]`` is the validation NLL of the
    parameters at step ``val_steps[i]``. ``best_step`` is the step whose parameters the flow
    holds at the end when the best parameters were restored. ``val_index`` lists the rows of
    the data that were held out for validation.

    ``chunk_program`` says how the compiled training program was obtained: ``"compiled"``,
    ``"loaded"`` (from JAX's persistent compilation cache) or ``"reused"`` (compiled by an
    earlier call in this process for the same flow structure, data shapes, optimizer and
    settings); ``compile_seconds`` is what that took.
    """

    loss: np.ndarray
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    val_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stop_reason: str = "steps"
    steps_run: int = 0
    best_step: int | None = None
    best_loss: float | None = None
    non_finite_step: int | None = None
    restored_best: bool = False
    steps_per_second: float = float("nan")
    compile_seconds: float = float("nan")
    train_seconds: float = float("nan")
    chunk_program: str = "compiled"

    def to_dict(self) -> dict:
        """Plain Python types (lists and numbers), ready for JSON."""
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out

    def to_csv(self, path: str | None = None) -> str:
        """Rows ``step,loss,val_loss`` (``val_loss`` empty where not evaluated)."""
        val = dict(zip(self.val_steps.tolist(), self.val_loss.tolist(), strict=True))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "loss", "val_loss"])
        for t, loss in enumerate(self.loss.tolist()):
            w.writerow([t, repr(loss), repr(val[t]) if t in val else ""])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


def kernel_mask(params):
    """``True`` for every weight matrix (a ``kernel``) of the conditioner networks, ``False``
    for every other parameter: biases, ActNorm's shift and scale, the coupling scale bound
    ``c``, a base distribution's parameters. Weight decay given this mask
    (``optax.adamw(..., mask=kernel_mask)``) shrinks the networks toward smooth functions
    without pulling the data-dependent layers toward the identity.

    >>> import nflax
    >>> flow = nflax.flows.realnvp(2, num_layers=2, actnorm=True, rngs=nnx.Rngs(0))
    >>> mask = kernel_mask(nnx.state(flow, nnx.Param))
    >>> sum(jax.tree.leaves(mask)), len(jax.tree.leaves(mask))
    (3, 9)
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" in jax.tree_util.keystr(path), params
    )


def warmup_cosine(learning_rate: float, steps: int, warmup: int = 200) -> optax.Schedule:
    """A linear warm-up from 0 over ``min(warmup, steps // 10)`` steps (at least 1), then a
    cosine decay to 0 at ``steps``: ``nflax train``'s learning rate.

    >>> lr = warmup_cosine(2e-3, 4000)
    >>> [round(float(lr(t)), 6) for t in (0, 100, 200, 2100, 4000)]
    [0.0, 0.001, 0.002, 0.001, 0.0]
    """
    steps = positive_int("steps", steps, "warmup_cosine")
    warmup = min(int(warmup), max(steps // 10, 1))
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))


def default_fit_optimizer(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """:func:`fit`'s default: ``optax.adamw(learning_rate)``, the tutorial's optimizer.

    Leaf by leaf: a flow's identical layers are one :class:`~nflax.bijections.Stack`, whose
    parameters are stacked, so adamw runs over a few leaves only (7 for an 8-layer realnvp).
    Flattening them into one vector first (``optax.flatten``, this default before) adds a
    copy of the gradients and of the updates every step and was 3–5 % slower at batch 128
    (``benchmarks/README.md``).
    """
    return optax.adamw(learning_rate)


def default_optimizer(
    steps: int,
    learning_rate: float = 2e-3,
    weight_decay: float = 3.0,
    schedule: str = "warmup-cosine",
) -> optax.GradientTransformation:
    """``nflax train``'s optimizer: adamw on :func:`warmup_cosine` (or a constant rate), its
    weight decay on the conditioners' kernels only (:func:`kernel_mask`).

    It is ``optax.adamw`` step for step, built so that the learning rate, the step count and
    the weight decay are values in the optimizer state rather than constants in the compiled
    program: a program compiled for one of them is reused for any other (in this process,
    or from JAX's persistent compilation cache in the next).

    The weight decay is strong on purpose. adamw shrinks each kernel by ``lr·weight_decay``
    per step, which keeps the conditioners smooth where there are no data, so the tails of
    the density stop degrading as training goes on. With silu conditioners on the banana set
    (1024 points, seeds 0-19) it took the median test-NLL gap from 0.04 to 0.025 nats and the
    worst from 0.07 to 0.06; decaying every parameter instead made the result depend on the
    learning rate (a 0.7-nat gap at half the rate). ``benchmarks/README.md``, "Robust
    defaults", has the table.

    >>> tx = default_optimizer(4000)
    >>> state = tx.init({"kernel": jnp.ones(2), "bias": jnp.ones(2)})
    """
    if schedule not in ("warmup-cosine", "constant"):
        raise ValueError(
            f"default_optimizer: schedule must be 'warmup-cosine' or 'constant', received "
            f"{schedule!r}"
        )
    steps = positive_int("steps", steps, "default_optimizer")
    warmup = min(200, max(steps // 10, 1))  # as warmup_cosine
    decay = optax.inject_hyperparams(optax.add_decayed_weights, static_args="mask")
    tx = optax.chain(
        optax.scale_by_adam(),
        decay(weight_decay=0.0, mask=kernel_mask),
        scale_by_warmup_cosine(constant=schedule == "constant"),
    )
    total = max(steps, warmup + 1)
    return with_numbers(
        tx, peak=learning_rate, warmup=warmup, total=total, weight_decay=weight_decay
    )


def check_data(x, event_shape: tuple[int, ...], name: str = "x") -> np.ndarray:
    """Validate a data array on the host: numeric, shape ``(n, *event_shape)``, all finite."""
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: not a numeric array ({e})") from None
    want = (len(event_shape) + 1,)
    if arr.ndim != want[0] or arr.shape[1:] != tuple(event_shape):
        raise ValueError(
            f"{name}: expected shape (n, {', '.join(map(str, event_shape))}) for a flow with event "
            f"shape {tuple(event_shape)}, received {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: no data points (shape {arr.shape})")
    problem = nonfinite_rows(arr)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return arr


def _nll(model: Model, params, rest, x, w=None, context=None, *, train: bool = True):
    """Mean NLL of ``x`` (weights ``w``) and the model's mutable state after the call."""
    flow = model.merge(params, rest, train=train)
    lp = flow.log_prob(x, context)
    new_rest = mutable_state(flow)
    if w is None:
        return -jnp.mean(lp), new_rest
    return -jnp.sum(lp * w) / jnp.sum(w), new_rest


def permutation(key: Array, n: int) -> Array:
    """A uniformly random permutation of ``range(n)`` (int32), drawn as
    ``jax.random.permutation`` draws one, in a fraction of its time on XLA:CPU.

    Both sort the positions by random 32-bit keys, in as many rounds as make a tie between two
    keys unlikely (JAX's rule: ``3·log₂ n`` random bits per position over all rounds; a tie
    keeps the earlier position first). JAX sorts (key, position) pairs. Here the position
    fills the low ``⌈log₂ n⌉`` bits of the key and random bits the rest, so a round sorts one
    array of integers, for which XLA:CPU has a fast path: for ``n = 1024`` two such rounds
    take ~80 µs against ~170 µs for JAX's one. Past ``n = 2²⁴`` (fewer than 8 random bits
    left) it is ``jax.random.permutation``. For the same key the two draw different orders.

    >>> sorted(permutation(jax.random.key(0), 5).tolist())
    [0, 1, 2, 3, 4]
    """
    pos_bits = max(1, (n - 1).bit_length())
    random_bits = 32 - pos_bits
    if random_bits < 8:
        return jax.random.permutation(key, n).astype(jnp.int32)
    rounds = -(-3 * pos_bits // random_bits)  # ⌈3·⌈log₂ n⌉ / random bits⌉ ≥ 1
    positions = jnp.arange(n, dtype=jnp.uint32)

    def one_round(k: Array) -> Array:  # positions in the order of their random keys
        packed = (jax.random.bits(k, (n,), jnp.uint32) << pos_bits) | positions
        return (jnp.sort(packed) & jnp.uint32((1 << pos_bits) - 1)).astype(jnp.int32)

    first, *later = jax.random.split(key, rounds)
    perm = one_round(first)
    for k in later:
        perm = perm[one_round(k)]
    return perm


def epoch_permutation(key: Array, epoch, n: int, batch_size: int) -> Array:
    """The visiting order of epoch ``epoch``: a permutation of ``range(n)`` (:func:`permutation`),
    padded with zeros to a whole number of batches (``ceil(n / batch_size) · batch_size``
    entries)."""
    perm = permutation(jax.random.fold_in(key, epoch), n)
    pad = -(-n // batch_size) * batch_size - n
    return jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]) if pad else perm


def batch_indices(perm: Array, b, n: int, batch_size: int) -> tuple[Array, Array]:
    """Indices and 0/1 weights of batch ``b`` of an epoch; the padding of a last, smaller batch
    has weight 0, so every batch has the same shape and nothing recompiles."""
    idx = jax.lax.dynamic_slice(perm, (b * batch_size,), (batch_size,))
    w = (b * batch_size + jnp.arange(batch_size)) < n
    return idx, w


@dataclass(frozen=True)
class _Split:
    """The training and validation rows (and contexts) as device arrays, the held-out row
    indices, and the minibatch plan."""

    data: tuple  # (x_train, x_val, c_train, c_val, w_full): the compiled program's argument
    val_index: np.ndarray
    n_train: int
    batch_size: int
    full_batch: bool

    @property
    def has_val(self) -> bool:
        return self.data[1] is not None

    @property
    def num_batches(self) -> int:
        return self.plan.num_batches

    @property
    def plan(self) -> _Plan:
        return _Plan(self.n_train, self.batch_size, self.full_batch, self.has_val)


def _split_rows(data, ctx, key, n_val: int, batch_size: int | None, mesh) -> _Split:
    """Hold ``n_val`` random rows out for validation; pad a sharded full batch to a multiple
    of the device count (the padding has weight 0)."""
    n = data.shape[0]
    n_train = n - n_val
    ndev = parallel.data_size(mesh) if mesh is not None else 1
    full_batch = batch_size is None or batch_size >= n_train
    bsz = n_train if full_batch else batch_size
    if not full_batch and bsz % ndev:
        raise ValueError(
            f"fit: batch_size {bsz} must be divisible by the {ndev} devices of the mesh's "
            f"'data' axis"
        )
    order = jax.random.permutation(key, n)
    rows = [jnp.asarray(a) for a in (data, ctx) if a is not None]
    held = [a[order[:n_val]] if n_val else None for a in rows]
    kept = [a[order[n_val:]] if n_val else a for a in rows]
    w_full = None
    if full_batch and n_train % ndev:  # a sharded full batch is padded to the device count
        pad = ndev - n_train % ndev
        kept = [jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) for a in kept]
        w_full = (jnp.arange(n_train + pad) < n_train).astype(kept[0].dtype)
    x_train, c_train = kept[0], (kept[1] if ctx is not None else None)
    x_val, c_val = held[0], (held[1] if ctx is not None else None)
    val_index = np.asarray(order[:n_val]) if n_val else np.zeros(0, np.int64)
    return _Split((x_train, x_val, c_train, c_val, w_full), val_index, n_train, bsz, full_batch)


@dataclass(frozen=True)
class _Plan:
    """The minibatch plan: what the likelihood objective's program is built for (hashable)."""

    n_train: int
    batch_size: int
    full_batch: bool
    has_val: bool

    @property
    def num_batches(self) -> int:
        return -(-self.n_train // self.batch_size)


def _likelihood_objective(model: ModelDef, plan: _Plan, mesh: Mesh | None) -> Objective:
    """Maximum likelihood: the mean NLL of a minibatch drawn on the device (a fresh
    permutation per epoch, from ``data["key"]``), validated on the held-out rows.

    The functions capture only the flow's structure, the plan and the mesh; the rows, the key
    and the flow's frozen state are ``data``, so one program serves every call alike."""

    def inputs(perm, t, data):
        x_train, _, c_train, _, w_full = data["rows"]
        if plan.full_batch:
            xb, cb, w = x_train, c_train, w_full
        else:
            b = t % plan.num_batches
            perm = jax.lax.cond(
                b == 0,
                lambda: epoch_permutation(
                    data["key"], t // plan.num_batches, plan.n_train, plan.batch_size
                ),
                lambda: perm,
            )
            idx, w = batch_indices(perm, b, plan.n_train, plan.batch_size)
            xb, w = x_train[idx], w.astype(x_train.dtype)
            cb = c_train[idx] if c_train is not None else None
        if mesh is not None:  # each device takes its slice of the rows
            xb, cb, w = parallel.shard_rows((xb, cb, w), mesh)
        return (xb, cb, w), perm

    def loss(params, rest, batch, data):
        xb, cb, w = batch
        return _nll(model.bind(data["frozen"]), params, rest, xb, w, cb)

    def validate(params, rest, t, data):
        _, x_val, _, c_val, _ = data["rows"]
        bound = model.bind(data["frozen"])
        return _nll(bound, params, rest, x_val, None, c_val, train=False)[0], ()

    perm0 = jnp.zeros((1 if plan.full_batch else plan.num_batches * plan.batch_size,), jnp.int32)
    return Objective(loss, inputs, validate if plan.has_val else None, extra=perm0)


def fit(
    flow: Flow,
    x,
    *,
    key: Array,
    steps: int,
    context=None,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None = None,
    patience: int | None = None,
    val_fraction: float | None = None,
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
    mesh: Mesh | None = None,
    devices: str | Sequence | None = None,
    ema: float | None = None,
) -> History:
    r"""Fit ``flow`` to data ``x`` by maximum likelihood (minimise the mean NLL), in place.

    Args:
      flow: the flow to train; its parameters are updated in place.
      x: data, shape ``(n, *event_shape)``; checked for shape and NaN/inf before any compile.
      key: PRNG key for the validation split and minibatch order (same key → same result).
      steps: maximum number of optimizer steps.
      context: for a conditional flow, the context of each row of ``x``, shape
        ``(n, context_dim)``; rows of ``x`` and ``context`` stay together in every split
        and minibatch.
      optimizer: an optax transformation, default ``optax.adamw(1e-3)``
        (:func:`default_fit_optimizer`).
      batch_size: minibatch size, default the whole training set (full batch). Batches are
        drawn on the device, without replacement within an epoch (a fresh :func:`permutation`
        per epoch); the last, smaller batch of an epoch is masked, so it does not change any
        shape.
      patience: stop when the monitored loss (validation NLL if there is a validation split,
        else the training loss) has not improved for this many steps.
      val_fraction: fraction of ``x`` held out for validation; default 0.1 when ``patience``
        is set, else 0.
      eval_every: evaluate the validation NLL every this many steps (default: once per epoch).
      max_grad_norm: clip gradients to this global norm.
      restore_best: leave the flow with the best parameters seen (by the monitored loss);
        default on when there is a validation split or a patience.
      chunk_size: optimizer steps per compiled call (Python wakes up between chunks).
        The compiled chunk is kept: a later ``fit`` with a flow of the same structure, data
        of the same shapes, an equal optimizer and the same chunk size, averaging and
        early stopping on or off reuses it (``steps``, ``eval_every``, ``patience``, the key
        and the data values may differ); ``History.chunk_program`` says which happened.
      progress: progress bar on stderr; default on when stderr is a terminal.
      callback: ``callback(step, metrics)`` called between chunks; returning ``True`` stops.
      checkpoint_dir: save the whole training state (flow, optimizer, step, minibatch order,
        best parameters, history) here every ``checkpoint_every`` steps and at the end,
        keeping the last ``keep_checkpoints``. Each checkpoint is written atomically.
      checkpoint_every: steps between checkpoints (default ``chunk_size``); it becomes the
        chunk size, so a killed run loses at most this many steps.
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis, Auto or Explicit (e.g.
        ``jax.make_mesh((4,), ("data",))``): each batch is sharded over it,
        parameters and optimizer state are replicated, and the compiler averages the
        gradients. The batch size must divide by the number of devices on that axis (a full
        batch is padded and masked). With several processes (:func:`nflax.parallel.initialize`)
        each passes its own rows as ``x``; they are gathered, in process order.
      devices: ``"all"`` (or a list of devices) builds that mesh for you.
      ema: keep an exponential moving average of the parameters,
        :math:`\bar\theta_t = \mathrm{ema}\,\bar\theta_{t-1} + (1 - \mathrm{ema})\,\theta_t`
        (bias-corrected, as Adam's moments), e.g. ``0.99``. The validation
        NLL, the best parameters and the parameters the flow ends with are then those of the
        average, which is far less noisy than the last iterate (Polyak averaging).
      resume: continue from the latest checkpoint in ``checkpoint_dir`` (the same data, key
        and settings are required, and checked); without one, start from scratch. A run of
        ``2N`` steps and a run of ``N`` steps resumed to ``2N`` give the same parameters.

    Returns:
      A :class:`History`. A non-finite loss or gradient stops training (``stop_reason
      "non_finite"``) and leaves the last finite parameters.

    Layers with batch statistics (BatchNorm) train in training mode and are validated in
    evaluation mode; ``fit`` leaves the flow in evaluation mode (``flow.train()`` switches
    back). Layers with data-dependent initialisation (ActNorm) are initialised on the first
    training batch before the first step.

    >>> import nflax, jax
    >>> flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> data = nflax.datasets.get("banana").sample(jax.random.key(0), 64)
    >>> hist = nflax.fit(flow, data, key=jax.random.key(1), steps=10, progress=False)
    >>> hist.steps_run, hist.stop_reason
    (10, 'steps')
    >>> # step 0's loss: the data's NLL under the fresh flow (the identity, so N(0, I))
    >>> round(float(hist.loss[0]), 4), bool(hist.loss[-1] < hist.loss[0])
    (38.5757, True)
    """
    data, ctx, mesh = _fit_rows(flow, x, context, mesh, devices)
    settings = make_settings(
        "fit",
        steps=steps,
        chunk_size=chunk_size,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        patience=patience,
        restore_best=restore_best,
        ema=ema,
        mesh=mesh,
    )
    val_fraction = _val_fraction(val_fraction, settings.patience)
    tx = with_clipping(
        optimizer if optimizer is not None else default_fit_optimizer(), max_grad_norm, "fit"
    )
    bsz = None if batch_size is None else positive_int("batch_size", batch_size, "fit")
    checkpointing = make_checkpointing(checkpoint_dir, keep_checkpoints, resume, {}, "fit")
    key_split, key_shuffle = jax.random.split(key)
    split = _split_rows(data, ctx, key_split, _num_val(len(data), val_fraction), bsz, mesh)
    settings = replace(
        settings,
        eval_every=settings.eval_every or split.num_batches,
        restore_best=(split.has_val or patience is not None)
        if restore_best is None
        else settings.restore_best,
    )
    if checkpointing is not None:
        checkpointing.fingerprint.update(_fingerprint(data, ctx, key, val_fraction, split, ema))
    _initialize_from_data(flow, split)
    model = split_model(flow)
    objective = _likelihood_objective(model.definition, split.plan, mesh)
    run = train(
        flow,
        model,
        objective,
        tx,
        {"rows": split.data, "key": key_shuffle, "frozen": model.frozen},
        settings,
        report=_report(split, callback),
        progress=progress,
        checkpointing=checkpointing,
    )
    return _history(run, split)


def _fit_rows(flow, x, context, mesh, devices):
    """The checked data and context rows (every process's, with a mesh) and the mesh."""
    if not isinstance(flow, Flow):
        raise ValueError(f"fit: expected an nflax Flow, received {type(flow).__name__}")
    data = check_data(x, flow.event_shape)
    ctx = _check_context(flow, context, data.shape[0])
    mesh = parallel.resolve_mesh(mesh, devices)
    if mesh is not None:
        data = parallel.gather_process_data(data)
        ctx = parallel.gather_process_data(ctx) if ctx is not None else None
    return data, ctx, mesh


def _val_fraction(val_fraction: float | None, patience: int | None) -> float:
    if val_fraction is None:
        return 0.1 if patience is not None else 0.0
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"fit: val_fraction must be in [0, 1), received {val_fraction}")
    return float(val_fraction)


def _num_val(n: int, val_fraction: float) -> int:
    """Rows held out: ``round(val_fraction · n)``, at least 1 when ``val_fraction > 0``."""
    n_val = max(int(round(val_fraction * n)), 1) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(f"fit: {n} point(s) leave no training data after the validation split")
    return n_val


def _initialize_from_data(flow: Flow, split: _Split) -> None:
    """Data-dependent initialisation (ActNorm) runs once, eagerly, on the first batch."""
    if needs_data_init(flow):
        x_train, _, c_train, _, _ = split.data
        flow.train()
        bsz = split.batch_size
        flow.log_prob(x_train[:bsz], None if c_train is None else c_train[:bsz])


def _fingerprint(data, ctx, key, val_fraction: float, split: _Split, ema) -> dict:
    """What a resume must find unchanged: the data, the key, the split and the batch size."""
    return {
        "data_sha256": data_fingerprint(data, ctx),
        "data_shape": list(data.shape),
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "val_fraction": float(val_fraction),
        "batch_size": split.batch_size,
        "ema": ema,
    }


def _report(split: _Split, callback) -> Report:
    has_val = split.has_val

    def describe(last: list[float]) -> dict:
        return {"loss": last[0], "val_loss": last[1] if has_val else None}

    return Report(describe, callback)


def _history(run: Run, split: _Split) -> History:
    loss, metric = run.outputs[0], run.outputs[1]
    evaluated = ~np.isnan(metric) if split.has_val else np.zeros(run.steps_run, bool)
    return History(
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
        chunk_program=run.program,
    )


def _check_context(flow: Flow, context, n: int) -> np.ndarray | None:
    """Validate the context rows of a conditional flow (host side, before any compile)."""
    conditional = getattr(flow, "is_conditional", False)
    if context is None:
        if conditional:
            raise ValueError("fit: this flow is conditional; pass context=(n, context_dim) rows")
        return None
    if not conditional:
        raise ValueError("fit: this flow is unconditional; received a context")
    try:
        c = np.asarray(context, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"context: not a numeric array ({e})") from None
    want = getattr(flow, "context_dim", None)
    if c.ndim != 2 or c.shape[0] != n or (want is not None and c.shape[1] != want):
        cols = "context_dim" if want is None else want
        raise ValueError(f"context: expected shape ({n}, {cols}), received {c.shape}")
    problem = nonfinite_rows(c)
    if problem:
        raise ValueError(f"context: {problem}")
    return c


def nll(
    flow: Flow,
    x,
    context=None,
    batch_size: int = 65536,
    *,
    mesh: Mesh | None = None,
    devices: str | Sequence | None = None,
) -> np.ndarray:
    """Per-point negative log-likelihood ``−log p(x [| context])`` under ``flow`` (host array).

    ``x`` is evaluated ``batch_size`` rows at a time (a last, shorter batch is padded, so all
    batches share one shape). The program is compiled once per flow structure and batch
    shape and reused by every later call, :func:`nflax.evaluate`'s too. With ``mesh`` (a
    ``jax.sharding.Mesh`` with a ``"data"`` axis, Auto or Explicit) or ``devices="all"``, the
    rows of each batch are split over that axis and the flow is replicated; with several
    processes every process passes the same ``x`` and receives every row's NLL.

    >>> import nflax, jax
    >>> flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> [round(float(v), 4) for v in nll(flow, jax.numpy.zeros((3, 2)))]  # log 2π
    [1.8379, 1.8379, 1.8379]
    """
    data = check_data(x, flow.event_shape)
    ctx = _check_context(flow, context, data.shape[0])
    mesh = parallel.resolve_mesh(mesh, devices, "nll")
    batch_size = positive_int("batch_size", batch_size, "nll")
    graphdef, frozen, state = nnx.split(flow, FROZEN, ...)
    fn = _NEG_LOG_PROB if mesh is None else _neg_log_prob_on(mesh)
    if mesh is not None:  # every process receives the whole result
        frozen, state = jax.device_put((frozen, state), parallel.replicated(mesh))
    out = []
    for start, rows in _equal_batches((data, ctx), len(data), batch_size):
        n = min(batch_size, len(data) - start)
        if mesh is not None:
            rows = parallel.put_rows(rows, mesh)
        out.append(np.asarray(fn(_compile.Static(graphdef), frozen, state, *rows))[:n])
    return np.concatenate(out)


def _neg_log_prob(graphdef: _compile.Static, frozen, state, x, context):
    return -nnx.merge(graphdef.value, frozen, state).log_prob(x, context)


# compiled once per flow structure and batch shape (the structure is a static argument,
# compared by value), so a second nll or evaluate of a flow of that structure compiles nothing
_NEG_LOG_PROB = jax.jit(_neg_log_prob, static_argnums=0)


@functools.lru_cache(maxsize=8)
def _neg_log_prob_on(mesh: Mesh):
    """:func:`_neg_log_prob` with its result replicated over ``mesh``."""
    return jax.jit(_neg_log_prob, static_argnums=0, out_shardings=parallel.replicated(mesh))


def _equal_batches(rows: tuple, n: int, batch_size: int):
    """``(start, rows)`` for consecutive batches of ``min(n, batch_size)`` rows each: the last
    is padded with copies of its first row, so every batch has one shape and one program."""
    size = min(n, batch_size)
    for start in range(0, n, size):
        part = tuple(None if a is None else a[start : start + size] for a in rows)
        short = size - min(size, n - start)
        if short:
            part = tuple(
                None if a is None else np.concatenate([a, np.repeat(a[:1], short, 0)]) for a in part
            )
        yield start, part
