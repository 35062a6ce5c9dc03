"""A disk cache of the CLI's `--help` and `--print_config` output, so they answer without importing torch.

The parser of `vss-lightning` is built from the typed constructor signatures of the LightningModule,
the DataModule and the Trainer, so rendering it imports torch and Lightning (seconds on a loaded
2-core machine). Its output depends only on the command line, the config files it names, this
package's source and the versions of the libraries that render it; all of these are the cache key.
The first `--help` of a given command renders it and stores the text; later ones print it from disk
with nothing but the standard library. Standard library only: imported before any heavy import.

The cache lives in `$VSS_LIGHTNING_CACHE` (default `~/.cache/vss_lightning/cli`); set
`VSS_LIGHTNING_CACHE=off` to disable it. Entries are plain text files named by their key's hash;
deleting the folder is always safe.

The plain `[SUBCOMMAND] --help` does not even need a first run: `cli_schema` answers it from the
snapshot committed with the package (and the CLI stores that answer here too). This cache is what
makes `--help --config FILE`, `--print_config` and other widths fast after their first run.

Width: every help the CLI prints is rendered for `help_columns()` columns (`help_width()` sets
`$COLUMNS`, which argparse reads, while it renders), so the snapshot and the full parser agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RENDERING_LIBRARIES = ("lightning", "jsonargparse", "torch")
HELP_FLAGS = ("-h", "--help", "--print_config")


HELP_COLUMNS = 100  # the width of the committed snapshot (cli_schema)


def help_columns() -> int:
    """The width of `--help`: `$COLUMNS` when set, else the terminal's width when it is narrower
    than `HELP_COLUMNS`, else `HELP_COLUMNS` (also when the output is not a terminal)."""
    value = os.environ.get("COLUMNS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        if sys.stdout.isatty():
            return min(HELP_COLUMNS, os.get_terminal_size(sys.stdout.fileno()).columns)
    except (AttributeError, OSError, ValueError):
        pass
    return HELP_COLUMNS


@contextlib.contextmanager
def help_width(columns: int | None = None) -> Iterator[int]:
    """Render help at `columns` (default `help_columns()`): sets `$COLUMNS`, restored on exit."""
    width = help_columns() if columns is None else columns
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield width
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def cache_dir() -> Path | None:
    """The cache folder, or None when disabled (`VSS_LIGHTNING_CACHE=off`)."""
    value = os.environ.get("VSS_LIGHTNING_CACHE", "")
    if value.lower() in ("off", "0", "false", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "vss_lightning" / "cli"


def is_help_request(argv: list[str]) -> bool:
    """Whether `argv` only asks for help or the resolved config (never runs a job)."""
    return any(a in HELP_FLAGS or a.startswith("--print_config=") for a in argv)


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def cache_key(argv: list[str], prog: str) -> str | None:
    """The hash of everything the output depends on, or None when a part cannot be read (no caching)."""
    try:
        sources = sorted(
            (str(p.relative_to(PACKAGE_DIR)), p.stat().st_mtime_ns, p.stat().st_size)
            for p in PACKAGE_DIR.rglob("*.py")
        )
        configs = [(f, hashlib.sha256(Path(f).read_bytes()).hexdigest()) for f in _config_files(argv)]
        versions = [(name, importlib.metadata.version(name)) for name in RENDERING_LIBRARIES]
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    blob = json.dumps([argv, prog, os.getcwd(), sys.version, sources, configs, versions, help_columns()])
    return hashlib.sha256(blob.encode()).hexdigest()


def lookup(argv: list[str], prog: str) -> str | None:
    """The cached output of `prog argv`, or None."""
    folder, key = cache_dir(), cache_key(argv, prog)
    if folder is None or key is None:
        return None
    try:
        return (folder / f"{key}.txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def store(argv: list[str], prog: str, text: str) -> None:
    """Store the output of `prog argv` (atomically; a failure to write only costs speed next time)."""
    folder, key = cache_dir(), cache_key(argv, prog)
    if folder is None or key is None or not text:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, folder / f"{key}.txt")
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


class _Tee(io.TextIOBase):
    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recording(argv: list[str], prog: str) -> Iterator[None]:
    """Run a help request, storing what it printed to stdout when it exits with status 0."""
    tee, stdout = _Tee(sys.stdout), sys.stdout
    sys.stdout = tee
    try:
        yield
    except SystemExit as e:
        if e.code in (0, None):
            store(argv, prog, "".join(tee.parts))
        raise
    finally:
        sys.stdout = stdout
