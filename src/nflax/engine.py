"""The training engine: every objective's optimizer steps, in compiled chunks, and the loop
around them.

An objective (:class:`Objective`) is three small pure functions of arrays:

* ``inputs(extra, step, data) -> (inputs, extra)``: what step ``step`` consumes (a minibatch
  drawn on the device, a PRNG key, …) and the objective's own loop state ``extra``;
* ``loss(params, rest, inputs, data) -> (loss, rest)``: the scalar to minimise, and the model's
  mutable state after the call (batch statistics);
* ``validate(params, rest, step, data) -> (metric, diagnostics)`` (optional): at evaluation
  steps, the monitored metric (lower is better) and a tuple of scalars to record.

Everything else is the engine's, for every objective alike: gradients and the optimizer, the
NaN guard (a non-finite loss or gradient stops the run and keeps the last finite parameters),
an optional moving average of the parameters, the best parameters and their metric, patience,
one jitted ``jax.lax.while_loop`` per chunk of steps (Python wakes only between chunks), the
progress bar, the callback, checkpoints with exact resume, and a mesh's replicated placement.
Without ``validate`` the monitored metric is the training loss of each step.

Compile once: the chunk program is kept in this process and reused by every later call with
an equal objective and optimizer (equal code and captured values, :mod:`nflax._compile`), the
same static settings (chunk size, averaging, early stopping on or off) and arguments of the
same structure, shapes, dtypes and shardings. The step budget, the evaluation cadence and the
patience are arguments of the program, not constants in it. An objective is reusable when its
functions capture only hashable values (a :class:`ModelDef`, sizes, flags, a mesh, functions)
and take arrays (the flow's frozen state, PRNG keys, data) from ``data``; one that captures an
array it cannot key, or a module, is compiled afresh for every call, which is always correct.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from nflax import _compile, parallel
from nflax.variables import FROZEN

Array = jax.Array

RUNNING, PATIENCE, NON_FINITE = 0, 1, 2
_REASONS = {PATIENCE: "patience", NON_FINITE: "non_finite"}


# ---- the model, split once ------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDef:
    """A flow's structure (NNX graph definitions) in training and evaluation mode, without
    its arrays: what an objective captures so that its program serves every flow of that
    structure."""

    graphdef: Any
    graphdef_eval: Any

    def merge(self, params, frozen, rest, *, train: bool = True):
        """The flow with these arrays (fresh Variables, safe inside a trace)."""
        graphdef = self.graphdef if train else self.graphdef_eval
        return nnx.merge(graphdef, params, frozen, rest, copy=True)

    def bind(self, frozen) -> Model:
        """A :class:`Model` of this structure holding ``frozen`` (e.g. traced, from ``data``),
        for :meth:`Model.merge` inside an objective."""
        return Model(self.graphdef, self.graphdef_eval, None, frozen, None)


@dataclass(frozen=True)
class Model:
    """A flow split once, outside the hot loop: its trained parameters, the state no step
    changes (``frozen``), the rest (batch statistics), and its structure in training and in
    evaluation mode."""

    graphdef: Any
    graphdef_eval: Any
    params: Any
    frozen: Any
    rest: Any

    def merge(self, params, rest, *, train: bool = True):
        """The flow with ``params`` and ``rest`` (fresh Variables, safe inside a trace)."""
        return self.definition.merge(params, self.frozen, rest, train=train)

    @property
    def definition(self) -> ModelDef:
        """The structure alone (hashable): see :class:`ModelDef`."""
        return ModelDef(self.graphdef, self.graphdef_eval)


def split_model(flow: nnx.Module) -> Model:
    """Split ``flow`` into a :class:`Model`; the flow is left in training mode."""
    flow.eval()
    graphdef_eval = nnx.split(flow, nnx.Param, FROZEN, ...)[0]
    flow.train()
    graphdef, params, frozen, rest = nnx.split(flow, nnx.Param, FROZEN, ...)
    return Model(graphdef, graphdef_eval, params, frozen, rest)


def mutable_state(module: nnx.Module):
    """The state of ``module`` that a step may change besides its parameters."""
    return nnx.state(module, nnx.Not(nnx.Any(nnx.Param, FROZEN)))


# ---- what the engine is asked to do ----------------------------------------------------------
def _no_inputs(extra, step, data):
    return None, extra


@dataclass(frozen=True)
class Objective:
    """A training objective: see the module docstring. ``num_diagnostics`` is the length of
    the tuple ``validate`` returns beside the metric; ``extra`` the initial loop state of
    ``inputs``."""

    loss: Callable
    inputs: Callable = _no_inputs
    validate: Callable | None = None
    num_diagnostics: int = 0
    extra: Any = ()


@dataclass(frozen=True)
class Settings:
    """How to run: step budget, evaluation cadence, early stopping, averaging, placement."""

    steps: int
    eval_every: int | None = 1
    patience: int | None = None
    restore_best: bool = False
    chunk_size: int = 500
    ema: float | None = None
    mesh: Mesh | None = None


@dataclass(frozen=True)
class Checkpointing:
    """Where to write training checkpoints, how many to keep, whether to resume, and the
    fingerprint of the run's data and settings that a resume must match."""

    directory: str | os.PathLike
    keep: int = 3
    resume: bool = False
    fingerprint: dict = field(default_factory=dict)
    who: str = "fit"


