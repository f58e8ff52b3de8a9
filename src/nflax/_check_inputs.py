"""What :mod:`nflax.testing` checks at: the arguments checked, the inputs, far-out points and
contexts drawn, and the bijection made ready (initialised on a copy, never in training)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nflax.bijections.base import Bijection
from nflax.distributions import Flow
from nflax.variables import in_training_mode, needs_data_init

Array = jax.Array
FAR_RAMP_POINTS = 9


def rng(key: Array) -> np.random.Generator:
    """NumPy's generator seeded from ``key``: drawing with jax.random would compile a kernel
    for every shape, which costs more than the draws here."""
    typed = jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key  # a raw uint32 key (PRNGKey) as it is
    return np.random.default_rng(np.asarray(data).ravel().tolist())


def require_bijection(fn: str, bijection) -> Bijection:
    if not isinstance(bijection, Bijection):
        raise ValueError(f"{fn}: expected a Bijection, received {type(bijection).__name__}")
    return bijection


def event_shape(b: Bijection, given: int | Sequence[int] | None) -> tuple[int, ...]:
    """``given`` (an int ``d`` is ``(d,)``), else the bijection's; they must agree."""
    own = tuple(b.event_shape)
    if given is None:
        if not own:
            raise ValueError(
                f"check_bijection: {type(b).__name__} has no event_shape; set "
                "self.event_shape in its __init__ or pass event_shape="
            )
        return own
    shape = (int(given),) if isinstance(given, int) else tuple(int(d) for d in given)
    if not shape or min(shape) < 1:
        raise ValueError(f"check_bijection: event_shape must be positive, received {given!r}")
    if own and own != shape:
        raise ValueError(
            f"check_bijection: event_shape {shape} differs from {type(b).__name__}'s own "
            f"event shape {own}"
        )
    return shape


def latent_shape(b: Bijection, event: tuple[int, ...]) -> tuple[int, ...]:
    """The bijection's latent shape, or ``event`` for one that declares no shapes."""
    return b.latent_shape if tuple(b.event_shape) else event


def tolerances(
    defaults: Mapping[str, tuple[float, float]],
    given: Mapping[str, float | tuple[float, float]] | None,
) -> dict[str, tuple[float, float]]:
    """``defaults`` updated by ``given``: a number sets ``atol`` (``rtol`` kept), a pair both."""
    out = dict(defaults)
    for name, value in (given or {}).items():
        if name not in out:
            raise ValueError(
                f"check_bijection: no tolerance named {name!r}; known: {', '.join(out)}"
            )
        pair = (value, out[name][1]) if isinstance(value, int | float) else tuple(value)
        if len(pair) != 2 or not all(math.isfinite(v) and v >= 0 for v in pair):
            raise ValueError(
                f"check_bijection: tolerance {name!r} must be atol or (atol, rtol), finite "
                f"and ≥ 0, received {value!r}"
            )
        out[name] = (float(pair[0]), float(pair[1]))
    return out


def inputs(
    given: Array | None, key: Array, event: tuple[int, ...], num: int, scale: float
) -> Array:
    """``given`` (checked: ``(n, *event)``), or ``num`` draws of ``scale · N(0, I)``."""
    if given is None:
        if num < 1:
            raise ValueError(f"check_bijection: num_inputs must be ≥ 1, received {num}")
        return jnp.asarray(scale * rng(key).standard_normal((num, *event)), jnp.float32)
    x = jnp.asarray(given, jnp.float32)
    if x.ndim != len(event) + 1 or x.shape[1:] != event or x.shape[0] < 1:
        raise ValueError(
            f"check_bijection: inputs must have shape (n, {', '.join(map(str, event))}), "
            f"received shape {x.shape}"
        )
    return x


def far_points(far: float | Array | None, event: tuple[int, ...]) -> Array:
    """The far-out points: ``t·(1, …, 1)`` for ``t`` from ``−far`` to ``far``, or ``far`` as
    given, or none."""
    if far is None:
        return jnp.zeros((0, *event), jnp.float32)
    if isinstance(far, int | float):
        ramp = np.linspace(-float(far), float(far), FAR_RAMP_POINTS)
        return jnp.asarray(ramp.reshape(-1, *(1,) * len(event)) * np.ones(event), jnp.float32)
    return inputs(far, jax.random.key(0), event, 0, 0.0)


