"""Linear bijections on vectors: fixed permutations, reversal and a learnable LU-factored layer."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.scipy.linalg import solve_triangular

from nflax.bijections.base import Bijection, Buffer

Array = jax.Array


def _check_dim(name: str, dim: int) -> int:
    if isinstance(dim, bool) or int(dim) != dim or int(dim) < 1:
        raise ValueError(f"{name}: dim must be a positive integer, received {dim!r}")
    return int(dim)


def _check_permutation(name: str, dim: int, permutation) -> np.ndarray:
    perm = np.asarray(permutation)
    if perm.shape != (dim,) or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(
            f"{name}: expected a permutation of range({dim}) (integers, shape ({dim},)), "
            f"received {perm.dtype} array of shape {perm.shape}"
        )
    if not np.array_equal(np.sort(perm), np.arange(dim)):
        raise ValueError(
            f"{name}: expected a permutation of range({dim}), received {perm.tolist()}"
        )
    return perm.astype(np.int32)


class Permute(Bijection):
    r"""A fixed permutation of the coordinates of a vector, ``z_i = x_{π(i)}``.

    forward (data → latent):   ``z = x[..., π]``,       ``log|det J| = 0``
    inverse (latent → data):   ``x = z[..., π⁻¹]``,     ``log|det J⁻¹| = 0``

    Give exactly one of ``key`` (a JAX PRNG key; ``π`` is drawn uniformly) or ``permutation``
    (a sequence of the integers ``0 … dim-1``). ``π`` and ``π⁻¹`` are stored as
    :class:`~nflax.bijections.Buffer` variables: saved with the model, never trained.

    >>> layer = Permute(3, permutation=[2, 0, 1])
    >>> layer.forward(jnp.array([[10.0, 11.0, 12.0]]))[0]
    Array([[12., 10., 11.]], dtype=float32)
    """

    def __init__(
        self,
        dim: int,
        *,
        key: Array | None = None,
        permutation: Sequence[int] | np.ndarray | None = None,
    ):
        dim = _check_dim("Permute", dim)
        if (key is None) == (permutation is None):
            raise ValueError(
                "Permute: give exactly one of key= (random permutation) or permutation= "
                f"(explicit), received key={'set' if key is not None else None}, "
                f"permutation={'set' if permutation is not None else None}"
            )
        if permutation is None:
            perm = np.asarray(jax.random.permutation(key, dim), np.int32)
        else:
            perm = _check_permutation("Permute", dim, permutation)
        self.event_shape = (dim,)
        self.permutation = Buffer(jnp.asarray(perm))
        self.inverse_permutation = Buffer(jnp.asarray(np.argsort(perm).astype(np.int32)))

    def _forward(self, x, context):
        return x[..., self.permutation[...]], jnp.zeros(x.shape[:-1], x.dtype)

    def _inverse(self, z, context):
        return z[..., self.inverse_permutation[...]], jnp.zeros(z.shape[:-1], z.dtype)


class Reverse(Bijection):
    r"""Reverse the order of the coordinates of a vector (the flip between coupling layers).

    forward (data → latent):   ``z_i = x_{d−1−i}``,    ``log|det J| = 0``
    inverse (latent → data):   ``x_i = z_{d−1−i}``,    ``log|det J⁻¹| = 0``
    """

    def __init__(self, dim: int):
        self.event_shape = (_check_dim("Reverse", dim),)

    def _forward(self, x, context):
        return jnp.flip(x, axis=-1), jnp.zeros(x.shape[:-1], x.dtype)

    def _inverse(self, z, context):
        return jnp.flip(z, axis=-1), jnp.zeros(z.shape[:-1], z.dtype)


class LULinear(Bijection):
    r"""An invertible dense layer ``z = W x + b`` with ``W = P L U`` (Kingma & Dhariwal 2018).

    ``P`` is a fixed permutation matrix (a :class:`~nflax.bijections.Buffer`), ``L`` is unit
    lower-triangular (free strictly-lower entries), ``U`` is upper-triangular with a positive
    diagonal ``diag U = exp(s)`` (``s`` a free parameter), so ``W`` is invertible for every
    parameter value.

    forward (data → latent):   ``z = P L U x + b``,        ``log|det J| = Σ_i s_i``
    inverse (latent → data):   ``x = U⁻¹ L⁻¹ Pᵀ (z − b)`` (two triangular solves),
                               ``log|det J⁻¹| = −Σ_i s_i``

    (``|det P| = 1`` and ``det L = 1``, so ``log|det W| = Σ_i log|U_ii| = Σ_i s_i``.)

    At initialisation ``L = U = I`` and ``b = 0``; with the default ``permutation="identity"``
    the layer starts as the identity map. ``permutation="random"`` draws ``P`` from
    ``rngs.params()`` (then the layer starts as that permutation), or pass an explicit
    permutation of ``range(dim)`` (``(P v)_i = v_{π(i)}``).
    """

    def __init__(
        self,
        dim: int,
        *,
        rngs: nnx.Rngs | None = None,
        permutation: str | Sequence[int] | np.ndarray = "identity",
    ):
        dim = _check_dim("LULinear", dim)
        if isinstance(permutation, str):
            if permutation == "identity":
                perm = np.arange(dim, dtype=np.int32)
            elif permutation == "random":
                if rngs is None:
                    raise ValueError(
                        "LULinear: permutation='random' needs rngs=nnx.Rngs(...), received none"
                    )
                perm = np.asarray(jax.random.permutation(rngs.params(), dim), np.int32)
            else:
                raise ValueError(
                    "LULinear: permutation must be 'identity', 'random' or a permutation of "
                    f"range({dim}), received {permutation!r}"
                )
        else:
            perm = _check_permutation("LULinear", dim, permutation)
        self.event_shape = (dim,)
        self.permutation = Buffer(jnp.asarray(perm))
        self.inverse_permutation = Buffer(jnp.asarray(np.argsort(perm).astype(np.int32)))
        # Only the strictly-lower / strictly-upper entries of these matrices are used.
        self.lower = nnx.Param(jnp.zeros((dim, dim), jnp.float32))
        self.upper = nnx.Param(jnp.zeros((dim, dim), jnp.float32))
        self.log_diag = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def _factors(self) -> tuple[Array, Array]:
        dim = self.event_shape[0]
        eye = jnp.eye(dim, dtype=self.lower[...].dtype)
        lower = jnp.tril(self.lower[...], k=-1) + eye
        upper = jnp.triu(self.upper[...], k=1) + jnp.diag(jnp.exp(self.log_diag[...]))
        return lower, upper

    def weight(self) -> Array:
        """The matrix ``W = P L U`` (``dim × dim``)."""
        lower, upper = self._factors()
        return (lower @ upper)[self.permutation[...]]

    def _log_det(self, batch_shape, dtype) -> Array:
        return jnp.broadcast_to(jnp.sum(self.log_diag[...]).astype(dtype), batch_shape)

    def _forward(self, x, context):
        z = x @ self.weight().T + self.bias[...]
        return z, self._log_det(x.shape[:-1], x.dtype)

    def _inverse(self, z, context):
        lower, upper = self._factors()
        batch = z.shape[:-1]
        # Pᵀ (z − b): (Pᵀ v)_j = v_{π⁻¹(j)}; solve with the batch as columns.
        y = (z - self.bias[...])[..., self.inverse_permutation[...]].reshape(-1, z.shape[-1])
        y = solve_triangular(lower, y.T, lower=True, unit_diagonal=True)
        x = solve_triangular(upper, y, lower=False).T.reshape(z.shape)
        return x, -self._log_det(batch, z.dtype)
