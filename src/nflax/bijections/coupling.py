"""Coupling layers: one part of the input, picked by a binary mask, conditions the rest.

Every layer here takes any 0/1 ``mask`` ``m`` (1 = passed through unchanged and fed to the
conditioner, 0 = transformed; at least one 0) and a ``conditioner`` network whose input is
``m ⊙ x``, or ``concat(m ⊙ x, context)`` when ``context_dim`` is set. :class:`Coupling` takes
any elementwise :class:`~nflax.bijections.transformers.Transformer`; :class:`AffineCoupling`,
:class:`AdditiveCoupling` and :class:`SplineCoupling` are it with the affine, additive and
spline transformers. Mask helpers: :func:`alternating_mask`, :func:`half_mask`,
:func:`random_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nflax.bijections.base import Array, sum_event
from nflax.bijections.transformers import (
    AdditiveTransformer,
    AffineTransformer,
    SplineTransformer,
    Transformer,
    TransformerLayer,
    get_transformer,
    split_params,
)
from nflax.variables import Buffer


def alternating_mask(dim: int, parity: int = 0) -> np.ndarray:
    """``[1, 0, 1, 0, …]`` (parity 0) or ``[0, 1, 0, 1, …]`` (parity 1).

    >>> alternating_mask(3).tolist()
    [1.0, 0.0, 1.0]
    """
    return ((np.arange(dim) + parity) % 2 == 0).astype(np.float32)


def half_mask(dim: int, parity: int = 0) -> np.ndarray:
    """Parity 0: ones on the first ``⌊dim/2⌋`` coordinates; parity 1: the complement.

    With parity 0 the first half conditions the second half; for ``dim = 1`` the mask is
    ``[0]`` (the single coordinate is transformed by a function of the context only).

    >>> half_mask(5).tolist(), half_mask(5, 1).tolist()
    ([1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0])
    """
    first = (np.arange(dim) < dim // 2).astype(np.float32)
    return first if parity % 2 == 0 else 1.0 - first


def random_mask(dim: int, key: jax.Array) -> np.ndarray:
    """Ones on ``⌊dim/2⌋`` coordinates drawn at random with ``key`` (a ``jax.random`` key).

    >>> import jax
    >>> int(random_mask(6, jax.random.key(0)).sum())
    3
    """
    order = np.asarray(jax.random.permutation(key, dim))
    mask = np.zeros(dim, np.float32)
    mask[order[: dim // 2]] = 1.0
    return mask


def _checked_mask(name: str, mask) -> np.ndarray:
    mask = np.asarray(mask, np.float32)
    if mask.ndim < 1 or mask.size == 0 or not np.all((mask == 0) | (mask == 1)):
        raise ValueError(
            f"{name}: mask must be a non-empty array of 0/1 of the event shape, received {mask}"
        )
    if np.all(mask == 1):
        raise ValueError(
            f"{name}: mask {mask.tolist()} is all ones, so no coordinate would be transformed "
            "(an identity layer); the mask needs at least one 0"
        )
    return mask


class Coupling(TransformerLayer):
    r"""A coupling layer with any elementwise transformer ``τ`` (flowjax's ``Coupling``).

    With a binary ``mask`` ``m`` (1 = passed through and conditioning, at least one 0), the
    conditioner predicts ``θ = net(m ⊙ x [, context])``, ``dim · P`` numbers read as
    ``(dim, P)`` (``P = transformer.num_params``, the parameters of each coordinate in turn);
    the rows of the conditioning coordinates are ignored.

    The event shape is the mask's: ``(dim,)`` for vectors, ``(H, W, C)`` for images (e.g.
    :func:`~nflax.bijections.image.checkerboard_mask`). The conditioner then maps
    ``(*batch, H, W, C)`` to ``(*batch, H, W, C·P)`` (a conv net), read as ``(C, P)`` per
    pixel; a context is broadcast over the pixels and concatenated as extra channels; the
    transformer's own variables (the affine's ``c``) are per channel.

    forward (data → latent):   ``z_i = x_i`` if ``m_i = 1`` else ``τ(x_i; θ_i)``,
                               ``log|det J| = Σ_{i: m_i=0} log τ'(x_i; θ_i)``
    inverse (latent → data):   ``x_i = z_i`` if ``m_i = 1`` else ``τ⁻¹(z_i; θ_i)``,
                               ``log|det J⁻¹| = −Σ_{i: m_i=0} log τ'(x_i; θ_i)``

    ``θ`` depends only on ``m ⊙ x = m ⊙ z``, so the inverse is exact. ``transformer``: a
    :class:`~nflax.bijections.transformers.Transformer` or its name (``"affine"``,
    ``"additive"``, ``"spline"``).

    >>> from flax import nnx
    >>> from nflax.bijections.transformers import SplineTransformer
    >>> from nflax.nets import MLP
    >>> spline = SplineTransformer(bins=4)
    >>> net = MLP(2, 2 * spline.num_params, hidden=(8,), rngs=nnx.Rngs(0))
    >>> layer = Coupling([1.0, 0.0], net, spline)
    >>> layer.forward(jnp.array([[0.5, -1.0]]))[0].tolist()  # a fresh layer is the identity
    [[0.5, -1.0]]
    """

    def __init__(
        self,
        mask: Sequence[float] | np.ndarray,
        conditioner: nnx.Module,
        transformer: str | Transformer,
        *,
        context_dim: int | None = None,
    ):
        name = type(self).__name__
        mask = _checked_mask(name, mask)
        if context_dim is not None and int(context_dim) < 1:
            raise ValueError(f"{name}: context_dim must be ≥ 1 or None, received {context_dim}")
        self.event_shape = tuple(mask.shape)
        self.context_dim = None if context_dim is None else int(context_dim)
        self.mask = Buffer(jnp.asarray(mask))
        self.conditioner = conditioner
        self._set_transformer(get_transformer(transformer, name), mask.shape[-1])

    def _condition(self, x: Array, context: Array | None) -> Array:
        """Conditioner output for ``m ⊙ x`` (and the context, broadcast over the positions of
        an image), checked to have ``dim·P`` features (``dim``: the last event axis)."""
        h = x * self.mask[...]
        if context is not None and self.context_dim is not None:
            inner = (1,) * (len(self.event_shape) - 1)
            c = context.reshape(*context.shape[:-1], *inner, context.shape[-1])
            c = jnp.broadcast_to(c, (*h.shape[:-1], context.shape[-1]))
            h = jnp.concatenate([h, c.astype(h.dtype)], axis=-1)
        out = self.conditioner(h)
        dim, per_dim = self.event_shape[-1], self.transformer.num_params
        if out.shape[-1] != per_dim * dim:
            what = "dim" if per_dim == 1 else f"dim*{per_dim} = {dim}*{per_dim}"
            raise ValueError(
                f"{type(self).__name__}: conditioner must output {what} = {per_dim * dim} "
                f"features, received {out.shape[-1]}"
            )
        return out

    def _params(self, out: Array) -> tuple:
        """The transformer's parameter parts from the conditioner output ``(*batch, dim·P)``."""
        theta = out.reshape(*out.shape[:-1], self.event_shape[-1], self.transformer.num_params)
        return split_params(theta, self.transformer.sizes, type(self).__name__)

    def _apply(self, v: Array, context: Array | None, inverse: bool) -> tuple[Array, Array]:
        m = self.mask[...]
        y, ld = self._transform(v, self._params(self._condition(v, context)), inverse)
        return m * v + (1 - m) * y, sum_event((1 - m) * ld, len(self.event_shape))

    def _forward(self, x, context):
        return self._apply(x, context, inverse=False)

    def _inverse(self, z, context):
        return self._apply(z, context, inverse=True)


