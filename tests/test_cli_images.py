"""`nflax train` on image sets: a tiny Glow and a flat flow on digits, an IDX folder through
--data-dir, and the errors of flags and data that do not fit (one line, exit status 2)."""

import gzip
import json
import shutil

import jax
import numpy as np
import pytest

import nflax
from nflax.cli import build_parser, given_flags, main
from nflax.cli_images import image_config
from nflax.image_data import load_images

TINY_GLOW = ["--flow", "glow", "--levels", "2", "--depth", "1", "--hidden", "8"]
TINY_RUN = ["--steps", "20", "--batch-size", "64", "--iw-samples", "4", "--quiet"]
FLAT = ["--flow", "realnvp", "--layers", "2", "--hidden", "16"]
IMAGE_FILES = ["config.json", "history.csv", "metrics.json", "flow/nflax.json"]
FIGURES = ["samples.png", "reconstructions.png", "loss.png"]


@pytest.fixture(scope="module")
def glow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("images") / "glow"
    assert main(["train", "--dataset", "digits", *TINY_GLOW, *TINY_RUN, "--out", str(out)]) == 0
    return out


def _json(run, name):
    return json.loads((run / name).read_text())


def _check_metrics(m, steps=20):
    assert m["num_levels"] == 17 and m["dim"] == 64 and m["iw_samples"] == 4
    assert m["steps_run"] == steps and m["stop_reason"] == "steps"
    for k in ["test_bits_per_dim", "test_bits_per_dim_bound", "train_bits_per_dim"]:
        assert np.isfinite(m[k]) and 0 < m[k] < 8, (k, m[k])
    # importance weighting only tightens the bound (4 samples: a little)
    assert m["test_bits_per_dim"] <= m["test_bits_per_dim_bound"] + 1e-6
    assert m["uniform_bits_per_dim"] == pytest.approx(np.log2(17))
    # the round trip data → latent → data is exact: every level comes back
    assert m["reconstruction_wrong_levels"] == 0
    assert m["reconstruction_max_abs_error"] < 1e-4


def test_glow_on_digits_writes_every_file_and_reconstructs_exactly(glow_run):
    for name in IMAGE_FILES + FIGURES:
        assert (glow_run / name).is_file(), name
    cfg, m = _json(glow_run, "config.json"), _json(glow_run, "metrics.json")
    assert cfg["images"] and cfg["flow"] == "glow" and cfg["dataset"] == "digits"
    assert cfg["flow_kwargs"] == {
        "event_shape": [8, 8, 1], "levels": 2, "depth": 1, "hidden": 8,
        "coupling": "spline", "squeeze_last": True,  # digits' image-flow options
    }  # fmt: skip
    assert cfg["dequantization"] == "uniform" and cfg["dequantizer"] is None
    assert cfg["weight_decay"] == 0.0 and cfg["lr"] == 1e-3  # the image defaults
    _check_metrics(m)
    rows = (glow_run / "history.csv").read_text().strip().splitlines()
    assert rows[0] == "step,loss,val_loss" and len(rows) == 21


def test_glow_run_reloads_with_the_same_density(glow_run):
    flow = nflax.load(glow_run / "flow")
    assert tuple(flow.event_shape) == (8, 8, 1)
    m = _json(glow_run, "metrics.json")
    test = load_images("digits").test
    # the reloaded flow's dequantization bound on the test set (other noise than the run's:
    # the mean over 360 images moves by ~1e-3 bits/dim) is the one the run recorded
    y = (test + jax.random.uniform(jax.random.key(1), test.shape)) / 17
    bpd = nflax.metrics.bits_per_dim(float(np.mean(nflax.nll(flow, y))), 64, num_levels=17)
    assert abs(bpd - m["test_bits_per_dim_bound"]) < 0.01, (bpd, m)


