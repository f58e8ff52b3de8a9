"""Ready-made image flows (event shape ``(H, W, C)``): multi-scale RealNVP and Glow.

Both are one :class:`~nflax.bijections.MultiScale` bijection from the image to a flat latent
vector under a single ``N(0, I)`` base, optionally after the logit preprocessing for data in
``[0, 1]``. They register in :data:`nflax.flows.IMAGE_CONSTRUCTORS` (so
``nflax.flows.build("glow", event_shape=…)`` and checkpoints rebuild them) and are re-exported
from :mod:`nflax.flows`.

The levels: level ``l < L − 1`` squeezes (``(h, w, c)`` → ``(h/2, w/2, 4c)``), runs ``depth``
flow steps, optionally Glow's split prior, and factors out half the channels; the last level
runs ``depth`` steps on what is left, without squeezing (RealNVP's last level). So ``H`` and
``W`` must be divisible by ``2^(L−1)``: a 28×28 image takes 3 levels (14×14×4, 7×7×8, then
7×7×4). With ``squeeze_last=True`` the last level squeezes too (Glow's, and normflows'), so
``H`` and ``W`` must be divisible by ``2^L``: an 8×8 image with 2 levels runs 4×4×4, then
2×2×8.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax.numpy as jnp  # noqa: F401  (doctest namespace)
import numpy as np
from flax import nnx

from nflax.bijections import (
    ActNorm,
    AffineCoupling,
    Bijection,
    Chain,
    Logit,
    SplineCoupling,
    Stack,
)
from nflax.bijections.image import (
    Invertible1x1Conv,
    MultiScale,
    Squeeze,
    channel_mask,
    checkerboard_mask,
)
from nflax.bijections.image.squeeze import image_shape
from nflax.bijections.transformers import SplineTransformer
from nflax.distributions import Flow, StandardNormal
from nflax.flows import IMAGE_CONSTRUCTORS, _constructor
from nflax.nets import ConvResNet, GlowConvNet

Shape = tuple[int, int, int]
_image_constructor = functools.partial(_constructor, registry=IMAGE_CONSTRUCTORS)


def _checked_shape(
    name: str, event_shape, levels: int, depth: int, hidden: int, squeeze_last: bool = False
) -> Shape:
    """``event_shape`` as ``(H, W, C)``, checked against the number of squeezes."""
    for arg, value in (("levels", levels), ("depth", depth), ("hidden", hidden)):
        if value < 1:
            raise ValueError(f"{name}: {arg} must be ≥ 1, received {value}")
    shape = image_shape(name, event_shape)
    squeezes = levels if squeeze_last else levels - 1
    k = 2**squeezes
    if shape[0] % k or shape[1] % k:
        also = " (squeeze_last=True)" if squeeze_last else ""
        raise ValueError(
            f"{name}: levels={levels}{also} squeezes {squeezes} times, so H and W must be "
            f"divisible by {k}; received event_shape {shape}"
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


# name → (conv net, the name of its depth argument): the choices of ``conditioner=``
CONDITIONERS = {"glow": (GlowConvNet, "layers"), "resnet": (ConvResNet, "blocks")}
COUPLINGS = ("affine", "spline")


@dataclass(frozen=True)
class _Couplings:
    """How an image flow builds its couplings: the coupling (``"affine"``: an
    :class:`~nflax.bijections.AffineCoupling`; ``"spline"``: a
    :class:`~nflax.bijections.SplineCoupling` with ``bins`` bins on ``[-bound, bound]``) and
    its conditioner (``"glow"``: a :class:`~nflax.nets.GlowConvNet` with ``blocks`` 1×1
    layers; ``"resnet"``: a :class:`~nflax.nets.ConvResNet` with ``blocks`` residual
    blocks), ``hidden`` channels wide, its last layer at zero (every coupling starts as the
    identity)."""

    hidden: int
    blocks: int
    activation: str
    conditioner: str
    coupling: str
    bins: int
    bound: float

    def __call__(self, mask: np.ndarray, rngs: nnx.Rngs) -> Bijection:
        c = mask.shape[-1]
        spline = self.coupling == "spline"
        per_channel = 3 * self.bins - 1 if spline else 2  # the transformer's numbers per value
        net_class, depth_arg = CONDITIONERS[self.conditioner]
        net = net_class(
            c, per_channel * c, width=self.hidden, activation=self.activation, rngs=rngs,
            **{depth_arg: self.blocks},
        )  # fmt: skip
        if not spline:
            return AffineCoupling(mask, net)
        return SplineCoupling(mask, net, bins=self.bins, bound=self.bound)


def _couplings(name: str, hidden, blocks, activation, conditioner, coupling, bins, bound):
    """The checked :class:`_Couplings` of constructor ``name``."""
    if conditioner not in CONDITIONERS:
        raise ValueError(
            f"{name}: conditioner must be one of {tuple(CONDITIONERS)}, received {conditioner!r}"
        )
    if coupling not in COUPLINGS:
        raise ValueError(f"{name}: coupling must be one of {COUPLINGS}, received {coupling!r}")
    if int(blocks) < 0:
        raise ValueError(f"{name}: blocks must be ≥ 0, received {blocks}")
    if coupling == "spline":  # the transformer checks bins and bound, naming the constructor
        SplineTransformer(bins, bound, who=name)
    return _Couplings(
        int(hidden), int(blocks), activation, conditioner, coupling, int(bins), float(bound)
    )


def _split_prior(couplings: _Couplings, rngs) -> Callable[[Shape], Bijection]:
    """Glow's learned prior of the factored-out half (the last ``⌈c/2⌉`` channels) given the
    kept half: a coupling with ``channel_mask(shape, 0)``."""

    def prior(shape: Shape) -> Bijection:
        return couplings(channel_mask(shape, 0), rngs)

    return prior


def _multiscale(
    shape: Shape,
    levels: int,
    depth: int,
    step: Callable[[Shape, int], Bijection],
    prior: Callable[[Shape], Bijection] | None,
    squeeze_last: bool = False,
) -> MultiScale:
    """The levels (see the module docstring), each ``[Squeeze →] Stack(steps) [→ prior]``."""
    parts = []
    for level in range(levels):
        last = level == levels - 1
        layers: list[Bijection] = []
        if not last or squeeze_last:
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
    squeeze_last: bool = False,
    logit: bool = True,
    alpha: float = 0.05,
    activation: str = "relu",
    conditioner: str = "glow",
    coupling: str = "affine",
    bins: int = 8,
    bound: float = 3.0,
    rngs: nnx.Rngs,
) -> Flow:
    """Glow (Kingma & Dhariwal 2018) on images of shape ``event_shape = (H, W, C)``.

    ``levels`` levels (see the module docstring) of ``depth`` steps, each step
    :class:`~nflax.bijections.ActNorm` (per channel, data-dependent initialisation) →
    :class:`~nflax.bijections.Invertible1x1Conv` → a coupling that splits the channels in half
    (a checkerboard when there is one channel only). ``split_prior=True`` ends every level but
    the last with Glow's learned prior of the factored-out half given the kept half (a
    coupling, see :class:`~nflax.bijections.MultiScale`). ``squeeze_last=True`` squeezes
    before the last level too, as Glow does (module docstring). ``logit=True`` maps data in
    ``[0, 1]`` to the real line first, ``y = logit(α + (1 − 2α)x)`` with ``α = alpha``, its
    log-det inside the flow.

    The couplings: ``coupling="affine"`` (Glow's; an :class:`~nflax.bijections.AffineCoupling`)
    or ``"spline"`` (a :class:`~nflax.bijections.SplineCoupling` with ``bins`` bins on
    ``[-bound, bound]``, as in the Glow-shaped image flows of Neural Spline Flows, Durkan et
    al. 2019). Their conditioner: ``conditioner="glow"`` (Glow's own, a
    :class:`~nflax.nets.GlowConvNet`: 3×3 convolution, ``blocks`` 1×1 layers, 3×3
    convolution) or ``"resnet"`` (a :class:`~nflax.nets.ConvResNet` with ``blocks`` residual
    blocks), ``hidden`` channels wide, ``activation`` between layers, the last layer at zero
    (the flow starts as the identity after the logit and the ActNorms).

    On ``digits`` (``benchmarks/README.md``) the Glow conditioner trained better than the
    ResNet (it overfits the 1257 images less) and the spline coupling better than the affine.

    >>> import jax
    >>> flow = glow((4, 4, 1), levels=2, depth=2, hidden=8, rngs=nnx.Rngs(0))
    >>> flow.bijection.latent_shape, flow.sample(jax.random.key(0), 3).shape
    ((16,), (3, 4, 4, 1))
    """
    shape = _checked_shape("glow", event_shape, levels, depth, hidden, squeeze_last)
    make = _couplings("glow", hidden, blocks, activation, conditioner, coupling, bins, bound)

    def step(s: Shape, i: int) -> Bijection:
        mask = channel_mask(s, 0) if s[2] > 1 else checkerboard_mask(s, i % 2)
        return Chain([ActNorm(s), Invertible1x1Conv(s, rngs=rngs), make(mask, rngs)])

    prior = _split_prior(make, rngs) if split_prior else None
    body = _multiscale(shape, levels, depth, step, prior, squeeze_last)
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
    squeeze_last: bool = False,
    logit: bool = True,
    alpha: float = 0.05,
    activation: str = "relu",
    conditioner: str = "resnet",
    coupling: str = "affine",
    bins: int = 8,
    bound: float = 3.0,
    rngs: nnx.Rngs,
) -> Flow:
    """Multi-scale RealNVP (Dinh et al. 2017) on images of shape ``event_shape = (H, W, C)``.

    ``levels`` levels (see the module docstring) of ``depth`` steps; step ``i`` is a
    coupling with a checkerboard mask then one with a channel mask (parities ``i % 2``; a
    1×1 image has no checkerboard, a 1-channel one no channel mask), preceded by an
    :class:`~nflax.bijections.ActNorm` when ``actnorm=True`` (in place of the paper's batch
    norm). The couplings and their conditioners (by default the paper's: affine, on a
    :class:`~nflax.nets.ConvResNet` with ``blocks`` residual blocks of ``hidden`` channels,
    last layer at zero), ``split_prior``, ``squeeze_last``, ``logit`` and ``alpha`` as in
    :func:`glow`.

    >>> flow = realnvp_image((4, 4, 1), depth=1, hidden=8, actnorm=False, rngs=nnx.Rngs(0))
    >>> x = jnp.full((2, 4, 4, 1), 0.5)  # a fresh flow: logit, then the identity
    >>> [round(float(v), 3) for v in flow.log_prob(x)]  # 16·(log(0.9/0.25) − ½ log 2π)
    [5.792, 5.792]
    """
    shape = _checked_shape("realnvp_image", event_shape, levels, depth, hidden, squeeze_last)
    make = _couplings(
        "realnvp_image", hidden, blocks, activation, conditioner, coupling, bins, bound
    )

    def step(s: Shape, i: int) -> Bijection:
        couplings = [make(m, rngs) for m in _step_masks(s, i)]
        layers = [ActNorm(s), *couplings] if actnorm else couplings
        return layers[0] if len(layers) == 1 else Chain(layers)

    prior = _split_prior(make, rngs) if split_prior else None
    body = _multiscale(shape, levels, depth, step, prior, squeeze_last)
    return _image_flow(shape, body, logit, alpha)