class AffineCoupling(Coupling):
    r"""RealNVP affine coupling layer (Dinh et al. 2017), as in the tutorial.

    With a binary ``mask`` ``m`` (1 = passed through and conditioning), the conditioner predicts
    ``(s̃, t) = net(m ⊙ x [, context])``; the scale is stabilised with a learned per-dimension
    ``c`` (initialised to 0) as ``s = tanh(s̃ / e^c) · e^c`` so ``|s| ≤ e^c``, and both are
    masked: ``s ← (1 − m) ⊙ s``, ``t ← (1 − m) ⊙ t``.

    forward (data → latent):   ``z = (x + t) ⊙ exp(s)``,      ``log|det J| = Σ_i s_i``
    inverse (latent → data):   ``x = z ⊙ exp(−s) − t``,       ``log|det J⁻¹| = −Σ_i s_i``

    ``s, t`` depend only on ``m ⊙ x = m ⊙ z``, so the inverse is exact.

    ``conditioner`` maps ``(*batch, dim [+ context_dim])`` to ``(*batch, 2·dim)`` (first half
    ``s̃``, second half ``t``), e.g. :class:`nflax.nets.MLP`; on images ``(*batch, H, W, C)``
    to ``(*batch, H, W, 2C)``, e.g. :class:`nflax.nets.ConvResNet`. This is :class:`Coupling`
    with the :class:`~nflax.bijections.transformers.AffineTransformer`, whose parameters are
    ``(μ, α̃) = (−t, −s̃)`` (so ``α = −s``).
    """

    def __init__(
        self,
        mask: Sequence[float] | np.ndarray,
        conditioner: nnx.Module,
        *,
        context_dim: int | None = None,
    ):
        super().__init__(mask, conditioner, AffineTransformer(), context_dim=context_dim)

    def _params(self, out):
        dim = self.event_shape[-1]
        s, t = out[..., :dim], out[..., dim:]
        return -t[..., None], -s[..., None]