def contexts(
    b: Bijection, context: Array | None, key: Array, n: int, m: int
) -> tuple[Array | None, Array | None]:
    """Context rows for the ``n`` inputs and the ``m`` far-out points (``None`` for an
    unconditional bijection): ``context``'s rows in turn, or ``N(0, I)`` draws."""
    dim = b.context_dim
    if dim is None:
        if context is not None:
            raise ValueError(
                f"check_bijection: {type(b).__name__} is unconditional (no context_dim); "
                "received a context"
            )
        return None, None
    if context is None:
        rows = jnp.asarray(rng(key).standard_normal((n + m, dim)), jnp.float32)
    else:
        c = jnp.asarray(context, jnp.float32)
        if c.ndim not in (1, 2) or c.shape[-1] != dim or c.size == 0:
            raise ValueError(
                f"check_bijection: expected a context of shape ({dim},) or (k, {dim}) for "
                f"{type(b).__name__}, received shape {c.shape}"
            )
        c = c.reshape(-1, dim)
        rows = c[jnp.arange(n + m) % c.shape[0]]
    return rows[:n], rows[n:]


def ready(b: Bijection, x: Array, context: Array | None, perturb: float, key: Array) -> Bijection:
    """``b`` itself, or a copy: with ``perturb · N(0, 1)`` added to every parameter, and
    initialised on ``x`` when it awaits data-dependent initialisation."""
    if in_training_mode(b):
        raise ValueError(
            f"check_bijection: {type(b).__name__} is in training mode (batch statistics make "
            "each output depend on the whole batch); call .eval() on it first"
        )
    if not (perturb > 0 or needs_data_init(b)):
        return b
    copy = nnx.clone(b)
    if perturb > 0:
        _add_noise(copy, perturb, key)
    if needs_data_init(copy):
        copy.forward(x, context)
    return copy


def _add_noise(module: nnx.Module, scale: float, key: Array) -> None:
    """Add ``scale · N(0, 1)`` to every parameter (NumPy noise, see :func:`rng`)."""
    noise = rng(key)
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    noisy = [np.asarray(v) + scale * noise.standard_normal(np.shape(v)) for v in leaves]
    noisy = [jnp.asarray(v, leaf.dtype) for v, leaf in zip(noisy, leaves, strict=True)]
    nnx.update(module, jax.tree.unflatten(treedef, noisy))


def no_gradient_suffixes(paths: Iterable[str | Sequence[str | int]]) -> list[tuple[str, ...]]:
    """Parameter paths, or their last parts, as tuples of strings."""
    out = []
    for p in paths:
        parts = p.split("/") if isinstance(p, str) else [str(q) for q in p]
        if not parts or "" in parts:
            raise ValueError(f"check_bijection: no_gradient entry {p!r} is not a path")
        out.append(tuple(parts))
    return out


def flow_contexts(flow: Flow, context: Array | None, key: Array) -> Array | None:
    """The raw context rows a conditional flow is checked at: ``context`` as rows, or two
    ``N(0, I)`` rows; ``None`` for an unconditional flow."""
    if not flow.is_conditional:
        if context is not None:
            raise ValueError("check_flow: this flow is unconditional; received a context")
        return None
    dim = flow.context_dim
    if context is None:
        if dim is None:
            raise ValueError(
                "check_flow: this flow's embedding does not say its input size (in_features); "
                "pass context="
            )
        return jnp.asarray(rng(key).standard_normal((2, dim)), jnp.float32)
    c = jnp.asarray(context, jnp.float32)
    if c.ndim not in (1, 2) or (dim is not None and c.shape[-1] != dim) or c.size == 0:
        raise ValueError(
            f"check_flow: expected a context of shape ({dim},) or (k, {dim}), received shape "
            f"{c.shape}"
        )
    return c.reshape(-1, c.shape[-1])


def ready_flow(flow: Flow, rows: Array | None, key: Array, num: int = 256) -> Flow:
    """``flow``, or a copy initialised on ``num`` draws of ``2 · N(0, I)`` (context row 0)
    when it awaits data-dependent initialisation; a flow in training mode is refused."""
    if in_training_mode(flow):
        raise ValueError(
            "check_flow: the flow is in training mode (batch statistics make each density "
            "depend on the whole batch); call flow.eval() first"
        )
    if not needs_data_init(flow):
        return flow
    copy = nnx.clone(flow)
    x = jnp.asarray(2.0 * rng(key).standard_normal((num, *flow.event_shape)), jnp.float32)
    copy.log_prob(x, None if rows is None else jnp.broadcast_to(rows[0], (num, rows.shape[-1])))
    return copy