def checkpointing(
    directory: str | os.PathLike | None, keep: int, resume: bool, fingerprint: dict, who: str
) -> Checkpointing | None:
    """An objective's checkpoint settings, or ``None`` without a folder (where ``resume=True``
    is an error naming ``who``)."""
    if directory is None:
        if resume:
            raise ValueError(f"{who}: resume=True needs a checkpoint_dir")
        return None
    return Checkpointing(directory, keep, bool(resume), fingerprint, who)


@dataclass
class Run:
    """What the engine did. ``outputs[0]`` is each step's loss, ``outputs[1]`` the monitored
    metric at evaluation steps (NaN elsewhere), then the diagnostics; each has one entry per
    step run. ``compile_seconds`` covers compiling the chunk program and its first, throwaway
    execution (one-time setup); ``train_seconds`` the chunks that trained."""

    outputs: list[np.ndarray]
    steps_run: int
    start_step: int
    stop_reason: str
    best_step: int | None
    best_metric: float | None
    restored_best: bool
    compile_seconds: float
    train_seconds: float
    program: str = "compiled"  # the chunk program: "compiled", "loaded" (disk) or "reused"

    @property
    def steps_per_second(self) -> float:
        done = self.steps_run - self.start_step
        return done / self.train_seconds if self.train_seconds > 0 else 0.0


