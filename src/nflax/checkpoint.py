"""Save and load flows (a self-describing folder) and training checkpoints (exact resume).

Layout of a checkpoint folder::

    flow/
      nflax.json   {"format": "nflax-flow", "version": 1, "spec": {constructor, kwargs}}
      state/       every NNX variable of the flow (orbax-checkpoint)

Writes are atomic: the folder is written under a temporary name beside the target and
renamed into place, so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from nflax import flows
from nflax.distributions import Flow

FORMAT, VERSION = "nflax-flow", 1
_META = "nflax.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match the expected flow."""


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: ~1 s

    return ocp.StandardCheckpointer()


def save(path: str | os.PathLike, flow: Flow) -> Path:
    """Write ``flow`` (its constructor spec and every NNX variable) to the folder ``path``.

    The flow must come from a constructor in :mod:`nflax.flows` (it carries a ``spec``).
    An existing checkpoint at ``path`` is replaced only once the new one is complete.
    """
    if not isinstance(flow, Flow):
        raise CheckpointError(f"save: expected an nflax Flow, received {type(flow).__name__}")
    if flow.spec is None:
        raise CheckpointError(
            "save: this flow has no constructor spec (build it with nflax.flows.* to save it)"
        )
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"save: {path} exists and is not a folder")
    # With several processes (jax.distributed) every process calls save: orbax writes the
    # arrays together, process 0 writes the description and renames the folder into place.
    multi = jax.process_count() > 1
    primary = jax.process_index() == 0
    tmp = path.parent / (
        f".{path.name}.tmp-multi" if multi else f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:
        if primary:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _sync("nflax-save-start")
        state = nnx.to_pure_dict(nnx.state(flow))
        if multi:  # replicated values: host copies, which orbax writes once
            state = jax.tree.map(np.asarray, state)
        with _checkpointer() as ck:  # closing it stops orbax's background threads
            ck.save(tmp / "state", state)
            ck.wait_until_finished()
        if not primary:
            _sync("nflax-save-done")
            return path
        meta = {"format": FORMAT, "version": VERSION, "spec": json.loads(flow.spec)}
        with open(tmp / _META, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if primary and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if multi:
        _sync("nflax-save-done")
    return path


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_spec(path: str | os.PathLike) -> dict:
    """The constructor spec stored in a checkpoint folder (checks that it is one)."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: it does not exist")
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: it is a file, expected a folder")
    meta_file = path / _META
    if not meta_file.is_file() or not (path / "state").is_dir():
        raise CheckpointError(f"{path} is not a complete nflax checkpoint (missing {_META}/state)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "spec" not in meta:
        raise CheckpointError(f"{meta_file} is not an nflax checkpoint description")
    return meta["spec"]


def load(path: str | os.PathLike) -> Flow:
    """Rebuild the flow saved at ``path``; its ``log_prob`` equals the saved one's bit for bit."""
    path = Path(path).absolute()
    spec = read_spec(path)
    try:
        flow = flows.build(spec["constructor"], **spec["kwargs"], rngs=nnx.Rngs(0))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the flow from its spec: {e}") from None
    target = nnx.to_pure_dict(nnx.state(flow))
    try:
        with _checkpointer() as ck:
            restored = ck.restore(path / "state", target)
    except Exception as e:  # orbax raises many types for truncated or mismatched files
        raise CheckpointError(f"{path}: cannot read the saved state: {e}") from None
    want = jax.tree.map(lambda a: (a.shape, a.dtype), target)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), restored)
    if want != got:
        raise CheckpointError(f"{path}: the saved state does not match its architecture")
    nnx.replace_by_pure_dict(state := nnx.state(flow), restored)
    nnx.update(flow, state)
    return flow


# ---------------------------------------------------------------------------------------------
# Training checkpoints: the whole training state, so that a run resumes exactly.
class TrainingCheckpoints:
    """The last ``keep`` training checkpoints of a :func:`nflax.fit` run, in ``directory``.

    Each checkpoint holds every array of the training state (parameters, non-parameter state,
    optimizer state, best parameters, step, minibatch order) and a JSON record (history so
    far, PRNG key, a fingerprint of the data and settings). orbax writes each one under a
    temporary name and renames it when complete, so a process killed at any moment leaves
    only complete checkpoints behind (an interrupted one is ignored and cleaned up).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint_dir {self.directory} is a file, expected a folder")
        if int(keep) < 1:
            raise CheckpointError(f"checkpoints to keep must be ≥ 1, received {keep}")
        self._ocp = ocp
        options = dict(max_to_keep=int(keep), enable_async_checkpointing=False, create=True)
        kill_at = os.environ.get(KILL_BEFORE_COMMIT)
        if kill_at:  # test-only: see KILL_BEFORE_COMMIT
            options["temporary_path_class"] = _killed_before_commit(ocp, int(kill_at))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(**options)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, arrays: list, record: dict) -> None:
        if step in self._manager.all_steps():
            return
        ocp = self._ocp
        state = {f"{i:05d}": a for i, a in enumerate(arrays)}
        record = {**record, "num_arrays": len(arrays), "shapes": _shapes(arrays)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
            ),
        )
        self._manager.wait_until_finished()

    def record(self) -> dict:
        """The JSON record of the latest checkpoint (history, fingerprint, array shapes)."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no training checkpoint in {self.directory}")
        ocp = self._ocp
        try:
            return self._manager.restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
            )["record"]
        except Exception as e:
            raise self._unreadable(step, e) from None

    def restore(self, like: list) -> tuple[list, dict]:
        """The arrays (shaped like ``like``) and the record of the latest checkpoint."""
        record = self.record()
        step = self.latest_step()
        if record.get("num_arrays") != len(like) or record.get("shapes") != _shapes(like):
            raise CheckpointError(
                f"{self.directory}: checkpoint {step} was written by a different architecture "
                f"or optimizer (its state does not match this flow's)"
            )
        ocp = self._ocp
        target = {f"{i:05d}": a for i, a in enumerate(like)}
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:
            raise self._unreadable(step, e) from None
        return [state[k] for k in sorted(state)], record

    def _unreadable(self, step: int, e: Exception) -> CheckpointError:
        return CheckpointError(f"{self.directory}: checkpoint {step} is unreadable: {e}")

    def close(self) -> None:
        self._manager.close()


# Test-only hook: with NFLAX_TEST_KILL_BEFORE_COMMIT=<step> in the environment, a process
# writing training checkpoint <step> sends itself SIGKILL once every file of it is written under
# its temporary name, just before the rename that commits it (tests/test_checkpoint.py).
KILL_BEFORE_COMMIT = "NFLAX_TEST_KILL_BEFORE_COMMIT"


def _killed_before_commit(ocp, step: int):
    class KilledBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *args, **kwargs):
            if self.get_final().name == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return await super().finalize(*args, **kwargs)

    return KilledBeforeCommit


def _shapes(arrays: list) -> list:
    return [[list(a.shape), str(a.dtype)] for a in arrays]
