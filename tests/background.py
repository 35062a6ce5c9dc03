"""Jobs that need a fresh interpreter, started as soon as the session's tests are collected.

A fresh interpreter spends ~15 s importing torch, Lightning and diffusers on a 2-core machine before it
does anything. The few tests that need one (the `ddp` launcher starts each rank as a new run of the
script; the fast-path tests compare with what the full parser prints in a process that imported
nothing else) declare a job here, and `conftest.py` starts the jobs of the collected tests in the
background when collection ends, so that they run beside the tests before them. The test then waits
for the job's result and checks it as it would have checked a `subprocess.run`. On 2 cores the gain is
small (~19 s of ~6 min, measured: the other tests keep both cores busy much of the time); with more
cores the jobs' time is hidden almost entirely.

    @register("name")
    def _command(folder: Path) -> Command: ...      # in the test module: what to run, in `folder`

    @pytest.mark.background_job("name")              # on the tests (or module) that need it
    def test_x():
        done = result("name")                         # waits; `.returncode`, `.stdout`, `.stderr`, `.folder`

`VSS_TESTS_BACKGROUND=off` starts each job only when its test asks for it (one process at a time).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Command:
    """What a job runs: `argv` with environment `env` (the current one when None), in `cwd`."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None


@dataclass
class Finished:
    """A job's exit status and output, and the folder it was given."""

    returncode: int
    stdout: str
    stderr: str
    folder: Path


@dataclass
class _Running:
    proc: subprocess.Popen | None  # None: the job could not start (`finished` says why)
    folder: Path
    stdout: Path
    stderr: Path
    finished: Finished | None = None


_COMMANDS: dict[str, Callable[[Path], Command]] = {}
_RUNNING: dict[str, _Running] = {}
_ROOT: list[Path] = []


def register(name: str) -> Callable[[Callable[[Path], Command]], Callable[[Path], Command]]:
    """Declare the job `name`: a function that prepares its inputs in a fresh folder and returns the
    command to run there."""

    def add(make: Callable[[Path], Command]) -> Callable[[Path], Command]:
        if name in _COMMANDS and _COMMANDS[name] is not make:
            raise ValueError(f"Expected one background job named {name!r}, but it is registered twice.")
        _COMMANDS[name] = make
        return make

    return add


def enabled() -> bool:
    return os.environ.get("VSS_TESTS_BACKGROUND", "on").lower() not in ("0", "off", "false", "no")


def _root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="vss-tests-background-")))
    return _ROOT[0]


def start(names: Iterable[str]) -> None:
    """Start the jobs `names` (those not started yet) in the background."""
    for name in sorted(set(names)):
        if name in _RUNNING:
            continue
        if name not in _COMMANDS:
            raise KeyError(f"No background job named {name!r}; known: {sorted(_COMMANDS)}.")
        folder = _root() / name
        folder.mkdir(parents=True)
        stdout, stderr = folder / "job.stdout", folder / "job.stderr"
        try:
            command = _COMMANDS[name](folder)
            with stdout.open("wb") as out, stderr.open("wb") as err:
                # in a process group of its own: `stop_all` reaches what it starts (ranks, workers)
                proc = subprocess.Popen(
                    command.argv,
                    env=command.env,
                    cwd=command.cwd,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
        except Exception:  # the job's test fails with this, not the whole session
            failed = Finished(-1, "", traceback.format_exc(), folder)
            _RUNNING[name] = _Running(None, folder, stdout, stderr, finished=failed)
            continue
        _RUNNING[name] = _Running(proc, folder, stdout, stderr)


def result(name: str, timeout: float = 600.0) -> Finished:
    """Wait for job `name` (starting it now if it was not started) and return its result."""
    if name not in _RUNNING:
        start([name])
    job = _RUNNING[name]
    if job.finished is None:
        try:
            code = job.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(job)
            pytest.fail(f"background job {name!r} ran over {timeout:.0f} s; its stderr ends with:\n"
                        + job.stderr.read_text(errors="replace")[-3000:])  # fmt: skip
        job.finished = Finished(
            code, job.stdout.read_text(errors="replace"), job.stderr.read_text(errors="replace"), job.folder
        )
    return job.finished


def _kill(job: _Running) -> None:
    if job.proc is not None and job.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()


def stop_all() -> None:
    """Kill the jobs still running (a session that stopped early) and remove their folders."""
    for job in _RUNNING.values():
        _kill(job)
    _RUNNING.clear()
    if _ROOT:
        shutil.rmtree(_ROOT.pop(), ignore_errors=True)


def jobs_of(items: Iterable[pytest.Item]) -> set[str]:
    """The background jobs the collected `items` declare (marker `background_job`)."""
    return {m.args[0] for item in items for m in item.iter_markers("background_job")}
