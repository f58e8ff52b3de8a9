"""Image bijections, event shape ``(H, W, C)``: squeeze, coupling masks, the invertible 1×1
convolution and the multi-scale composite (image → flat vector). The per-channel image
ActNorm is :class:`nflax.bijections.ActNorm` with an image event shape; the logit
preprocessing is :class:`nflax.bijections.Logit` with ``alpha``."""

from nflax.bijections.image.conv1x1 import Invertible1x1Conv
from nflax.bijections.image.masks import channel_mask, checkerboard_mask
from nflax.bijections.image.multiscale import MultiScale
from nflax.bijections.image.squeeze import Squeeze

__all__ = ["Invertible1x1Conv", "MultiScale", "Squeeze", "channel_mask", "checkerboard_mask"]
