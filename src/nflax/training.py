"""Maximum-likelihood training: many optimizer steps per compiled call.

The hot loop is one jitted ``jax.lax.while_loop`` over a chunk of steps. Minibatches are drawn on
the device (a fresh permutation per epoch, without replacement), the validation NLL is
evaluated inside the loop, and the best parameters, patience counter and a NaN guard are all
part of the loop state. Python only wakes between chunks (progress, callback).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from nflax import parallel
from nflax.datafiles import nonfinite_rows
from nflax.distributions import Flow
from nflax.variables import FROZEN as _FROZEN

Array = jax.Array

_RUNNING, _PATIENCE, _NON_FINITE = 0, 1, 2
_REASONS = {_PATIENCE: "patience", _NON_FINITE: "non_finite"}


@dataclass
class History:
    """What happened during :func:`fit`.

    ``loss[t]`` is the training NLL (nats per point) of the batch used at step ``t``, computed
    with the parameters before that step's update; ``val_loss[i]`` is the validation NLL of the
    parameters at step ``val_steps[i]``. ``best_step`` is the step whose parameters the flow
    holds at the end when the best parameters were restored. ``val_index`` lists the rows of
    the data that were held out for validation.
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
    steps = _positive_int("steps", steps, "warmup_cosine")
    warmup = min(int(warmup), max(steps // 10, 1))
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))


def default_optimizer(
    steps: int,
    learning_rate: float = 2e-3,
    weight_decay: float = 3.0,
    schedule: str = "warmup-cosine",
) -> optax.GradientTransformation:
    """``nflax train``'s optimizer: adamw on :func:`warmup_cosine` (or a constant rate), its
    weight decay on the conditioners' kernels only (:func:`kernel_mask`).

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
    lr = warmup_cosine(learning_rate, steps) if schedule == "warmup-cosine" else learning_rate
    return optax.adamw(lr, weight_decay=weight_decay, mask=kernel_mask)


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


def _nll(graphdef, params, rest, x, w=None, frozen=None, context=None):
    """Mean NLL of ``x`` (weights ``w``) and the model's mutable state after the call."""
    model = nnx.merge(graphdef, params, frozen, rest, copy=True)  # fresh Variables per trace
    lp = model.log_prob(x, context)
    new_rest = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, _FROZEN)))
    if w is None:
        return -jnp.mean(lp), new_rest
    return -jnp.sum(lp * w) / jnp.sum(w), new_rest


def epoch_permutation(key: Array, epoch, n: int, batch_size: int) -> Array:
    """The visiting order of epoch ``epoch``: a permutation of ``range(n)``, padded with zeros
    to a whole number of batches (``ceil(n / batch_size) · batch_size`` entries)."""
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    pad = -(-n // batch_size) * batch_size - n
    return jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]) if pad else perm


def batch_indices(perm: Array, b, n: int, batch_size: int) -> tuple[Array, Array]:
    """Indices and 0/1 weights of batch ``b`` of an epoch; the padding of a last, smaller batch
    has weight 0, so every batch has the same shape and nothing recompiles."""
    idx = jax.lax.dynamic_slice(perm, (b * batch_size,), (batch_size,))
    w = (b * batch_size + jnp.arange(batch_size)) < n
    return idx, w


def run_chunk(step_fn, carry: dict, total, chunk_size: int, num_outputs: int):
    """Up to ``chunk_size`` steps ``carry, outputs = step_fn(carry)`` in one ``while_loop``.

    ``carry`` holds ``step`` and ``status``; the loop ends early at step ``total`` or when the
    status leaves ``_RUNNING``, so a short last chunk or an early stop costs nothing (a scan
    with a per-step ``cond`` spent ~50 µs per skipped step copying the carry). Returns the
    carry and ``num_outputs`` float32 buffers of length ``chunk_size`` holding each step's
    scalar outputs; entries past the last step stay NaN.
    """
    end = jnp.minimum(carry["step"] + chunk_size, total)
    nan = jnp.full((chunk_size,), jnp.nan, jnp.float32)

    def active(s):
        c = s[0]
        return (c["status"] == _RUNNING) & (c["step"] < end)

    def body(s):
        c, i, bufs = s
        c, outs = step_fn(c)
        return c, i + 1, tuple(b.at[i].set(o) for b, o in zip(bufs, outs, strict=True))

    carry, _, bufs = jax.lax.while_loop(active, body, (carry, jnp.int32(0), (nan,) * num_outputs))
    return carry, bufs


