"""``nflax sample``: samples of a run folder's flow, in the units of its data, to a file."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import jax
import numpy as np

from nflax import checkpoint
from nflax.distributions import compiled_sample
from nflax.runs.folder import RunError, read_config

SUFFIXES = (".npy", ".csv")


def run_sample(
    run: str | os.PathLike,
    num: int,
    output: str | os.PathLike,
    *,
    seed: int = 0,
    quiet: bool = False,
) -> np.ndarray:
    """Draw ``num`` samples from the flow of the run folder ``run`` with the seed ``seed`` and
    write them to ``output`` (``.npy``, or ``.csv`` with the training file's header row when it
    had one), atomically; a run trained on a standardised data file samples in the file's own
    units. Returns the samples; :class:`RunError` for a missing run or a bad output name.
    """
    run, out = Path(run), Path(output)
    _check_paths(run, out)
    try:
        flow = checkpoint.load(run / "flow")
    except checkpoint.CheckpointError as e:
        raise RunError(str(e)) from None
    x = np.asarray(compiled_sample(flow, jax.random.key(seed), num))
    config = read_config(run)
    std = config.get("standardize")
    if std:  # trained on a standardised file: back to its units
        x = x * np.asarray(std["std"]) + np.asarray(std["mean"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp" + out.suffix)
    if out.suffix == ".npy":
        np.save(tmp, x)
    else:  # with the training file's header row, when it had one
        header = _csv_row(config["columns"]) if config.get("columns") else ""
        np.savetxt(tmp, x, delimiter=",", fmt="%.8g", header=header, comments="")
    os.replace(tmp, out)
    if not quiet:
        print(f"wrote {len(x)} samples to {out}")
    return x


def _check_paths(run: Path, out: Path) -> None:
    if not run.exists():
        raise RunError(f"run folder {run} does not exist")
    if not run.is_dir():
        raise RunError(f"{run} is a file, expected a run folder")
    if out.suffix not in SUFFIXES:
        raise RunError(f"output {out} must end in .npy or .csv")
    if out.is_dir():
        raise RunError(f"output {out} is a folder, expected a file name")


def _csv_row(cells: list[str]) -> str:
    """One CSV line (quoted where a cell needs it), without the line ending.

    >>> _csv_row(["a", "b b", "c,d"])
    'a,b b,"c,d"'
    """
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()
