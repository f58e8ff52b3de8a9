"""Run folders: a command's data in, its flow, metrics and figures out (no flag parsing).

``nflax train``, ``nflax vi`` and ``nflax sample`` are :func:`run_train` (or
:func:`resume_train`), :func:`run_vi` and :func:`run_sample`, called with a run
configuration: the dictionary a run folder's ``config.json`` holds. A run claims its folder
for its length (:func:`claim_run_folder`: one process at a time, a new run needs an empty
folder) and writes ``config.json``, ``flow/``, ``history.csv``, ``metrics.json`` and the
figures there. A problem with the run's input (an unknown set, an unreadable data file, a
folder in use) is a :class:`RunError`, which ``nflax`` reports as one line, exit status 2.

The seams: ``folder`` (the lock and the JSON files), ``data`` (the run's points: a built-in
set, a conditional set, a standardised data file; each process's block), ``train``, ``vi``
and ``sample`` (one command each), ``figures`` and ``common`` (what the commands share).
"""

from nflax.runs.data import DataSpec, RunData, describe_data, load_run_data, process_block
from nflax.runs.folder import RunError, RunFolderError, claim_run_folder
from nflax.runs.sample import run_sample
from nflax.runs.train import read_train_config, resume_train, run_train
from nflax.runs.vi import run_vi, vi_target

__all__ = [
    "DataSpec",
    "RunData",
    "RunError",
    "RunFolderError",
    "claim_run_folder",
    "describe_data",
    "load_run_data",
    "process_block",
    "read_train_config",
    "resume_train",
    "run_sample",
    "run_train",
    "run_vi",
    "vi_target",
]