def _tree_where(c, a, b):
    return jax.tree.map(lambda u, v: jnp.where(c, u, v), a, b)


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class _Progress:
    def __init__(self, total: int, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.total = total
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, val: float | None, rate: float) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "█" * filled + "·" * (width - filled)
        msg = f"\r{bar} {step}/{self.total} loss {loss:.4f}"
        if val is not None and math.isfinite(val):
            msg += f" val {val:.4f}"
        msg += f" {rate:,.0f} steps/s"
        print(msg, end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


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
    """Fit ``flow`` to data ``x`` by maximum likelihood (minimise the mean NLL), in place.

    Args:
      flow: the flow to train; its parameters are updated in place.
      x: data, shape ``(n, *event_shape)``; checked for shape and NaN/inf before any compile.
      key: PRNG key for the validation split and minibatch order (same key → same result).
      steps: maximum number of optimizer steps.
      context: for a conditional flow, the context of each row of ``x``, shape
        ``(n, context_dim)``; rows of ``x`` and ``context`` stay together in every split
        and minibatch.
      optimizer: an optax transformation, default ``optax.adamw(1e-3)``.
      batch_size: minibatch size, default the whole training set (full batch). Batches are
        drawn on the device, without replacement within an epoch; the last, smaller batch of an
        epoch is masked, so it does not change any shape.
      patience: stop when the monitored loss (validation NLL if there is a validation split,
        else the training loss) has not improved for this many steps.
      val_fraction: fraction of ``x`` held out for validation; default 0.1 when ``patience``
        is set, else 0.
      eval_every: evaluate the validation NLL every this many steps (default: once per epoch).
      max_grad_norm: clip gradients to this global norm.
      restore_best: leave the flow with the best parameters seen (by the monitored loss);
        default on when there is a validation split or a patience.
      chunk_size: optimizer steps per compiled call (Python wakes up between chunks).
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
      ema: keep an exponential moving average of the parameters, ``θ̄_t = ema·θ̄_{t−1} +
        (1 − ema)·θ_t`` (bias-corrected, as Adam's moments), e.g. ``0.99``. The validation
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
    # ---- argument checks (all before any compile) -------------------------------------
    if not isinstance(flow, Flow):
        raise ValueError(f"fit: expected an nflax Flow, received {type(flow).__name__}")
    data = check_data(x, flow.event_shape)
    ctx = _check_context(flow, context, data.shape[0])
    mesh = parallel.resolve_mesh(mesh, devices)
    if mesh is not None:
        data = parallel.gather_process_data(data)
        ctx = parallel.gather_process_data(ctx) if ctx is not None else None
    steps = _positive_int("steps", steps)
    chunk_size = _positive_int("chunk_size", chunk_size)
    if patience is not None:
        patience = _positive_int("patience", patience)
    if val_fraction is None:
        val_fraction = 0.1 if patience is not None else 0.0
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"fit: val_fraction must be in [0, 1), received {val_fraction}")
    if checkpoint_every is not None:
        chunk_size = _positive_int("checkpoint_every", checkpoint_every)
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs a checkpoint_dir")
    if max_grad_norm is not None and not float(max_grad_norm) > 0:
        raise ValueError(f"fit: max_grad_norm must be > 0, received {max_grad_norm}")
    if ema is not None:
        if isinstance(ema, bool) or not 0.0 <= float(ema) < 1.0:
            raise ValueError(f"fit: ema must be a decay in [0, 1), received {ema!r}")
        ema = float(ema)

    n = data.shape[0]
    n_val = int(round(float(val_fraction) * n)) if val_fraction > 0 else 0
    if val_fraction > 0:
        n_val = max(n_val, 1)
    n_train = n - n_val
    if n_train < 1:
        raise ValueError(f"fit: {n} point(s) leave no training data after the validation split")
    if batch_size is not None:
        batch_size = _positive_int("batch_size", batch_size)
    full_batch = batch_size is None or batch_size >= n_train
    bsz = n_train if full_batch else batch_size
    ndev = parallel.data_size(mesh) if mesh is not None else 1
    if not full_batch and bsz % ndev:
        raise ValueError(
            f"fit: batch_size {bsz} must be divisible by the {ndev} devices of the mesh's "
            f"'data' axis"
        )
    num_batches = -(-n_train // bsz)
    if eval_every is None:
        eval_every = num_batches
    eval_every = _positive_int("eval_every", eval_every)
    has_val = n_val > 0
    if restore_best is None:
        restore_best = has_val or patience is not None

    key_split, key_shuffle = jax.random.split(key)
    order = jax.random.permutation(key_split, n)
    data_j = jnp.asarray(data)
    x_val = data_j[order[:n_val]] if has_val else None
    x_train = data_j[order[n_val:]] if has_val else data_j
    c_val = c_train = None
    if ctx is not None:
        ctx_j = jnp.asarray(ctx)
        c_val = ctx_j[order[:n_val]] if has_val else None
        c_train = ctx_j[order[n_val:]] if has_val else ctx_j
    w_full = None  # a sharded full batch is padded to a multiple of the device count
    if full_batch and n_train % ndev:
        pad = ndev - n_train % ndev
        x_train = jnp.concatenate([x_train, jnp.zeros((pad, *x_train.shape[1:]), x_train.dtype)])
        if c_train is not None:
            c_train = jnp.concatenate([c_train, jnp.zeros((pad, c_train.shape[1]), c_train.dtype)])
        w_full = (jnp.arange(n_train + pad) < n_train).astype(x_train.dtype)

    # ---- the pure training program ----------------------------------------------------
    tx = optimizer if optimizer is not None else optax.adamw(1e-3)
    if max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(float(max_grad_norm)), tx)
    if any(getattr(m, "needs_data_init", False) for _, m in nnx.iter_graph(flow)):
        # Data-dependent initialisation (ActNorm) runs once, eagerly, on the first batch.
        flow.train()
        flow.log_prob(x_train[:bsz], None if c_train is None else c_train[:bsz])
    # Training mode (batch statistics) for the steps, evaluation mode for the validation NLL.
    flow.eval()
    graphdef_eval = nnx.split(flow, nnx.Param, _FROZEN, ...)[0]
    flow.train()
    graphdef, params, frozen, rest = nnx.split(flow, nnx.Param, _FROZEN, ...)
    opt_state = tx.init(params)
    patience_v = patience if patience is not None else -1

    def batch_at(carry, d):
        x_train, _, c_train, _ = d
        if full_batch:
            return x_train, c_train, w_full, carry["perm"]
        b = carry["step"] % num_batches
        perm = jax.lax.cond(
            b == 0,
            lambda: epoch_permutation(key_shuffle, carry["step"] // num_batches, n_train, bsz),
            lambda: carry["perm"],
        )
        idx, w = batch_indices(perm, b, n_train, bsz)
        cb = c_train[idx] if c_train is not None else None
        return x_train[idx], cb, w.astype(x_train.dtype), perm

    def do_step(carry, d, total):
        p, rest = carry["params"], carry["rest"]
        t = carry["step"]
        xb, cb, w, perm = batch_at(carry, d)
        if mesh is not None:  # shard the batch: each device takes its slice of the rows
            xb, cb, w = parallel.shard_rows((xb, cb, w), mesh)
        (loss, new_rest), grads = jax.value_and_grad(
            lambda q: _nll(graphdef, q, rest, xb, w, frozen, cb), has_aux=True
        )(p)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        avg, p_mon = _average(carry, p, t)  # the monitored parameters (p, or their average)
        if has_val:
            do_eval = (t % eval_every == 0) | (t == total - 1)
            metric = jax.lax.cond(
                do_eval,
                lambda: _nll(graphdef_eval, p_mon, rest, d[1], None, frozen, d[3])[0],
                lambda: jnp.float32(jnp.nan),
            )
        elif ema is not None:  # no validation split: the training batch, at the average
            do_eval = (t % eval_every == 0) | (t == total - 1)
            metric = jax.lax.cond(
                do_eval,
                lambda: _nll(graphdef, p_mon, rest, xb, w, frozen, cb)[0],
                lambda: jnp.float32(jnp.nan),
            )
        else:
            do_eval, metric = jnp.array(True), loss
        improved = finite & do_eval & jnp.isfinite(metric) & (metric < carry["best_metric"])
        updates, new_opt = tx.update(grads, carry["opt_state"], p)
        new_p = optax.apply_updates(p, updates)
        status = jnp.where(finite, carry["status"], _NON_FINITE)
        best_step = jnp.where(improved, t, carry["best_step"])
        if patience is not None:
            stop = finite & do_eval & (t - best_step >= patience_v)
            status = jnp.where(stop, _PATIENCE, status)
        new = dict(
            params=_tree_where(finite, new_p, p),
            rest=_tree_where(finite, new_rest, rest),
            opt_state=_tree_where(finite, new_opt, carry["opt_state"]),
            perm=perm,
            step=jnp.where(finite, t + 1, t),
            best_params=_tree_where(improved, p_mon, carry["best_params"]),
            best_rest=_tree_where(improved, rest, carry["best_rest"]),
            best_metric=jnp.where(improved, metric, carry["best_metric"]),
            best_step=best_step,
            status=status,
        )
        if ema is not None:
            new["avg"] = _tree_where(finite, avg, carry["avg"])
        return new, (jnp.where(finite, loss, jnp.nan), jnp.where(do_eval, metric, jnp.nan))

    def _average(carry, p, t):
        """The running average including step ``t``'s parameters, and its bias-corrected value
        (``(None, p)`` without ``ema``)."""
        if ema is None:
            return None, p
        avg = optax.tree_utils.tree_update_moment(p, carry["avg"], ema, 1)
        return avg, optax.tree_utils.tree_bias_correction(avg, ema, t + 1)

    def chunk(carry, d, total):
        return run_chunk(lambda c: do_step(c, d, total), carry, total, chunk_size, 2)

    perm0 = jnp.zeros((num_batches * bsz if not full_batch else 1,), jnp.int32)
    carry = dict(
        params=params,
        rest=rest,
        opt_state=opt_state,
        perm=perm0,
        step=jnp.int32(0),
        best_params=params,
        best_rest=rest,
        best_metric=jnp.float32(jnp.inf),
        best_step=jnp.int32(-1),
        status=jnp.int32(_RUNNING),
    )
    if ema is not None:
        carry["avg"] = jax.tree.map(jnp.zeros_like, params)
    total = jnp.int32(steps)
    args = ((x_train, x_val, c_train, c_val), total)
    t0 = time.perf_counter()
    if mesh is not None:  # everything replicated; batches are sharded inside the step
        carry, args = jax.device_put((carry, args), parallel.replicated(mesh))
    compiled = jax.jit(chunk, donate_argnums=0).lower(carry, *args).compile()
    compile_seconds = time.perf_counter() - t0
    carry = jax.tree.map(jnp.copy, carry)  # donation must not consume the flow's own arrays

    # ---- checkpoints: open, and resume from the latest one ------------------------------
    losses, vals = [], []
    ckpt = None
    if checkpoint_dir is not None:
        from nflax.checkpoint import TrainingCheckpoints

        ckpt = TrainingCheckpoints(checkpoint_dir, keep_checkpoints)
        fingerprint = {
            "data_sha256": hashlib.sha256(
                data.tobytes() + (ctx.tobytes() if ctx is not None else b"")
            ).hexdigest(),
            "data_shape": list(data.shape),
            "key": np.asarray(jax.random.key_data(key)).tolist(),
            "val_fraction": float(val_fraction),
            "batch_size": bsz,
            "ema": ema,
        }
        try:  # a refused resume must not leave orbax's threads running
            leaves, treedef = jax.tree.flatten(carry)
            if ckpt.latest_step() is not None:
                if not resume:
                    raise ValueError(
                        f"fit: {ckpt.directory} already holds training checkpoints; pass "
                        f"resume=True to continue that run, or choose an empty checkpoint_dir"
                    )
                if ckpt.record().get("fingerprint") != fingerprint:
                    raise ValueError(
                        f"fit: the checkpoints in {ckpt.directory} come from a run with other "
                        f"data, key, val_fraction or batch size; cannot resume"
                    )
                saved, record = ckpt.restore(leaves)
                carry = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in saved])
                losses.append(np.asarray(record["loss"], np.float32))
                vals.append(np.asarray(record["val"], np.float32))
        except BaseException:
            ckpt.close()
            raise

    def save_checkpoint():
        if ckpt is None:
            return
        step = int(carry["step"])
        record = {
            "step": step,
            "loss": np.concatenate(losses)[:step].tolist() if losses else [],
            "val": np.concatenate(vals)[:step].tolist() if vals else [],
            "fingerprint": fingerprint,
        }
        ckpt.save(step, jax.tree.leaves(carry), record)

    # ---- the driver: Python wakes between chunks --------------------------------------
    bar = _Progress(steps, progress)
    stop_reason = "steps"
    start_step = int(carry["step"])
    t0 = time.perf_counter()
    try:
        while True:
            carry, (loss_c, val_c) = compiled(carry, *args)
            step, status = int(carry["step"]), int(carry["status"])
            losses.append(np.asarray(loss_c))
            vals.append(np.asarray(val_c))
            elapsed = time.perf_counter() - t0
            rate = (step - start_step) / elapsed if elapsed > 0 else float("nan")
            last_loss = _last_finite(losses[-1])
            last_val = _last_finite(vals[-1]) if has_val else None
            bar.update(step, last_loss, last_val, rate)
            save_checkpoint()
            if status != _RUNNING:
                stop_reason = _REASONS[status]
                break
            if step >= steps:
                break
            if callback is not None and callback(
                step, {"loss": last_loss, "val_loss": last_val, "steps_per_second": rate}
            ):
                stop_reason = "callback"
                break
        jax.block_until_ready(carry)
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    train_seconds = time.perf_counter() - t0

    loss_all = np.concatenate(losses)
    val_all = np.concatenate(vals)
    steps_run = int(carry["step"])
    eval_mask = ~np.isnan(val_all[:steps_run]) if has_val else np.zeros(steps_run, bool)
    best_step = int(carry["best_step"])
    restored = bool(restore_best and best_step >= 0)
    if restored:
        nnx.update(flow, carry["best_params"], carry["best_rest"])
    elif ema is not None and steps_run > 0:
        avg = optax.tree_utils.tree_bias_correction(carry["avg"], ema, steps_run)
        nnx.update(flow, avg, carry["rest"])
    else:
        nnx.update(flow, carry["params"], carry["rest"])
    flow.eval()
    return History(
        loss=loss_all[:steps_run],
        val_loss=val_all[:steps_run][eval_mask],
        val_steps=np.nonzero(eval_mask)[0],
        val_index=np.asarray(order[:n_val]) if has_val else np.zeros(0, np.int64),
        stop_reason=stop_reason,
        steps_run=steps_run,
        best_step=best_step if best_step >= 0 else None,
        best_loss=float(carry["best_metric"]) if best_step >= 0 else None,
        non_finite_step=steps_run if stop_reason == "non_finite" else None,
        restored_best=restored,
        steps_per_second=(steps_run - start_step) / train_seconds if train_seconds > 0 else 0.0,
        compile_seconds=compile_seconds,
        train_seconds=train_seconds,
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


def _last_finite(a: np.ndarray) -> float:
    f = a[np.isfinite(a)]
    return float(f[-1]) if f.size else float("nan")


def _positive_int(name: str, v, who: str = "fit") -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or int(v) < 1:
        raise ValueError(f"{who}: {name} must be a positive integer, received {v!r}")
    return int(v)


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

    ``x`` is evaluated ``batch_size`` rows at a time. With ``mesh`` (a ``jax.sharding.Mesh``
    with a ``"data"`` axis, Auto or Explicit) or ``devices="all"``, the rows of each batch are
    split over that axis and the flow is replicated; with several processes every process
    passes the same ``x`` and receives every row's NLL.

    >>> import nflax, jax
    >>> flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> [round(float(v), 4) for v in nll(flow, jax.numpy.zeros((3, 2)))]  # log 2π
    [1.8379, 1.8379, 1.8379]
    """
    data = check_data(x, flow.event_shape)
    ctx = _check_context(flow, context, data.shape[0])
    mesh = parallel.resolve_mesh(mesh, devices, "nll")
    graphdef, frozen, state = nnx.split(flow, _FROZEN, ...)
    neg_log_prob = lambda s, xb, cb: -nnx.merge(graphdef, frozen, s).log_prob(xb, cb)
    if mesh is None:
        fn = jax.jit(neg_log_prob)
    else:  # every process receives the whole result
        fn = jax.jit(neg_log_prob, out_shardings=parallel.replicated(mesh))
        state = jax.device_put(state, parallel.replicated(mesh))
    out = []
    for i in range(0, len(data), batch_size):
        rows = (data[i : i + batch_size], None if ctx is None else ctx[i : i + batch_size])
        n = len(rows[0])
        if mesh is not None:
            rows = parallel.put_rows(rows, mesh)
        out.append(np.asarray(fn(state, *rows))[:n])
    return np.concatenate(out)