def test_sample_an_image_run_gives_images_of_levels(glow_run, tmp_path):
    for suffix, shape in [(".npy", (5, 8, 8, 1)), (".csv", (5, 64))]:
        out = tmp_path / f"s{suffix}"
        assert main(["sample", str(glow_run), "-n", "5", "-o", str(out)]) == 0
        x = np.load(out) if suffix == ".npy" else np.loadtxt(out, delimiter=",")
        assert x.shape == shape and x.min() >= 0 and x.max() <= 16
        assert np.all(x == np.round(x))


def test_flat_flow_on_digits_trains_on_the_flattened_image(tmp_path):
    out = tmp_path / "flat"
    argv = ["train", "--dataset", "digits", *FLAT, *TINY_RUN, "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    cfg, m = _json(out, "config.json"), _json(out, "metrics.json")
    assert cfg["flow_kwargs"]["dim"] == 64 and cfg["flow_kwargs"]["hidden"] == [16]
    assert cfg["flow_kwargs"]["num_layers"] == 2
    _check_metrics(m)
    flow = nflax.load(out / "flow")
    assert tuple(flow.event_shape) == (64,)
    assert not any((out / f).exists() for f in FIGURES)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _mnist_folder(folder, n_train=60, n_test=12, side=8):
    """Tiny MNIST-like IDX files (8×8 images, 256 levels), the training images gzipped."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, side, side), dtype=np.uint8)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(train)))
    test = rng.integers(0, 256, (n_test, side, side), dtype=np.uint8)
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx(test))
    return folder


def test_mnist_from_an_idx_folder(tmp_path):
    data = _mnist_folder(tmp_path / "idx")
    out = tmp_path / "mnist"
    argv = ["train", "--data-dir", str(data), "--dataset", "mnist", *FLAT, *TINY_RUN]
    assert main([*argv, "--no-plots", "--out", str(out)]) == 0
    cfg, m = _json(out, "config.json"), _json(out, "metrics.json")
    assert cfg["data_dir"] == str(data.absolute()) and cfg["num_levels"] == 256
    assert cfg["event_shape"] == [8, 8, 1] and cfg["dim"] == 64
    # a file of 60 training images keeps its last tenth for validation
    assert m["num_train_images"] == 54 and m["num_test_images"] == 12
    assert m["reconstruction_wrong_levels"] == 0 and np.isfinite(m["test_bits_per_dim"])


def _config(*argv):
    """The configuration `nflax train` would run with, without running it."""
    argv = ["train", *argv]
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)
    return image_config(args)[0]


def test_image_defaults_per_flow_and_set_and_flags_override_them():
    cfg = _config("--dataset", "digits")
    assert cfg["flow"] == "glow"
    assert cfg["flow_kwargs"] == {
        "event_shape": [8, 8, 1], "levels": 2, "depth": 4, "hidden": 64,
        "coupling": "spline", "squeeze_last": True,
    }  # fmt: skip
    assert (cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["weight_decay"]) == (2000, 64, 1e-3, 0)
    assert (cfg["patience"], cfg["iw_samples"], cfg["dequantization"]) == (500, 128, "uniform")
    assert cfg["ema"] == 0.999
    cfg = _config("--dataset", "mnist_5k")  # the recipe and conditioner its figures were made with
    assert cfg["flow_kwargs"]["conditioner"] == "resnet" and cfg["ema"] is None
    cfg = _config("--dataset", "digits", "--flow", "realnvp_image", "--no-actnorm", "--steps", "7")
    assert cfg["flow_kwargs"]["actnorm"] is False and cfg["flow_kwargs"]["depth"] == 2
    assert cfg["flow_kwargs"]["coupling"] == "spline" and cfg["flow_kwargs"]["hidden"] == 64
    assert cfg["steps"] == 7
    cfg = _config("--dataset", "digits", "--flow", "nsf")  # flat: its own defaults
    assert cfg["flow_kwargs"]["dim"] == 64 and cfg["flow_kwargs"]["hidden"] == [64]
    assert cfg["flow_kwargs"]["num_layers"] == 4 and cfg["steps"] == 2000
    argv = ["--dataset", "digits", "--flow", "nsf", "--layers", "3", "--hidden", "8", "8"]
    cfg = _config(*argv, "--weight-decay", "0.1", "--batch-size", "32", "--no-early-stopping")
    assert cfg["flow_kwargs"]["num_layers"] == 3 and cfg["flow_kwargs"]["hidden"] == [8, 8]
    assert (cfg["weight_decay"], cfg["batch_size"], cfg["patience"]) == (0.1, 32, None)
    cfg = _config("--dataset", "digits", "--dequantization", "variational", "--lev", "1")
    assert cfg["dequantizer"]["flow"] == "realnvp" and cfg["flow_kwargs"]["levels"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "nope"], "image sets: digits, fashion_mnist, mnist, mnist_5k"),
        (["--dataset", "mnist"], "--dataset mnist is read from IDX files in a folder: add"),
        (["--dataset", "mnist", "--data-dir", "/no/such"], "MNIST folder /no/such does not exist"),
        (["--dataset", "fashion_mnist", "--data-dir", "."], "holds none of the files"),
        (["--dataset", "digits", "--data-dir", "."], "--data-dir is for --dataset mnist or"),
        (["--flow", "glow"], "flow 'glow' models images: it needs an image set"),
        (["--flow", "realnvp_image", "--dataset", "moons"], "not --dataset moons"),
        (["--data-dir", "."], "--data-dir is for the image sets"),
        (["--levels", "2"], "--levels is for the image sets"),
        (["--dataset", "digits", "--flow", "maf", "--depth", "2"], "--depth is an option of the"),
        (["--dataset", "digits", "--layers", "3"], "--layers is not an option of flow 'glow'"),
        (["--dataset", "digits", "--leaky-relu"], "--leaky-relu is not an option of flow 'glow'"),
        (["--dataset", "digits", "--no-actnorm"], "--no-actnorm is not an option of flow 'glow'"),
        (["--dataset", "digits", "--hidden", "8", "8"], "is one width"),
        (["--dataset", "digits", "--num-points", "100"], "--num-points does not apply"),
        (["--dataset", "digits", "--devices", "all"], "image runs train on one device"),
        (["--dataset", "digits", "--dequantization", "x"], "invalid choice: 'x'"),
        (["--dataset", "digits", "--flow", "nope"], "unknown flow 'nope'"),
    ],
)
def test_image_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nflax: error: ") and message in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_variational_dequantization_run_saves_its_noise_flow(tmp_path):
    out = tmp_path / "var"
    argv = ["train", "--dataset", "digits", *FLAT, *TINY_RUN, "--no-plots", "--out", str(out)]
    assert main([*argv, "--dequantization", "variational"]) == 0
    cfg, m = _json(out, "config.json"), _json(out, "metrics.json")
    assert cfg["dequantizer"]["flow_kwargs"]["context_dim"] == 64
    assert m["dequantization"] == "variational" and np.isfinite(m["test_bits_per_dim"])
    noise = nflax.load(out / "dequantizer")
    assert noise.context_dim == 64


@pytest.mark.slow
def test_image_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    out = tmp_path / "resume"
    argv = ["train", "--dataset", "digits", *FLAT, "--steps", "40", "--checkpoint-every", "10"]
    assert main([*argv, "--iw-samples", "4", "--no-plots", "--quiet", "--out", str(out)]) == 0
    before = _json(out, "metrics.json")
    last = max((out / "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert last.name == "40"
    shutil.rmtree(last)  # as if killed after step 30
    assert main(["train", "--resume", str(out), "--no-plots", "--quiet"]) == 0
    after = _json(out, "metrics.json")
    assert after["test_bits_per_dim"] == before["test_bits_per_dim"]
    assert after["steps_run"] == 40
