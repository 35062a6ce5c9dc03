"""A committed snapshot of the CLI's parser: `--help` and command-line mistakes answer without torch.

The parser of `vss-lightning` (and of our `lightning` script) is built by LightningCLI from the typed
constructor signatures of the LightningModule, the DataModule and the Trainer, which imports torch and
Lightning (10-15 s on a loaded 2-core machine). Its help texts and its accepted option keys depend
only on this package's source and on the versions of the libraries that render them, so they are
rendered once, by a developer, into `cli_schema.json` beside this file:

    python -m vss_lightning.cli_schema_build --write   # after changing a signature, a docstring, the CLI
    python -m vss_lightning.cli_schema_build --check   # exit status 1 when the snapshot is stale

(`cli_schema_build` renders it with the full parser; this module only reads it.)

`tests/test_cli_fast.py` fails when the committed snapshot differs from a fresh one, so it cannot go
stale silently. At run time `vss_lightning.cli.main` asks this module first, with the standard
library only (this module imports nothing else at import time):

- `lookup_help(argv, prog)`: the text of `[SUBCOMMAND] --help` (no other argument);
- `precheck(argv, prog)`: the two-line error (and exit status 2) of a misspelled option key, exactly
  as the full parser prints it, e.g. `--model.segmenter.init_args.batch_sise 3`.

Both answer only when the snapshot is valid for this installation: the installed versions of
Python, lightning, jsonargparse, docstring-parser, typeshed-client, torch and diffusers equal the
recorded ones, and the sha256 of this package's source files (every `vss_lightning/**/*.py` but this
module and `help_cache.py`, which do not shape the parser) equals the recorded one. Otherwise, and
whenever a command line is outside what they can decide for sure, they return None and the caller
builds the full parser (its `--help` output is then cached by `help_cache`). `--help` together with
`--config FILE`, and `--print_config`, always take that path: slow the first time, cached after.

Width: help is rendered for `HELP_COLUMNS` (100) columns. `help_cache.help_columns()` decides the
width of every help the CLI prints, on both paths: `$COLUMNS` when set, else the terminal's width
when it is narrower than 100, else 100 (also when the output is not a terminal). The snapshot
answers only at 100 columns; other widths take the full path (and the cache).

Which mistakes the fast path reports: an option key that the subcommand does not accept (printed
as `error: unrecognized arguments: ...` with the "did you mean" of the full parser), and an unknown
argument of the default segmenter class (`error: \\`--model.segmenter.init_args.x\\` is not an
option ...`). It stays silent (the full parser decides) on anything it cannot decide: keys below
options that take arbitrary sub-keys (e.g. `--trainer.logger.init_args.*`, `--data.shards.x`),
segmenter keys when a config file or the command line names a class that could be another segmenter
(or a config file points to more files), a config file it cannot read, short options, `--`, values
starting with `-`, and anything it has not seen in the snapshot. Values are not validated: when a
command line holds a misspelled key and also a bad value (or a bad config file), the fast path names
the misspelled key where the full parser may name the other mistake first; both exit with status 2.

`$VSS_LIGHTNING_SCHEMA=off` disables the snapshot; `$VSS_LIGHTNING_SCHEMA=PATH` reads another file
(for tests).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from vss_lightning.help_cache import help_columns

FORMAT = 1
PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_FILE = PACKAGE_DIR / "cli_schema.json"
SCHEMA_ENV = "VSS_LIGHTNING_SCHEMA"
WRITE_COMMAND = "python -m vss_lightning.cli_schema_build --write"
PROGS = ("vss-lightning", "lightning")
RENDERING_LIBRARIES = (
    "lightning",
    "jsonargparse",
    "docstring-parser",
    "typeshed-client",
    "torch",
    "diffusers",
)
# Files of the package that do not shape the parser (the fast path itself); every other .py does.
NOT_HASHED = ("cli_schema.py", "help_cache.py")
HELP_FLAGS = ("-h", "--help")
# Class paths that cannot name a segmenter of the user's (their subclasses of the default segmenter
# defined in this package are listed by name in the snapshot and never count as safe).
SAFE_CLASS_PREFIXES = ("vss_lightning.", "lightning.", "pytorch_lightning.", "lightning_fabric.", "torch.")
_KEY = re.compile(r"--?[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CLASS_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_CLASS_PATH_IN_CONFIG = re.compile(r"""class_path['"]?\s*[:=]\s*['"]?([^\s'",}\]]*)""")
_CONFIG_REFERENCE = re.compile(r"\.(ya?ml|json|jsonnet)\b", re.IGNORECASE)
_COMMENT = re.compile(r"(^|\s)#.*$", re.MULTILINE)


class _Undecided(Exception):
    """The command line holds something the snapshot cannot decide: the full parser answers."""


# --- validity ---------------------------------------------------------------------------------------


def installed_versions() -> dict[str, str | None]:
    """Python's version and the installed versions of the libraries that render the parser."""
    versions: dict[str, str | None] = {"python": "{}.{}.{}".format(*sys.version_info[:3])}
    for name in RENDERING_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the names and contents of the package's `.py` files that shape the parser."""
    digest = hashlib.sha256()
    files = sorted((p.relative_to(package_dir).as_posix(), p) for p in package_dir.rglob("*.py"))
    for name, path in files:
        if name in NOT_HASHED:
            continue
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def schema_path() -> Path | None:
    """The snapshot file to use, or None when disabled (`VSS_LIGHTNING_SCHEMA=off`)."""
    value = os.environ.get(SCHEMA_ENV, "")
    if value.lower() in ("off", "0", "false", "none"):
        return None
    return Path(value).expanduser() if value else SCHEMA_FILE


