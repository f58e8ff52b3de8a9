"""Space-to-depth reshaping of images, the resolution change of a multi-scale flow."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from nflax.bijections.base import Array, Bijection


def image_shape(name: str, event_shape: Sequence[int]) -> tuple[int, int, int]:
    """``event_shape`` as ``(H, W, C)``, checked: three positive sizes."""
    shape = tuple(int(d) for d in event_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"{name}: expected an image event shape (H, W, C) of positive sizes, "
            f"received {tuple(event_shape)}"
        )
    return shape  # type: ignore[return-value]


class Squeeze(Bijection):
    r"""Space to depth, 2×2 (Dinh et al. 2017): ``(H, W, C)`` → ``(H/2, W/2, 4C)``.

    Each 2×2 block of pixels becomes one pixel with the block's ``4C`` values as channels, in
    the order (row in block, column in block, channel):

    forward (data → latent):   ``z[i, j, (2a + b)·C + c] = x[2i + a, 2j + b, c]``
                               (``a, b ∈ {0, 1}``),  ``log|det J| = 0``
    inverse (latent → data):   ``x[2i + a, 2j + b, c] = z[i, j, (2a + b)·C + c]``,
                               ``log|det J⁻¹| = 0``

    A permutation of the coordinates, so volume preserving. ``H`` and ``W`` must be even.

    >>> x = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> Squeeze((2, 2, 2)).forward(x)[0].tolist()
    [[[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]]]
    """

    def __init__(self, event_shape: Sequence[int]):
        h, w, c = image_shape("Squeeze", event_shape)
        if h % 2 or w % 2:
            raise ValueError(
                f"Squeeze: height and width must be even (2×2 blocks), received event shape "
                f"{(h, w, c)}"
            )
        self.event_shape = (h, w, c)
        self._latent_shape = (h // 2, w // 2, 4 * c)

    def _forward(self, x, context) -> tuple[Array, Array]:
        h, w, c = self.event_shape
        batch = x.shape[:-3]
        y = x.reshape(*batch, h // 2, 2, w // 2, 2, c)
        y = jnp.moveaxis(y, -4, -3)  # (…, H/2, W/2, 2, 2, C): block row, block column
        return y.reshape(*batch, *self.latent_shape), jnp.zeros(batch, x.dtype)

    def _inverse(self, z, context) -> tuple[Array, Array]:
        h, w, c = self.event_shape
        batch = z.shape[:-3]
        y = z.reshape(*batch, h // 2, w // 2, 2, 2, c)
        y = jnp.moveaxis(y, -3, -4)  # (…, H/2, 2, W/2, 2, C)
        return y.reshape(*batch, h, w, c), jnp.zeros(batch, z.dtype)
