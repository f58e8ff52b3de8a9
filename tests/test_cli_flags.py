"""Each `nflax` flag checked by what it changes: small runs (a few seconds each), compared in
pairs that differ in that flag only, and the error paths of flags that do not go together."""

import argparse
import csv
import json

import jax
import numpy as np
import pytest
from flax import nnx

import nflax
from nflax.checkpoint import TrainingCheckpoints
from nflax.cli import DEFAULT_LAYERS, TRAIN_ACTIVATION, build_parser, main
from nflax.vi import default_vi_schedule

TRAIN = [
    "train", "--num-points", "128", "--layers", "2", "--hidden", "8", "--steps", "30",
    "--no-early-stopping", "--schedule", "constant", "--lr", "0.01", "--weight-decay", "0",
    "--checkpoint-every", "30", "--no-plots", "--quiet",
]  # fmt: skip
TIMING = {"steps_per_second", "compile_seconds", "train_seconds"}
TRAIN_RUNS = {
    "seed3": ["--seed", "3"],
    "seed3_again": ["--seed", "3"],
    "seed4": ["--seed", "4"],
    "weight_decay": ["--seed", "3", "--weight-decay", "0.5"],
    "warmup": ["--seed", "3", "--schedule", "warmup-cosine"],
    "devices": ["--seed", "3", "--devices", "all"],
    "moons_leaky": ["--seed", "3", "--dataset", "moons", "--leaky-relu", "--no-actnorm"]
    + ["--batch-size", "32", "--activation", "gelu"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    for name, extra in TRAIN_RUNS.items():
        assert main([*TRAIN, "--out", str(root / name), *extra]) == 0, name
    return {name: root / name for name in TRAIN_RUNS}


def _config(run):
    return json.loads((run / "config.json").read_text())


def _metrics(run):
    m = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in TIMING}


def _column(run, name):
    with open(run / "history.csv") as f:
        return np.array([float(r[name]) for r in csv.DictReader(f)], np.float64)


def _flow_arrays(run):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(nflax.load(run / "flow")))]


def test_seed_same_seed_same_run_other_seed_other_run(runs):
    a, again, other = runs["seed3"], runs["seed3_again"], runs["seed4"]
    assert _config(a)["seed"] == 3 and _config(other)["seed"] == 4
    assert (a / "history.csv").read_text() == (again / "history.csv").read_text()
    assert _metrics(a) == _metrics(again)
    for x, y in zip(_flow_arrays(a), _flow_arrays(again), strict=True):
        np.testing.assert_array_equal(x, y)
    # another seed: other training points, initialisation and test points
    assert _column(a, "loss")[0] != _column(other, "loss")[0]
    assert _metrics(a)["true_nll"] != _metrics(other)["true_nll"]
    assert any(
        not np.array_equal(x, y) for x, y in zip(_flow_arrays(a), _flow_arrays(other), strict=True)
    )


def test_weight_decay_changes_the_updates_only(runs):
    a, wd = runs["seed3"], runs["weight_decay"]
    assert _config(a)["weight_decay"] == 0.0 and _config(wd)["weight_decay"] == 0.5
    la, lw = _column(a, "loss"), _column(wd, "loss")
    assert la[0] == lw[0]  # same data and initialisation
    assert np.all(la[1:] != lw[1:])  # every update differs


def test_schedule_warmup_starts_at_rate_zero_constant_does_not(runs):
    const, warm = runs["seed3"], runs["warmup"]
    assert _config(const)["schedule"] == "constant"
    assert _config(warm)["schedule"] == "warmup-cosine"
    lc, lw = _column(const, "loss"), _column(warm, "loss")
    assert lc[0] == lw[0]
    assert lw[1] == lw[0] and lw[2] != lw[1]  # full batch: step 0's rate is 0, step 1's is not
    assert lc[1] != lc[0]


def test_devices_all_trains_the_same_model(runs):
    a, dev = runs["seed3"], runs["devices"]
    assert _config(dev)["devices"] == "all" and _config(a)["devices"] is None
    n = len(jax.devices())  # one device here: the same numbers; several: the same up to rounding
    np.testing.assert_allclose(_column(dev, "loss"), _column(a, "loss"), rtol=0 if n == 1 else 1e-5)
    assert _metrics(dev)["steps_run"] == 30


