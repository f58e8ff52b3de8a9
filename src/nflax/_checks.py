"""Measurements behind :func:`nflax.testing.check_bijection`: each turns the program's arrays
into ``(error, tolerance, where)``, the worst error, what it was allowed, and where it was."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

Measured = tuple[float, float, str]
Describe = Callable[[int], str]


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
