"""nflax.runs, the work behind the `nflax` command, called as a library: the run's data,
a training run whose metrics nflax.evaluate reproduces, resume, a VI run, sampling."""

import json

import jax
import numpy as np
import pytest

import nflax
from nflax.runs import (
    DataSpec,
    RunData,
    RunError,
    RunFolderError,
    describe_data,
    load_run_data,
    process_block,
    read_train_config,
    resume_train,
    run_sample,
    run_train,
    run_vi,
    vi_target,
)

TIMING = {"steps_per_second", "compile_seconds", "train_seconds"}
TRAIN_CONFIG = {  # what `nflax train --num-points 128 --layers 2 --hidden 8 --steps 30` records
    "command": "train", "flow": "realnvp", "num_points": 128, "steps": 30, "batch_size": None,
    "lr": 0.01, "schedule": "constant", "weight_decay": 0.0, "early_stopping": True,
    "patience": 1000, "val_fraction": 0.1, "checkpoint_every": 30, "seed": 3, "devices": None,
    "dataset": "banana", "dim": 2,
    "flow_kwargs": {"dim": 2, "num_layers": 2, "hidden": [8], "leaky_relu": False,
                    "actnorm": True, "activation": "silu"},
}  # fmt: skip


def _keys(seed):
    """The data and test keys of a run with this seed (the first two of four)."""
    return jax.random.split(jax.random.key(seed), 4)[:2]


def _csv(tmp_path, rows=200):
    path = tmp_path / "people.csv"
    x = np.random.default_rng(0).normal(size=(rows, 3)) * [1.0, 5.0, 0.1] + [0.0, 10.0, -3.0]
    np.savetxt(path, x, delimiter=",", header="age,income,height", comments="")
    return path, x


@pytest.fixture(scope="module")
def banana_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "banana"
    metrics = run_train(dict(TRAIN_CONFIG), out, quiet=True, plots=False)
    return out, metrics


# -- the run's data ---------------------------------------------------------------------------
def test_describe_data_gives_the_config_entries_of_each_source(tmp_path):
    spec = describe_data("moons")
    assert isinstance(spec, DataSpec)
    assert spec.config == {"dataset": "moons", "dim": 2}
    assert spec.name == "moons" and spec.context_dim is None
    spec = describe_data("conditional_banana", conditional=True)
    assert spec.config == {"dataset": "conditional_banana", "dim": 2, "conditional": True}
    assert spec.context_dim == 1
    path, _ = _csv(tmp_path)
    spec = describe_data(data_file=str(path))
    assert spec.name == "people" and spec.config["data_file"] == str(path.absolute())
    assert spec.config["dim"] == 3 and spec.config["columns"] == ["age", "income", "height"]
    for kwargs, message in [
        ({"dataset": "nope"}, "unknown dataset 'nope'; known datasets: banana"),
        ({"dataset": "banana", "conditional": True}, "unknown conditional"),
        ({"data_file": str(tmp_path / "none.csv")}, "does not exist"),
    ]:
        with pytest.raises(RunError, match=message):
            describe_data(**kwargs)


def test_load_run_data_standardises_a_file_and_holds_out_a_tenth(tmp_path):
    path, raw = _csv(tmp_path)
    raw = raw.astype(np.float32).astype(np.float64)  # the file is read as float32
    config = {**describe_data(data_file=str(path)).config, "seed": 0}
    data = load_run_data(config, *_keys(0))
    assert isinstance(data, RunData) and data.name == "people" and data.dim == 3
    assert data.x.shape == (180, 3) and data.x_test.shape == (20, 3)
    assert data.context is None and data.log_prob_true is None
    np.testing.assert_allclose(data.standardize["mean"], raw.mean(0), rtol=1e-12)
    np.testing.assert_allclose(data.standardize["std"], raw.std(0), rtol=1e-12)
    assert data.nll_offset == pytest.approx(np.sum(np.log(raw.std(0))), rel=1e-12)
    back = np.concatenate([data.x, data.x_test]) * raw.std(0) + raw.mean(0)  # every row once
    np.testing.assert_allclose(np.sort(back, 0), np.sort(raw, 0), atol=1e-5)
    again = load_run_data(config, *_keys(0))  # the same split for the same seed (resume)
    np.testing.assert_array_equal(again.x_test, data.x_test)
    with pytest.raises(RunError, match=r"now has 3 column\(s\); the run was started with 2"):
        load_run_data({**config, "dim": 2}, *_keys(0))


