"""Reading a user's data file (``.npy``, ``.npz``, ``.csv``) into a checked float32 array, with
the column names of a CSV header (:func:`load_table`).

Every problem is a :class:`DataFileError` (a ``ValueError``) whose message names the file and
what is wrong with it: missing, a folder, empty, an unknown type, non-numeric cells, ragged
rows, the wrong number of dimensions, NaN or inf.

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "x.csv")
>>> _ = open(path, "w").write("a,b\\n1,2\\n3,4\\n")
>>> load_array(path)
array([[1., 2.],
       [3., 4.]], dtype=float32)
>>> load_table(path)[1]
['a', 'b']
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".csv")


class DataFileError(ValueError):
    """A data file that cannot be used, with a message naming the file and the problem."""


def load_array(path: str | os.PathLike, *, dim: int | None = None) -> np.ndarray:
    """Read ``path`` into an ``(n, d)`` float32 array, checking it thoroughly.

    ``.npz`` files must hold one array (or one named ``x`` or ``data``). A ``.csv`` file may
    start with one header row (skipped; :func:`load_table` returns its names). A 1D array is
    read as ``n`` points of dimension 1. With ``dim``, the number of columns must equal it.
    """
    arr, _ = _load(Path(path), dim)
    return arr


def load_table(
    path: str | os.PathLike, *, dim: int | None = None
) -> tuple[np.ndarray, list[str] | None]:
    """:func:`load_array`, and the column names from a CSV file's header row.

    The names are ``None`` for ``.npy``/``.npz`` files and a CSV file without a header. A
    header must name every column (a :class:`DataFileError` otherwise); names are stripped of
    surrounding spaces.
    """
    p = Path(path)
    arr, header = _load(p, dim)
    if header is None:
        return arr, None
    names = [c.strip() for c in header]
    if len(names) != arr.shape[1]:
        raise DataFileError(
            f"data file {p}: the header names {len(names)} column(s), the rows have {arr.shape[1]}"
        )
    return arr, names


def _load(p: Path, dim: int | None) -> tuple[np.ndarray, list[str] | None]:
    """The checked array and the raw header row (CSV only, else ``None``)."""
    if not p.exists():
        raise DataFileError(f"data file {p} does not exist")
    if p.is_dir():
        raise DataFileError(f"data file {p} is a folder, expected a file")
    if p.suffix.lower() not in SUFFIXES:
        raise DataFileError(
            f"data file {p}: unsupported type {p.suffix or '(none)'!r}, expected one of "
            f"{', '.join(SUFFIXES)}"
        )
    if p.stat().st_size == 0:
        raise DataFileError(f"data file {p} is empty")
    suffix = p.suffix.lower()
    header = None
    if suffix == ".csv":
        arr, header = _read_csv(p)
    elif suffix == ".npy":
        arr = _read_npy(p)
    else:
        arr = _read_npz(p)
    return check_array(arr, str(p), dim=dim), header


def check_array(arr: np.ndarray, name: str, *, dim: int | None = None) -> np.ndarray:
    """Shape, dtype and finiteness checks shared by every loader."""
    if arr.dtype.kind not in "biuf":
        raise DataFileError(f"data file {name}: holds {arr.dtype} values, expected numbers")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataFileError(
            f"data file {name}: expected a 2D array (points × dimensions), received shape "
            f"{arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataFileError(f"data file {name}: contains no data points (shape {arr.shape})")
    if dim is not None and arr.shape[1] != dim:
        raise DataFileError(f"data file {name}: expected {dim} column(s), received {arr.shape[1]}")
    problem = nonfinite_rows(arr)
    if problem:
        raise DataFileError(f"data file {name}: {problem}")
    big = np.abs(arr) > np.finfo(np.float32).max  # would become inf in float32
    if big.any():
        rows = np.unique(np.nonzero(big)[0])
        raise DataFileError(
            f"data file {name}: {len(rows)} row(s) hold values beyond float32's range "
            f"(±3.4e38; first at row {int(rows[0])})"
        )
    return arr.astype(np.float32)


def nonfinite_rows(arr: np.ndarray) -> str | None:
    """``"k row(s) contain NaN or inf (first at row r)"``, or ``None`` when all is finite."""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    rows = np.unique(np.nonzero(bad)[0])
    return f"{len(rows)} row(s) contain NaN or inf (first at row {int(rows[0])})"


def _read_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFileError(f"data file {p} is not a readable .npy file ({e})") from None


def _read_npz(p: Path) -> np.ndarray:
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if len(keys) == 1:
                return z[keys[0]]
            for k in ("x", "data"):
                if k in keys:
                    return z[k]
            raise DataFileError(
                f"data file {p} holds {len(keys)} arrays ({', '.join(keys) or 'none'}); "
                f"expected one, or one named 'x' or 'data'"
            )
    except DataFileError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataFileError(f"data file {p} is not a readable .npz file ({e})") from None


def _read_csv(p: Path) -> tuple[np.ndarray, list[str] | None]:
    """The numbers, and the header row when the first row is not numeric."""
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise DataFileError(f"data file {p} is not a text (UTF-8) CSV file") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise DataFileError(f"data file {p} is empty")
    start = 1 if not _numeric_row(rows[0]) else 0
    width = len(rows[start]) if start < len(rows) else len(rows[0])
    out = np.empty((len(rows) - start, width), np.float64)
    for i, row in enumerate(rows[start:]):
        line = i + start + 1
        if len(row) != width:
            raise DataFileError(
                f"data file {p} line {line}: {len(row)} column(s), expected {width}"
            )
        for j, cell in enumerate(row):
            try:
                out[i, j] = float(cell)
            except ValueError:
                raise DataFileError(
                    f"data file {p} line {line} column {j + 1}: {cell.strip()!r} is not a number"
                ) from None
    return out, (rows[0] if start else None)


def _numeric_row(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True


def standardize(x: np.ndarray, name: str = "data") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x − mean) / std`` per column, with the mean and std (a constant column is an error)."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    if np.any(std == 0):
        cols = ", ".join(str(int(c) + 1) for c in np.nonzero(std == 0)[0])
        raise DataFileError(f"{name}: column(s) {cols} are constant; cannot standardise")
    return ((x - mean) / std).astype(np.float32), mean, std
