"""Exclusive lock files, so that several jobs can share one `output_dir`.

A lock is a small file created with `O_CREAT | O_EXCL` (atomic on local filesystems and NFSv3+)
holding JSON `{host, pid, proc_start, started, token}`. While it exists, the video (or file) it
guards belongs to its holder. A lock is *stale*, and is taken over, when its holder is gone:

- same host: the pid no longer runs (`os.kill(pid, 0)`, or `/proc/<pid>/stat` says it exited and
  waits to be reaped: a zombie), or runs a newer process (the pid was reused: its start time in
  `/proc/<pid>/stat` differs from the recorded one);
- another host: the lock file was not touched (`refresh`) for `stale_after_s` seconds.

A takeover is itself serialised by a guard file (`.<name>`, also `O_EXCL`): only the job that holds
the guard may remove the stale lock, and it re-reads the lock first, so two jobs that both found a
stale lock never both take it. A guard older than `GUARD_STALE_S` (its holder died mid-takeover) is
removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

GUARD_STALE_S = 60.0  # a takeover takes milliseconds; an older guard was left by a killed job
MAX_LOCK_BYTES = 4096
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
HOST = socket.gethostname()


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name (field 3 on), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()
    except (OSError, ValueError):
        return None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, Linux), None where unknown."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None  # field 22: starttime


def process_exited(pid: int) -> bool:
    """Whether process `pid` has exited but was not reaped yet (a zombie, Linux): e.g. a DDP rank of a
    killed job, orphaned in a container whose init does not reap, answers `os.kill(pid, 0)` forever."""
    fields = _proc_stat(pid)
    return fields is not None and len(fields) > 0 and fields[0] in ("Z", "X")


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create `path` holding `record` if it does not exist (atomically); False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(record).encode())
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's record; None if there is no lock; `{}` if it is unreadable (being written, or foreign)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_LOCK_BYTES + 1)
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class FileLock:
    """An exclusive lock file at `path`, taken over when its holder is gone (see the module docstring).

    Args:
        path: the lock file (its folder must exist).
        stale_after_s: a lock of another host, or an unreadable lock, untouched this long is stale.
    """

    def __init__(self, path: Path, stale_after_s: float = 6 * 3600.0) -> None:
        self.path = Path(path)
        self.guard = self.path.with_name(f".{self.path.name}")
        self.stale_after_s = stale_after_s
        self.record = {
            "host": HOST,
            "pid": os.getpid(),
            "proc_start": process_start(os.getpid()),
            "started": time.time(),
            "token": uuid.uuid4().hex,
        }
        self.held = False

    def alive(self, holder: dict[str, Any]) -> bool:
        """Whether the holder recorded in a lock may still be running (see the module docstring)."""
        if holder.get("host") == HOST and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # runs, as another user
                pass
            if process_exited(pid):
                return False
            recorded, now = holder.get("proc_start"), process_start(pid)
            return recorded is None or now is None or recorded == now
        try:
            age = time.time() - os.lstat(self.path).st_mtime
        except FileNotFoundError:
            return False
        return age < self.stale_after_s

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock if it is free or stale.

        Returns:
            None when this process holds the lock now; else the live holder's record (`{}` when it
            could not be read).
        """
        if self.held:
            return None
        if _create(self.path, self.record):
            self.held = True
            return None
        holder = read_lock(self.path)
        if holder is None:  # released in between: try once more
            return self._acquire_once()
        if self.alive(holder):
            return holder
        return self._take_over(holder)

    def _acquire_once(self) -> dict[str, Any] | None:
        if _create(self.path, self.record):
            self.held = True
            return None
        return read_lock(self.path) or {}

    def _take_over(self, stale: dict[str, Any]) -> dict[str, Any] | None:
        if not _create(self.guard, self.record):
            try:
                if time.time() - os.lstat(self.guard).st_mtime > GUARD_STALE_S:
                    self.guard.unlink(missing_ok=True)  # left by a job killed mid-takeover
            except FileNotFoundError:
                pass
            return stale  # another job is taking it over right now
        try:
            holder = read_lock(self.path)  # re-check under the guard: still the stale one?
            if holder is not None and (holder != stale or self.alive(holder)):
                return holder
            self.path.unlink(missing_ok=True)
            return self._acquire_once()
        finally:
            self.guard.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Touch the lock (its age is what other hosts judge staleness by)."""
        if self.held:
            with contextlib.suppress(OSError):  # gone or unwritable: release() finds out
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if it still records this process (never another job's lock)."""
        if not self.held:
            return
        self.held = False
        try:
            if (read_lock(self.path) or {}).get("token") == self.record["token"]:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # nothing more can be done; a rerun takes the stale lock over

    def wait(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Acquire, polling for up to `timeout_s`; True when held."""
        deadline = time.monotonic() + timeout_s
        while self.acquire() is not None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True


def describe(holder: dict[str, Any]) -> str:
    """A holder record for messages."""
    if not holder:
        return "another job (unreadable lock)"
    started = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, (int, float))
        else "?"
    )
    return f"pid {holder.get('pid')} on {holder.get('host')!r} since {when}"
