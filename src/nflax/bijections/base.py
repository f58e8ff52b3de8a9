"""The bijection contract, composition (`Chain`), direction swap (`Invert`) and `Stack`.

Direction convention (see DESIGN.md): ``forward`` is the *normalizing* direction, data ``x`` →
latent ``z``; ``inverse`` is the *generating* direction, latent ``z`` → data ``x``. Both return
the transformed array and the log-determinant of the Jacobian of the map they apply, so
``log p(x) = log p_base(forward(x)[0]) + forward(x)[1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import errors, nnx

from nflax.variables import Buffer, in_training_mode, may_write_data_init

Array = jax.Array


class Bijection(nnx.Module):
    """An invertible map with a tractable log-determinant.

    Subclasses set ``self.event_shape`` (and ``self.context_dim`` when they are conditional) in
    ``__init__`` and implement ``_forward`` and ``_inverse``. The public :meth:`forward` and
    :meth:`inverse` check shapes once, here, and then call them.

    * ``x.shape == (*batch, *event_shape)``; the returned log-determinant has shape ``batch``.
    * ``latent_shape`` is the event shape of the output of :meth:`forward` (the input of
      :meth:`inverse`). It is ``event_shape`` unless a shape-changing layer (``Squeeze``, the
      multi-scale composite) sets ``self._latent_shape``; the number of elements is the same.
    * ``context`` (conditional layers only) has shape ``(*batch, context_dim)`` or broadcasts
      to it. Unconditional layers ignore it, so a conditional flow can pass it to every layer.
    """

    event_shape: tuple[int, ...] = ()
    context_dim: int | None = None
    _latent_shape: tuple[int, ...] | None = None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Event shape of the latent side (forward output, inverse input)."""
        latent = self._latent_shape
        return tuple(self.event_shape) if latent is None else tuple(latent)

    def _shape_on(self, direction: str) -> tuple[int, ...]:
        """The event shape the input of ``direction`` has: data side or latent side."""
        return self.latent_shape if direction.startswith("inverse") else tuple(self.event_shape)

    # -- the contract ---------------------------------------------------------------------
    def forward(self, x: Array, context: Array | None = None) -> tuple[Array, Array]:
        """Normalizing direction, data → latent. Returns ``(z, log|det ∂z/∂x|)``."""
        context = self._check(x, context, "forward")
        return self._forward(x, context)

    def inverse(self, z: Array, context: Array | None = None) -> tuple[Array, Array]:
        """Generating direction, latent → data. Returns ``(x, log|det ∂x/∂z|)``."""
        context = self._check(z, context, "inverse")
        return self._inverse(z, context)

    def _forward(self, x: Array, context: Array | None) -> tuple[Array, Array]:
        raise NotImplementedError

    def _inverse(self, z: Array, context: Array | None) -> tuple[Array, Array]:
        raise NotImplementedError

    # -- trajectories ----------------------------------------------------------------------
    def trajectory(self, x: Array, context: Array | None = None) -> list[Array]:
        """The batch after each elementary layer, data → latent, input first."""
        return [x, self.forward(x, context)[0]]

    def inverse_trajectory(self, z: Array, context: Array | None = None) -> list[Array]:
        """The batch after each elementary layer, latent → data, input (noise) first."""
        return [z, self.inverse(z, context)[0]]

    def layer_names(self) -> list[str]:
        """Names of the elementary layers, in forward order (one per trajectory step)."""
        return [type(self).__name__]

    # -- checks ----------------------------------------------------------------------------
    def _check(self, x: Array, context: Array | None, direction: str) -> Array | None:
        name = type(self).__name__
        event = self._shape_on(direction)
        k = len(event)
        shape = tuple(jnp.shape(x))
        if len(shape) < k or shape[len(shape) - k :] != event:
            dims = ", ".join(map(str, event))
            raise ValueError(
                f"{name}.{direction}: expected input of shape (*batch, {dims})"
                f" (event shape {event}), received shape {shape}"
            )
        if self.context_dim is None:
            return context
        if context is None:
            raise ValueError(
                f"{name}.{direction}: this layer is conditional and needs a context of shape "
                f"(*batch, {self.context_dim}); received none"
            )
        cshape = tuple(jnp.shape(context))
        batch = shape[: len(shape) - k]
        if len(cshape) < 1 or cshape[-1] != self.context_dim:
            raise ValueError(
                f"{name}.{direction}: expected context of shape (*batch, {self.context_dim}), "
                f"received shape {cshape}"
            )
        try:
            target = jnp.broadcast_shapes(cshape[:-1], batch)
        except ValueError:
            target = None
        if target != batch:
            raise ValueError(
                f"{name}.{direction}: context batch shape {cshape[:-1]} does not broadcast to the "
                f"input batch shape {batch}"
            )
        return jnp.broadcast_to(context, (*batch, self.context_dim))


