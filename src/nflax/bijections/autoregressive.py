"""Masked autoregressive layers (MAF; IAF is ``Invert(MaskedAutoregressive(...))``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nflax.bijections.base import Array
from nflax.bijections.transformers import (
    Transformer,
    TransformerLayer,
    get_transformer,
    split_params,
)
from nflax.nets import MADE


class MaskedAutoregressive(TransformerLayer):
    r"""Masked autoregressive flow layer (Papamakarios et al. 2017; splines: Durkan et al. 2019).

    A :class:`~nflax.nets.MADE` predicts the parameters ``θ_i = net(x_{<i} [, context])`` of an
    elementwise transformer ``τ`` for coordinate ``i`` from the coordinates before it in the
    degree order ``order`` (default ``1, …, dim``); ``z_i = τ(x_i; θ_i)``, so the Jacobian is
    triangular and ``log|det J| = Σ_i log τ'(x_i; θ_i)``.

    ``transformer`` is a :class:`~nflax.bijections.transformers.Transformer` or its name; the
    MADE predicts its ``num_params`` parameters per coordinate. ``bins`` and ``bound`` are the
    spline's when ``transformer="spline"``.

    ``transformer="affine"``: ``θ_i = (μ_i, α̃_i)``, log-scale bounded as
    ``α_i = e^{c_i} · tanh(α̃_i / e^{c_i})`` (``|α_i| ≤ e^{c_i}``, ``c`` learned per dimension,
    initialised to 0):

        forward (data → latent):   ``z_i = (x_i − μ_i) · exp(−α_i)``,  ``log|det J| = −Σ_i α_i``
        inverse (latent → data):   ``x_i = z_i · exp(α_i) + μ_i``,     ``log|det J⁻¹| = Σ_i α_i``

    ``transformer="spline"``: ``θ_i`` are the ``3·bins − 1`` unnormalised parameters of a
    rational-quadratic spline ``g_i`` on ``[-bound, bound]``, identity outside
    (:mod:`nflax.bijections.splines`):

        forward:  ``z_i = g_i(x_i)``,     ``log|det J| = Σ_i log g_i'(x_i)``
        inverse:  ``x_i = g_i⁻¹(z_i)``,   ``log|det J⁻¹| = −Σ_i log g_i'(x_i)``

    ``transformer="additive"``: ``θ_i = μ_i``, ``z_i = x_i − μ_i`` (volume preserving).

    Cost: the forward (density) direction is one network pass. The inverse (sampling) direction
    is exact but sequential: ``x`` is rebuilt one degree at a time, ``dim`` network passes in a
    ``jax.lax.fori_loop`` (compiled once). ``Invert(MaskedAutoregressive(...))`` is an IAF:
    one-pass sampling, ``dim``-pass density. The network's output layer starts at zero, so the
    layer starts as the identity.

    >>> from flax import nnx
    >>> maf = MaskedAutoregressive(3, hidden=(8,), rngs=nnx.Rngs(0))
    >>> z, log_det = maf.forward(jnp.ones((2, 3)))  # a fresh layer is the identity
    >>> z.tolist(), log_det.tolist()
    ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [0.0, 0.0])
    """

    def __init__(
        self,
        dim: int,
        *,
        transformer: str | Transformer = "affine",
        hidden: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        order: Sequence[int] | None = None,
        bins: int = 8,
        bound: float = 3.0,
        activation: str | Callable[[Array], Array] = "tanh",
        rngs: nnx.Rngs,
    ):
        if int(dim) < 1:
            raise ValueError(f"MaskedAutoregressive: dim must be ≥ 1, received {dim}")
        transformer = get_transformer(transformer, "MaskedAutoregressive", bins=bins, bound=bound)
        dim = int(dim)
        self.event_shape = (dim,)
        self.context_dim = None if context_dim is None else int(context_dim)
        self.made = MADE(
            dim,
            transformer.num_params,
            hidden=hidden,
            context_dim=self.context_dim,
            order=order,
            activation=activation,
            rngs=rngs,
        )
        self._set_transformer(transformer, dim)

    def _elementwise(self, v: Array, theta: Array, inverse: bool) -> tuple[Array, Array]:
        """``τ(v; θ)`` or ``τ⁻¹(v; θ)`` and its per-coordinate log-derivative."""
        return self._transform(v, split_params(theta, self.transformer.sizes), inverse)

    def _forward(self, x, context):
        z, log_det = self._elementwise(x, self.made(x, context), inverse=False)
        return z, log_det.sum(-1)

    def _inverse(self, z, context):
        # After pass k the coordinates of degree ≤ k are exact; the last pass sees all inputs
        # of degree < dim exactly and so yields every coordinate and the log-det.
        def step(_, x):
            return self._elementwise(z, self.made(x, context), inverse=True)[0]

        x = jax.lax.fori_loop(0, self.event_shape[0] - 1, step, jnp.zeros_like(z))
        x, log_det = self._elementwise(z, self.made(x, context), inverse=True)
        return x, log_det.sum(-1)
