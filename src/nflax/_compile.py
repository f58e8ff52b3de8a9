"""Compile once: what makes a compiled program reusable, the in-process store of programs, a
log of JAX's compilations, and JAX's persistent compilation cache on disk.

A program may be reused when everything it was traced from is equal: the functions (their
code, defaults and captured values), the static values, and the shapes, dtypes and shardings
of the arguments. :func:`freeze` turns the first two into a hashable key *by value*, or
refuses (:class:`Unfreezable`) when it cannot vouch for a value; a refused key means "compile
afresh", never "reuse". So two ``optax.adamw(1e-3)`` built in two calls give the same key
(equal code, equal captured numbers), ``optax.adamw(2e-3)`` another; a closure over a flow
module (mutable, compared by identity) gives none.

Rules of :func:`freeze`:

* numbers, strings, ``None``, dtypes, types, modules, code objects: themselves (floats by
  ``repr``, so ``-0.0``, ``0.0`` and ``nan`` are told apart);
* tuples, lists, mappings, dataclasses (an NNX ``GraphDef`` is one): their items, recursively;
* other hashable values with an equality of their own: themselves;
* Python functions: module, qualified name, code, defaults and captured values, recursively
  (globals are read when traced, as ``jax.jit`` reads them); ``functools.partial`` and bound
  methods: the function and what is bound to it;
* arrays: their bytes when small (at most :data:`MAX_FROZEN_ELEMENTS` elements), else a JAX
  array by identity (JAX arrays are immutable);
* library callables that hold no state of their own (built-ins, ufuncs, ``jax.jit``-ed and
  ``custom_jvp``/``custom_vjp`` functions): by identity;
* anything else (an NNX module or variable, a large NumPy array, an object compared by
  identity): :class:`Unfreezable`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import threading
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax import monitoring

MAX_FROZEN_ELEMENTS = 4096  # arrays up to this size are keyed by their bytes
_VALUES = (type(None), bool, int, complex, str, bytes, type, types.ModuleType, types.CodeType)
_VALUES += (np.dtype, jax.sharding.Mesh, jax.sharding.PartitionSpec)
_STATELESS = (types.BuiltinFunctionType, np.ufunc, type(jax.jit(abs)))
_STATELESS += (jax.custom_jvp, jax.custom_vjp)


class Unfreezable(TypeError):
    """A value :func:`freeze` cannot vouch for: a program traced from it is not reused."""


def freeze(value: Any, _depth: int = 0) -> Hashable:
    """A hashable key that is equal for two values only when a program traced from one can
    serve the other (see the module docstring); :class:`Unfreezable` otherwise.

    >>> import optax
    >>> freeze(optax.adam(1e-3).update) == freeze(optax.adam(1e-3).update)
    True
    >>> freeze(optax.adam(1e-3).update) == freeze(optax.adam(2e-3).update)
    False
    """
    if _depth > 200:
        raise Unfreezable("nested too deeply")
    d = _depth + 1
    if isinstance(value, float):
        return (float, repr(value))
    if isinstance(value, np.generic):
        return (type(value), value.tobytes())
    if isinstance(value, _VALUES):
        return (type(value), value)
    if isinstance(value, tuple | list):
        return (type(value), tuple(freeze(v, d) for v in value))
    if isinstance(value, Mapping):
        return (type(value), tuple((freeze(k, d), freeze(v, d)) for k, v in value.items()))
    if isinstance(value, jax.Array | np.ndarray):
        return _freeze_array(value)
    if isinstance(value, types.FunctionType):
        return _freeze_function(value, d)
    if isinstance(value, functools.partial):
        return ("partial", freeze(value.func, d), freeze(value.args, d), freeze(value.keywords, d))
    if isinstance(value, types.MethodType):
        return ("method", freeze(value.__func__, d), freeze(value.__self__, d))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return (type(value), tuple(freeze(getattr(value, f.name), d) for f in fields))
    if isinstance(value, _STATELESS):
        return _Identity(value)
    if _compared_by_value(value):
        return (type(value), value)
    raise Unfreezable(f"cannot key a compiled program on a {type(value).__name__}")


class _Identity:
    """A key part equal only to itself: holds ``value`` (so its id is not reused) and compares
    by identity (a JAX array's ``==`` is elementwise)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


def _compared_by_value(value) -> bool:
    """Hashable, with an equality of its own (not identity)."""
    if type(value).__eq__ is object.__eq__:
        return False
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _freeze_array(a) -> Hashable:
    if isinstance(a, jax.core.Tracer):
        raise Unfreezable("a traced value")
    if a.size <= MAX_FROZEN_ELEMENTS:
        is_key = jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
        host = np.asarray(jax.random.key_data(a) if is_key else a)
        return ("array", str(a.dtype), a.shape, host.tobytes())
    if isinstance(a, jax.Array):
        return ("array", _Identity(a))  # JAX arrays are immutable: same array, same values
    raise Unfreezable(f"a NumPy array of {a.size} elements (mutable, too large to key)")


def _freeze_function(fn: types.FunctionType, d: int) -> Hashable:
    cells = tuple(freeze(c.cell_contents, d) for c in fn.__closure__ or ())
    defaults = freeze(fn.__defaults__, d), freeze(fn.__kwdefaults__, d)
    return ("function", fn.__module__, fn.__qualname__, fn.__code__, defaults, cells)


def key_or_none(*values: Any) -> Hashable | None:
    """:func:`freeze` of ``values``, or ``None`` when one of them cannot be keyed."""
    try:
        return freeze(values)
    except Unfreezable:
        return None


def signature(tree: Any) -> Hashable:
    """The structure, shapes, dtypes, weak types and shardings of a pytree of arrays: what an
    ahead-of-time compiled program requires of its arguments."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(_leaf_signature(x) for x in leaves)


def _leaf_signature(x) -> Hashable:
    return jax.typeof(x), x.sharding if isinstance(x, jax.Array) else None


def trace_context() -> Hashable:
    """JAX's configuration that changes what a trace produces (x64, matmul precision, …)."""
    try:
        from jax._src import config as jax_config

        return jax_config.trace_context()
    except (ImportError, AttributeError):  # a JAX without it: the settings that matter most
        return (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)


class Static:
    """A value passed to ``jax.jit`` as a static argument, compared by :func:`freeze` (by
    identity when it cannot be frozen), so equal functions built in two calls share one
    compiled program.

    >>> def shift(c):
    ...     return lambda x: x + c
    >>> Static(shift(1)) == Static(shift(1)), Static(shift(1)) == Static(shift(2))
    (True, False)
    """

    __slots__ = ("value", "_key")

    def __init__(self, value: Any):
        self.value = value
        self._key = key_or_none(value)

    def __hash__(self) -> int:
        return hash(self._key) if self._key is not None else id(self.value)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Static):
            return NotImplemented
        if self._key is None or other._key is None:
            return self.value is other.value
        return self._key == other._key


