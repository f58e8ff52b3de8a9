"""The data-file loader under seeded fuzzing, with a value oracle: what a file must load to.

Every generated file either loads to exactly the array the oracle computes from what was
written, or raises :class:`DataFileError` exactly when the oracle says the file is unusable;
nothing else (no other exception, no silently different values). Hypothesis is seeded and
keeps no example database, so every run tries the same files.
"""

import csv
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nflax.datafiles import DataFileError, load_array

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
F32_MAX = float(np.finfo(np.float32).max)


def expected_from_array(arr: np.ndarray) -> np.ndarray | None:
    """The oracle for .npy/.npz: the float32 ``(n, d)`` array a numeric 1D or 2D array with at
    least one value, all finite and within float32's range, must load to; else ``None``."""
    if arr.dtype.kind not in "biuf" or arr.ndim not in (1, 2):
        return None
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.size == 0:
        return None
    values = arr.astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > F32_MAX):
        return None
    return values.astype(np.float32)


def expected_from_rows(rows: list[list[str]]) -> np.ndarray | None:
    """The oracle for CSV: blank rows are ignored; a first row that is not all numbers is a
    header; every other row must have the first data row's width and parse as numbers."""
    rows = [r for r in rows if any(c.strip() for c in r)]

    def number(c):
        try:
            return float(c)
        except ValueError:
            return None

    if not rows:
        return None
    if any(number(c) is None for c in rows[0]):
        rows = rows[1:]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        return None
    values = [[number(c) for c in r] for r in rows]
    if any(v is None for r in values for v in r):
        return None
    return expected_from_array(np.asarray(values, np.float64))


def _check(path, expected):
    if expected is None:
        with pytest.raises(DataFileError, match="data file"):
            load_array(path)
    else:
        got = load_array(path)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


numeric_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.float32, np.float16, np.int32, np.uint8, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
finite_arrays = hnp.arrays(  # mostly valid files; some values beyond float32's range
    dtype=np.float64,
    shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4),
    elements=st.floats(-1e39, 1e39),
)
other_arrays = hnp.arrays(
    dtype=st.sampled_from([np.complex64, np.dtype("U2")]), shape=hnp.array_shapes(max_dims=2)
)


@seed(16)
@FUZZ
@given(arr=st.one_of(numeric_arrays, finite_arrays, other_arrays))
def test_fuzz_npy_loads_to_its_array(tmp_path, arr):
    path = tmp_path / "f.npy"
    np.save(path, arr)
    _check(path, expected_from_array(arr))


@seed(17)
@FUZZ
@given(arrays=st.dictionaries(st.sampled_from(["x", "data", "a", "b"]), numeric_arrays, max_size=3))
def test_fuzz_npz_loads_the_one_array_or_x_or_data(tmp_path, arrays):
    path = tmp_path / "f.npz"
    np.savez(path, **arrays)
    # the only array, else the one named x, else data; several others: an error
    pick = next(iter(arrays)) if len(arrays) == 1 else "x" if "x" in arrays else "data"
    _check(path, expected_from_array(arrays[pick]) if pick in arrays else None)


cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.text(alphabet="0123456789.-+eE abcnaif", max_size=6),
)


@seed(18)
@FUZZ
@given(rows=st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6))
def test_fuzz_csv_loads_to_its_numbers(tmp_path, rows):
    path = tmp_path / "f.csv"
    path.write_text("\n".join(",".join(r) for r in rows))
    _check(path, expected_from_rows(rows))


@seed(19)
@FUZZ
@given(
    text=st.text(alphabet='0123456789.-+eE abcnaif,"\n', max_size=80),
)
def test_fuzz_csv_text_with_quotes(tmp_path, text):
    """Quotes and stray commas: the rows are whatever Python's csv module reads."""
    path = tmp_path / "f.csv"
    path.write_text(text)
    expected = expected_from_rows(list(csv.reader(io.StringIO(text)))) if text else None
    _check(path, expected)


@seed(20)
@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".npy", ".npz"]))
def test_fuzz_loaders_bytes(tmp_path, content, suffix):
    """Any bytes at all: a DataFileError, or (rarely) a file that is valid after all, which
    then loads to what numpy or the csv module reads from it."""
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    try:
        got = load_array(path)
    except DataFileError:
        return
    if suffix == ".npy":
        expected = expected_from_array(np.load(io.BytesIO(content), allow_pickle=False))
    elif suffix == ".csv":
        expected = expected_from_rows(list(csv.reader(io.StringIO(content.decode()))))
    else:
        with np.load(io.BytesIO(content), allow_pickle=False) as z:
            expected = expected_from_array(z[next(iter(z.keys()))])
    assert expected is not None
    np.testing.assert_array_equal(got, expected)
