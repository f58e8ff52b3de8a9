"""Normalization layers: ActNorm (data-dependent initialisation) and BatchNorm (batch statistics).

Both normalise per *feature*: the last axis of the event (the coordinate of a vector, the
channel of an image); statistics are taken over every other axis (batch and, for images, the
spatial positions). With ``n`` positions per event (``n = 1`` for vectors,
``H·W`` for images of shape ``(H, W, C)``) a per-feature log-scale ``s_c`` contributes
``n·s_c`` to the log-determinant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors, nnx

from nflax.bijections.base import Bijection
from nflax.variables import DataInit

Array = jax.Array


def _event_shape(name: str, event_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (int(event_shape),) if isinstance(event_shape, int) else tuple(map(int, event_shape))
    if not shape or any(d < 1 for d in shape):
        raise ValueError(
            f"{name}: event_shape must be a positive size or a non-empty tuple of them, "
            f"received {event_shape!r}"
        )
    return shape


def _moments(x: Array) -> tuple[Array, Array]:
    """Per-feature (last axis) mean and biased variance over all other axes."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return mean, var


def _is_concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


class ActNorm(Bijection):
    r"""Activation normalization (Kingma & Dhariwal 2018) with data-dependent initialisation.

    Per feature ``c`` (last event axis), with location ``μ_c = μ⁰_c + loc_c`` and log-scale
    ``σ̃_c = σ̃⁰_c + log_scale_c``:

    forward (data → latent):   ``z = (x − μ) ⊙ exp(−σ̃)``,  ``log|det J| = −n·Σ_c σ̃_c``
    inverse (latent → data):   ``x = μ + z ⊙ exp(σ̃)``,     ``log|det J⁻¹| = n·Σ_c σ̃_c``

    (``n`` = positions per feature in one event, 1 for vectors.)

    ``loc`` and ``log_scale`` are the trainable :class:`nnx.Param` s (start at 0).
    ``μ⁰``, ``σ̃⁰`` and the flag ``initialized`` are :class:`DataInit` variables. On the first
    **forward** call, they are set from that batch so that the output has zero mean and unit
    variance per feature: ``μ = mean(x)``, ``σ̃ = log(std(x) + eps)`` (statistics over all
    axes but the last). Later calls leave them alone. An inverse call before initialisation
    uses the current values (the identity map for a fresh layer).

    The flag is part of the model's state, so it is saved and restored with a checkpoint
    (unlike nflows/normflows, where a reloaded model re-initialises). Initialisation works

    * eagerly: ``layer.forward(x)`` on a fresh layer writes the variables;
    * traced: under ``jax.jit`` with the state passed through ``nnx.split``/``nnx.merge`` (or
      ``nnx.jit``), the update is a ``jnp.where`` on the flag and the new state is visible
      through ``nnx.state`` after the call; inside a :class:`Stack` the new state is written
      back to every layer.

    It does not work on a layer held outside a transform and called on traced inputs
    (``jax.jit(lambda x: layer.forward(x))`` on a fresh layer): that raises a ``ValueError``.
    Run one eager forward pass first (:func:`nflax.training.fit` does, see
    ``needs_data_init``).
    """

    def __init__(self, event_shape: int | Sequence[int], *, eps: float = 1e-6):
        self.event_shape = _event_shape("ActNorm", event_shape)
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"ActNorm: eps must be positive and finite, received {eps}")
        features = self.event_shape[-1]
        self.eps = float(eps)
        self.loc = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.log_scale = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.init_loc = DataInit(jnp.zeros((features,), jnp.float32))
        self.init_log_scale = DataInit(jnp.zeros((features,), jnp.float32))
        self.initialized = DataInit(jnp.asarray(False))

    @property
    def needs_data_init(self) -> bool:
        """True while the data-dependent initialisation has not run (read eagerly)."""
        flag = self.initialized[...]
        return _is_concrete(flag) and not bool(np.all(np.asarray(flag)))

    def _positions(self) -> int:
        return math.prod(self.event_shape[:-1])

    def _loc_log_scale(self) -> tuple[Array, Array]:
        return (
            self.init_loc[...] + self.loc[...],
            self.init_log_scale[...] + self.log_scale[...],
        )

    def _data_init(self, x: Array) -> None:
        flag = self.initialized[...]
        mean, var = _moments(jax.lax.stop_gradient(x))
        target_log_scale = jnp.log(jnp.sqrt(var) + self.eps)
        new_loc = jnp.where(flag, self.init_loc[...], mean - self.loc[...])
        new_log_scale = jnp.where(
            flag, self.init_log_scale[...], target_log_scale - self.log_scale[...]
        )
        try:
            self.init_loc[...] = jax.lax.stop_gradient(new_loc)
            self.init_log_scale[...] = jax.lax.stop_gradient(new_log_scale)
            self.initialized[...] = jnp.asarray(True)
        except errors.TraceContextError:
            raise ValueError(
                "ActNorm.forward: the data-dependent initialisation cannot write to a layer "
                "held outside the current JAX transform. Call forward once eagerly on a "
                "batch, or pass the state through the transform (nnx.split/nnx.merge, nnx.jit)"
            ) from None

    def _forward(self, x, context):
        flag = self.initialized[...]
        if not (_is_concrete(flag) and bool(flag)):
            self._data_init(x.reshape(-1, self.event_shape[-1]))
        loc, log_scale = self._loc_log_scale()
        z = (x - loc) * jnp.exp(-log_scale)
        ld = -self._positions() * jnp.sum(log_scale)
        return z, jnp.broadcast_to(ld, x.shape[: x.ndim - len(self.event_shape)])

    def _inverse(self, z, context):
        loc, log_scale = self._loc_log_scale()
        x = loc + z * jnp.exp(log_scale)
        ld = self._positions() * jnp.sum(log_scale)
        return x, jnp.broadcast_to(ld, z.shape[: z.ndim - len(self.event_shape)])


