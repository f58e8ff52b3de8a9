"""A ``nflax vi`` run: fit a flow to a target's unnormalised density by reverse KL, measure
how close it came, write the run folder."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from nflax import datasets
from nflax.distributions import compiled_sample
from nflax.runs.common import build_flow, history_metrics, save_run
from nflax.runs.figures import vi_figures
from nflax.runs.folder import RunError, hold_run_folder
from nflax.vi import default_vi_optimizer, fit_vi, vi_diagnostics

NUM_EVAL_SAMPLES = 65536  # samples for the ELBO, the ESS and the moments
VI_HISTORY_KEYS = (
    "steps_run",
    "stop_reason",
    "steps_per_second",
    "compile_seconds",
    "train_seconds",
)


def vi_target(name: str, dim: int | None = None) -> datasets.Target:
    """The VI target ``name`` (``dim`` for the targets that take one); :class:`RunError`
    for an unknown name or an option the target does not take.

    >>> vi_target("correlated_gaussian", 3).dim
    3
    """
    try:
        return datasets.get_target(name, **({"dim": dim} if dim is not None else {}))
    except ValueError as e:
        raise RunError(str(e)) from None


def run_vi(
    target: datasets.Target,
    config: dict,
    out: str | os.PathLike,
    *,
    quiet: bool = False,
    plots: bool = True,
) -> dict:
    """Fit the run ``config`` (``flow``, ``flow_kwargs``, ``seed``, ``steps``,
    ``num_samples``, ``lr``, ``stick_the_landing``) to ``target`` in the new folder ``out``,
    then write ``config.json``, the flow, ``history.csv``, ``metrics.json`` and the figures;
    return the metrics."""
    with hold_run_folder(out, fresh=True) as run:
        key_fit, key_eval, key_plot = jax.random.split(jax.random.key(config["seed"]), 3)
        flow = build_flow(config)
        history = fit_vi(
            flow,
            target.log_density,
            key=key_fit,
            steps=config["steps"],
            num_samples=config["num_samples"],
            optimizer=default_vi_optimizer(config["steps"], config["lr"]),
            stick_the_landing=config["stick_the_landing"],
            progress=False if quiet else None,
        )
        metrics = vi_metrics(flow, target, history, key_eval)
        samples = np.asarray(compiled_sample(flow, key_plot, NUM_EVAL_SAMPLES))
        metrics.update(moment_errors(samples, target))
        save_run(run, flow, history, metrics, config)
        if plots:
            vi_figures(run, flow, target, history, samples[:2000], key_plot)
        if not quiet:
            print(vi_summary_line(target, metrics, run))
        return metrics


def vi_metrics(flow, target: datasets.Target, history, key) -> dict:
    """The ELBO, its standard error, the effective sample size, the estimated and the exact
    ``log Z`` and, when ``log Z`` is known, ``KL(q ‖ p) = log Z − ELBO``; then how the fit
    went."""
    diag = vi_diagnostics(flow, target.log_density, key=key, num_samples=NUM_EVAL_SAMPLES)
    metrics = {
        "elbo": diag["elbo"],
        "elbo_std_error": diag["elbo_std_error"],
        "ess_fraction": diag["ess_fraction"],
        "log_z_estimate": diag["log_z"],
        "log_z": target.log_normalizer,
        "num_eval_samples": diag["num_samples"],
        **history_metrics(history, VI_HISTORY_KEYS),
    }
    if target.log_normalizer is not None:
        metrics["kl_q_p"] = target.log_normalizer - diag["elbo"]  # log Z − ELBO = KL(q ‖ p)
    return metrics


def moment_errors(samples: np.ndarray, target: datasets.Target) -> dict:
    """For a target with known moments: the largest error of the samples' mean and the
    relative (Frobenius) error of their covariance; else nothing.

    >>> t = vi_target("correlated_gaussian", 2)
    >>> x = np.random.default_rng(0).multivariate_normal(t.mean, t.covariance, 100_000)
    >>> {k: bool(v < 0.02) for k, v in moment_errors(x, t).items()}
    {'mean_abs_error': True, 'covariance_rel_error': True}
    """
    if target.mean is None:
        return {}
    mean, cov = np.asarray(target.mean), np.asarray(target.covariance)
    err = np.cov(samples.T).reshape(cov.shape) - cov
    return {
        "mean_abs_error": float(np.max(np.abs(samples.mean(0) - mean))),
        "covariance_rel_error": float(np.linalg.norm(err) / np.linalg.norm(cov)),
    }


def vi_summary_line(target: datasets.Target, metrics: dict, out: Path) -> str:
    """The line ``nflax vi`` prints at the end of a run."""
    line = f"{target.name}: ELBO {metrics['elbo']:.4f}"
    if target.log_normalizer is not None:
        line += f" (log Z {target.log_normalizer:.4f}, KL {metrics['kl_q_p']:.4f})"
    return line + (
        f", ESS {100 * metrics['ess_fraction']:.1f}%, {metrics['steps_run']} steps → {out}"
    )
