"""Checkpoints never lose work: save/load, exact resume, SIGKILL, and bad input everywhere."""

import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax import checkpoint, flows
from nflax.cli import main
from nflax.datafiles import DataFileError, load_array
from nflax.variables import needs_data_init


def _small_kwargs(name):
    params = inspect.signature(flows.CONSTRUCTORS[name]).parameters
    return {k: v for k, v in dict(num_layers=2, hidden=(8,)).items() if k in params}


def _small(name, dim=2, seed=0):
    return flows.build(name, dim=dim, rngs=nnx.Rngs(seed), **_small_kwargs(name))


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with a hash of its bytes (to prove nothing was modified)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(flows.CONSTRUCTORS))
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
    """An unconditional flow: its spec records every argument of the constructor (the given
    ones and the defaults), rebuilds the same flow from the same seed, and a saved and loaded
    flow is the same density bit for bit (non-default arguments: the next test)."""
    flow = _small(name)
    spec = json.loads(flow.spec)
    params = inspect.signature(flows.CONSTRUCTORS[name]).parameters
    want = {k: p.default for k, p in params.items() if k != "rngs"}
    want.update(dim=2, **json.loads(json.dumps(_small_kwargs(name))))  # tuples: JSON lists
    assert spec == {"constructor": name, "kwargs": want}
    rebuilt = flows.build(spec["constructor"], **spec["kwargs"], rngs=nnx.Rngs(0))
    assert rebuilt.spec == flow.spec
    for f in (flow, rebuilt):
        perturb(f, jax.random.key(1), scale=0.1)
    x = jax.random.normal(jax.random.key(0), (16, 2))
    if needs_data_init(flow):
        flow.log_prob(x)  # ActNorm: the initialised state must survive the round trip
    nflax.save(tmp_path / "ck", flow)
    loaded = nflax.load(tmp_path / "ck")
    lp = np.asarray(flow.log_prob(x))
    assert np.all(np.isfinite(lp))
    np.testing.assert_array_equal(np.asarray(loaded.log_prob(x)), lp)
    np.testing.assert_array_equal(np.asarray(rebuilt.log_prob(x)), lp)
    assert loaded.spec == flow.spec