class BatchNorm(Bijection):
    r"""Batch normalization as a bijection (Dinh et al. 2017, RealNVP, appendix E).

    Per feature ``c`` (last event axis), with statistics ``(m, v)``, learnable log-scale
    ``γ̃`` and shift ``β`` (both start at 0):

    forward (data → latent):   ``z = (x − m) / √(v + eps) ⊙ exp(γ̃) + β``,
                               ``log|det J| = n·Σ_c [γ̃_c − ½·log(v_c + eps)]``
    inverse (latent → data):   ``x = m + (z − β) ⊙ exp(−γ̃) ⊙ √(v + eps)``,
                               ``log|det J⁻¹| = −n·Σ_c [γ̃_c − ½·log(v_c + eps)]``

    (``n`` = positions per feature in one event, 1 for vectors.) Which statistics:

    * **training mode** (``use_running_average=False``, the default, like ``nnx.BatchNorm``):
      the forward pass uses the batch mean and (biased) variance over all axes but the last,
      and updates the running averages ``r ← momentum·r + (1 − momentum)·batch`` (stored as
      :class:`nnx.BatchStat`, not differentiated). Gradients flow through the batch statistics
      as in ordinary batch norm. The log-determinant is the per-example one of the paper: it
      treats the batch statistics as constants (the exact Jacobian of the whole-batch map
      differs by terms of order 1/batch size).
    * **evaluation mode** (``use_running_average=True``): the forward pass uses the running
      averages; the layer is then a fixed elementwise affine map and the log-determinant is
      exact.
    * the **inverse** (sampling) always uses the running averages, in both modes. So in
      training mode ``inverse(forward(x))`` is not ``x``; in evaluation mode it is.

    Switch modes with NNX's ``module.train()`` / ``module.eval()`` on the layer or any module
    containing it (they set ``use_running_average`` to False / True on every sub-module), or
    pass ``use_running_average=`` at construction. Evaluate log-densities in evaluation mode
    (with training-mode statistics a point's density depends on the rest of its batch).
    """

    def __init__(
        self,
        event_shape: int | Sequence[int],
        *,
        momentum: float = 0.9,
        eps: float = 1e-5,
        use_running_average: bool = False,
    ):
        self.event_shape = _event_shape("BatchNorm", event_shape)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1), received {momentum}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"BatchNorm: eps must be positive and finite, received {eps}")
        features = self.event_shape[-1]
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.use_running_average = bool(use_running_average)
        self.log_gamma = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

    def _positions(self) -> int:
        return math.prod(self.event_shape[:-1])

    def _log_det(self, var: Array, batch_shape) -> Array:
        ld = self._positions() * jnp.sum(self.log_gamma[...] - 0.5 * jnp.log(var + self.eps))
        return jnp.broadcast_to(ld, batch_shape)

    def _forward(self, x, context):
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            mean, var = _moments(x.reshape(-1, self.event_shape[-1]))
            r = self.momentum
            self.running_mean[...] = r * self.running_mean[...] + (1 - r) * jax.lax.stop_gradient(
                mean
            )
            self.running_var[...] = r * self.running_var[...] + (1 - r) * jax.lax.stop_gradient(var)
        z = (x - mean) * jax.lax.rsqrt(var + self.eps) * jnp.exp(self.log_gamma[...])
        z = z + self.beta[...]
        return z, self._log_det(var, x.shape[: x.ndim - len(self.event_shape)])

    def _inverse(self, z, context):
        mean, var = self.running_mean[...], self.running_var[...]
        x = (z - self.beta[...]) * jnp.exp(-self.log_gamma[...]) * jnp.sqrt(var + self.eps)
        x = x + mean
        return x, -self._log_det(var, z.shape[: z.ndim - len(self.event_shape)])
