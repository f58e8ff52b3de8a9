"""Binary coupling masks for images of shape ``(H, W, C)`` (1 = passed through and
conditioning, 0 = transformed), for :class:`~nflax.bijections.AffineCoupling` and the other
couplings, whose event shape is their mask's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nflax.bijections.image.squeeze import image_shape


def checkerboard_mask(event_shape: Sequence[int], parity: int = 0) -> np.ndarray:
    """``m[i, j, c] = 1`` where ``i + j + parity`` is even (every channel alike): RealNVP's
    spatial checkerboard.

    >>> checkerboard_mask((2, 2, 1))[..., 0].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    h, w, c = image_shape("checkerboard_mask", event_shape)
    board = (np.arange(h)[:, None] + np.arange(w)[None, :] + parity) % 2 == 0
    return np.broadcast_to(board[:, :, None], (h, w, c)).astype(np.float32)


def channel_mask(event_shape: Sequence[int], parity: int = 0) -> np.ndarray:
    """Parity 0: ones on the first ``⌊C/2⌋`` channels of every pixel; parity 1: the
    complement (RealNVP's channel-wise mask, Glow's split).

    >>> channel_mask((1, 1, 4))[0, 0].tolist(), channel_mask((1, 1, 4), 1)[0, 0].tolist()
    ([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0])
    """
    h, w, c = image_shape("channel_mask", event_shape)
    first = np.arange(c) < c // 2
    first = first if parity % 2 == 0 else ~first
    return np.broadcast_to(first, (h, w, c)).astype(np.float32)