def positive_int(name: str, v, who: str) -> int:
    """``v`` as an int, or a ``ValueError`` naming ``who`` and ``name`` unless it is ≥ 1."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or int(v) < 1:
        raise ValueError(f"{who}: {name} must be a positive integer, received {v!r}")
    return int(v)


def make_settings(
    who: str,
    *,
    steps: int,
    chunk_size: int,
    checkpoint_every: int | None,
    eval_every: int | None,
    patience: int | None,
    restore_best: bool,
    ema: float | None,
    mesh: Mesh | None,
) -> Settings:
    """Checked :class:`Settings` from a training function's arguments (``checkpoint_every``,
    when given, is the chunk size; ``eval_every=None`` is left for the caller to fill in)."""
    chunk_size = positive_int("chunk_size", chunk_size, who)
    if checkpoint_every is not None:
        chunk_size = positive_int("checkpoint_every", checkpoint_every, who)
    if ema is not None and (isinstance(ema, bool) or not 0.0 <= float(ema) < 1.0):
        raise ValueError(f"{who}: ema must be a decay in [0, 1), received {ema!r}")
    return Settings(
        steps=positive_int("steps", steps, who),
        eval_every=None if eval_every is None else positive_int("eval_every", eval_every, who),
        patience=None if patience is None else positive_int("patience", patience, who),
        restore_best=bool(restore_best),
        chunk_size=chunk_size,
        ema=None if ema is None else float(ema),
        mesh=mesh,
    )


def with_clipping(tx: optax.GradientTransformation, max_grad_norm, who: str):
    """``tx`` after clipping gradients to the global norm ``max_grad_norm`` (if given)."""
    if max_grad_norm is None:
        return tx
    if not float(max_grad_norm) > 0:
        raise ValueError(f"{who}: max_grad_norm must be > 0, received {max_grad_norm}")
    clip = optax.clip_by_global_norm(float(max_grad_norm))
    # the update holds tx's update only (not its init, which may hold numbers the compiled
    # program does not use: see nflax._optim.with_numbers), so programs stay reusable
    update = optax.chain(clip, optax.GradientTransformation(_init_elsewhere, tx.update)).update
    return optax.GradientTransformation(optax.chain(clip, tx).init, update)


def _init_elsewhere(params):
    raise NotImplementedError("initialised by the enclosing transformation")


# ---- one step, and a chunk of them --------------------------------------------------------
def _tree_where(c, a, b):
    return jax.tree.map(lambda u, v: jnp.where(c, u, v), a, b)


def _all_finite(tree) -> Array:
    """Whether every entry of every leaf is finite: one reduction over the leaves joined (on
    XLA:CPU a reduction per leaf, each split in two, cost ~3 % of a small step more)."""
    leaves = [jnp.ravel(v) for v in jax.tree.leaves(tree)]
    return jnp.all(jnp.isfinite(jnp.concatenate(leaves))) if leaves else jnp.array(True)


def _average(ema: float | None, carry: dict, p, t):
    """The running average including step ``t``'s parameters and its bias-corrected value
    (``(None, p)`` without averaging)."""
    if ema is None:
        return None, p
    avg = optax.tree_utils.tree_update_moment(p, carry["avg"], ema, 1)
    return avg, optax.tree_utils.tree_bias_correction(avg, ema, t + 1)


@dataclass(frozen=True)
class _Static:
    """What a chunk program is built for besides its arguments: part of its key."""

    chunk_size: int
    ema: float | None
    early_stopping: bool
    num_outputs: int
    restore_best: bool  # without it the best parameters are not tracked


def _static(objective: Objective, settings: Settings) -> _Static:
    return _Static(
        settings.chunk_size,
        settings.ema,
        settings.patience is not None,
        2 + objective.num_diagnostics,
        settings.restore_best,
    )


def _hyper(settings: Settings) -> dict:
    """The settings the program takes as arguments: a new value reuses the program."""
    return {
        "total": jnp.int32(settings.steps),
        "eval_every": jnp.int32(settings.eval_every),
        "patience": jnp.int32(settings.patience or 0),
    }


def _monitor(objective: Objective, static: _Static, hyper, p_mon, rest, inputs, data, t, loss):
    """``(do_eval, metric, diagnostics)`` of step ``t``: the validation metric at evaluation
    steps; without validation, the training loss (of the average, when there is one)."""
    nan = jnp.float32(jnp.nan)
    do_eval = (t % hyper["eval_every"] == 0) | (t == hyper["total"] - 1)
    if objective.validate is not None:
        metric, diags = jax.lax.cond(
            do_eval,
            lambda: objective.validate(p_mon, rest, t, data),
            lambda: (nan, (nan,) * objective.num_diagnostics),
        )
        return do_eval, metric, diags
    if static.ema is not None:
        metric = jax.lax.cond(
            do_eval, lambda: objective.loss(p_mon, rest, inputs, data)[0], lambda: nan
        )
        return do_eval, metric, ()
    return jnp.array(True), loss, ()


def _step(objective: Objective, tx, static: _Static, hyper, carry: dict, data):
    """One optimizer step of ``objective``: the new loop state and the step's outputs."""
    p, rest, t = carry["params"], carry["rest"], carry["step"]
    inputs, extra = objective.inputs(carry["extra"], t, data)
    (loss, new_rest), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        p, rest, inputs, data
    )
    finite = jnp.isfinite(loss) & _all_finite(grads)
    avg, p_mon = _average(static.ema, carry, p, t)
    do_eval, metric, diags = _monitor(objective, static, hyper, p_mon, rest, inputs, data, t, loss)
    improved = finite & do_eval & jnp.isfinite(metric) & (metric < carry["best_metric"])
    updates, new_opt = tx.update(grads, carry["opt_state"], p)
    status = jnp.where(finite, carry["status"], NON_FINITE)
    best_step = jnp.where(improved, t, carry["best_step"])
    if static.early_stopping:
        stop = finite & do_eval & (t - best_step >= hyper["patience"])
        status = jnp.where(stop, PATIENCE, status)
    # A non-finite step keeps the parameters and state the flow ends with; the optimizer
    # state is not kept: the run stops here, so it is never used again (its select cost ~5 %
    # of a small step). Without restore_best the best parameters are never read: not tracked.
    new = dict(
        params=_tree_where(finite, optax.apply_updates(p, updates), p),
        rest=_tree_where(finite, new_rest, rest),
        opt_state=new_opt,
        extra=extra,
        step=jnp.where(finite, t + 1, t),
        best_params=_tree_where(improved, p_mon, carry["best_params"])
        if static.restore_best
        else carry["best_params"],
        best_rest=_tree_where(improved, rest, carry["best_rest"])
        if static.restore_best
        else carry["best_rest"],
        best_metric=jnp.where(improved, metric, carry["best_metric"]),
        best_step=best_step,
        status=status,
    )
    if static.ema is not None:
        new["avg"] = _tree_where(finite, avg, carry["avg"])
    nan = jnp.float32(jnp.nan)
    outputs = (
        jnp.where(finite, loss, nan),
        jnp.where(do_eval, metric, nan),
        *(jnp.where(finite & do_eval, d, nan) for d in diags),
    )
    return new, outputs