class Programs:
    """The compiled programs of this process, least recently used dropped beyond ``size``."""

    def __init__(self, size: int = 32):
        self.size, self._store, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Hashable | None):
        if key is None:
            return None
        with self._lock:
            program = self._store.get(key)
            if program is not None:
                self._store.move_to_end(key)
            return program

    def put(self, key: Hashable | None, program) -> None:
        if key is None:
            return
        with self._lock:
            self._store[key] = program
            while len(self._store) > self.size:
                self._store.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def __len__(self) -> int:
        return len(self._store)


# ---- JAX's compilations, counted -----------------------------------------------------------
@dataclasses.dataclass
class CompileLog:
    """Counts of this process's XLA compilations (``compiles``: every program JAX built or
    loaded from its persistent cache, ``seconds`` their time) and of persistent-cache hits."""

    compiles: int = 0
    seconds: float = 0.0
    cache_hits: int = 0

    def copy(self) -> CompileLog:
        return dataclasses.replace(self)


LOG = CompileLog()
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == _BACKEND_COMPILE:
        LOG.compiles += 1
        LOG.seconds += seconds


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT:
        LOG.cache_hits += 1


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


def compile_timed(lower: Callable[[], Any]) -> tuple[Any, float, str]:
    """``lower().compile()``: the compiled program, the seconds it took, and ``"loaded"`` when
    JAX's persistent cache supplied it (else ``"compiled"``)."""
    hits, t0 = LOG.cache_hits, time.perf_counter()
    compiled = lower().compile()
    how = "loaded" if LOG.cache_hits > hits else "compiled"
    return compiled, time.perf_counter() - t0, how


# ---- the persistent cache on disk ---------------------------------------------------------
class _OneWarning:
    """Print the first of JAX's persistent-cache warnings as one ``nflax: warning:`` line on
    stderr and drop the rest; pass every other warning on."""

    def __init__(self, directory: str, show):
        self.directory, self.show, self.said = directory, show, False

    def say(self, reason: str, hint: str = "") -> None:
        if not self.said:
            self.said = True
            print(
                f"nflax: warning: compilation cache {self.directory}: {reason}; continuing, "
                f"programs are compiled as needed{hint}",
                file=sys.stderr,
            )

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "persistent compilation cache" not in text:
            self.show(message, category, filename, lineno, file, line)
            return
        detail = text.split("': ", 1)[-1][:120]
        if "reading" in text:
            self.say(f"cannot read an entry ({detail})", " (delete the folder to rebuild it)")
        else:
            self.say(f"cannot write an entry ({detail})")


def _usable(directory: str) -> str | None:
    """``None`` when ``directory`` can be created and written, else the reason it cannot."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)  # the cache is trusted: yours only
        fd, probe = tempfile.mkstemp(prefix=".nflax-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"not writable ({e.strerror or type(e).__name__})"
    return None


@contextlib.contextmanager
def persistent_cache(directory: str | None) -> Iterator[bool]:
    """JAX's persistent compilation cache in ``directory`` for the length of the ``with``
    block (``None``: off), every program cached however fast it compiled; yields whether the
    cache is on. A folder that cannot be written, or entries that cannot be read or written,
    never fail the block: one warning line on stderr, and programs are compiled as needed."""
    from jax.experimental.compilation_cache import compilation_cache

    if directory is None:
        yield False
        return
    directory = os.path.abspath(os.path.expanduser(directory))
    with warnings.catch_warnings():
        hook = _OneWarning(directory, warnings.showwarning)
        warnings.showwarning = hook
        reason = _usable(directory)
        if reason is not None:
            hook.say(reason)
            yield False
            return
        names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
        before = {n: getattr(jax.config, n) for n in names}
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()
        try:
            yield True
        finally:
            for name, value in before.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()