def stale_reason(schema: Any) -> str | None:
    """Why `schema` does not describe this installation's parser, or None when it does."""
    if not isinstance(schema, dict) or schema.get("format") != FORMAT:
        return f"the snapshot is not in format {FORMAT}"
    versions = installed_versions()
    if schema.get("versions") != versions:
        recorded = schema.get("versions") or {}
        changed = sorted(k for k in set(versions) | set(recorded) if versions.get(k) != recorded.get(k))
        return "library versions differ: " + ", ".join(
            f"{k} {recorded.get(k)} (recorded) != {versions.get(k)} (installed)" for k in changed
        )
    try:
        current = source_hash()
    except OSError as e:
        return f"the package source cannot be read: {e}"
    if schema.get("source_hash") != current:
        return "the package source changed since the snapshot was written"
    return None


def load_schema() -> dict[str, Any] | None:
    """The snapshot when it is valid for this installation, else None (the caller takes the full path)."""
    path = schema_path()
    if path is None:
        return None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return schema if stale_reason(schema) is None else None


# --- help ----------------------------------------------------------------------------------------------


def lookup_help(
    argv: list[str], prog: str, columns: int | None = None, schema: dict[str, Any] | None = None
) -> str | None:
    """The full parser's output of `prog [SUBCOMMAND] --help`, from a valid snapshot, or None.

    Only a help flag alone or after a subcommand is answered, at the snapshot's width (`columns`,
    default `help_cache.help_columns()`). `--help` after `--config FILE` or with other arguments,
    `--print_config` and other widths return None: the full parser renders them (and `help_cache`
    stores them), slow the first time only.
    """
    if not argv or len(argv) > 2 or argv[-1] not in HELP_FLAGS:
        return None
    sub = argv[0] if len(argv) == 2 else ""
    if sub.startswith("-"):
        return None
    if columns is None:
        columns = help_columns()
    schema = load_schema() if schema is None else schema
    if schema is None or columns != schema.get("columns"):
        return None
    lines = schema.get("progs", {}).get(prog, {}).get("help", {}).get(sub)
    return "\n".join(lines) if isinstance(lines, list) else None


# --- argument errors -------------------------------------------------------------------------------


def unknown_init_arg(message: str) -> str | None:
    """`--model.segmenter.init_args.x` from jsonargparse's `Parser key "model.segmenter": ... Option 'x'
    is not accepted` (an unknown argument of a class given by class_path), or None."""
    keys = re.findall(r"Parser key \"([A-Za-z0-9_.]+)\"", message)
    option = re.search(r"Option '([A-Za-z0-9_.]+)' is not accepted", message)
    if keys and option:
        return f"--{keys[0]}.init_args." + ".".join([*keys[1:], option.group(1)])
    return None


def did_you_mean(message: str, known: set[str] | list[str]) -> str:
    """`Did you mean --x?` for the first unknown option or key named in a parser error, or "".

    Used by the full parser (`lightning_cli.VSSArgumentParser`) and the fast path alike.
    """
    known = set(known)
    words = re.findall(r"--[A-Za-z0-9_.+-]+", message)
    words += ["--" + k for k in re.findall(r"[Kk]ey[s]? ['\"]([A-Za-z0-9_.]+)['\"]", message)]
    unknown = unknown_init_arg(message)
    words = [unknown, *words] if unknown else words
    for word in words:
        if word in known:
            continue
        close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.75)
        if close:
            return f" Did you mean `{close[0]}`?"
    return ""


def precheck(argv: list[str], prog: str, schema: dict[str, Any] | None = None) -> str | None:
    """The full parser's error output (two lines) for a misspelled option key in `prog argv`, or None.

    None when the command line has no mistake the snapshot can see, when it holds anything the
    snapshot cannot decide for sure (see the module docstring), when it asks for help, and when the
    snapshot is not valid for this installation: the caller then builds the full parser. The caller
    prints the text to stderr and exits with status 2, as the full parser does.
    """
    if len(argv) < 2 or argv[0].startswith("-"):
        return None
    schema = load_schema() if schema is None else schema
    if schema is None:
        return None
    try:
        return _precheck(argv, prog, schema)
    except (_Undecided, LookupError, TypeError, ValueError, AttributeError):
        return None


