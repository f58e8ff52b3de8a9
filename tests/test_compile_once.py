"""Compile once: a second identical fit, fit_vi, nll, evaluate or sampling call compiles
nothing; a changed optimizer, batch size, flow or target compiles anew and gives the result a
fresh compile gives; `nflax` keeps its programs in JAX's persistent compilation cache, and a
cache folder that cannot be used costs one warning line, never the run.

Compilations are counted with JAX's monitoring events (every XLA compilation, or load from the
persistent cache, records ``/jax/core/compile/backend_compile_duration``).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nflax
from nflax import _compile, engine
from nflax.bijections import Chain, Coupling
from nflax.cli import build_parser, cache_dir, main
from nflax.distributions import Flow, StandardNormal, compiled_log_prob, compiled_sample
from nflax.nets import MLP
from nflax.training import default_optimizer

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: (
        COMPILES.append(kw.get("fun_name"))
        if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
)
TIMING = {"steps_per_second", "compile_seconds", "train_seconds"}
X = np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 256))


@contextlib.contextmanager
def compiles():
    """The names of the programs compiled inside the block."""
    seen = []
    start = len(COMPILES)
    yield seen
    seen.extend(COMPILES[start:])


def _flow(seed=0, layers=2):
    return nflax.flows.realnvp(2, num_layers=layers, hidden=(8,), rngs=nnx.Rngs(seed))


def _fit(flow, **kw):
    kw = {"key": jax.random.key(1), "steps": 30, "progress": False, "chunk_size": 16} | kw
    return nflax.fit(flow, X, **kw)


def _fresh(make_flow, **kw):
    """The same call from an empty program store: what a correct reuse must reproduce."""
    engine.PROGRAMS.clear()
    flow = make_flow()
    hist = _fit(flow, **kw)
    assert hist.chunk_program == "compiled"
    return flow, hist


def _same(a, b):
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.val_loss, b.val_loss)


def _params(flow):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(flow, nnx.Param))]


# -- in one process ---------------------------------------------------------------------------
def test_second_identical_fit_compiles_nothing_and_new_hyperparameters_reuse_the_program():
    _fit(_flow())
    with compiles() as seen:
        hist = _fit(_flow())
    assert seen == [] and hist.chunk_program == "reused" and hist.compile_seconds < 1.0
    # steps, patience, eval_every, the key and the parameters' values are program arguments
    kw = {
        "steps": 45,
        "patience": 7,
        "val_fraction": 0.2,
        "eval_every": 3,
        "key": jax.random.key(5),
    }
    _fit(_flow(), **kw)
    with compiles() as seen:
        hist = _fit(_flow(seed=3), **kw | {"steps": 20, "patience": 3, "eval_every": 2})
    assert seen == [] and hist.chunk_program == "reused"
    _, fresh = _fresh(lambda: _flow(seed=3), **kw | {"steps": 20, "patience": 3, "eval_every": 2})
    _same(hist, fresh)
    assert hist.stop_reason == fresh.stop_reason and hist.best_step == fresh.best_step


def test_default_optimizer_learning_rate_steps_and_decay_are_traced():
    """`nflax train`'s optimizer keeps its numbers in its state: new values reuse the program
    and give what a fresh compile gives."""
    _fit(_flow(), optimizer=default_optimizer(30, 2e-3, 3.0))
    opt = dict(steps=50, learning_rate=5e-3, weight_decay=0.5)
    with compiles() as seen:
        hist = _fit(_flow(), steps=50, optimizer=default_optimizer(**opt))
    assert seen == [] and hist.chunk_program == "reused"
    _, fresh = _fresh(_flow, steps=50, optimizer=default_optimizer(**opt))
    _same(hist, fresh)
    # with gradient clipping too: the clipped optimizer's update holds none of the numbers
    _fit(_flow(), optimizer=default_optimizer(30, 2e-3, 3.0), max_grad_norm=1.0)
    with compiles() as seen:
        hist = _fit(_flow(), optimizer=default_optimizer(**opt), max_grad_norm=1.0)
    assert seen == [] and hist.chunk_program == "reused"


@pytest.mark.parametrize(
    "change",
    [
        # (another kind of optimizer, sgd for adam, is another key: test_freeze_keys_by_value)
        {"optimizer": optax.adam(3e-3)},  # another learning rate baked into a user's adam
        {"optimizer": optax.adamw(1e-3), "max_grad_norm": 0.5},
        {"batch_size": 64},
        {"ema": 0.9},
        {"layers": 3},  # another flow structure
    ],
    ids=["adam-lr", "clipping", "batch-size", "ema", "flow"],
)
def test_a_changed_optimizer_batch_size_or_flow_compiles_anew_and_gives_the_right_result(change):
    layers = change.pop("layers", 2)
    _fit(_flow(), optimizer=optax.adam(1e-3))
    with compiles() as seen:
        flow = _flow(layers=layers)
        hist = _fit(flow, **({"optimizer": optax.adam(1e-3)} | change))
    assert any("_chunk_program" in name for name in seen) and hist.chunk_program == "compiled"
    fresh_flow, fresh = _fresh(
        lambda: _flow(layers=layers), **({"optimizer": optax.adam(1e-3)} | change)
    )
    _same(hist, fresh)
    for a, b in zip(_params(flow), _params(fresh_flow), strict=True):
        np.testing.assert_array_equal(a, b)


def _coupling_flow(mask):
    net = MLP(2, 4, hidden=(8,), rngs=nnx.Rngs(0))
    return Flow(StandardNormal(2), Chain([Coupling(mask, net, "affine")]))


def test_a_flow_of_the_same_structure_with_other_fixed_arrays_reuses_the_program_correctly():
    """The coupling mask is a Buffer (frozen state): an argument of the program, not a
    constant in it, so a flow with the other mask reuses the program and gets its own result."""
    a = _fit(_coupling_flow([1.0, 0.0]))
    with compiles() as seen:
        b = _fit(_coupling_flow([0.0, 1.0]))
    assert seen == [] and b.chunk_program == "reused"
    assert not np.array_equal(a.loss, b.loss)
    _, fresh = _fresh(lambda: _coupling_flow([0.0, 1.0]))
    _same(b, fresh)


def test_second_fit_vi_compiles_nothing_and_another_target_compiles_anew():
    def run(target, seed=0, steps=20):
        flow = _flow(seed)
        kw = {"key": jax.random.key(2), "steps": steps, "num_samples": 32, "progress": False}
        return flow, nflax.fit_vi(flow, target.log_density, eval_samples=64, **kw)

    energy = nflax.datasets.get_target("energy1")
    run(energy)
    with compiles() as seen:
        _, hist = run(energy, seed=1, steps=25)
    assert seen == [] and hist.chunk_program == "reused"
    # another target compiles anew; one built again with equal arrays is the same function:
    # reused
    with compiles() as seen:
        _, other = run(nflax.datasets.get_target("correlated_gaussian", dim=2), seed=1, steps=25)
        _, again = run(nflax.datasets.get_target("correlated_gaussian", dim=2), seed=1, steps=25)
    assert other.chunk_program == "compiled" and again.chunk_program == "reused"
    assert len(seen) >= 1 and not np.array_equal(other.elbo, hist.elbo)
    np.testing.assert_array_equal(again.elbo, other.elbo)
    engine.PROGRAMS.clear()
    _, fresh = run(energy, seed=1, steps=25)
    np.testing.assert_array_equal(hist.elbo, fresh.elbo)


def test_second_nll_and_evaluate_compile_nothing_and_another_flow_compiles():
    flow = _flow()
    first = nflax.nll(flow, X)
    nflax.evaluate(flow, X[:100])
    with compiles() as seen:
        again = nflax.nll(_flow(), X)
        metrics = nflax.evaluate(_flow(seed=4), X[:100])
    assert seen == []
    np.testing.assert_array_equal(first, again)
    assert metrics["num_test_points"] == 100
    # 256 rows in batches of 96: the last is padded, one program for all three
    with compiles() as seen:
        batched = nflax.nll(flow, X, batch_size=96)
    assert len(seen) == 1
    np.testing.assert_allclose(batched, first, rtol=1e-6)
    deeper = _flow(layers=3)
    nnx.update(deeper, jax.tree.map(lambda a: a + 0.01, nnx.state(deeper, nnx.Param)))
    with compiles() as seen:
        got = nflax.nll(deeper, X)
    assert len(seen) == 1
    np.testing.assert_allclose(got, -np.asarray(deeper.log_prob(X)), rtol=1e-5)


def test_compiled_sample_and_log_prob_compile_once_per_structure_and_shape():
    flow = _flow()
    nnx.update(flow, jax.tree.map(lambda a: a + 0.05, nnx.state(flow, nnx.Param)))
    compiled_sample(flow, jax.random.key(0), 50)
    compiled_log_prob(flow, X[:50])
    with compiles() as seen:
        x = compiled_sample(flow, jax.random.key(1), 50)
        lp = compiled_log_prob(flow, X[:50])
    assert seen == []
    np.testing.assert_allclose(x, flow.sample(jax.random.key(1), 50), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lp, flow.log_prob(X[:50]), rtol=1e-5, atol=1e-5)
    with compiles() as seen:
        compiled_sample(flow, jax.random.key(1), 60)
    assert len(seen) == 1


def test_an_objective_that_captures_a_module_is_compiled_every_time():
    """An objective whose functions capture what cannot be keyed (here the flow module) is
    never served a stale program: it compiles on every call."""
    flow = _flow()
    model = engine.split_model(flow)
    x = jnp.asarray(X)

    def loss(params, rest, inputs, data):
        return -jnp.mean(model.merge(params, rest).log_prob(x)) + 0 * len(flow.layer_names()), rest

    objective = engine.Objective(loss)
    settings = engine.make_settings(
        "test", steps=5, chunk_size=5, checkpoint_every=None, eval_every=1, patience=None,
        restore_best=False, ema=None, mesh=None,
    )  # fmt: skip
    tx = optax.adam(1e-3)
    assert engine.program_key(objective, tx, engine._static(objective, settings), ()) is None
    report = engine.Report(lambda last: {})
    for _ in range(2):
        run = engine.train(
            flow, engine.split_model(flow), objective, tx, (), settings, report=report
        )
        assert run.program == "compiled"


def test_freeze_keys_by_value_and_refuses_what_it_cannot_vouch_for():
    freeze = _compile.freeze
    assert freeze(optax.adamw(1e-3).update) == freeze(optax.adamw(1e-3).update)
    assert freeze(optax.adamw(1e-3).update) != freeze(optax.adamw(1e-3, weight_decay=0.5).update)
    assert freeze(optax.sgd(1e-3).update) != freeze(optax.adam(1e-3).update)
    assert freeze(default_optimizer(10, 1e-3).update) == freeze(default_optimizer(99, 5.0).update)
    assert freeze(0.0) != freeze(-0.0) and freeze(1) != freeze(1.0) != freeze(True)
    small = jnp.arange(3.0)
    assert freeze(small) == freeze(jnp.arange(3.0)) != freeze(jnp.arange(1.0, 4.0))
    big = jnp.zeros(_compile.MAX_FROZEN_ELEMENTS + 1)
    assert freeze(big) == freeze(big) != freeze(jnp.zeros_like(big))  # immutable: by identity
    flow = _flow()
    for value in (flow, np.zeros(_compile.MAX_FROZEN_ELEMENTS + 1), object()):
        with pytest.raises(_compile.Unfreezable):
            freeze(value)
    with pytest.raises(_compile.Unfreezable):
        freeze(lambda x: flow.log_prob(x))  # a closure over a module
    graphdef = nnx.split(flow)[0]
    assert (
        freeze(graphdef)
        == freeze(nnx.split(_flow(seed=9))[0])
        != freeze(nnx.split(_flow(layers=3))[0])
    )


# -- across processes: the `nflax` command and its cache folder -----------------------------
ARGS = [
    "train", "--num-points", "128", "--layers", "2", "--hidden", "8", "--steps", "40",
    "--checkpoint-every", "20", "--no-plots", "--quiet",
]  # fmt: skip
PROBE = (
    "import json, sys; from nflax import _compile; from nflax.cli import main; "
    "rc = main(sys.argv[1:]); L = _compile.LOG; "
    "print(json.dumps({'rc': rc, 'compiles': L.compiles, 'hits': L.cache_hits}))"
)


def _nflax(out: Path, *extra, **env):
    """`nflax train` in a new process: its exit status, counts of compilations and of programs
    loaded from the persistent cache, stderr, and metrics.json."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NFLAX_")} | env
    environ["PYTHONPATH"] = str(Path(nflax.__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *ARGS, "--out", str(out), *extra],
        capture_output=True, text=True, env=environ, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    return counts, done.stderr, {k: v for k, v in metrics.items() if k not in TIMING}


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    """A first `nflax train` into an empty cache folder."""
    root = tmp_path_factory.mktemp("cache")
    counts, stderr, metrics = _nflax(root / "cold", NFLAX_CACHE_DIR=str(root / "jax"))
    return root, counts, stderr, metrics


def test_second_nflax_train_loads_every_program_from_the_cache_with_identical_metrics(cold_run):
    root, cold, stderr, metrics = cold_run
    assert cold["hits"] == 0 and cold["compiles"] > 10 and stderr == ""
    assert len(list((root / "jax").iterdir())) >= cold["compiles"] // 2
    warm, stderr, again = _nflax(root / "warm", NFLAX_CACHE_DIR=str(root / "jax"))
    assert warm["hits"] == warm["compiles"] == cold["compiles"] and stderr == ""
    assert again == metrics  # every value but the timings, bit for bit


def _nflax_here(out: Path, *extra, monkeypatch, capsys, **env):
    """`nflax train` in this process (its programs may already be in memory): stderr and
    metrics.json. What a cold process does with the cache is the subprocess tests' business;
    the settings and the warnings are decided before any compile, so this process shows them."""
    for name in [n for n in os.environ if n.startswith("NFLAX_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert main([*ARGS, "--out", str(out), *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return capsys.readouterr().err, {k: v for k, v in metrics.items() if k not in TIMING}


def test_no_cache_flag_and_environment_variable_turn_the_cache_off(
    cold_run, tmp_path, monkeypatch, capsys
):
    """With the cache on, the folder is created (and probed) before anything is compiled: a
    folder that never appears is a cache that was never used."""
    _, _, _, metrics = cold_run
    for extra, env in [(["--no-cache"], {}), ([], {"NFLAX_NO_CACHE": "1"})]:
        folder = tmp_path / f"jax{len(extra)}"
        out = tmp_path / f"run{len(extra)}"
        stderr, got = _nflax_here(
            out, *extra, monkeypatch=monkeypatch, capsys=capsys, NFLAX_CACHE_DIR=str(folder), **env
        )
        assert not folder.exists() and stderr == ""
        assert got == metrics  # bit for bit what the cold `nflax train` process gave
    assert jax.config.jax_compilation_cache_dir is None
    for command in (["train"], ["vi"], ["sample", "run", "-o", "x.npy"]):
        assert build_parser().parse_args([*command, "--no-cache"]).no_cache is True
    assert cache_dir(no_cache=True) is None


def test_an_unwritable_cache_folder_gives_a_normal_run_and_one_warning_line(
    cold_run, tmp_path, monkeypatch, capsys
):
    _, _, _, metrics = cold_run
    (tmp_path / "file").write_text("not a folder")  # a folder below a regular file (chmod
    folder = tmp_path / "file" / "jax"  # does not stop root)
    stderr, got = _nflax_here(
        tmp_path / "run", monkeypatch=monkeypatch, capsys=capsys, NFLAX_CACHE_DIR=str(folder)
    )
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nflax: warning: compilation cache"), stderr
    assert "not writable" in lines[0]
    assert got == metrics


def test_a_garbage_cache_folder_gives_a_normal_run_and_one_warning_line(
    cold_run, tmp_path, monkeypatch, capsys
):
    """Every entry of the cold run's folder overwritten with garbage, and a stray file beside
    them; this process's training program dropped, so that it is looked up there again."""
    root, _, _, metrics = cold_run
    folder = root / "jax"  # entries are keyed with their folder's path: garbage them in place
    shutil.copytree(folder, tmp_path / "kept")
    try:
        rng = np.random.default_rng(0)
        for entry in folder.iterdir():
            entry.write_bytes(rng.bytes(64))
        (folder / "stray.txt").write_text("garbage")
        engine.PROGRAMS.clear()  # the chunk program is looked up in the folder again
        stderr, got = _nflax_here(
            tmp_path / "run", monkeypatch=monkeypatch, capsys=capsys, NFLAX_CACHE_DIR=str(folder)
        )
    finally:
        shutil.rmtree(folder)
        shutil.copytree(tmp_path / "kept", folder)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nflax: warning: compilation cache"), stderr
    assert "cannot read an entry" in lines[0]
    assert got == metrics


def test_cache_entries_that_cannot_be_written_cost_one_warning_line(monkeypatch, tmp_path, capsys):
    """A folder that accepts the first probe but refuses every entry (a read-only file system,
    simulated): one warning line for all of them, and the run completes."""
    from jax._src import lru_cache

    def refuse(self, key, value):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lru_cache.LRUCache, "put", refuse)
    monkeypatch.setenv("NFLAX_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.delenv("NFLAX_NO_CACHE", raising=False)
    engine.PROGRAMS.clear()  # so that this process compiles (and tries to write) its program again
    assert main([*ARGS, "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot write an entry" in lines[0], lines
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps_run"] == 40
    assert jax.config.jax_compilation_cache_dir is None  # the command put JAX back as it was


@pytest.mark.slow  # 45 s; the behaviours it times are each tested above
def test_compile_once_benchmark_quick_prints_its_tables():
    """benchmarks/compile_once.py runs end to end (no timing is asserted)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_once.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NFLAX_")}
    env["PYTHONPATH"] = str(Path(nflax.__file__).parents[1])
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| one fit |", "| 2 fits |", "| tutorial loop |", "| 1 warm |", "identical"):
        assert row in done.stdout, done.stdout
