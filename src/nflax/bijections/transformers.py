r"""Elementwise transformers: the monotone map a coupling or autoregressive layer applies to each
coordinate, with parameters that a conditioner network predicts.

A transformer ``τ(·; θ)`` maps one coordinate given its parameters ``θ`` (``num_params``
numbers per coordinate, split into parts of the sizes ``sizes`` by :func:`split_params`).
The one direction convention, shared by every transformer and every layer built on one:

    forward (data → latent):   ``z = τ(x; θ)``,     returns ``(z, log τ'(x; θ))``
    inverse (latent → data):   ``x = τ⁻¹(z; θ)``,   returns ``(x, −log τ'(x; θ))``

elementwise, so a layer's log-determinant is the sum of the log-derivatives of the
coordinates it transforms.

============================  ======================  ======================================
transformer                   ``θ`` per coordinate    forward ``z = τ(x; θ)``, ``log τ'``
============================  ======================  ======================================
:class:`AffineTransformer`    ``(μ, α̃)``              ``(x − μ)·exp(−α)``, ``−α``, with
                                                      ``α = e^c·tanh(α̃ / e^c)``
:class:`AdditiveTransformer`  ``(μ,)``                ``x − μ``, ``0``
:class:`SplineTransformer`    ``(w, h, d)``: ``K``,   rational-quadratic spline ``g`` on
                              ``K``, ``K − 1``        ``[-B, B]``, identity outside; ``log g'``
============================  ======================  ======================================

All three are the identity at ``θ = 0``, so a layer whose conditioner's output layer starts
at zero starts as the identity. A new transformer is one subclass of :class:`Transformer`: its
``sizes``, ``forward`` and ``inverse``, and ``variables`` when it learns state of its own
(the affine's ``c``); its class attribute ``name`` makes it available by name, as in
``MaskedAutoregressive(transformer="spline")``. Layers hold one through
:class:`TransformerLayer`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from nflax.bijections.base import Bijection
from nflax.bijections.splines import rq_spline_forward, rq_spline_inverse

Array = jax.Array

# name → class, filled by Transformer.__init_subclass__
TRANSFORMERS: dict[str, type[Transformer]] = {}


def split_params(theta: Array, sizes: Sequence[int], who: str = "split_params") -> tuple:
    """Split the last axis of ``theta`` into consecutive parts of the given ``sizes``.

    >>> parts = split_params(jnp.zeros((5, 3, 23)), (8, 8, 7))
    >>> [p.shape for p in parts]
    [(5, 3, 8), (5, 3, 8), (5, 3, 7)]
    """
    sizes = tuple(int(s) for s in sizes)
    if theta.shape[-1] != sum(sizes):
        raise ValueError(
            f"{who}: expected {sum(sizes)} parameters per coordinate (parts of sizes {sizes}), "
            f"received {theta.shape[-1]}"
        )
    parts, start = [], 0
    for size in sizes:
        parts.append(theta[..., start : start + size])
        start += size
    return tuple(parts)


class Transformer:
    """An elementwise monotone map ``τ(·; θ)``; see the module docstring for the convention.

    Subclasses set ``sizes`` (the parts of ``θ`` per coordinate) and implement ``forward`` and
    ``inverse``, which take the coordinates ``v`` of shape ``(*batch, dim)``, the parts
    ``params`` (each ``(*batch, dim, size)``) and, as keywords, the values of the variables
    that :meth:`variables` created; they return the image and its per-coordinate
    log-derivative, both ``(*batch, dim)``. A transformer is configuration, not state: it is
    compared and hashed by its attributes, so identical layers stack.
    """

    name: ClassVar[str | None] = None
    sizes: tuple[int, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls) and cls.name is not None:
            TRANSFORMERS[cls.name] = cls

    @property
    def num_params(self) -> int:
        """Parameters per coordinate: ``sum(sizes)``."""
        return sum(self.sizes)

    def variables(self, dim: int) -> dict[str, nnx.Variable]:
        """Learned state of the transformer itself for ``dim`` coordinates (none by default);
        the layer holds it under these names."""
        return {}

    def forward(self, x: Array, params: tuple, **state) -> tuple[Array, Array]:
        """Data → latent: ``(τ(x; θ), log τ'(x; θ))``."""
        raise NotImplementedError

    def inverse(self, z: Array, params: tuple, **state) -> tuple[Array, Array]:
        """Latent → data: ``(τ⁻¹(z; θ), −log τ'(τ⁻¹(z; θ); θ))``."""
        raise NotImplementedError

    def _config(self) -> tuple:
        return tuple(sorted(vars(self).items()))

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._config() == other._config()

    def __hash__(self) -> int:
        return hash((type(self), self._config()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config())
        return f"{type(self).__name__}({args})"


class AffineTransformer(Transformer):
    r"""Affine with the tutorial's bounded log-scale.

    ``θ = (μ, α̃)``; the log-scale ``α = e^c · tanh(α̃ / e^c)`` satisfies ``|α| ≤ e^c``, with
    ``c`` learned per coordinate (a variable of the layer, named ``c``, starting at 0). The
    bound limits how far one layer can contract or expand.

    forward (data → latent):   ``z = (x − μ)·exp(−α)``,   ``log τ' = −α``
    inverse (latent → data):   ``x = z·exp(α) + μ``,      ``log (τ⁻¹)' = α``

    >>> t = AffineTransformer()
    >>> mu, a = jnp.full((1, 1), 1.0), jnp.full((1, 1), 0.0)
    >>> z, ld = t.forward(jnp.array([3.0]), (mu, a), c=jnp.zeros(1))
    >>> z.tolist(), ld.tolist()
    ([2.0], [-0.0])
    """

    name = "affine"
    sizes = (1, 1)

    def variables(self, dim: int) -> dict[str, nnx.Variable]:
        return {"c": nnx.Param(jnp.zeros((dim,), jnp.float32))}

    @staticmethod
    def _loc_log_scale(params, c):
        mu, raw = (p[..., 0] for p in params)
        ec = jnp.exp(c)
        return mu, ec * jnp.tanh(raw / ec)

    def forward(self, x, params, *, c):
        mu, alpha = self._loc_log_scale(params, c)
        return (x - mu) * jnp.exp(-alpha), -alpha

    def inverse(self, z, params, *, c):
        mu, alpha = self._loc_log_scale(params, c)
        return z * jnp.exp(alpha) + mu, alpha


class AdditiveTransformer(Transformer):
    r"""A shift, volume preserving: ``θ = (μ,)``.

    forward (data → latent):   ``z = x − μ``,   ``log τ' = 0``
    inverse (latent → data):   ``x = z + μ``,   ``log (τ⁻¹)' = 0``
    """

    name = "additive"
    sizes = (1,)

    def forward(self, x, params):
        return x - params[0][..., 0], jnp.zeros_like(x)

    def inverse(self, z, params):
        return z + params[0][..., 0], jnp.zeros_like(z)


class SplineTransformer(Transformer):
    r"""Monotonic rational-quadratic spline (Durkan et al. 2019) with ``bins`` bins on
    ``[-bound, bound]``, the identity outside (:mod:`nflax.bijections.splines`).

    ``θ = (w, h, d)``: ``K`` unnormalised bin widths, ``K`` heights and ``K − 1`` interior knot
    derivatives (``K = bins``, ``3K − 1`` in all).

    forward (data → latent):   ``z = g(x)``,     ``log τ' = log g'(x)``
    inverse (latent → data):   ``x = g⁻¹(z)``,   ``log (τ⁻¹)' = −log g'(x)``

    ``who`` names the layer or constructor in the errors of a bad ``bins`` or ``bound``.

    >>> SplineTransformer(4).sizes
    (4, 4, 3)
    """

    name = "spline"

    def __init__(self, bins: int = 8, bound: float = 3.0, *, who: str = "SplineTransformer"):
        if int(bins) < 2:
            raise ValueError(f"{who}: bins must be ≥ 2, received {bins}")
        if not float(bound) > 0:
            raise ValueError(f"{who}: bound must be > 0, received {bound}")
        self.bins = int(bins)
        self.bound = float(bound)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.bins, self.bins, self.bins - 1)

    def forward(self, x, params):
        return rq_spline_forward(x, *params, bound=self.bound)

    def inverse(self, z, params):
        return rq_spline_inverse(z, *params, bound=self.bound)


def get_transformer(
    transformer: str | Transformer, who: str = "get_transformer", **options
) -> Transformer:
    """``transformer`` itself, or the one of that name built with the ``options`` its class
    takes (e.g. ``bins`` and ``bound`` for ``"spline"``; the others are ignored).

    >>> get_transformer("spline", bins=4, bound=2.0)
    SplineTransformer(bins=4, bound=2.0)
    """
    if isinstance(transformer, Transformer):
        return transformer
    if not isinstance(transformer, str) or transformer not in TRANSFORMERS:
        raise ValueError(
            f"{who}: transformer must be one of {tuple(TRANSFORMERS)} or a Transformer, "
            f"received {transformer!r}"
        )
    cls = TRANSFORMERS[transformer]
    accepted = inspect.signature(cls).parameters
    options = {k: v for k, v in {**options, "who": who}.items() if k in accepted}
    return cls(**options)


class TransformerLayer(Bijection):
    """A bijection that applies a :class:`Transformer` to its coordinates.

    It holds the transformer (static configuration) and the transformer's own variables as
    attributes of the layer itself (the affine's ``c`` is ``layer.c``).
    """

    def _set_transformer(self, transformer: Transformer, dim: int) -> None:
        self.transformer = transformer
        variables = transformer.variables(dim)
        for name, variable in variables.items():
            setattr(self, name, variable)
        self.transformer_variables = tuple(variables)

    def _transform(self, v: Array, params: tuple, inverse: bool) -> tuple[Array, Array]:
        """``τ(v; θ)`` (or ``τ⁻¹``) and the per-coordinate log-derivative of that map."""
        state = {name: getattr(self, name)[...] for name in self.transformer_variables}
        apply = self.transformer.inverse if inverse else self.transformer.forward
        return apply(v, params, **state)