def _value(argv: list[str], i: int, inline: str | None) -> tuple[str, int]:
    """The one value of the option before index `i` (`--key=value` or `--key value`) and the next index."""
    if inline is not None:
        return inline, i
    if i >= len(argv) or argv[i].startswith("-"):
        raise _Undecided  # a missing value or one that looks like an option: the parser's own error
    return argv[i], i + 1


def _precheck(argv: list[str], prog: str, schema: dict[str, Any]) -> str | None:
    sub = argv[0]
    options: dict[str, list[Any]] = schema["options"][sub]
    errors: dict[str, Any] = schema["progs"][prog]["errors"][sub]
    init: dict[str, Any] | None = schema.get("init_args")
    extras: list[str] = []  # what argparse reports as "unrecognized arguments", in order
    init_errors: list[str] = []  # unknown arguments of the default segmenter, in order
    configs: list[str] = []
    class_values: list[str] = []
    touches_init = False
    i = 1
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("-"):
            extras.append(token)  # a stray value (e.g. after an unknown option)
            continue
        key, eq, inline_value = token.partition("=") if token.startswith("--") else (token, "", "")
        inline = inline_value if eq else None
        if not _KEY.fullmatch(key):  # `--`, `-`, `--key+` (append), odd characters
            raise _Undecided
        if key in options:
            kind, nargs = options[key]
            if kind == "help" or nargs not in (None, "?", 0):
                raise _Undecided
            if nargs == 0:
                if inline is not None:
                    raise _Undecided
                continue
            if nargs == "?" and inline is None:
                if i < len(argv) and not argv[i].startswith("-"):
                    i += 1
                continue
            value, i = _value(argv, i, inline)
            if kind == "config":
                configs.append(value)
            elif kind == "container":  # `--model FILE`: a nested config may hold anything
                raise _Undecided
            elif init and key == init["option"]:
                touches_init = True
                class_values.append(value)
            continue
        if not key.startswith("--"):
            raise _Undecided  # a short option the snapshot does not know
        if init and key.startswith(init["option"] + "."):
            touches_init = True
            rest = key[len(init["option"]) + 1 :]
            head = rest.split(".")[0]
            value, i = _value(argv, i, inline)
            if rest == "class_path":
                class_values.append(value)
                continue
            if head in ("class_path", "dict_kwargs", "help", "__path__") or rest == "init_args":
                raise _Undecided
            name = init["option"] + "." + (rest if head == "init_args" else "init_args." + rest)
            if name in init["names"]:
                if name in init["containers"]:  # a whole settings object given as one value
                    raise _Undecided
                continue
            parent, _, leaf = name.rpartition(".")
            if parent in init["containers"] and re.fullmatch(r"[A-Za-z0-9_]+", leaf):
                init_errors.append(name)
                continue
            raise _Undecided  # below an argument that takes sub-keys (e.g. the backbone's)
        parts = key[2:].split(".")
        for n in range(len(parts) - 1, 0, -1):
            parent = "--" + ".".join(parts[:n])
            if parent in options:
                if options[parent][0] != "container":  # e.g. --trainer.logger.x, --data.shards.x
                    raise _Undecided
                break
        extras.append(token)
    if not init_errors and not extras:
        return None
    texts = []
    for config in configs:
        try:
            texts.append(Path(config).expanduser().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            raise _Undecided from None  # missing or unreadable: the full parser says which
    if touches_init:
        _check_segmenter_class(init, class_values, texts)
    known_sets = schema["known_sets"]
    if init_errors:  # raised while parsing, before the unrecognized arguments are reported
        key = init_errors[0]
        close = difflib.get_close_matches(key, known_sets[errors["known_not_an_option"]], n=1, cutoff=0.75)
        if not close:  # the full parser would search its own (unrecorded) message further
            raise _Undecided
        first = errors["not_an_option"].replace("{key}", key)
        return f"error: {first} Did you mean `{close[0]}`?\n{errors['hint']}\n"
    message = errors["unrecognized"] + " ".join(extras)
    first = " ".join(message.split())
    unknown = unknown_init_arg(first)
    if unknown:
        first = errors["not_an_option"].replace("{key}", unknown)
    if len(first) > 600:
        first = first[:600] + " ..."
    suggestion = did_you_mean(message, known_sets[errors["known_unrecognized"]])
    return f"error: {first}{suggestion}\n{errors['hint']}\n"


def _check_segmenter_class(init: Any, class_values: list[str], config_texts: list[str]) -> None:
    """Raise `_Undecided` unless the segmenter is surely the default class (whose arguments we know)."""
    values = list(class_values)
    for text in config_texts:
        values += _CLASS_PATH_IN_CONFIG.findall(text)  # comments too: a false alarm only costs speed
        if _CONFIG_REFERENCE.search(_COMMENT.sub("", text)):
            raise _Undecided  # a config that names more config files: their classes are unseen
    for value in values:
        if not _CLASS_PATH.fullmatch(value) or value.rsplit(".", 1)[-1] in init["subclass_names"]:
            raise _Undecided
        if "." in value and value != init["class_path"] and not value.startswith(SAFE_CLASS_PREFIXES):
            raise _Undecided  # e.g. mypackage.MySegmenter