def test_dataset_leaky_relu_no_actnorm_batch_size(runs):
    a, run = runs["seed3"], runs["moons_leaky"]
    cfg = _config(run)
    assert cfg["dataset"] == "moons" and cfg["batch_size"] == 32 and cfg["steps"] == 30
    assert cfg["flow_kwargs"]["num_layers"] == 2 and cfg["flow_kwargs"]["hidden"] == [8]
    # --no-early-stopping: every point trains, no validation split, no patience
    assert cfg["early_stopping"] is False and cfg["val_fraction"] == 0 and cfg["patience"] is None
    with open(run / "history.csv") as f:
        assert {r["val_loss"] for r in csv.DictReader(f)} == {""}
    assert not list(run.glob("*.png"))  # --no-plots
    assert cfg["flow_kwargs"]["leaky_relu"] is True and cfg["flow_kwargs"]["actnorm"] is False
    assert "true_nll" not in _metrics(run)  # moons has no exact density; the banana has
    assert "true_nll" in _metrics(a)
    assert nflax.load(run / "flow").layer_names() == ["AffineCoupling", "LeakyReLU"] * 2
    assert nflax.load(a / "flow").layer_names() == ["ActNorm"] + ["AffineCoupling"] * 2
    # --activation, and nflax train's own default when it is not given
    assert json.loads(nflax.load(run / "flow").spec)["kwargs"]["activation"] == "gelu"
    assert json.loads(nflax.load(a / "flow").spec)["kwargs"]["activation"] == TRAIN_ACTIVATION
    # the training state records the batch size the run drew its minibatches with
    ck = TrainingCheckpoints(run / "checkpoints")
    try:
        assert ck.latest_step() == 30
        record = ck.record()
    finally:
        ck.close()
    assert (
        record["fingerprint"]["batch_size"] == 32 and len(record["outputs"][0]) == 30
    )  # the loss series


