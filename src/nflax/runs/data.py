"""The data of a ``nflax train`` run: a built-in set, a conditional set or the user's file.

:func:`describe_data` checks the source when a run is set up and gives the entries of its
``config.json``; :func:`load_run_data` draws (or reads) the training and test points from
that configuration, the same points every time for a seed, so that a resumed run sees the
data its first part saw. :func:`process_block` is the share of the rows one process of a
multi-process run passes to ``fit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nflax import datasets
from nflax.datafiles import DataFileError, load_table, standardize
from nflax.image_data import image_names
from nflax.runs.folder import RunError

NUM_TEST_POINTS = 16384  # test points drawn from a built-in set


@dataclass(frozen=True)
class RunData:
    """The points of a training run, in the flow's units (a data file's are standardised).

    ``x``/``context`` are every training row (all processes'), ``x_test``/``context_test``
    the test rows (none for a data file of fewer than 20 rows); ``context`` is ``None``
    unless the run is conditional. ``dataset`` is the built-in set (``None`` for a data
    file); ``standardize`` holds a data file's column ``mean`` and ``std``, and
    ``nll_offset = Σ log std`` turns an NLL of standardised points into one in the file's
    own units.
    """

    name: str
    dim: int
    x: np.ndarray
    x_test: np.ndarray
    context: np.ndarray | None = None
    context_test: np.ndarray | None = None
    dataset: Any = None
    standardize: dict | None = None
    nll_offset: float = 0.0

    @property
    def log_prob_true(self):
        """The exact log-density ``(x[, context]) → log p(x)``, or ``None`` when unknown."""
        if self.dataset is None or not self.dataset.has_density:
            return None
        return self.dataset.log_prob


@dataclass(frozen=True)
class DataSpec:
    """What a new run records of its data: ``config`` (the entries of ``config.json``:
    ``dataset``, ``dim`` and ``conditional``, or ``data_file`` and ``columns``), ``name``
    (for the run folder and the summary) and a conditional set's ``context_dim``."""

    config: dict
    name: str
    context_dim: int | None = None


def describe_data(
    dataset: str | None = None, data_file: str | None = None, *, conditional: bool = False
) -> DataSpec:
    """Check a run's data source (a built-in or conditional set by name, or a data file) and
    describe it; an unknown set or an unreadable file raises :class:`RunError`.

    >>> spec = describe_data("moons")
    >>> spec.config, spec.name
    ({'dataset': 'moons', 'dim': 2}, 'moons')
    """
    try:
        if data_file is not None:
            x, columns = load_table(data_file)
            config = {"dataset": None, "data_file": str(Path(data_file).absolute())}
            config.update(dim=x.shape[1], columns=columns)
            return DataSpec(config, Path(data_file).stem)
        if conditional:
            cds = datasets.get_conditional(dataset)
            config = {"dataset": cds.name, "dim": cds.dim, "conditional": True}
            return DataSpec(config, cds.name, cds.context_dim)
        try:
            ds = datasets.get(dataset)
        except ValueError as e:  # the image sets are known too (nflax.runs.images)
            raise RunError(f"{e}; image sets: {', '.join(image_names())}") from None
        return DataSpec({"dataset": ds.name, "dim": ds.dim}, ds.name)
    except ValueError as e:  # DataFileError is a ValueError
        raise RunError(str(e)) from None


def load_run_data(config: dict, key_data: jax.Array, key_test: jax.Array) -> RunData:
    """The training and test points of the run ``config`` (a ``config.json``): drawn from
    its set with ``key_data`` and ``key_test``, or read from its data file, standardised,
    with a fixed 10 % of the rows (chosen by ``key_test``) held out for testing."""
    if config.get("data_file"):
        return _from_file(config, key_test)
    try:
        if config.get("conditional"):
            ds = datasets.get_conditional(config["dataset"])
        else:
            ds = datasets.get(config["dataset"])
    except ValueError as e:
        raise RunError(f"cannot run: {e}") from None
    train, test = ds.sample(key_data, config["num_points"]), ds.sample(key_test, NUM_TEST_POINTS)
    if not config.get("conditional"):
        return RunData(ds.name, ds.dim, np.asarray(train), np.asarray(test), dataset=ds)
    (x, c), (x_test, c_test) = ([np.asarray(a) for a in pair] for pair in (train, test))
    return RunData(ds.name, ds.dim, x, x_test, c, c_test, dataset=ds)


def _from_file(config: dict, key_test: jax.Array) -> RunData:
    """A data-file run's points: the file read again (it must still have the run's number of
    columns), standardised, and split into training and test rows."""
    path = config["data_file"]
    try:
        raw, _ = load_table(path)
        if raw.shape[1] != config["dim"]:
            raise RunError(
                f"data file {path} now has {raw.shape[1]} column(s); the run was started with "
                f"{config['dim']}"
            )
        order = np.asarray(jax.random.permutation(key_test, len(raw)))
        n_test = max(1, len(raw) // 10) if len(raw) >= 20 else 0
        x_all, mean, std = standardize(raw, f"data file {path}")
    except DataFileError as e:
        raise RunError(str(e)) from None
    return RunData(
        name=Path(path).stem,
        dim=config["dim"],
        x=x_all[order[n_test:]],
        x_test=x_all[order[:n_test]],
        standardize={"mean": mean.tolist(), "std": std.tolist()},
        nll_offset=float(np.sum(np.log(std))),  # NLL in data units = NLL in z-units + this
    )


def process_block(num_rows: int, process_index: int, process_count: int) -> slice:
    """The rows process ``process_index`` of ``process_count`` passes to ``fit`` (which
    gathers every process's block): equal consecutive blocks, or :class:`RunError` when the
    rows do not split evenly.

    >>> process_block(1024, 1, 4)
    slice(256, 512, None)
    """
    if num_rows % process_count:
        raise RunError(
            f"{num_rows} training points do not split evenly over {process_count} processes"
        )
    block = num_rows // process_count
    return slice(process_index * block, (process_index + 1) * block)
