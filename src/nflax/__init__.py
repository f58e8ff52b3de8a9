"""nflax: normalizing flows for JAX, built on Flax NNX and optax.

Direction convention: ``forward`` maps data → latent (normalizing), ``inverse`` maps
latent → data (sampling); ``log p(x) = log p_base(f(x)) + log|det ∂f/∂x|``.
"""

from nflax import (
    bijections,
    checkpoint,
    datasets,
    dequantization,
    distributions,
    flows,
    metrics,
    nets,
    plotting,
    variables,
    vi,
)
from nflax.checkpoint import load, save
from nflax.dequantization import fit_dequantized
from nflax.distributions import ConditionalDiagNormal, Flow, StandardNormal
from nflax.flow_matching import FlowMatchingHistory, fit_flow_matching
from nflax.metrics import evaluate
from nflax.training import History, fit, nll
from nflax.vi import VIHistory, fit_vi

__all__ = [
    "ConditionalDiagNormal",
    "Flow",
    "FlowMatchingHistory",
    "History",
    "StandardNormal",
    "bijections",
    "checkpoint",
    "datasets",
    "dequantization",
    "distributions",
    "evaluate",
    "fit",
    "fit_dequantized",
    "fit_flow_matching",
    "fit_vi",
    "load",
    "save",
    "flows",
    "metrics",
    "nets",
    "nll",
    "plotting",
    "testing",
    "variables",
    "vi",
    "VIHistory",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``nflax.testing`` is imported on first use, so ``import nflax`` does not pay for it."""
    if name == "testing":
        import importlib

        return importlib.import_module("nflax.testing")
    raise AttributeError(f"module 'nflax' has no attribute {name!r}")