# Every argument of every constructor but ``dim`` (and nsf's ``variant`` in its coupling case)
# away from its default: each must reach the saved spec and come back. Every case is conditional
# with an embedding network (context_dim → embedding sizes), saved and loaded with it.
NON_DEFAULT = {
    "realnvp": dict(num_layers=3, hidden=(8, 4), leaky_relu=True, actnorm=True,
                    activation="silu", context_dim=2, embedding=(4, 3)),
    "nice": dict(num_layers=2, hidden=(8,), activation="gelu", context_dim=1, embedding=(5,)),
    "maf": dict(num_layers=2, hidden=(6, 6), activation="elu", context_dim=3, embedding=(5, 2)),
    "iaf": dict(num_layers=3, hidden=(4,), activation="relu", context_dim=2, embedding=(3,)),
    "nsf": dict(num_layers=2, hidden=(8,), bins=5, bound=2.5, actnorm=True,
                activation="softplus", context_dim=2, embedding=(3,)),
    "nsf_autoregressive": dict(variant="autoregressive", num_layers=3, hidden=(8,), bins=3,
                               bound=4.0, actnorm=True, activation="silu", context_dim=1,
                               embedding=(4, 2)),
    "planar": dict(num_layers=5, context_dim=2, embedding=(4, 2)),
    "cnf": dict(hidden=(8, 4), activation="tanh", time_frequencies=2, actnorm=True,
                trace="hutchinson", rtol=1e-6, atol=1e-6, context_dim=2, embedding=(4, 3)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(NON_DEFAULT))
def test_non_default_arguments_round_trip_bit_for_bit(case, tmp_path):
    name, kwargs = case.split("_")[0], NON_DEFAULT[case]
    params = inspect.signature(flows.CONSTRUCTORS[name]).parameters
    untouched = set(params) - {"dim", "rngs"} - set(kwargs)
    assert untouched <= {"variant"}, f"{name}: give {untouched} a non-default value here"
    assert all(kwargs[k] != params[k].default for k in kwargs)
    flow = flows.build(name, dim=3, rngs=nnx.Rngs(0), **kwargs)
    # the embedding: an MLP from the raw context to the features the layers see
    cdim, features = kwargs["context_dim"], kwargs["embedding"][-1]
    assert flow.context_dim == cdim and flow.feature_dim == features
    assert (flow.embedding.in_features, flow.embedding.out_features) == (cdim, features)
    perturb(flow, jax.random.key(1), scale=0.1)
    x = jax.random.normal(jax.random.key(0), (16, 3))
    c = jax.random.normal(jax.random.key(2), (16, cdim))
    if needs_data_init(flow):
        flow.log_prob(x, c)  # ActNorm: the initialised state must survive the round trip
    nflax.save(tmp_path / "ck", flow)
    loaded = nflax.load(tmp_path / "ck")
    assert loaded.spec == flow.spec
    want = {"dim": 3, **json.loads(json.dumps(kwargs))}  # tuples are JSON lists
    if name == "nsf":
        want.setdefault("variant", "coupling")
    assert json.loads(loaded.spec) == {"constructor": name, "kwargs": want}
    assert nnx.graphdef(loaded) == nnx.graphdef(flow)
    lp = np.asarray(flow.log_prob(x, c))
    assert np.all(np.isfinite(lp))
    np.testing.assert_array_equal(np.asarray(loaded.log_prob(x, c)), lp)
    assert not np.array_equal(lp, flow.log_prob(x, c[::-1]))  # the context matters
    wrong = rf"context of shape \(\*batch, {cdim}\) for the embedding"
    with pytest.raises(ValueError, match=wrong):
        flow.log_prob(x, jnp.zeros((16, cdim + 1)))


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    a, b = _small("realnvp", seed=0), _small("realnvp", seed=1)
    perturb(b, jax.random.key(3))
    nflax.save(tmp_path / "ck", a)
    nflax.save(tmp_path / "ck", b)
    x = jnp.ones((3, 2))
    np.testing.assert_array_equal(nflax.load(tmp_path / "ck").log_prob(x), b.log_prob(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_load_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        nflax.load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        nflax.load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete nflax checkpoint"):
        nflax.load(tmp_path / "empty")
    # another architecture's spec over these weights
    nflax.save(tmp_path / "ck", _small("realnvp"))
    meta = json.loads((tmp_path / "ck" / "nflax.json").read_text())
    meta["spec"]["kwargs"]["num_layers"] = 3
    (tmp_path / "ck" / "nflax.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="does not match|cannot read"):
        nflax.load(tmp_path / "ck")
    # truncated: the array data is gone
    nflax.save(tmp_path / "ck2", _small("realnvp"))
    for p in (tmp_path / "ck2" / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[:10])
    with pytest.raises(checkpoint.CheckpointError):
        nflax.load(tmp_path / "ck2")
    _fake_checkpoint(tmp_path / "ck3", "{not json")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        nflax.load(tmp_path / "ck3")


def _fake_checkpoint(path, description: str) -> None:
    """A checkpoint folder with an empty ``state/`` and ``description`` as its nflax.json."""
    (path / "state").mkdir(parents=True)
    (path / "nflax.json").write_text(description)


def test_read_spec_returns_the_constructor_and_its_arguments(tmp_path):
    flow = _small("nsf")
    nflax.save(tmp_path / "ck", flow)
    spec = checkpoint.read_spec(tmp_path / "ck")
    assert spec == json.loads(flow.spec)
    assert spec["constructor"] == "nsf" and spec["kwargs"]["num_layers"] == 2
    meta = json.loads((tmp_path / "ck" / "nflax.json").read_text())
    assert meta == {"format": "nflax-flow", "version": 1, "spec": spec}
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read_spec(tmp_path / "missing")
    _fake_checkpoint(tmp_path / "other", '{"format": "something-else", "spec": {}}')
    with pytest.raises(checkpoint.CheckpointError, match="is not an nflax checkpoint description"):
        checkpoint.read_spec(tmp_path / "other")


def test_register_makes_a_constructor_buildable_and_loadable(tmp_path):
    """A user's own constructor, registered, is built by name and saved/loaded by its spec."""

    def shifted_normal(dim, *, shift=0.0, rngs):
        spec = json.dumps({"constructor": "shifted_normal", "kwargs": {"dim": dim, "shift": shift}})
        bij = nflax.bijections.Affine(dim, loc=shift)
        return nflax.Flow(nflax.StandardNormal(dim), bij, spec=spec)

    try:
        assert flows.register(shifted_normal) is shifted_normal
        assert flows.CONSTRUCTORS["shifted_normal"] is shifted_normal
        flow = flows.build("shifted_normal", dim=2, shift=1.5, rngs=nnx.Rngs(0))
        x = jnp.array([[1.5, 1.5], [0.0, 0.0]])
        want = jax.scipy.stats.norm.logpdf(x, 1.5).sum(-1)
        np.testing.assert_allclose(flow.log_prob(x), want, rtol=1e-6)
        nflax.save(tmp_path / "mine", flow)
        back = nflax.load(tmp_path / "mine")
        np.testing.assert_array_equal(np.asarray(back.log_prob(x)), np.asarray(flow.log_prob(x)))
    finally:
        flows.CONSTRUCTORS.pop("shifted_normal", None)
    with pytest.raises(ValueError, match="unknown flow 'shifted_normal'; known flows: cnf, iaf"):
        flows.build("shifted_normal", dim=2, rngs=nnx.Rngs(0))


# -- exact resume -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 256))


def _fit(data, steps, ckdir, resume=False, seed=0, **kw):
    flow = nflax.flows.realnvp(2, num_layers=3, hidden=(16,), actnorm=True, rngs=nnx.Rngs(seed))
    hist = nflax.fit(
        flow,
        data,
        key=jax.random.key(1),
        steps=steps,
        batch_size=50,
        patience=10_000,
        checkpoint_dir=ckdir,
        checkpoint_every=30,
        resume=resume,
        progress=False,
        **kw,
    )
    return flow, hist


def test_resume_is_exact(data, tmp_path):
    full, h_full = _fit(data, 180, tmp_path / "a")
    _fit(data, 90, tmp_path / "b")
    seen = []  # the steps at which the resumed run woke up between chunks
    resumed, h_res = _fit(  # another initialisation: ignored, the checkpoint wins
        data, 180, tmp_path / "b", resume=True, seed=99, callback=lambda s, m: seen.append(s)
    )
    assert seen == [120, 150]  # it went on from the latest checkpoint (90), not an earlier one
    for a, b in zip(
        jax.tree.leaves(nnx.state(full)), jax.tree.leaves(nnx.state(resumed)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
    np.testing.assert_array_equal(h_full.loss, h_res.loss)
    # the stopped run also evaluated its own last step (89); otherwise the same evaluations
    extra = set(h_res.val_steps.tolist()) - set(h_full.val_steps.tolist())
    assert extra <= {89}
    keep = np.isin(h_res.val_steps, h_full.val_steps)
    np.testing.assert_array_equal(h_full.val_loss, h_res.val_loss[keep])
    assert h_full.best_step == h_res.best_step
    # only the last three checkpoints are kept
    assert sorted(int(p.name) for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == [
        120,
        150,
        180,
    ]


def test_resume_refuses_other_data_or_settings(data, tmp_path):
    _fit(data, 30, tmp_path / "c")
    before = snapshot(tmp_path / "c")
    with pytest.raises(ValueError, match="already holds training checkpoints"):
        _fit(data, 60, tmp_path / "c")
    with pytest.raises(ValueError, match="other data"):  # same shape (no new program): values
        _fit(data * 1.01, 60, tmp_path / "c", resume=True)
    with pytest.raises(ValueError, match="different architecture"):
        flow = nflax.flows.realnvp(2, num_layers=4, hidden=(16,), rngs=nnx.Rngs(0))
        nflax.fit(
            flow,
            data,
            key=jax.random.key(1),
            steps=60,
            batch_size=50,
            patience=10_000,
            checkpoint_dir=tmp_path / "c",
            checkpoint_every=30,
            resume=True,
            progress=False,
        )
    assert snapshot(tmp_path / "c") == before


# -- a process killed with SIGKILL in the middle of writing a checkpoint --------------------------
def _cli(*args):
    return [sys.executable, "-m", "nflax.cli", *args]


# 360 points (324 to train on, 36 to validate): the shapes of the 400-row data file's run in
# test_data_file_run_samples_in_original_units (a tenth held out to test), which then reuses
# this run's training program
KILL_FLAGS = [
    "--layers", "2", "--hidden", "16", "--num-points", "360", "--steps", "400",
    "--checkpoint-every", "100", "--no-plots", "--quiet",
]  # fmt: skip
TIMING = {"steps_per_second", "compile_seconds", "train_seconds"}


def _flow_arrays(run):
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(nflax.load(run / "flow")))]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted `nflax train` with KILL_FLAGS: checkpoints 200, 300 and 400 kept."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(run), *KILL_FLAGS]) == 0
    return run


def test_kill_during_a_checkpoint_write_then_resume_equals_an_uninterrupted_run(
    finished_run, tmp_path
):
    """A run SIGKILLed while it writes checkpoint 300 (its files written under the temporary
    name, the commit rename not yet done: the test-only hook in nflax.checkpoint), resumed,
    ends exactly where an uninterrupted run ends: same history, metrics and parameters."""
    full, run = finished_run, tmp_path / "run"
    env = {**os.environ, checkpoint.KILL_BEFORE_COMMIT: "300"}
    r = subprocess.run(
        _cli("train", "--out", str(run), *KILL_FLAGS), env=env, capture_output=True, timeout=600
    )
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert not (run / "metrics.json").exists()  # it died mid-run
    ckdir = run / "checkpoints"
    names = sorted(p.name for p in ckdir.iterdir())
    assert [n for n in names if n.isdigit()] == ["100", "200"]  # 300 never committed
    tmp = [p for p in ckdir.iterdir() if p.name.startswith("300") and "tmp" in p.name]
    assert len(tmp) == 1 and (tmp[0] / "state").is_dir()  # ... though its files were written
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0
    assert sorted(p.name for p in ckdir.iterdir()) == ["200", "300", "400"]  # debris gone
    assert (run / "history.csv").read_text() == (full / "history.csv").read_text()
    m_run, m_full = (json.loads((d / "metrics.json").read_text()) for d in (run, full))
    assert m_run["steps_run"] == 400
    assert {k: v for k, v in m_run.items() if k not in TIMING} == {
        k: v for k, v in m_full.items() if k not in TIMING
    }
    for a, b in zip(_flow_arrays(run), _flow_arrays(full), strict=True):
        np.testing.assert_array_equal(a, b)


# -- bad input, table driven ---------------------------------------------------------------------
def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        np.save(path, content)
    return path


BAD_FILES = [
    ("missing.csv", None, "does not exist"),
    ("folder.csv", "DIR", "is a folder"),
    ("empty.csv", "", "is empty"),
    ("blank.csv", "\n\n  \n", "is empty"),
    ("text.csv", "1,2\n3,abc\n", "line 2 column 2: 'abc' is not a number"),
    ("ragged.csv", "1,2\n3\n", "line 2: 1 column"),
    ("nan.csv", "1,2\nnan,4\n", "NaN or inf"),
    ("inf.npy", np.array([[1.0, np.inf]]), "NaN or inf"),
    ("huge.csv", "1,2\n3,4\n5,1e39\n", r"1 row\(s\) hold values beyond float32's range"),
    ("cube.npy", np.zeros((2, 2, 2)), "expected a 2D array"),
    ("none.npy", np.zeros((0, 2)), "no data points"),
    ("strings.npy", np.array([["a", "b"]]), "expected numbers"),
    ("garbage.npy", b"\x00\x01 not numpy", "not a readable .npy"),
    ("garbage.npz", b"PK\x03\x04 broken", "not a readable .npz"),
    ("two.npz", {"a": np.zeros((3, 2)), "b": np.zeros((3, 2))}, "holds 2 arrays"),
    ("data.txt", "1,2\n", "unsupported type '.txt'"),
    ("binary.csv", b"\xff\xfe\x00\x81", "not a text"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_files(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, str) and content == "DIR":
        path.mkdir()
    elif content is not None:
        _write(path, content)
    with pytest.raises(DataFileError, match=message):
        load_array(path)
    # the CLI: exit 2, one line naming the file, no run folder written
    before = snapshot(tmp_path)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert snapshot(tmp_path) == before


def test_good_files_all_formats(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 2))
    _write(tmp_path / "a.npy", x)
    _write(tmp_path / "b.npz", {"x": x, "other": np.zeros(3)})
    np.savetxt(tmp_path / "c.csv", x, delimiter=",", header="u,v", comments="")
    for f in ["a.npy", "b.npz", "c.csv"]:
        np.testing.assert_allclose(load_array(tmp_path / f), x, rtol=1e-6, atol=1e-6)
    assert load_array(_write(tmp_path / "d.npy", np.arange(5.0))).shape == (5, 1)
    with pytest.raises(DataFileError, match="expected 3 column"):
        load_array(tmp_path / "a.npy", dim=3)


def test_bad_resume_leaves_the_run_untouched(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    ck = run / "checkpoints" / "400"  # the latest
    for p in ck.rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"")  # truncated array data
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err
    assert snapshot(run) == before
    for bad, msg in [(tmp_path / "nope", "not a run folder"), (finished_run / "flow", "not a run")]:
        assert main(["train", "--resume", str(bad)]) == 2
        assert msg in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing_that_matters(finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before = json.loads((run / "metrics.json").read_text())
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["steps_run"] == before["steps_run"] == 400
    assert after["test_nll"] == before["test_nll"]


def test_data_file_run_samples_in_original_units(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2)) * [2.0, 50.0] + [10.0, -300.0]
    np.savetxt(tmp_path / "mine.csv", x, delimiter=",")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "mine.csv"),
                "--out",
                str(run),
                "--steps",
                "200",
                "--layers",
                "2",
                "--hidden",
                "16",
                "--checkpoint-every",  # KILL_FLAGS' chunk of steps: their training program
                "100",
                "--quiet",
                "--no-plots",
            ]
        )
        == 0
    )
    cfg = json.loads((run / "config.json").read_text())
    np.testing.assert_allclose(cfg["standardize"]["mean"], x.mean(0), rtol=1e-6)
    m = json.loads((run / "metrics.json").read_text())
    # NLL in data units: close to the Gaussian's entropy, log(2πe·2·50)
    assert abs(m["test_nll"] - np.log(2 * np.pi * np.e * 100.0)) < 0.3
    assert main(["sample", str(run), "-n", "4000", "-o", str(tmp_path / "s.npy")]) == 0
    s = np.load(tmp_path / "s.npy")
    assert np.all(np.abs(s.mean(0) - [10.0, -300.0]) < [0.3, 8.0]), s.mean(0)
    np.testing.assert_allclose(s.std(0), [2.0, 50.0], rtol=0.15)
    # the data file changes under the run: its resume is refused, the run left as it was
    before = (run / "history.csv").read_text()
    capsys.readouterr()
    # the same shape, other values: the checkpoints' fingerprint refuses it
    np.savetxt(tmp_path / "mine.csv", rng.normal(size=(400, 2)), delimiter=",")
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "come from a run with other data" in err, err
    # another number of columns: refused before anything is loaded into a flow
    np.savetxt(tmp_path / "mine.csv", rng.normal(size=(400, 3)), delimiter=",")
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "now has 3 column(s); the run was started with 2" in err, err
    assert (run / "history.csv").read_text() == before
