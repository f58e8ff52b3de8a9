"""Run folders: one nflax process at a time, and the JSON files in them.

A fresh run creates its folder atomically (``os.mkdir``; an existing empty folder may be
used), and every run, fresh or resumed, holds an exclusive ``fcntl.flock`` on the lock file
``.nflax.lock`` inside the folder for as long as it runs. The operating system releases the
lock when the process ends, however it ends, so a killed run never leaves a stale lock. A
second process is refused before it writes anything, and a refused run leaves the folder's
contents as they were (it creates no lock file in a folder that holds other files).

>>> import tempfile, os
>>> run = os.path.join(tempfile.mkdtemp(), "run")
>>> with claim_run_folder(run, fresh=True):
...     sorted(os.listdir(run))
['.nflax.lock']
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".nflax.lock"


class RunError(ValueError):
    """A run that cannot go ahead because of its input (an unknown data set, a data file
    that cannot be used, a folder that is not a run): ``nflax`` reports the message as one
    line and exits with status 2."""


class RunFolderError(RunError):
    """A run folder that cannot be used now: not empty, not a folder, or in use."""


@contextlib.contextmanager
def claim_run_folder(path: str | os.PathLike, *, fresh: bool) -> Iterator[Path]:
    """Hold the run folder ``path`` for the length of the ``with`` block.

    ``fresh=True`` (a new run): the folder is created atomically, or must exist and be empty
    (a lone lock file left by an earlier claim counts as empty). ``fresh=False`` (a resumed
    run): the folder must exist. Either way, a folder that another process holds raises
    :class:`RunFolderError` ("in use by another nflax process").
    """
    run = Path(path)
    if fresh:
        _create_or_check_empty(run)
    elif not run.is_dir():
        raise RunFolderError(f"run folder {run} does not exist")
    fd = _lock(run)
    try:
        if fresh and _contents(run):  # another run started and finished here meanwhile
            raise RunFolderError(_not_empty(run))
        yield run
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _create_or_check_empty(run: Path) -> None:
    """Create ``run`` (its parents too); if it exists it must be a folder that is empty, or
    whose only file is a lock file (which :func:`_lock` then tries)."""
    run.parent.mkdir(parents=True, exist_ok=True)
    try:
        run.mkdir()
        return
    except FileExistsError:
        pass
    if not run.is_dir():
        raise RunFolderError(f"run folder {run} already exists and is not a folder")
    if _contents(run) and not (run / LOCK_NAME).exists():
        raise RunFolderError(_not_empty(run))


def _lock(run: Path) -> int:
    """An open descriptor of ``run``'s lock file holding an exclusive lock, or
    :class:`RunFolderError` when another process holds it."""
    fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(f"run folder {run} is in use by another nflax process") from None
    return fd


def _contents(run: Path) -> list[str]:
    """The names in ``run`` other than its lock file."""
    return [p.name for p in run.iterdir() if p.name != LOCK_NAME]


def _not_empty(run: Path) -> str:
    return f"run folder {run} already exists and is not empty (use --resume {run})"


@contextlib.contextmanager
def hold_run_folder(path: str | os.PathLike, *, fresh: bool) -> Iterator[Path]:
    """:func:`claim_run_folder` on process 0 of a multi-process run; the other processes
    share the folder that process 0 holds, and claim nothing."""
    from nflax import parallel

    if not parallel.is_primary():
        yield Path(path)
        return
    with claim_run_folder(path, fresh=fresh) as run:
        yield run


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (a temporary file, renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_config(run: Path) -> dict:
    """A run folder's ``config.json``, or ``{}`` when it is missing or unreadable."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}
