"""A ``nflax train`` run: fit a flow to a run's data, evaluate it, write the run folder.

:func:`run_train` takes a run configuration (the dictionary ``config.json`` holds) and does
the whole run, fresh or resumed; :func:`resume_train` reads the configuration of a stopped
run first. Every process of a multi-process run calls them with the same folder: each fits
its block of the rows, and process 0 alone writes files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from nflax import checkpoint, parallel
from nflax.flow_matching import fit_flow_matching
from nflax.metrics import evaluate
from nflax.runs.common import build_flow, history_metrics, save_run
from nflax.runs.data import RunData, load_run_data, process_block
from nflax.runs.figures import train_figures
from nflax.runs.folder import RunError, hold_run_folder, write_json
from nflax.runs.images import train_images
from nflax.training import default_optimizer, fit, nll

# the test metrics that are NLLs (the data file's offset Σ log std is added to them)
TEST_NLL_KEYS = ("test_nll", "test_nll_median", "test_nll_trimmed_1pct", "test_nll_worst")
UNITS = "NLL in the data file's own units (standardisation undone)"
# Flow matching's recipe: its gradients are noisy (a fresh noise draw and time per point and
# step), so the flow ends with the moving average of the iterates, not the iterate of the best
# validation loss, which is a noisy guide to the likelihood (benchmarks/README.md, "Continuous
# flows").
FLOW_MATCHING = {"ema": 0.9995, "restore_best": False}


def run_train(
    config: dict,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    quiet: bool = False,
    plots: bool = True,
) -> dict | None:
    """Train the run ``config`` in the folder ``out`` (claimed for the run's length: a new run
    needs an empty or absent folder), then write the flow, ``history.csv``, ``metrics.json``
    and the figures; return the metrics (``None`` on processes other than 0).

    ``config`` holds the data (see :func:`describe_data`), ``flow`` and ``flow_kwargs``,
    ``seed``, ``num_points``, ``steps``, ``lr``, ``schedule``, ``weight_decay``,
    ``batch_size``, ``patience``, ``val_fraction``, ``checkpoint_every``, ``devices`` and
    ``objective`` (``"likelihood"``, the default, or ``"flow-matching"``).
    With ``images`` set, ``config`` is an image run's (:mod:`nflax.runs.images`).
    A new run writes it to ``config.json`` before training; ``resume=True`` continues from the
    folder's last training checkpoint. ``quiet`` silences the progress bar and summary line.
    """
    with hold_run_folder(out, fresh=not resume) as run:
        if config.get("images"):  # an image set: dequantized training, bits/dim
            return train_images(config, run, resume=resume, quiet=quiet, plots=plots)
        return _train(config, run, resume=resume, quiet=quiet, plots=plots)


def resume_train(run: str | os.PathLike, *, quiet: bool = False, plots: bool = True):
    """:func:`run_train` on a stopped run's folder, from its own ``config.json``."""
    return run_train(read_train_config(run), run, resume=True, quiet=quiet, plots=plots)


def read_train_config(run: str | os.PathLike) -> dict:
    """The ``config.json`` of the ``nflax train`` run folder ``run``; :class:`RunError` when
    there is none, it is corrupt, or the run was made by another command."""
    run = Path(run)
    if not run.is_dir() or not (run / "config.json").is_file():
        raise RunError(f"cannot resume {run}: not a run folder (no config.json)")
    try:
        config = json.loads((run / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"cannot resume {run}: config.json is corrupt ({e})") from None
    if not isinstance(config, dict) or config.get("command") != "train":
        raise RunError(f"cannot resume {run}: it is not a `nflax train` run")
    return config


def _train(config: dict, out: Path, *, resume: bool, quiet: bool, plots: bool) -> dict | None:
    """The run in the claimed folder ``out``: data, flow, fit, metrics, files."""
    key_data, key_test, key_fit, key_plot = jax.random.split(jax.random.key(config["seed"]), 4)
    data = load_run_data(config, key_data, key_test)
    if data.standardize is not None:
        config["standardize"] = data.standardize
    rows = process_block(len(data.x), jax.process_index(), jax.process_count())
    flow = build_flow(config)
    if parallel.is_primary():
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(out / "config.json", config)
    history = _fit(flow, data, rows, config, out, key_fit, resume=resume, quiet=quiet)
    metrics = train_metrics(flow, data, history)
    if not parallel.is_primary():  # every process takes part in saving; process 0 writes
        checkpoint.save(out / "flow", flow)
        return None
    save_run(out, flow, history, metrics, config if data.standardize is not None else None)
    if plots:
        train_figures(out, flow, data, history, key_plot, config)
    if not quiet:
        print(summary_line(data.name, metrics, out))
    return metrics


def _fit(flow, data: RunData, rows: slice, config: dict, out: Path, key, *, resume, quiet):
    """``fit`` (or ``fit_flow_matching``) with the run's recipe on this process's ``rows``,
    checkpointing into ``out``."""
    steps = config["steps"]
    train_fn, options = fit, {}
    if config.get("objective", "likelihood") == "flow-matching":
        train_fn, options = fit_flow_matching, FLOW_MATCHING
    try:
        return train_fn(
            flow,
            data.x[rows],
            context=None if data.context is None else data.context[rows],
            key=key,
            steps=steps,
            optimizer=default_optimizer(
                steps, config["lr"], config["weight_decay"], config["schedule"]
            ),
            batch_size=config["batch_size"],
            patience=config["patience"],
            val_fraction=config["val_fraction"],
            progress=False if quiet else None,
            checkpoint_dir=out / "checkpoints",
            checkpoint_every=config["checkpoint_every"],
            resume=resume,
            devices=config.get("devices"),
            **options,
        )
    except (ValueError, checkpoint.CheckpointError) as e:
        raise RunError(str(e)) from None


def train_metrics(flow, data: RunData, history) -> dict:
    """The entries of ``metrics.json``: the training NLL, the test metrics of
    :func:`nflax.evaluate` (when the run has test points), how training went, and for a data
    file the units (its NLLs are in the file's own units: ``data.nll_offset`` is added)."""
    metrics = {"train_nll": float(np.mean(nll(flow, data.x, data.context))) + data.nll_offset}
    if len(data.x_test):
        test = evaluate(flow, data.x_test, data.context_test, data.log_prob_true)
        for k in TEST_NLL_KEYS:
            test[k] += data.nll_offset
        metrics.update(test)
    metrics.update(history_metrics(history))
    if data.standardize is not None:
        metrics["units"] = UNITS
    return metrics


def summary_line(name: str, metrics: dict, out: Path) -> str:
    """The line ``nflax train`` prints at the end of a run.

    >>> summary_line("banana", {"test_nll": 3.5, "true_nll": 3.4, "test_minus_true_nll": 0.1,
    ...     "steps_run": 900, "stop_reason": "patience"}, Path("runs/b"))
    'banana: test NLL 3.5000 (exact 3.4000, gap +0.1000), 900 steps (patience) → runs/b'
    """
    line = f"{name}: "
    if "test_nll" in metrics:
        line += f"test NLL {metrics['test_nll']:.4f}"
    if "true_nll" in metrics:
        line += f" (exact {metrics['true_nll']:.4f}, gap {metrics['test_minus_true_nll']:+.4f})"
    return line + f", {metrics['steps_run']} steps ({metrics['stop_reason']}) → {out}"
