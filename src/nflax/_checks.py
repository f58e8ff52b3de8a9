"""Measurements behind :func:`nflax.testing.check_bijection`: each turns the program's arrays
into ``(error, tolerance, where)``, the worst error, what it was allowed, and where it was;
:func:`measure` runs them all, in the order of the report."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

Measured = tuple[float, float, str]
Describe = Callable[[int], str]
Movement = list[tuple[str, float | None]]


def wrong_shapes(
    out: dict, event: tuple[int, ...], latent: tuple[int, ...], n: int, m: int
) -> list[str]:
    """What has the wrong shape among the program's outputs (``n`` inputs, ``m`` far-out
    points); when nothing does, ``out`` gains the forward pass on all points (``z_all``,
    ``ld_all``) and on the inputs (``z``, ``ld``)."""
    expected = {
        "z2": ("forward's output on (1, N, …) inputs", (1, n + m, *latent)),
        "ld2": ("forward's log-det on (1, N, …) inputs", (1, n + m)),
        "x_back": ("inverse's output", (n, *event)),
        "ld_inv": ("inverse's log-det", (n,)),
        "z_single": ("forward's output on one event", (n, *latent)),
        "ld_single": ("forward's log-det on one event", (n,)),
    }
    wrong = []
    for k, (what, want) in expected.items():
        got = np.shape(out[k])
        if got != want and k.endswith("single"):  # one event: vmapped over the inputs
            got, want = got[1:], want[1:]
        if got != want:
            wrong.append(f"{what} has shape {got}, expected {want}")
    if not wrong:
        out["z_all"], out["ld_all"] = out["z2"][0], out["ld2"][0]
        out["z"], out["ld"] = out["z_all"][:n], out["ld_all"][:n]
    return wrong


def measure(
    out: dict,
    names: list[str],
    tol: dict[str, tuple[float, float]],
    stacked: Sequence[tuple],
    no_gradient: Sequence[tuple[str, ...]],
    identity_layers: set[str],
) -> tuple[list[tuple[str, Measured]], Movement]:
    """Every property's ``(name, (error, tolerance, where))``, and each layer's movement."""
    describe = point_describer(out["points"], len(out["x"]))
    measured = _compared(out, tol, describe)
    measured.append(("gradients", dead_parameters(out["grads"], stacked, no_gradient)))
    measured.append(("finite", non_finite(out, describe)))
    movement = _movement(out, names)
    measured += _layer_checks(out, names, movement, identity_layers, tol, describe)
    measured += _context_checks(out, tol, describe)
    return measured, movement


def _compared(out: dict, tol: dict, describe: Describe) -> list[tuple[str, Measured]]:
    """The properties that compare two computations of the same numbers."""
    ld = "the log-det"
    pairs = {
        "round_trip": [("", out["x_back"], out["x"])],
        "inverse_log_det": [("", -out["ld_inv"], out["ld"])],
        "log_det": [("", out["ld_single"], out["jac"])],
        "batch_dims": [("z", out["z"], out["z_single"]), (ld, out["ld"], out["ld_single"])],
        "jit": [("z", out["z"], out["z_eager"]), (ld, out["ld"], out["ld_eager"])],
    }
    return [(k, compare(p, tol[k], describe)) for k, p in pairs.items()]


def _movement(out: dict, names: list[str]) -> Movement:
    """Each elementary layer's largest move (a one-layer bijection: from input to output)."""
    trajectory = out.get("trajectory") or [out["points"], out["z_all"]]
    if len(trajectory) != len(names) + 1:
        return []
    return layer_movement(trajectory, names)


def _layer_checks(out, names, movement, identity_layers, tol, describe):
    """The trajectory ends at the forward output; every elementary layer moves its input."""
    measured = []
    if "trajectory" in out:
        trajectory = out["trajectory"]
        if len(trajectory) != len(names) + 1:
            where = f"{len(trajectory)} arrays for {len(names)} layers (expected one more)"
            measured.append(("trajectory", (1.0, 0.0, where)))
        else:
            pair = [("", trajectory[-1], out["z_all"])]
            measured.append(("trajectory", compare(pair, tol["trajectory"], describe, True)))
    idle = idle_layers(movement, identity_layers, tol["layers_move"][0])
    return [*measured, ("layers_move", idle)]


def _context_checks(out: dict, tol: dict, describe: Describe) -> list[tuple[str, Measured]]:
    """A single context row broadcasts over the batch; another context changes the output."""
    c = out["context"]
    if c is None:
        return []
    row0 = [
        ("z", out["z_row"][:1], out["z"][:1]),
        ("the log-det", out["ld_row"][:1], out["ld"][:1]),
    ]
    measured = [("context_broadcast", compare(row0, tol["context_broadcast"], describe))]
    used = context_ignored(out, np.any(c != c[:1], axis=1), tol["context_used"][0])
    return measured if used is None else [*measured, ("context_used", used)]


def point_describer(points: np.ndarray, num_inputs: int) -> Describe:
    """``describe(i)``: "input 3, x = [...]" or "far-out point 2, x = [...]" for row ``i`` of
    ``points`` (the inputs first, then the far-out points)."""

    def describe(i: int) -> str:
        kind = f"input {i}" if i < num_inputs else f"far-out point {i - num_inputs}"
        value = np.array2string(np.ravel(points[i]), precision=4, threshold=8, edgeitems=3)
        return f"{kind}, x = {value}"

    return describe


