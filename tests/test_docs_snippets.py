"""The code the documentation shows but the docs build does not run, run here so it cannot rot.

The tutorial and the how-to pages are MyST-NB notebooks: their ``{code-cell}`` blocks run when
the site is built. Their plain fenced blocks do not: the ``bash`` blocks of ``nflax`` command
lines and the ``python`` blocks that are only shown (a multi-host script). Here every command
line is parsed by the real ``nflax`` parser, each page's command lines run in order with small
step counts (the sizes are shrunk, the flags and the flow are the page's), and the multi-host
script and command lines run as two processes on this machine.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nflax.cli import build_parser, main

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [DOCS / "tutorial.md", *sorted((DOCS / "howto").glob("*.md"))]

# Command lines that are parsed but not run here, and where they are run instead.
NOT_RUN = {
    "--flow glow": "a Glow compiles for minutes on a CPU; tests/test_cli_images.py runs it",
    "--dataset digits": "image runs: tests/test_cli_images.py",
    "--dataset mnist": "needs the MNIST files; tests/test_cli_images.py uses a fake IDX folder",
    "--flow cnf": "exact test NLLs of a cnf are ODE solves; tests/test_continuous.py runs it",
    "--coordinator": "run as two processes by test_multi_host_commands_and_script",
}
# Sizes shrunk for a quick run: flag -> the largest value kept.
SHRINK = {
    "--steps": 20,
    "--num-points": 2048,
    "--batch-size": 256,
    "--num-samples": 64,
    "-n": 500,
    "--hidden": None,
}
QUIET = ["--quiet", "--no-plots"]


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the fenced blocks marked exactly ```language (not ```{code-cell})."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def command_lines(page: Path) -> list[list[str]]:
    """The ``nflax …`` command lines of a page's bash blocks, as argument lists (no
    ``nflax``), continuation lines joined and comments dropped."""
    out = []
    for block in fenced(page.read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["nflax"]:
                out.append(words[1:])
    return out


def not_run(argv: list[str]) -> str | None:
    line = " ".join(argv)
    return next((why for flag, why in NOT_RUN.items() if flag in line), None)


def shrunk(argv: list[str]) -> list[str]:
    """``argv`` with the sizes of :data:`SHRINK` made small, and a short ``--steps`` added to a
    new run; ``--quiet --no-plots`` for ``train`` and ``vi``."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if flag in SHRINK:
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            limit = SHRINK[flag]
            values = ["16"] if limit is None else [str(min(int(values[0]), limit))]
            out += [flag, *values]
            continue
        out.append(flag)
        i += 1
    if out[0] in ("train", "vi"):
        if "--resume" not in out and "--steps" not in out:
            out += ["--steps", str(SHRINK["--steps"])]
        out += QUIET
    return out


def write_data_files(argv: list[str], folder: Path) -> None:
    """The files a command reads with ``--data``: a 3-column CSV with a header."""
    if "--data" in argv:
        path = folder / argv[argv.index("--data") + 1]
        if not path.exists():
            rng = np.random.default_rng(0)
            x = np.column_stack([rng.normal(170, 9, 400), rng.gamma(3, 4, 400), rng.random(400)])
            np.savetxt(path, x, delimiter=",", header="a,b,c", comments="")


ALL_COMMANDS = [(page, argv) for page in PAGES for argv in command_lines(page)]


def test_the_pages_have_command_lines():
    assert len(ALL_COMMANDS) >= 15, ALL_COMMANDS
    assert {page.stem for page, _ in ALL_COMMANDS} >= {
        "your_data",
        "conditional",
        "variational_inference",
        "continuous_flows",
        "image_flows",
        "checkpoints",
        "many_devices",
    }


@pytest.mark.parametrize(
    "argv", [a for _, a in ALL_COMMANDS], ids=[" ".join(a) for _, a in ALL_COMMANDS]
)
def test_every_command_line_parses(argv):
    build_parser().parse_args(argv)  # a flag that no longer exists exits with status 2


def runs_of(argv: list[str]) -> set[str]:
    """The run folders a command line reads: ``sample RUN`` and ``--resume RUN``."""
    if argv[0] == "sample":
        return {argv[1]}
    return {argv[argv.index("--resume") + 1]} if "--resume" in argv else set()