def test_patience_and_val_fraction(tmp_path, capsys):
    """A learning rate of 1e-30 changes no float32 loss: a plateau. Patience 7 stops at step 7
    exactly; the 25 % validation split is 32 of the 128 points, so step 0's training loss (96
    points) and validation loss (32 points), weighted, give the NLL of all 128 points."""
    out = tmp_path / "plateau"
    args = ["train", "--num-points", "128", "--layers", "2", "--hidden", "8", "--steps", "400"]
    args += ["--patience", "7", "--val-fraction", "0.25", "--lr", "1e-30", "--schedule"]
    args += ["constant", "--weight-decay", "0", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    # without --quiet: one summary line
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("banana: test NLL "), summary
    assert "8 steps (patience)" in summary[0] and summary[0].endswith(str(out))
    cfg, m = _config(out), _metrics(out)
    assert cfg["patience"] == 7 and cfg["val_fraction"] == 0.25
    assert m["stop_reason"] == "patience" and m["steps_run"] == 8 and m["best_step"] == 0
    loss, val = _column(out, "loss"), _column(out, "val_loss")
    assert np.all(loss == loss[0]) and np.all(val == val[0])  # evaluated every step
    np.testing.assert_allclose((96 * loss[0] + 32 * val[0]) / 128, m["train_nll"], rtol=1e-6)


def test_sample_seed(runs, tmp_path):
    def sample(*seed):
        out = tmp_path / f"s{'-'.join(seed) or 'default'}.npy"
        assert main(["sample", str(runs["seed3"]), "-n", "50", "-o", str(out), *seed]) == 0
        return np.load(out)

    one, one_again, two = sample("--seed", "1"), sample("--seed", "1"), sample("--seed", "2")
    assert one.shape == (50, 2) and np.all(np.isfinite(one))
    np.testing.assert_array_equal(one, one_again)
    assert not np.any(one == two)
    np.testing.assert_array_equal(sample(), sample("--seed", "0"))  # the default seed is 0


VI = [
    "vi", "--target", "ring", "--flow", "maf", "--layers", "2", "--hidden", "8", "--steps", "20",
    "--num-samples", "64", "--no-plots", "--quiet",
]  # fmt: skip
VI_RUNS = {
    "lr01_seed1": ["--lr", "0.01", "--seed", "1"],
    "lr01_seed1_again": ["--lr", "0.01", "--seed", "1"],
    "lr01_seed2": ["--lr", "0.01", "--seed", "2"],
    "lr03_seed1": ["--lr", "0.03", "--seed", "1"],
}


@pytest.fixture(scope="module")
def vi_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vi_flags")
    for name, extra in VI_RUNS.items():
        assert main([*VI, "--out", str(root / name), *extra]) == 0, name
    return {name: root / name for name in VI_RUNS}


def test_vi_flow_lr_seed_no_plots(vi_runs):
    base = vi_runs["lr01_seed1"]
    cfg = _config(base)
    assert cfg["flow"] == "maf" and cfg["lr"] == 0.01 and cfg["seed"] == 1
    fk = cfg["flow_kwargs"]
    assert (fk["dim"], fk["num_layers"], fk["hidden"]) == (2, 2, [8])
    assert cfg["steps"] == 20 and cfg["num_samples"] == 64 and len(_column(base, "elbo")) == 20
    assert json.loads((base / "flow" / "nflax.json").read_text())["spec"]["constructor"] == "maf"
    assert nflax.load(base / "flow").layer_names() == ["MaskedAutoregressive"] * 2
    assert json.loads(nflax.load(base / "flow").spec)["kwargs"]["activation"] == "tanh"  # vi's
    assert not list(base.glob("*.png"))  # --no-plots
    elbo = _column(base, "elbo")
    # --seed: the same seed gives the same run, another seed another one
    np.testing.assert_array_equal(_column(vi_runs["lr01_seed1_again"], "elbo"), elbo)
    assert _column(vi_runs["lr01_seed2"], "elbo")[0] != elbo[0]
    # --lr (the peak of fit_vi's default schedule): the same samples at step 0 and the same
    # parameters while the warm-up's rate is 0, other updates from its first nonzero step on
    faster = _column(vi_runs["lr03_seed1"], "elbo")
    assert _config(vi_runs["lr03_seed1"])["lr"] == 0.03
    schedule = default_vi_schedule(20, 0.01)
    first = next(t for t in range(20) if float(schedule(t)) > 0)  # its update shows at first + 1
    np.testing.assert_array_equal(faster[: first + 1], elbo[: first + 1])
    assert np.all(faster[first + 1 :] != elbo[first + 1 :])


def test_vi_dim(tmp_path, capsys):
    out = tmp_path / "cg3"
    args = ["vi", "--target", "correlated_gaussian", "--dim", "3", "--layers", "2"]
    args += ["--hidden", "8", "--steps", "20", "--num-samples", "64", "--no-plots", "--quiet"]
    args += ["--activation", "elu"]
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert capsys.readouterr() == ("", "")  # --quiet: nothing on stdout or stderr
    assert _config(out)["dim"] == 3 and _config(out)["flow_kwargs"]["dim"] == 3
    assert json.loads(nflax.load(out / "flow").spec)["kwargs"]["activation"] == "elu"
    assert nflax.load(out / "flow").sample(jax.random.key(0), 4).shape == (4, 3)
    assert np.isfinite(_metrics(out)["covariance_rel_error"])  # a Gaussian target: moments


SHARED = ["--flow", "--layers", "--hidden", "--leaky-relu", "--activation", "--steps", "--lr"]
SHARED += ["--seed", "--out", "--no-plots", "--quiet", "--no-cache"]


def test_train_and_vi_share_one_declaration_of_their_common_flags():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    train, vi = (
        {s: a for a in sub.choices[command]._actions for s in a.option_strings}
        for command in ("train", "vi")
    )
    assert set(train) & set(vi) == {"-h", "--help", *SHARED}
    for flag in SHARED:  # one declaration (a parent parser): they differ in defaults only
        t, v = train[flag], vi[flag]
        assert (t.type, t.nargs, t.choices, t.const) == (v.type, v.nargs, v.choices, v.const)
    t, v = parser.parse_args(["train"]), parser.parse_args(["vi", "--layers", "3"])
    # train's hidden sizes and steps depend on the flow and the objective (test_flow_matching);
    # --layers is resolved with the flow (8 for train, 6 for vi; cnf has none)
    assert (t.layers, t.hidden, t.steps, t.lr, t.activation) == (None, None, None, 2e-3, None)
    assert (v.layers, v.hidden, v.steps, v.lr, v.activation) == (3, [32], 5000, 1e-2, None)
    assert DEFAULT_LAYERS == {"train": 8, "vi": 6}


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--conditional", "--data", "points.csv"],
            "--conditional works with the built-in conditional sets, not --data",
        ),
        (
            ["train", "--flow", "nice", "--leaky-relu"],
            "--leaky-relu is not an option of flow 'nice'",
        ),
        (["vi", "--flow", "maf", "--leaky-relu"], "--leaky-relu is not an option of flow 'maf'"),
        (["train", "--flow", "cnf", "--layers", "4"], "--layers is not an option of flow 'cnf'"),
        (["train", "--coordinator", "localhost:1234"], "--coordinator needs --num-processes and"),
        (
            ["train", "--coordinator", "localhost:1234", "--num-processes", "2"],
            "--coordinator needs --num-processes and --process-id",
        ),
        (
            ["train", "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0"],
            "--coordinator needs --out",
        ),
        (
            ["train", "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "5"]
            + ["--out", "somewhere"],
            "process_id must be in [0, 2), received 5",
        ),
        (["train", "--val-fraction", "0"], "--val-fraction 0 leaves nothing to stop early on"),
        (["train", "--val-fraction", "1"], "expected a number in [0, 1), got '1'"),
        (["train", "--patience", "0"], "expected a positive integer, got '0'"),
        (["train", "--schedule", "linear"], "invalid choice: 'linear'"),
        (["train", "--devices", "some"], "invalid choice: 'some'"),
        (["train", "--weight-decay", "x"], "expected a number ≥ 0, got 'x'"),
        (["train", "--weight-decay", "-1"], "expected a number ≥ 0, got '-1'"),
    ],
)
def test_flags_that_do_not_go_together_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and surely not in the repository
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nflax: error: ") and message in err, err
    assert not any(tmp_path.iterdir())


# --resume after the data file changed (same shape other values, another number of columns):
# test_checkpoint.py's test_data_file_run_samples_in_original_units, on its finished run.