def run_chunk(step_fn, carry: dict, total, chunk_size: int, num_outputs: int):
    """Up to ``chunk_size`` steps ``carry, outputs = step_fn(carry)`` in one ``while_loop``.

    ``carry`` holds ``step`` and ``status``; the loop ends early at step ``total`` or when the
    status leaves ``RUNNING``, so a short last chunk or an early stop costs nothing (a scan
    with a per-step ``cond`` spent ~50 µs per skipped step copying the carry). Returns the
    carry and ``num_outputs`` float32 buffers of length ``chunk_size`` holding each step's
    scalar outputs; entries past the last step stay NaN.
    """
    end = jnp.minimum(carry["step"] + chunk_size, total)
    nan = jnp.full((chunk_size,), jnp.nan, jnp.float32)

    def active(s):
        c = s[0]
        return (c["status"] == RUNNING) & (c["step"] < end)

    def body(s):
        c, i, bufs = s
        c, outs = step_fn(c)
        return c, i + 1, tuple(b.at[i].set(o) for b, o in zip(bufs, outs, strict=True))

    carry, _, bufs = jax.lax.while_loop(active, body, (carry, jnp.int32(0), (nan,) * num_outputs))
    return carry, bufs


def _initial_carry(model: Model, objective: Objective, tx, settings: Settings) -> dict:
    carry = dict(
        params=model.params,
        rest=model.rest,
        opt_state=tx.init(model.params),
        extra=objective.extra,
        step=jnp.int32(0),
        best_params=model.params,
        best_rest=model.rest,
        best_metric=jnp.float32(jnp.inf),
        best_step=jnp.int32(-1),
        status=jnp.int32(RUNNING),
    )
    if settings.ema is not None:
        carry["avg"] = jax.tree.map(jnp.zeros_like, model.params)
    return carry


def _chunk_program(objective: Objective, tx, static: _Static, carry: dict, data, hyper):
    """Up to ``static.chunk_size`` steps of ``objective``: the function that is compiled."""
    step = lambda c: _step(objective, tx, static, hyper, c, data)  # noqa: E731
    return run_chunk(step, carry, hyper["total"], static.chunk_size, static.num_outputs)


PROGRAMS = _compile.Programs()  # this process's chunk programs, by key


def program_key(objective: Objective, tx, static: _Static, args) -> Any:
    """The key of the chunk program for ``args``, or ``None`` when the objective or the
    optimizer captures a value that cannot be keyed (then it is compiled every time)."""
    fns = _compile.key_or_none(
        objective.loss, objective.inputs, objective.validate, tx.update, static
    )
    return None if fns is None else (fns, _compile.trace_context(), _compile.signature(args))


def _program(objective: Objective, tx, static: _Static, args):
    """The chunk program for ``args``: the one this process compiled for an equal key, else
    compiled now (or loaded from JAX's persistent cache). Returns it, the seconds that took,
    and how it was obtained: ``"reused"``, ``"compiled"`` or ``"loaded"``."""
    t0 = time.perf_counter()
    key = program_key(objective, tx, static, args)
    program = PROGRAMS.get(key)
    if program is not None:
        return program, time.perf_counter() - t0, "reused"
    fn = functools.partial(_chunk_program, objective, tx, static)
    program, _, how = _compile.compile_timed(lambda: jax.jit(fn, donate_argnums=0).lower(*args))
    PROGRAMS.put(key, program)
    return program, time.perf_counter() - t0, how