class AdditiveCoupling(Coupling):
    r"""NICE additive coupling layer (Dinh et al. 2015): volume preserving.

    The conditioner predicts a shift ``t = (1 − m) ⊙ net(m ⊙ x [, context])``.

    forward (data → latent):   ``z = x + t(m ⊙ x)``,    ``log|det J| = 0``
    inverse (latent → data):   ``x = z − t(m ⊙ z)``,    ``log|det J⁻¹| = 0``

    ``conditioner`` maps ``(*batch, dim [+ context_dim])`` to ``(*batch, dim)``. This is
    :class:`Coupling` with the :class:`~nflax.bijections.transformers.AdditiveTransformer`,
    ``μ = −t``.
    """

    def __init__(
        self,
        mask: Sequence[float] | np.ndarray,
        conditioner: nnx.Module,
        *,
        context_dim: int | None = None,
    ):
        super().__init__(mask, conditioner, AdditiveTransformer(), context_dim=context_dim)

    def _params(self, out):
        return (-out[..., None],)


class SplineCoupling(Coupling):
    r"""Rational-quadratic spline coupling layer (Durkan et al. 2019, "Neural Spline Flows").

    The conditioner output ``net(m ⊙ x [, context])`` of size ``dim · (3K − 1)`` is read as
    ``(dim, 3K − 1)``: for each coordinate ``K`` unnormalised bin widths, ``K`` heights and
    ``K − 1`` interior knot derivatives (see :mod:`nflax.bijections.splines`); the rows of the
    conditioning coordinates (``m_i = 1``) are ignored. ``g_i`` is the monotonic spline with
    those parameters on ``[-B, B]`` (``B = bound``), the identity outside.

    forward (data → latent):   ``z_i = x_i`` if ``m_i = 1`` else ``g_i(x_i)``,
                               ``log|det J| = Σ_{i: m_i=0} log g_i'(x_i)``
    inverse (latent → data):   ``x_i = z_i`` if ``m_i = 1`` else ``g_i⁻¹(z_i)``,
                               ``log|det J⁻¹| = −Σ_{i: m_i=0} log g_i'(x_i)``

    With a zero-initialised conditioner (e.g. :class:`nflax.nets.MLP`'s default) every spline
    starts as the identity. This is :class:`Coupling` with the
    :class:`~nflax.bijections.transformers.SplineTransformer`.
    """

    def __init__(
        self,
        mask: Sequence[float] | np.ndarray,
        conditioner: nnx.Module,
        *,
        bins: int = 8,
        bound: float = 3.0,
        context_dim: int | None = None,
    ):
        spline = SplineTransformer(bins, bound, who="SplineCoupling")
        super().__init__(mask, conditioner, spline, context_dim=context_dim)