def sum_event(a: Array, event_ndim: int) -> Array:
    """Sum the trailing ``event_ndim`` axes of ``a`` (the per-element log-dets of an event)."""
    return a.sum(axis=tuple(range(a.ndim - event_ndim, a.ndim))) if event_ndim else a


def _common_context_dim(layers: Sequence[Bijection]) -> int | None:
    dims = {b.context_dim for b in layers if b.context_dim is not None}
    if len(dims) > 1:
        raise ValueError(f"Chain: layers disagree on context_dim: {sorted(dims)}")
    return dims.pop() if dims else None


class Chain(Bijection):
    """Composition ``f = f_n ∘ … ∘ f_1`` (``layers[0]`` is applied first in the forward pass).

    forward:  ``z = f_n(…f_1(x))``,  ``log|det J_f(x)| = Σ_i log|det J_{f_i}(h_{i-1})|``
    inverse:  ``x = f_1⁻¹(…f_n⁻¹(z))``, log-det the sum of the inverses' log-dets.
    """

    def __init__(self, layers: Sequence[Bijection]):
        layers = list(layers)
        if not layers:
            raise ValueError("Chain: needs at least one layer, received an empty list")
        for i, b in enumerate(layers):
            if not isinstance(b, Bijection):
                raise ValueError(f"Chain: layer {i} is a {type(b).__name__}, not a Bijection")
            if i and tuple(b.event_shape) != layers[i - 1].latent_shape:
                raise ValueError(
                    f"Chain: layer {i} ({type(b).__name__}) has event shape "
                    f"{tuple(b.event_shape)}, expected {layers[i - 1].latent_shape}, the latent "
                    f"shape of layer {i - 1} ({type(layers[i - 1]).__name__})"
                )
        self.layers = nnx.List(layers)
        self.event_shape = tuple(layers[0].event_shape)
        if layers[-1].latent_shape != self.event_shape:
            self._latent_shape = layers[-1].latent_shape
        self.context_dim = _common_context_dim(layers)

    def _forward(self, x, context):
        total = jnp.zeros(x.shape[: x.ndim - len(self.event_shape)], x.dtype)
        for b in self.layers:
            x, ld = b.forward(x, context)
            total = total + ld
        return x, total

    def _inverse(self, z, context):
        total = jnp.zeros(z.shape[: z.ndim - len(self.latent_shape)], z.dtype)
        for b in reversed(self.layers):
            z, ld = b.inverse(z, context)
            total = total + ld
        return z, total

    def trajectory(self, x, context=None):
        self._check(x, context, "trajectory")
        out = [x]
        for b in self.layers:
            out.extend(b.trajectory(out[-1], context)[1:])
        return out

    def inverse_trajectory(self, z, context=None):
        self._check(z, context, "inverse_trajectory")
        out = [z]
        for b in reversed(self.layers):
            out.extend(b.inverse_trajectory(out[-1], context)[1:])
        return out

    def layer_names(self):
        return [n for b in self.layers for n in b.layer_names()]


class Invert(Bijection):
    """Swap the directions of a bijection: ``Invert(b).forward = b.inverse`` and vice versa.

    forward: ``z = b⁻¹(x)`` with log-det ``log|det J_{b⁻¹}(x)|``; inverse: ``x = b(z)``.
    This turns a MAF (fast density) into an IAF (fast sampling). The event and latent shapes
    swap: ``Invert(b).event_shape == b.latent_shape``.
    """

    def __init__(self, bijection: Bijection):
        if not isinstance(bijection, Bijection):
            raise ValueError(f"Invert: expected a Bijection, received {type(bijection).__name__}")
        self.bijection = bijection
        self.event_shape = bijection.latent_shape
        if tuple(bijection.event_shape) != self.event_shape:
            self._latent_shape = tuple(bijection.event_shape)
        self.context_dim = bijection.context_dim

    def _forward(self, x, context):
        return self.bijection.inverse(x, context)

    def _inverse(self, z, context):
        return self.bijection.forward(z, context)

    def trajectory(self, x, context=None):
        return self.bijection.inverse_trajectory(x, context)

    def inverse_trajectory(self, z, context=None):
        return self.bijection.trajectory(z, context)

    def layer_names(self):
        return [f"Invert({n})" for n in reversed(self.bijection.layer_names())]