def test_load_run_data_draws_a_built_in_or_conditional_set():
    data = load_run_data({"dataset": "banana", "num_points": 64}, *_keys(0))
    assert data.x.shape == (64, 2) and data.x_test.shape == (16384, 2)
    assert data.log_prob_true == nflax.datasets.get("banana").log_prob and data.nll_offset == 0
    config = {"dataset": "conditional_banana", "conditional": True, "num_points": 64}
    data = load_run_data(config, *_keys(0))
    assert data.context.shape == (64, 1) and data.context_test.shape == (16384, 1)
    with pytest.raises(RunError, match="cannot run: unknown dataset 'gone'"):
        load_run_data({"dataset": "gone", "num_points": 64}, *_keys(0))


def test_process_block_splits_the_rows_evenly():
    assert process_block(10, 0, 1) == slice(0, 10)
    assert [process_block(12, i, 3) for i in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(RunError, match="10 training points do not split evenly over 4 processes"):
        process_block(10, 1, 4)


# -- a training run ---------------------------------------------------------------------------
def test_run_train_returns_its_metrics_and_evaluate_reproduces_them(banana_run):
    out, metrics = banana_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["steps_run"] == 30 and metrics["num_test_points"] == 16384
    assert read_train_config(out) == TRAIN_CONFIG
    data = load_run_data(TRAIN_CONFIG, *_keys(3))
    test = nflax.evaluate(nflax.load(out / "flow"), data.x_test, None, data.log_prob_true)
    assert test == {k: metrics[k] for k in test}  # the same numbers, bit for bit
    with pytest.raises(RunFolderError, match="already exists and is not empty"):
        run_train(dict(TRAIN_CONFIG), out, quiet=True)


def test_resume_train_of_a_finished_run_gives_the_same_metrics(banana_run):
    out, metrics = banana_run
    again = resume_train(out, quiet=True, plots=False)
    assert {k: v for k, v in again.items() if k not in TIMING} == {
        k: v for k, v in metrics.items() if k not in TIMING
    }


def test_read_train_config_errors(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RunError, match="not a run folder"):
        read_train_config(run)
    run.mkdir()
    (run / "config.json").write_text("{broken")
    with pytest.raises(RunError, match="config.json is corrupt"):
        read_train_config(run)
    (run / "config.json").write_text('{"command": "vi"}')
    with pytest.raises(RunError, match="it is not a `nflax train` run"):
        read_train_config(run)


# -- sampling and VI --------------------------------------------------------------------------
def test_run_sample_writes_what_it_returns(banana_run, tmp_path, capsys):
    out, _ = banana_run
    x = run_sample(out, 7, tmp_path / "s.npy", seed=1)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), x)
    assert (
        x.shape == (7, 2)
        and capsys.readouterr().out == f"wrote 7 samples to {tmp_path / 's.npy'}\n"
    )
    np.testing.assert_array_equal(run_sample(out, 7, tmp_path / "t.csv", seed=1, quiet=True), x)
    for run, output, message in [
        (tmp_path / "none", "x.npy", "run folder .* does not exist"),
        (out, "x.txt", "must end in .npy or .csv"),
    ]:
        with pytest.raises(RunError, match=message):
            run_sample(run, 3, tmp_path / output)


def test_run_vi_on_a_target_returns_what_it_writes(tmp_path):
    target = vi_target("ring")
    assert (target.name, target.dim) == ("ring", 2)
    config = {
        "command": "vi", "target": "ring", "dim": 2, "flow": "realnvp", "seed": 0,
        "flow_kwargs": {"dim": 2, "num_layers": 2, "hidden": [8], "leaky_relu": False,
                        "activation": "tanh"},
        "steps": 20, "num_samples": 64, "lr": 0.01, "stick_the_landing": True,
    }  # fmt: skip
    metrics = run_vi(target, config, tmp_path / "vi", quiet=True, plots=False)
    assert json.loads((tmp_path / "vi" / "metrics.json").read_text()) == metrics
    assert json.loads((tmp_path / "vi" / "config.json").read_text()) == config
    assert metrics["steps_run"] == 20 and metrics["num_eval_samples"] == 65536
    assert metrics["kl_q_p"] == metrics["log_z"] - metrics["elbo"]
    assert vi_target("correlated_gaussian", 4).dim == 4
    with pytest.raises(RunError, match="unknown target 'nope'"):
        vi_target("nope")
    with pytest.raises(RunError, match="takes no options"):
        vi_target("ring", 3)