def run_page(page: Path, folder: Path, *, everything: bool) -> int:
    """Run a page's command lines in ``folder``, in order, sizes shrunk: all of them but
    :data:`NOT_RUN` (``everything``), or the first and the lines that read its run (the
    page's main recipe). Returns how many ran."""
    ran, made = 0, set()
    for argv in command_lines(page):
        needed = everything or not ran or (runs_of(argv) and runs_of(argv) <= made)
        if not_run(argv) or not needed:
            continue
        write_data_files(argv, folder)
        assert main(shrunk(argv)) == 0, argv
        ran += 1
        if "--out" in argv:  # every run the pages start names its folder
            made.add(argv[argv.index("--out") + 1])
            assert (folder / argv[argv.index("--out") + 1] / "config.json").is_file()
    return ran


RUNNABLE = [p for p in PAGES if any(not not_run(a) for a in command_lines(p))]


def test_every_page_with_command_lines_runs_some():
    assert {p.stem for p in PAGES if command_lines(p)} - {p.stem for p in RUNNABLE} <= {
        "image_flows",
        "continuous_flows",  # image and cnf runs only: see NOT_RUN
    }


# A cold `nflax train` compiles its programs in ~10 CPU-seconds, so the default suite runs
# the two pages whose command lines chain runs (`sample RUN`, `--resume RUN`); the other
# pages' main lines (`--conditional`, `vi`, `--devices all`) are runs tests/test_cli*.py
# make too, and run here under -m slow.
DEFAULT_RUN = {"your_data", "checkpoints"}


@pytest.mark.parametrize(
    "page",
    [p if p.stem in DEFAULT_RUN else pytest.param(p, marks=pytest.mark.slow) for p in RUNNABLE],
    ids=lambda p: p.stem,
)
def test_main_command_lines_run(page, tmp_path, monkeypatch):
    """A page's first command line, and those that use its run (``sample``, ``--resume``):
    the recipe itself, quickly."""
    monkeypatch.chdir(tmp_path)
    assert run_page(page, tmp_path, everything=False) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.stem)
def test_all_command_lines_run(page, tmp_path, monkeypatch):
    """Every command line of a page but :data:`NOT_RUN`'s, in order (slow: a few minutes)."""
    monkeypatch.chdir(tmp_path)
    assert run_page(page, tmp_path, everything=True) >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(make_argv, cwd: Path, timeout: int = 500) -> None:
    port = _free_port()
    procs = [
        subprocess.Popen(
            make_argv(port, pid),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    for p in procs:
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, output[-3000:]


@pytest.mark.slow  # four processes start JAX and compile (~100 s); tests/test_parallel.py
# joins two processes in the default suite
def test_multi_host_commands_and_script(tmp_path):
    """The many-devices page's two-host command lines and its ``train.py``, each as two
    processes joined by jax.distributed on this machine (localhost for ``host0``, a folder
    here for the shared one), with small step counts."""
    page = DOCS / "howto" / "many_devices.md"
    hosts = [argv for argv in command_lines(page) if "--coordinator" in argv]
    assert len(hosts) == 2 and hosts[0][hosts[0].index("--process-id") + 1] == "0"
    shared = tmp_path / "shared"

    def cli(port, pid):
        argv = shrunk(hosts[pid])
        argv[argv.index("--coordinator") + 1] = f"localhost:{port}"
        argv[argv.index("--out") + 1] = str(shared / "two-hosts")
        return [
            sys.executable,
            "-c",
            "import sys; from nflax.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv,
        ]

    _two_processes(cli, tmp_path)
    assert (shared / "two-hosts" / "metrics.json").is_file()

    (script,) = fenced(page.read_text(), "python")
    assert "nflax.parallel.initialize(coordinator, num_processes, process_id)" in script
    (tmp_path / "train.py").write_text(re.sub(r"steps=\d+", "steps=20", script))
    _two_processes(
        lambda port, pid: [sys.executable, "train.py", f"localhost:{port}", "2", str(pid)],
        tmp_path,
    )
    assert (tmp_path / "runs" / "multi-host" / "flow" / "nflax.json").is_file()