def _warm_up(program, args) -> None:
    """A fresh program's first execution pays a one-time setup (on XLA:CPU 0.07-0.1 s for an
    8-layer realnvp, a tenth of 2000 steps at batch 128): one throwaway step, on a copy, puts
    it with the compile time instead of the first chunk's steps."""
    one = jax.device_put(np.int32(1), args[2]["total"].sharding)
    jax.block_until_ready(
        program(jax.tree.map(jnp.copy, args[0]), args[1], {**args[2], "total": one})
    )


def _place(args, mesh: Mesh | None):
    """Everything replicated over the mesh (the objective shards its batches)."""
    if mesh is None:
        return args
    sharding = parallel.replicated(mesh)

    def put(x):  # a typed PRNG key cannot go to other processes' devices: its data can
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, args)


# ---- the driver: Python between chunks ----------------------------------------------------
class Progress:
    """A tqdm progress bar on stderr (elapsed time, ETA, steps/s), which says "compiling"
    while the first program compiles; on by default when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool | None):
        from tqdm.auto import tqdm

        enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.bar = tqdm(
            total=total, disable=not enabled, file=sys.stderr, unit="step", dynamic_ncols=True
        )
        self.bar.set_description("compiling")

    def started(self, step: int) -> None:
        self.bar.set_description("training")
        self.bar.update(step - self.bar.n)

    def update(self, step: int, **values: float | None) -> None:
        shown = {k: f"{v:.4f}" for k, v in values.items() if v is not None and np.isfinite(v)}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def last_finite(a: np.ndarray) -> float:
    """The last finite entry of ``a`` (NaN when there is none)."""
    f = a[np.isfinite(a)]
    return float(f[-1]) if f.size else float("nan")


def data_fingerprint(*arrays: np.ndarray | None) -> str:
    """SHA-256 of the arrays' bytes (``None`` entries skipped): a resume must see the same."""
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class _Checkpoints:
    """The run's training checkpoints: open, resume from the latest, save, close."""

    def __init__(self, spec: Checkpointing | None, num_outputs: int):
        self.spec, self.num_outputs, self.ckpt = spec, num_outputs, None
        if spec is not None:
            from nflax.checkpoint import TrainingCheckpoints

            self.ckpt = TrainingCheckpoints(spec.directory, spec.keep)

    def resume(self, carry: dict) -> tuple[dict, list[list[np.ndarray]]]:
        """The latest checkpoint's loop state and outputs, or ``carry`` and none."""
        outputs: list[list[np.ndarray]] = [[] for _ in range(self.num_outputs)]
        if self.ckpt is None or self.ckpt.latest_step() is None:
            return carry, outputs
        directory = self.ckpt.directory
        who = self.spec.who
        if not self.spec.resume:
            raise ValueError(
                f"{who}: {directory} already holds training checkpoints; pass resume=True to "
                f"continue that run, or choose an empty checkpoint_dir"
            )
        if self.ckpt.record().get("fingerprint") != self.spec.fingerprint:
            raise ValueError(
                f"{who}: the checkpoints in {directory} come from a run with other data, key, "
                f"val_fraction, batch size or settings; cannot resume"
            )
        leaves, treedef = jax.tree.flatten(carry)
        saved, record = self.ckpt.restore(leaves)
        for out, values in zip(outputs, record["outputs"], strict=True):
            out.append(np.asarray(values, np.float32))
        return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in saved]), outputs

    def save(self, carry: dict, outputs: list[list[np.ndarray]]) -> None:
        if self.ckpt is None:
            return
        step = int(carry["step"])
        record = {
            "step": step,
            "outputs": [np.concatenate(o)[:step].tolist() if o else [] for o in outputs],
            "fingerprint": self.spec.fingerprint,
        }
        self.ckpt.save(step, jax.tree.leaves(carry), record)

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