def compare(
    pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
    tolerance: tuple[float, float],
    describe: Describe,
    equal_nan: bool = False,
) -> Measured:
    """The worst of ``|got − want|`` against ``atol + rtol·|want|`` over ``(label, got,
    want)`` pairs of arrays with one row per point; NaN counts as the worst error (unless
    ``equal_nan`` and both are NaN)."""
    atol, rtol = tolerance
    best = (-1.0, 0.0, 0.0, "")
    for label, got, want in pairs:
        n = np.shape(got)[0]
        got = np.asarray(got, np.float64).reshape(n, -1)
        want = np.asarray(want, np.float64).reshape(n, -1)
        err = np.abs(got - want)
        allowed = np.maximum(atol + rtol * np.abs(want), np.finfo(np.float64).tiny)
        ratio = np.where(np.isnan(err), np.inf, err / allowed)
        if equal_nan:
            ratio = np.where(np.isnan(got) & np.isnan(want), 0.0, ratio)
        i, j = np.unravel_index(np.argmax(ratio), ratio.shape)
        if ratio[i, j] > best[0]:
            where = describe(int(i)) + (f", in {label}" if label else "")
            best = (float(ratio[i, j]), float(err[i, j]), float(allowed[i, j]), where)
    return best[1], best[2], best[3]


def _path(path: tuple) -> str:
    return "/".join(map(str, path))


def _exempt(path: tuple, suffixes: Iterable[tuple[str, ...]]) -> bool:
    names = tuple(map(str, path))
    return any(len(s) <= len(names) and names[len(names) - len(s) :] == s for s in suffixes)


def dead_parameters(
    grads: dict[tuple, np.ndarray],
    stacked: Sequence[tuple],
    no_gradient: Sequence[tuple[str, ...]],
) -> Measured:
    """Parameters whose gradient is zero everywhere (and, for the ``(L, …)`` parameters of a
    ``Stack`` under a path in ``stacked``, each layer's slice on its own), less those whose
    path ends with one of ``no_gradient``."""
    dead = []
    for path, g in grads.items():
        if _exempt(path, no_gradient):
            continue
        if any(path[: len(s)] == s for s in stacked):
            live = np.any(g.reshape(g.shape[0], -1) != 0, axis=1)
            layers = np.nonzero(~live)[0].tolist()
            if layers:
                dead.append(f"parameter {_path(path)} (layer(s) {layers} of its Stack)")
        elif not np.any(g != 0):
            dead.append(f"parameter {_path(path)}")
    return float(len(dead)), 0.0, "; ".join(dead[:3]) + (" …" if len(dead) > 3 else "")


def non_finite(out: dict, describe: Describe) -> Measured:
    """Non-finite outputs, input gradients (per point) and parameter gradients."""
    per_point = [out["z_all"], out["ld_all"], out["grad_points"]]
    n = np.shape(out["ld_all"])[0]
    bad = np.zeros(n, bool)
    for a in per_point:
        bad |= ~np.all(np.isfinite(np.reshape(a, (n, -1))), axis=1)
    params = [_path(p) for p, g in out["grads"].items() if not np.all(np.isfinite(g))]
    where = [describe(int(i)) for i in np.nonzero(bad)[0][:2]]
    where += [f"gradient of parameter {p}" for p in params[:2]]
    return float(np.count_nonzero(bad) + len(params)), 0.0, "; ".join(where)


def layer_movement(
    trajectory: Sequence[np.ndarray], names: Sequence[str]
) -> list[tuple[str, float | None]]:
    """Each elementary layer's ``max |output − input|`` over all points (``None`` for a
    shape-changing layer: it rearranges, it is not an identity layer)."""
    out = []
    for i, name in enumerate(names):
        a, b = trajectory[i], trajectory[i + 1]
        same = np.shape(a) == np.shape(b)
        moved = float(np.nanmax(np.abs(np.asarray(b) - np.asarray(a)))) if same else None
        out.append((name, moved))
    return out


def idle_layers(
    movement: Sequence[tuple[str, float | None]], identity_layers: set[str], least: float
) -> Measured:
    """Layers that move no input by more than ``least``, less those named in
    ``identity_layers`` (by name, or by the name inside ``Invert(…)``)."""
    idle = []
    for i, (name, moved) in enumerate(movement):
        inner = name.removeprefix("Invert(").removesuffix(")")
        if moved is None or name in identity_layers or inner in identity_layers:
            continue
        if not moved > least:
            idle.append(f"layer {i} ({name}) moves its input by at most {moved:.3g}")
    return float(len(idle)), 0.0, "; ".join(idle[:3])


def context_ignored(out: dict, changed: np.ndarray, least: float) -> Measured | None:
    """Whether the context matters: with the context of row 0 in place of their own, the rows
    ``changed`` (whose context differs from row 0's) must not all keep their output (a row may:
    a spline's identity tails ignore the context). ``None`` when no row's context differs."""
    if not np.any(changed):
        return None
    dz = np.abs(out["z_row"] - out["z"]).reshape(len(out["z"]), -1).max(axis=1)
    moved = np.maximum(dz, np.abs(out["ld_row"] - out["ld"]))[changed]
    most = float(np.max(moved))
    return float(not most > least), 0.0, f"outputs move by up to {most:.3g} with another context"
