"""Optimizer parts whose numbers live in the optimizer state, not in the compiled program.

``nflax train``'s and ``fit_vi``'s default optimizers are ``optax.adamw``/``optax.adam`` on a
warm-up + cosine schedule, step for step, assembled from parts whose ``update`` captures no
learning rate, step count or weight decay: :func:`with_numbers` writes those into the state at
``init``. A compiled training program calls only ``update``, so one program serves every
value of them, in this process (the engine keys programs by ``update``) and in the next
(JAX's persistent cache keys them by their compiled code, in which the numbers no longer
appear).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class ScheduleState(NamedTuple):
    """The state of :func:`scale_by_warmup_cosine`: the step count and the schedule's numbers
    (arrays, so that programs do not depend on their values)."""

    count: Array
    peak: Array
    warmup: Array
    total: Array


def warmup_cosine_rate(t, peak, warmup, total) -> Array:
    """``optax.warmup_cosine_decay_schedule(0, peak, warmup, total)`` at step ``t``, in the
    same operations, for traced ``peak``, ``warmup`` and ``total``: a linear rise from 0 to
    ``peak`` over ``warmup`` steps (none when ``warmup`` is 0), then a cosine decay to 0 at
    ``total``.

    >>> [round(float(warmup_cosine_rate(t, 2e-3, 200, 4000)), 6) for t in (0, 100, 2100, 4000)]
    [0.0, 0.001, 0.001, 0.0]
    """
    t = jnp.asarray(t)
    w = jnp.maximum(warmup, 1)  # warmup 0: the rise is never selected below
    frac = 1 - jnp.clip(t, 0, w) / w
    rise = (0.0 - peak) * frac + peak
    span = jnp.maximum(total - warmup, 1).astype(jnp.float32)
    count = jnp.minimum(t - warmup, span)
    fall = peak * (0.5 * (1 + jnp.cos(jnp.pi * count / span)))
    return jnp.where(t < warmup, rise, fall)


def scale_by_warmup_cosine(
    peak: float = 0.0, warmup: int = 0, total: int = 1, *, constant: bool = False
) -> optax.GradientTransformation:
    """Scale the updates by ``−lr(t)``: :func:`warmup_cosine_rate` (``peak`` throughout with
    ``constant``), its numbers read from the optimizer state (:class:`ScheduleState`), so the
    compiled update does not depend on them; :func:`with_numbers` sets them.

    >>> tx = scale_by_warmup_cosine(0.5, constant=True)
    >>> float(tx.update(jnp.ones(1), tx.init(jnp.ones(1)))[0][0])
    -0.5
    """

    def init(params):
        del params
        numbers = (jnp.float32(peak), jnp.int32(warmup), jnp.int32(total))
        return ScheduleState(jnp.zeros([], jnp.int32), *numbers)

    def update(updates, state, params=None):
        del params
        s = state
        lr = s.peak if constant else warmup_cosine_rate(s.count, s.peak, s.warmup, s.total)
        updates = jax.tree.map(lambda g: jnp.asarray(-lr, g.dtype) * g, updates)
        return updates, s._replace(count=optax.safe_increment(s.count))

    return optax.GradientTransformation(init, update)


_NUMBERED = (ScheduleState, optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def with_numbers(tx: optax.GradientTransformation, **numbers) -> optax.GradientTransformation:
    """``tx`` whose ``init`` writes ``numbers`` into its state: the fields of that name of each
    :class:`ScheduleState`, and the hyperparameters of that name of each
    ``optax.inject_hyperparams`` state. Built from parts that hold placeholders, ``tx.update``
    (all a compiled program calls) then holds no number, so one program serves every value.

    >>> tx = with_numbers(scale_by_warmup_cosine(constant=True), peak=0.25)
    >>> float(tx.update(jnp.ones(1), tx.init(jnp.ones(1)))[0][0])
    -0.25
    """

    def put(node):
        if isinstance(node, ScheduleState):
            given = {k: v for k, v in numbers.items() if k in node._fields}
            return node._replace(
                **{k: jnp.asarray(v, getattr(node, k).dtype) for k, v in given.items()}
            )
        if isinstance(node, _NUMBERED):
            hyper = dict(node.hyperparams)
            for k in hyper.keys() & numbers.keys():
                hyper[k] = jnp.asarray(numbers[k], hyper[k].dtype)
            return node._replace(hyperparams=hyper)
        return node

    def init(params):
        return jax.tree.map(put, tx.init(params), is_leaf=lambda n: isinstance(n, _NUMBERED))

    return optax.GradientTransformation(init, tx.update)