def _drive(compiled, args, settings: Settings, checkpoints: _Checkpoints, outputs, bar, report):
    """Run chunks until the budget, an early stop or the callback; returns the final carry,
    the stop reason and the wall time."""
    carry, rest_args = args[0], args[1:]
    start, stop_reason = int(carry["step"]), "steps"
    bar.started(start)
    t0 = time.perf_counter()
    while True:
        carry, chunk_outputs = compiled(carry, *rest_args)
        step, status = int(carry["step"]), int(carry["status"])
        for out, values in zip(outputs, chunk_outputs, strict=True):
            out.append(np.asarray(values))
        elapsed = time.perf_counter() - t0
        rate = (step - start) / elapsed if elapsed > 0 else float("nan")
        metrics = report([last_finite(o[-1]) for o in outputs])
        bar.update(step, **{k: v for k, v in metrics.items() if k in ("loss", "val_loss")})
        checkpoints.save(carry, outputs)
        if status != RUNNING:
            stop_reason = _REASONS[status]
            break
        if step >= settings.steps:
            break
        if report.callback is not None and report.callback(
            step, {**metrics, "steps_per_second": rate}
        ):
            stop_reason = "callback"
            break
    jax.block_until_ready(carry)
    return carry, stop_reason, start, time.perf_counter() - t0


@dataclass(frozen=True)
class Report:
    """How a run describes itself between chunks: ``describe(last finite outputs) -> dict``
    (shown on the progress bar and passed to ``callback(step, metrics)``; returning ``True``
    from the callback stops the run)."""

    describe: Callable[[list[float]], dict]
    callback: Callable[[int, dict], bool | None] | None = None

    def __call__(self, last: list[float]) -> dict:
        return self.describe(last)


def train(
    flow: nnx.Module,
    model: Model,
    objective: Objective,
    tx: optax.GradientTransformation,
    data,
    settings: Settings,
    *,
    report: Report,
    progress: bool | None = None,
    checkpointing: Checkpointing | None = None,
) -> Run:
    """Train ``flow`` (split as ``model``) on ``objective`` with ``tx``; ``data`` (a pytree of
    arrays) is an argument of the compiled program, not a constant baked into it.

    The flow ends with the best parameters when ``settings.restore_best`` and a best step
    exists, else with the average (``settings.ema``) or the last parameters; and in evaluation
    mode.
    """
    num_outputs = 2 + objective.num_diagnostics
    if checkpointing is not None:  # best parameters are tracked only with restore_best
        fingerprint = {**checkpointing.fingerprint, "restore_best": settings.restore_best}
        checkpointing = replace(checkpointing, fingerprint=fingerprint)
    bar = Progress(settings.steps, progress)
    checkpoints = None
    try:
        carry = _initial_carry(model, objective, tx, settings)
        args = _place((carry, data, _hyper(settings)), settings.mesh)
        compiled, compile_seconds, how = _program(objective, tx, _static(objective, settings), args)
        if how != "reused":
            t0 = time.perf_counter()
            _warm_up(compiled, args)
            compile_seconds += time.perf_counter() - t0
        # donation must not consume the flow's own arrays
        args = (jax.tree.map(jnp.copy, args[0]), *args[1:])
        checkpoints = _Checkpoints(checkpointing, num_outputs)
        carry, outputs = checkpoints.resume(args[0])
        carry, stop_reason, start, seconds = _drive(
            compiled, (carry, *args[1:]), settings, checkpoints, outputs, bar, report
        )
    finally:
        bar.close()
        if checkpoints is not None:
            checkpoints.close()
    timing = (compile_seconds, how, seconds)
    return _finish(flow, carry, settings, outputs, stop_reason, start, timing)


def _finish(flow, carry, settings, outputs, stop_reason, start, timing) -> Run:
    """Leave the flow with the parameters the run chose; the run's record."""
    steps_run = int(carry["step"])
    best_step = int(carry["best_step"])
    restored = bool(settings.restore_best and best_step >= 0)
    if restored:
        nnx.update(flow, carry["best_params"], carry["best_rest"])
    elif settings.ema is not None and steps_run > 0:
        average = optax.tree_utils.tree_bias_correction(carry["avg"], settings.ema, steps_run)
        nnx.update(flow, average, carry["rest"])
    else:
        nnx.update(flow, carry["params"], carry["rest"])
    flow.eval()
    return Run(
        outputs=[np.concatenate(o)[:steps_run] for o in outputs],
        steps_run=steps_run,
        start_step=start,
        stop_reason=stop_reason,
        best_step=best_step if best_step >= 0 else None,
        best_metric=float(carry["best_metric"]) if best_step >= 0 else None,
        restored_best=restored,
        compile_seconds=timing[0],
        program=timing[1],
        train_seconds=timing[2],
    )
