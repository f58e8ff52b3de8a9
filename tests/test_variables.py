"""Kinds of state (nflax.variables): one leaf module, the frozen filter and the two flags."""

import ast
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

import nflax
from nflax.bijections import ActNorm, AffineCoupling, BatchNorm, Chain, half_mask
from nflax.nets import MLP
from nflax.variables import (
    FROZEN,
    Buffer,
    DataInit,
    in_training_mode,
    may_write_data_init,
    needs_data_init,
)

SRC = Path(nflax.__file__).resolve().parent


def _nflax_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n.split(".")[0] == "nflax"}


def test_variables_is_a_leaf_and_the_old_paths_still_work():
    assert _nflax_imports(SRC / "variables.py") == set()
    assert _nflax_imports(SRC / "_conv.py") == set()
    # no upward import any more: nets uses only the two leaf modules
    assert _nflax_imports(SRC / "nets.py") == {"nflax.variables", "nflax._conv"}
    assert nflax.bijections.Buffer is Buffer and nflax.bijections.DataInit is DataInit
    assert nflax.variables.Buffer is Buffer


def test_frozen_selects_buffers_and_data_init_only():
    layer = Chain(
        [ActNorm(2), AffineCoupling(half_mask(2), MLP(2, 4, hidden=(4,), rngs=nnx.Rngs(0)))]
    )
    _, frozen, params, rest = nnx.split(layer, FROZEN, nnx.Param, ...)
    kinds = {type(v) for _, v in nnx.to_flat_state(frozen)}
    assert kinds == {Buffer, DataInit}
    names = {p[-1] for p, _ in nnx.to_flat_state(frozen)}
    assert names == {"mask", "init_loc", "init_log_scale", "initialized"}
    assert not nnx.to_flat_state(rest)  # nothing else: no batch statistics here
    assert "c" in {p[-1] for p, _ in nnx.to_flat_state(params)}


def test_training_mode_flag():
    layer = Chain([BatchNorm(2), ActNorm(2)])
    assert in_training_mode(layer) is True
    layer.eval()
    assert in_training_mode(layer) is False
    assert in_training_mode(ActNorm(2)) is False  # nothing with batch statistics
    layer.train()
    assert in_training_mode(layer) is True


def test_data_init_flag():
    layer = Chain([ActNorm(2), BatchNorm(2)])
    assert needs_data_init(layer) is True
    layer.forward(jnp.array([[0.0, 1.0], [2.0, 5.0]]))
    assert needs_data_init(layer) is False
    assert needs_data_init(BatchNorm(2)) is False
    flags = {p[-1]: v for p, v in nnx.to_flat_state(nnx.state(layer, DataInit))}
    assert bool(flags["initialized"][...])  # the flag itself is a DataInit variable
    # may_write_data_init: awaiting init, or not knowable because the flag is traced
    assert may_write_data_init(Chain([ActNorm(2)])) and not may_write_data_init(layer)
    assert bool(nnx.jit(may_write_data_init)(layer))
    assert not bool(nnx.jit(may_write_data_init)(BatchNorm(2)))  # no DataInit state at all
