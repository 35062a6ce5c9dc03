"""The tests' background jobs (`background.py`): results as `subprocess.run` gives them, a job that
cannot start fails its test (not the session), and `stop_all` ends what still runs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import background
import pytest
from background import Command, register, result


@register("_echo")
def _echo(folder: Path) -> Command:
    (folder / "input.txt").write_text("from the folder")
    code = "import sys; print(open('input.txt').read()); print('to stderr', file=sys.stderr); sys.exit(3)"
    return Command([sys.executable, "-c", code], cwd=folder)


@register("_broken")
def _broken(folder: Path) -> Command:
    raise RuntimeError("cannot prepare the inputs")


@register("_sleeper")
def _sleeper(folder: Path) -> Command:
    return Command([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.mark.background_job("_echo")
def test_a_job_started_at_collection_gives_its_status_output_and_folder():
    # started by conftest when collection ended (unless VSS_TESTS_BACKGROUND=off)
    assert ("_echo" in background._RUNNING) == background.enabled()
    done = result("_echo")
    assert (done.returncode, done.stdout, done.stderr) == (3, "from the folder\n", "to stderr\n")
    assert (done.folder / "input.txt").is_file()
    assert result("_echo") is done  # asked again: the same result, nothing rerun


def test_a_job_that_cannot_start_fails_with_its_traceback():
    done = result("_broken")  # not declared by this test: started when asked for
    assert done.returncode == -1 and "RuntimeError: cannot prepare the inputs" in done.stderr


def test_a_job_over_its_time_is_killed_and_fails_the_test():
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="background job '_sleeper' ran over 1 s"):
        result("_sleeper", timeout=1)
    assert time.monotonic() - t0 < 30
    assert background._RUNNING["_sleeper"].proc.poll() is not None  # killed, and reaped