class Stack(Bijection):
    """``n`` structurally identical layers, parameters stacked, run with ``jax.lax.scan``.

    Mathematically the same as ``Chain(layers)``. The layers may differ in their array values
    (weights, masks stored as :class:`Buffer`), not in structure, and must keep the shape of
    their input (``latent_shape == event_shape``: a scan carries one shape). State that a
    layer mutates during a call (running statistics, data-dependent initialisation) is
    carried out of the scan and written back to each layer.

    ``unroll`` chooses how the scan over layers is compiled:

    * ``"auto"`` (default): unrolled when ``n ≤ Stack.AUTO_UNROLL_LAYERS`` (8), else scanned;
    * ``True``: unrolled into straight-line code (every layer compiled on its own): faster
      steps, compile time that grows with depth;
    * ``False`` or ``1``: scanned (the layer compiled once): compile time flat in depth;
    * an int ``k``: ``k`` layers per scan iteration.

    The rule comes from ``benchmarks/train_speed.py``'s depth sweep (``fit`` at batch 128,
    64-64 conditioners, 2 CPU cores shared with other jobs; compile = CPU seconds of ``fit``'s
    training program, AOT). Unrolled steps against scanned ones, and compile time unrolled
    (scanned: the same at every depth, realnvp ~1.8 s, nsf ~3 s):

    * realnvp, 2 / 4 / 8 / 16 / 32 layers: 1.54 / 1.31 / 1.50 / 1.38 / 1.72×; 1.4 / 1.9 / 2.6
      / 3.4 / 5.6 s;
    * nsf, 2 / 4 / 5 / 8 / 16 layers: 1.38 / 1.27 / 1.32 / 0.9–1.34 / 1.21×; 2.6 / 3.8 / 4.5 /
      6.3 / 12.2 s (nsf at 32: 78 s wall);
    * maf, 5 / 8 / 16: 1.61 / 1.56 / 1.56×, at most +1.4 s; planar, 4 / 8 / 16 / 32: 1.31 /
      1.41 / 1.09 / 0.87×, +0.7 s at 8, +1.7 s at 16.

    Up to 8 layers unrolling costs at most ~3.4 s of compile (nsf), under 1 s for the others,
    and the steps gain 1.3–1.6× (nsf at 8 layers: from none to 1.34× between runs under
    load). Beyond 8 compile grows fastest and the gain shrinks for the heavier layers (planar
    loses at 32). Every constructor's default depth is ≤ 8 except planar's 16, which stays
    scanned. Partial unrolling (2, 4) was slower than none for realnvp. The choice changes
    the compiled program only, not the parameters: a saved flow loads with any ``unroll``.
    """

    #: ``unroll="auto"`` unrolls stacks of at most this many layers.
    AUTO_UNROLL_LAYERS = 8

    def __init__(self, layers: Sequence[Bijection], *, unroll: int | bool | str = "auto"):
        layers = list(layers)
        if not layers:
            raise ValueError("Stack: needs at least one layer, received an empty list")
        if layers[0].latent_shape != tuple(layers[0].event_shape):
            raise ValueError(
                f"Stack: layers must keep the shape of their input (a scan carries one shape); "
                f"layer 0 ({type(layers[0]).__name__}) maps event shape "
                f"{tuple(layers[0].event_shape)} to latent shape {layers[0].latent_shape}; "
                "use Chain for shape-changing layers"
            )
        graphdef, first = nnx.split(layers[0])
        states = [first]
        for i, b in enumerate(layers[1:], start=1):
            g, s = nnx.split(b)
            if g != graphdef:
                raise ValueError(
                    f"Stack: layer {i} ({type(b).__name__}) differs in structure from layer 0 "
                    f"({type(layers[0]).__name__}); use Chain for heterogeneous layers"
                )
            states.append(s)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
        self.layer = nnx.merge(graphdef, stacked)
        self.num_layers = len(layers)
        if isinstance(unroll, str):
            if unroll != "auto":
                raise ValueError(
                    f"Stack: unroll must be 'auto', a bool or an int ≥ 1, received {unroll!r}"
                )
            unroll = len(layers) <= self.AUTO_UNROLL_LAYERS
        if isinstance(unroll, bool):
            unroll = len(layers) if unroll else 1
        if int(unroll) < 1:
            raise ValueError(
                f"Stack: unroll must be 'auto', a bool or an int ≥ 1, received {unroll!r}"
            )
        self.unroll = int(unroll)
        self.event_shape = tuple(layers[0].event_shape)
        self.context_dim = layers[0].context_dim
        self._names = layers[0].layer_names()

    def _scan(self, h, context, inverse: bool, want_traj: bool = False):
        graphdef, state = nnx.split(self.layer)
        y, (ld, traj, new_state) = _scan_layers(
            graphdef, state, h, context, inverse=inverse, unroll=self.unroll, want_traj=want_traj
        )
        if jax.tree.leaves(new_state) and self._may_change_state():
            self._write_back(new_state)
        return y, (ld, traj)

    def _write_back(self, new_state) -> None:
        """The layers' new running statistics or data-dependent init, into ``self.layer``."""
        try:
            nnx.update(self.layer, new_state)
        except errors.TraceContextError:
            raise ValueError(
                "Stack: its layers' new state (data-dependent initialisation or running "
                "statistics) cannot be written to a Stack held outside the current JAX "
                "transform. Call forward once eagerly on a batch, or pass the state through "
                "the transform (nnx.split/nnx.merge, nnx.jit)"
            ) from None

    def _may_change_state(self) -> bool:
        """Only layers in training mode or that may write their data-dependent init (awaiting
        it, or traced under an NNX transform) write state back, so that an initialised Stack
        in evaluation mode can be called under jax.jit/jacobian from outside."""
        return in_training_mode(self.layer) or may_write_data_init(self.layer)

    def _forward(self, x, context):
        y, (ld, _) = self._scan(x, context, inverse=False)
        return y, ld.sum(0)

    def _inverse(self, z, context):
        y, (ld, _) = self._scan(z, context, inverse=True)
        return y, ld.sum(0)

    def _trajectories(self, h, context, inverse):
        _, (_, traj) = self._scan(h, context, inverse, want_traj=True)
        order = range(self.num_layers - 1, -1, -1) if inverse else range(self.num_layers)
        return [h] + [t[i] for i in order for t in traj]

    def trajectory(self, x, context=None):
        self._check(x, context, "trajectory")
        return self._trajectories(x, context, inverse=False)

    def inverse_trajectory(self, z, context=None):
        self._check(z, context, "inverse_trajectory")
        return self._trajectories(z, context, inverse=True)

    def layer_names(self):
        return self._names * self.num_layers


@partial(jax.jit, static_argnames=("graphdef", "inverse", "unroll", "want_traj"))
def _scan_layers(graphdef, state, h, context, *, inverse, unroll, want_traj):
    """The layers of a :class:`Stack` (``state``, stacked on axis 0) applied in turn by
    ``lax.scan``; returns the output and, per layer, the log-det, the trajectory and the
    layer's mutable state after the call.

    Compiled once per structure and shape (``jax.jit`` keyed by ``graphdef``): called eagerly,
    a ``lax.scan`` of a fresh closure would compile its body anew on every call (seconds for a
    Glow step); under an outer trace the call is inlined.
    """
    mutable = nnx.Not(nnx.Any(nnx.Param, Buffer))

    def body(h, s):
        layer = nnx.merge(graphdef, s)
        if inverse:
            y, ld = layer.inverse(h, context)
            traj = layer.inverse_trajectory(h, context)[1:] if want_traj else []
        else:
            y, ld = layer.forward(h, context)
            traj = layer.trajectory(h, context)[1:] if want_traj else []
        return y, (ld, traj, nnx.state(layer, mutable))

    return jax.lax.scan(body, h, state, reverse=inverse, unroll=unroll)
