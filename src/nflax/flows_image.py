"""Ready-made image flows (event shape ``(H, W, C)``): multi-scale RealNVP and Glow.

Both are one :class:`~nflax.bijections.MultiScale` bijection from the image to a flat latent
vector under a single ``N(0, I)`` base, optionally after the logit preprocessing for data in
``[0, 1]``. They register in :data:`nflax.flows.IMAGE_CONSTRUCTORS` (so
``nflax.flows.build("glow", event_shape=…)`` and checkpoints rebuild them) and are re-exported
from :mod:`nflax.flows`.

The levels: level ``l < L − 1`` squeezes (``(h, w, c)`` → ``(h/2, w/2, 4c)``), runs ``depth``
flow steps, optionally Glow's split prior, and factors out half the channels; the last level
runs ``depth`` steps on what is left, without squeezing. So ``H`` and ``W`` must be divisible
by ``2^(L−1)``: a 28×28 image takes 3 levels (14×14×4, 7×7×8, then 7×7×4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax.numpy as jnp  # noqa: F401  (doctest namespace)
import numpy as np
from flax import nnx

from nflax.bijections import ActNorm, AffineCoupling, Bijection, Chain, Logit, Stack
from nflax.bijections.image import (
    Invertible1x1Conv,
    MultiScale,
    Squeeze,
    channel_mask,
    checkerboard_mask,
)
from nflax.bijections.image.squeeze import image_shape
from nflax.distributions import Flow, StandardNormal
from nflax.flows import IMAGE_CONSTRUCTORS, _constructor
from nflax.nets import ConvResNet

Shape = tuple[int, int, int]
_image_constructor = functools.partial(_constructor, registry=IMAGE_CONSTRUCTORS)


def _checked_shape(name: str, event_shape, levels: int, depth: int, hidden: int) -> Shape:
    """``event_shape`` as ``(H, W, C)``, checked against the number of squeezes."""
    for arg, value in (("levels", levels), ("depth", depth), ("hidden", hidden)):
        if value < 1:
            raise ValueError(f"{name}: {arg} must be ≥ 1, received {value}")
    shape = image_shape(name, event_shape)
    k = 2 ** (levels - 1)
    if shape[0] % k or shape[1] % k:
        raise ValueError(
            f"{name}: levels={levels} squeezes {levels - 1} times, so H and W must be divisible "
            f"by {k}; received event_shape {shape}"
        )
    return shape


def _step_masks(shape: Shape, i: int, channels_first: bool = False) -> list[np.ndarray]:
    """Coupling masks of step ``i``: a checkerboard (parity ``i % 2``) when the image has more
    than one pixel, a channel mask (parity ``i % 2``) when it has more than one channel."""
    h, w, c = shape
    masks = [checkerboard_mask(shape, i % 2)] if h * w > 1 else []
    masks += [channel_mask(shape, i % 2)] if c > 1 else []
    if not masks:
        raise ValueError(f"image flow: a 1×1×1 image leaves nothing to couple, shape {shape}")
    return masks


def _coupling(mask: np.ndarray, hidden: int, blocks: int, activation: str, rngs) -> Bijection:
    """An affine coupling on images with a :class:`~nflax.nets.ConvResNet` conditioner (its
    last layer at zero: the coupling starts as the identity)."""
    c = mask.shape[-1]
    net = ConvResNet(c, 2 * c, width=hidden, blocks=blocks, activation=activation, rngs=rngs)
    return AffineCoupling(mask, net)


def _split_prior(hidden: int, blocks: int, activation: str, rngs) -> Callable[[Shape], Bijection]:
    """Glow's learned prior of the factored-out half (the last ``⌈c/2⌉`` channels) given the
    kept half: an affine coupling with ``channel_mask(shape, 0)``."""

    def prior(shape: Shape) -> Bijection:
        return _coupling(channel_mask(shape, 0), hidden, blocks, activation, rngs)

    return prior


def _multiscale(
    shape: Shape,
    levels: int,
    depth: int,
    step: Callable[[Shape, int], Bijection],
    prior: Callable[[Shape], Bijection] | None,
) -> MultiScale:
    """The levels (see the module docstring), each ``[Squeeze →] Stack(steps) [→ prior]``."""
    parts = []
    for level in range(levels):
        last = level == levels - 1
        layers: list[Bijection] = []
        if not last:
            layers.append(Squeeze(shape))
            shape = layers[-1].latent_shape
        layers.append(Stack([step(shape, i) for i in range(depth)]))
        if not last:
            layers += [prior(shape)] if prior is not None else []
            shape = (shape[0], shape[1], shape[2] // 2)
        parts.append(layers[0] if len(layers) == 1 else Chain(layers))
    return MultiScale(parts)


def _image_flow(shape: Shape, bijection: MultiScale, logit: bool, alpha: float) -> Flow:
    """``[Logit(α) →] bijection`` under ``N(0, I)`` on the flat latent vector."""
    parts = [Logit(shape, alpha=alpha), bijection] if logit else [bijection]
    chain = parts[0] if len(parts) == 1 else Chain(parts)
    return Flow(StandardNormal(bijection.latent_shape), chain)


@_image_constructor
def glow(
    event_shape: Sequence[int],
    *,
    levels: int = 2,
    depth: int = 4,
    hidden: int = 64,
    blocks: int = 1,
    split_prior: bool = True,
    logit: bool = True,
    alpha: float = 0.05,
    activation: str = "relu",
    rngs: nnx.Rngs,
) -> Flow:
    """Glow (Kingma & Dhariwal 2018) on images of shape ``event_shape = (H, W, C)``.

    ``levels`` levels (see the module docstring) of ``depth`` steps, each step
    :class:`~nflax.bijections.ActNorm` (per channel, data-dependent initialisation) →
    :class:`~nflax.bijections.Invertible1x1Conv` → an affine coupling whose conditioner is a
    :class:`~nflax.nets.ConvResNet` (``hidden`` channels, ``blocks`` residual blocks, its last
    layer at zero). The coupling splits the channels in half (a checkerboard when there is one
    channel only). ``split_prior=True`` ends every level but the last with Glow's learned
    prior of the factored-out half given the kept half (an affine coupling, see
    :class:`~nflax.bijections.MultiScale`). ``logit=True`` maps data in ``[0, 1]`` to the real
    line first, ``y = logit(α + (1 − 2α)x)`` with ``α = alpha``, its log-det inside the flow.

    >>> import jax
    >>> flow = glow((4, 4, 1), levels=2, depth=2, hidden=8, rngs=nnx.Rngs(0))
    >>> flow.bijection.latent_shape, flow.sample(jax.random.key(0), 3).shape
    ((16,), (3, 4, 4, 1))
    """
    shape = _checked_shape("glow", event_shape, levels, depth, hidden)

    def step(s: Shape, i: int) -> Bijection:
        mask = channel_mask(s, 0) if s[2] > 1 else checkerboard_mask(s, i % 2)
        coupling = _coupling(mask, hidden, blocks, activation, rngs)
        return Chain([ActNorm(s), Invertible1x1Conv(s, rngs=rngs), coupling])

    prior = _split_prior(hidden, blocks, activation, rngs) if split_prior else None
    body = _multiscale(shape, levels, depth, step, prior)
    return _image_flow(shape, body, logit, alpha)


@_image_constructor
def realnvp_image(
    event_shape: Sequence[int],
    *,
    levels: int = 2,
    depth: int = 2,
    hidden: int = 64,
    blocks: int = 2,
    actnorm: bool = True,
    split_prior: bool = False,
    logit: bool = True,
    alpha: float = 0.05,
    activation: str = "relu",
    rngs: nnx.Rngs,
) -> Flow:
    """Multi-scale RealNVP (Dinh et al. 2017) on images of shape ``event_shape = (H, W, C)``.

    ``levels`` levels (see the module docstring) of ``depth`` steps; step ``i`` is an affine
    coupling with a checkerboard mask then one with a channel mask (parities ``i % 2``; a
    1×1 image has no checkerboard, a 1-channel one no channel mask), each with a
    :class:`~nflax.nets.ConvResNet` conditioner (``hidden`` channels, ``blocks`` residual
    blocks, last layer at zero), preceded by an :class:`~nflax.bijections.ActNorm` when
    ``actnorm=True`` (in place of the paper's batch norm). ``split_prior`` and ``logit``,
    ``alpha`` as in :func:`glow`.

    >>> flow = realnvp_image((4, 4, 1), depth=1, hidden=8, actnorm=False, rngs=nnx.Rngs(0))
    >>> x = jnp.full((2, 4, 4, 1), 0.5)  # a fresh flow: logit, then the identity
    >>> [round(float(v), 3) for v in flow.log_prob(x)]  # 16·(log(0.9/0.25) − ½ log 2π)
    [5.792, 5.792]
    """
    shape = _checked_shape("realnvp_image", event_shape, levels, depth, hidden)

    def step(s: Shape, i: int) -> Bijection:
        couplings = [_coupling(m, hidden, blocks, activation, rngs) for m in _step_masks(s, i)]
        layers = [ActNorm(s), *couplings] if actnorm else couplings
        return layers[0] if len(layers) == 1 else Chain(layers)

    prior = _split_prior(hidden, blocks, activation, rngs) if split_prior else None
    body = _multiscale(shape, levels, depth, step, prior)
    return _image_flow(shape, body, logit, alpha)
