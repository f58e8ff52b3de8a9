"""What a training run and a VI run share: the flow built from the run's configuration, the
history's entries of ``metrics.json``, and the files every run writes."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from nflax import checkpoint, flows
from nflax.runs.folder import RunError, write_json

# the entries of a training run's metrics.json that say how training went
HISTORY_KEYS = (
    "steps_run",
    "stop_reason",
    "best_step",
    "steps_per_second",
    "compile_seconds",
    "train_seconds",
)


def build_flow(config: dict) -> nnx.Module:
    """The run's flow, initialised from its seed: ``flows.build(config["flow"],
    **config["flow_kwargs"])``; a constructor that refuses its arguments raises
    :class:`RunError` naming the flow.

    >>> build_flow({"flow": "nice", "flow_kwargs": {"dim": 2}, "seed": 0}).event_shape
    (2,)
    """
    try:
        return flows.build(config["flow"], **config["flow_kwargs"], rngs=nnx.Rngs(config["seed"]))
    except (TypeError, ValueError) as e:
        raise RunError(f"cannot build flow {config['flow']!r}: {e}") from None


def history_metrics(history, keys: tuple[str, ...] = HISTORY_KEYS) -> dict:
    """The attributes ``keys`` of ``history`` (a ``History`` or ``VIHistory``), in order."""
    return {k: getattr(history, k) for k in keys}


def save_run(out: Path, flow, history, metrics: dict, config: dict | None = None) -> None:
    """Write the run's ``flow/``, ``history.csv``, ``metrics.json`` and, when given,
    ``config.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        write_json(out / "config.json", config)
    checkpoint.save(out / "flow", flow)
    history.to_csv(str(out / "history.csv"))
    write_json(out / "metrics.json", metrics)
