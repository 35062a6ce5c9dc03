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

- `lookup_help(argv, prog)`: the text of `[SUBCOMMAND] --help`, and of `SUBCOMMAND [--config FILE ...]
  [--key value ...] --help` when `print_config` (below) applies every file and override for sure (the
  full parser then prints the same help: config values are not shown as defaults);
- `precheck(argv, prog)`: the two-line error (and exit status 2) of a misspelled option key, exactly
  as the full parser prints it, e.g. `--model.segmenter.init_args.batch_sise 3`;
- `value_error(argv, prog)`: the two-line error (exit status 2) of a value the full parser surely
  refuses, e.g. `--model.label_mode clusters` or `--trainer.max_epochs 1.5`, exactly as it prints it
  (rendered by `cli_values`, checked against the full parser when the snapshot is written).

They answer only when the snapshot is valid for this installation: the installed versions of
Python, lightning, jsonargparse, docstring-parser, typeshed-client, torch and diffusers equal the
recorded ones, and the sha256 of this package's source files (every `vss_lightning/**/*.py` but this
module and `help_cache.py`, which do not shape the parser; `cli_values.py` counts, so that its
messages are checked again whenever it changes) equals the recorded one. Otherwise, and
whenever a command line is outside what they can decide for sure, they return None and the caller
builds the full parser (its `--help` output is then cached by `help_cache`).

- `print_config(argv, prog)`: the output of `SUBCOMMAND [--config FILE ...] [--key value ...]
  --print_config` (no flags), byte for byte, from the tree the parser prints without arguments, the
  nodes (types) of its keys and the defaults of the classes and settings groups the configs can name
  (see the `print_config` section below). It defers to the full parser on anything it cannot apply
  for sure: a class it was not rendered with (e.g. `trainer.strategy`, `trainer.logger` classes, a
  short class name), a key it does not know, a value it cannot check (strings for non-string keys,
  numbers for keys that also take strings, YAML forms beyond plain words, numbers and flat lists),
  a value the parser would refuse (the parser then prints its error), `--print_config=FLAGS`, and
  any `JSONARGPARSE_*` or `PL_*` environment variable.

(Longer than 400 lines because answering exactly as jsonargparse would — its value reading, merge
rules and YAML loader — is one concern that must stay in one stdlib-only module: splitting it would
add imports to the fast path; the rendering of refused values' messages, imported when an override
is checked, lives in `cli_values`.)

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
starting with `-`, and anything it has not seen in the snapshot. `precheck` does not validate
values: when a command line holds a misspelled key and also a bad value (or a bad config file), it
names the misspelled key where the full parser may name the other mistake first; both exit with
status 2. `value_error` answers only command lines without unknown keys: it walks the whole line
with the `print_config` machinery and reports the first value that a key of a simple type (ints,
floats, booleans, None, string Literals and their unions; `--flag/--no_flag` options) surely refuses;
anything else it cannot apply for sure (a value in a config file, `null` below a class key, where
jsonargparse reads it unevenly, a value form it does not read for sure) leaves it to the full parser.

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


class _Refused(_Undecided):
    """A command-line value the full parser surely refuses (`value_error` prints its error)."""

    def __init__(self, levels: list[tuple[str, str, str, str]], name: str, kind: Any, token: str,
                 yes_no: str | None = None) -> None:  # fmt: skip
        super().__init__(name)
        self.levels, self.name, self.kind, self.token, self.yes_no = levels, name, kind, token, yes_no


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
    if not argv or argv[-1] not in HELP_FLAGS:
        return None
    sub = argv[0] if len(argv) >= 2 else ""
    if sub.startswith("-"):
        return None
    if len(argv) > 2:  # only a plain `SUB [--config FILE ...] [--key value ...] --help`
        others = any(a in HELP_FLAGS or a.startswith(PRINT_FLAG) for a in argv[1:-1])
        if sub not in SUBCOMMANDS or others or _env_driven():
            return None
    if columns is None:
        columns = help_columns()
    schema = load_schema() if schema is None else schema
    if schema is None or columns != schema.get("columns"):
        return None
    if len(argv) > 2:  # `SUB --config FILE [--key value ...] --help`: the help of SUB, once all apply
        try:
            _apply_argv(argv[:-1], schema["print_config"], None)
        except (_Undecided, LookupError, TypeError, ValueError, AttributeError, RecursionError, OSError):
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


# --- print_config ------------------------------------------------------------------------------------
#
# The snapshot's `print_config` entry holds, per subcommand, the tree the full parser prints without
# arguments (`tree`, in its key order) and a node per settable key (`nodes`, dotted keys of the tree);
# `classes` holds, per class a subclass-typed key can take, its init_args nodes and its defaults as
# the parser renders them; `groups` the fields of the settings dataclasses (expanded when given).
# Node and type descriptors (all rendered from the parser's own type hints at build time):
#   {"leaf": T}                         a value of type T
#   {"group": NAME}                     `Dataclass | None` (None until given; a dict expands it)
#   {"class": [CLASS_PATH, ...]}        `Class | None`: None or {class_path, init_args}
# where T is "int", "float", "bool", "str", "null", {"lit": [str, ...]}, {"list": T}, {"union": [T, ...]},
# "class" (a class type: refuses numbers, booleans and None, may take anything else), "seq" (an
# iterable of classes: refuses those and dicts) or "any".
# Anything the model cannot decide for sure raises `_Undecided` and the full parser answers.

PRINT_FLAG = "--print_config"
SUBCOMMANDS = ("predict", "test", "validate")
_ENV_PREFIXES = ("JSONARGPARSE_", "PL_")  # environment-driven parsing settings and defaults
# set by `seed_everything` (e.g. an earlier run in the same process): they do not shape the parser
_SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _env_driven() -> bool:
    """Whether an environment variable may change what the full parser prints."""
    return any(name.startswith(_ENV_PREFIXES) and name not in _SEED_ENV for name in os.environ)


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
_Reject = object()  # a value the full parser refuses (it prints the error)


def print_config(argv: list[str], prog: str, schema: dict[str, Any] | None = None) -> str | None:
    """The full parser's output of `prog SUBCOMMAND [--config FILE] [overrides] --print_config`, or None.

    Answered from a valid snapshot when every config file and override is one the snapshot can apply
    for sure (see above); None otherwise (the caller builds the full parser).
    """
    if len(argv) < 2 or argv[0] not in SUBCOMMANDS or argv.count(PRINT_FLAG) != 1:
        return None
    if _env_driven():
        return None
    schema = load_schema() if schema is None else schema
    if schema is None or "print_config" not in schema or prog not in schema.get("progs", {}):
        return None
    try:
        return _print_config(argv, schema["print_config"])
    except (_Undecided, LookupError, TypeError, ValueError, AttributeError, RecursionError, OSError):
        return None


def value_error(argv: list[str], prog: str, schema: dict[str, Any] | None = None) -> str | None:
    """The full parser's error output (two lines) for the first value it surely refuses, or None.

    Answered from a valid snapshot when the whole command line is one `print_config` can apply for
    sure except for values of simple types (see `cli_values`) that the parser surely refuses; the
    first of those, in command-line order, is the parser's error. The caller prints the text to stderr
    and exits with status 2, as the full parser does. None otherwise (the caller builds the parser).
    """
    if len(argv) < 2 or argv[0] not in SUBCOMMANDS:
        return None
    if any(a in HELP_FLAGS or a.startswith(PRINT_FLAG) for a in argv):
        return None
    if _env_driven():
        return None
    schema = load_schema() if schema is None else schema
    if schema is None or "print_config" not in schema:
        return None
    try:
        return _value_error(argv, prog, schema)
    except (_Undecided, LookupError, TypeError, ValueError, AttributeError, RecursionError, OSError):
        return None


def _value_error(argv: list[str], prog: str, schema: dict[str, Any]) -> str | None:
    from vss_lightning import cli_values

    errors = schema["progs"][prog]["errors"][argv[0]]
    if "known_value" not in errors:
        return None
    refused: list[_Refused] = []
    _apply_argv(argv, schema["print_config"], refused)
    if not refused:
        return None
    first = refused[0]
    if first.yes_no is not None:
        text = cli_values.yes_no_message(first.yes_no, first.token)
    else:
        if not first.levels:  # a list-valued option would name the element
            kind, nargs = schema["options"][argv[0]]["--" + first.name]
            if kind != "value" or nargs not in (None, "?"):
                return None
        text = cli_values.message(first.levels, first.name, first.kind, first.token)
    return cli_values.user_error(text, schema["known_sets"][errors["known_value"]], errors["hint"])


def _yaml_loader() -> Any:
    """jsonargparse's YAML loader: PyYAML's safe loader without timestamps and with its float rule."""
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        pass

    dropped = ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:float")
    resolvers = yaml.SafeLoader.yaml_implicit_resolvers.items()
    Loader.yaml_implicit_resolvers = {k: [(t, r) for t, r in v if t not in dropped] for k, v in resolvers}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:
        [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def _safe_load(text: str, loader: Any) -> Any:
    """Parse one YAML document with `loader`, a subclass of PyYAML's safe loader (no Python tags)."""
    import yaml

    if not issubclass(loader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        raise TypeError("Expected a safe YAML loader.")
    instance = loader(text)
    try:
        return instance.get_single_data()
    finally:
        instance.dispose()


def _print_config(argv: list[str], snap: dict[str, Any]) -> str:
    import yaml

    state = _apply_argv(argv, snap, None)
    header = "".join(f"# {line}\n" for line in snap["header"])
    return header + yaml.safe_dump(state, default_flow_style=False, allow_unicode=True, sort_keys=False)


def _apply_argv(argv: list[str], snap: dict[str, Any], refused: list[_Refused] | None) -> dict[str, Any]:
    """The tree of `argv[0]` after the config files and overrides of `argv[1:]`, as the parser applies
    them. A value it surely refuses raises `_Refused`, or, when `refused` is a list, is appended to it
    and skipped (the rest must still be applied for sure)."""
    import copy

    import yaml

    sub = argv[0]
    state = copy.deepcopy(snap["trees"][sub])
    nodes: dict[str, Any] = snap["nodes"][sub]
    loader = _yaml_loader()
    i = 1
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == PRINT_FLAG:
            continue
        if not token.startswith("--") or not _KEY.fullmatch(token.partition("=")[0]):
            raise _Undecided
        key, eq, inline = token.partition("=")
        if key == "--write_previews" and not eq and (i >= len(argv) or argv[i].startswith("-")):
            state["write_previews"] = True  # ActionYesNo without a value
            continue
        if key == "--no_write_previews" and not eq:
            state["write_previews"] = False
            continue
        value, i = _value(argv, i, inline if eq else None)
        if key in ("--config", "-c"):
            text = Path(value).expanduser().read_text(encoding="utf-8")
            try:
                loaded = _safe_load(text, loader)
            except yaml.YAMLError:
                raise _Undecided from None  # malformed, or a tag: the full parser reports it
            if not isinstance(loaded, dict) or all(v is None for v in loaded.values()):
                raise _Undecided  # jsonargparse reads a mapping of only nulls as a string
            _apply_mapping(state, nodes, loaded, "", snap)
        else:
            try:
                _apply_cli(state, nodes, key[2:], value, snap, loader, snap["trees"][sub])
            except _Refused as r:
                if refused is None:
                    raise
                refused.append(r)
    return state


def _apply_mapping(state: dict[str, Any], nodes: dict[str, Any], data: dict[str, Any], prefix: str,
                   snap: dict[str, Any]) -> None:  # fmt: skip
    """Apply a config file's mapping (at dotted `prefix` of the top tree)."""
    for key, value in data.items():
        if not isinstance(key, str) or "." in key:
            raise _Undecided
        path = prefix + key
        if path in nodes:
            _set_node(state, path.split("."), nodes[path], value, snap, cli=False)
        elif isinstance(_get(state, path.split(".")), dict) and isinstance(value, dict) and "." not in path:
            _apply_mapping(state, nodes, value, path + ".", snap)  # trainer, model, data, writer
        else:
            raise _Undecided  # unknown key, a link target, `config` in a config, ...


def _get(state: dict[str, Any], parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(state, dict) or part not in state:
            raise _Undecided
        state = state[part]
    return state


def _set_node(state: dict[str, Any], parts: list[str], node: dict[str, Any], value: Any,
              snap: dict[str, Any], cli: bool) -> None:  # fmt: skip
    """Set the value of the key at `parts` of `state` (its parent must exist) from a config file."""
    import copy

    parent = _get(state, parts[:-1])
    name = parts[-1]
    if name not in parent:
        raise _Undecided
    if "leaf" in node:
        parent[name] = _checked(value, node["leaf"])
    elif "group" in node:
        if not isinstance(value, dict):
            raise _Undecided  # None, a path, ...
        group = snap["groups"][node["group"]]
        current = parent[name]
        merged = copy.deepcopy(group["default"]) if current is None else current
        for field, field_value in value.items():
            if field not in group["fields"] or field not in merged:
                raise _Undecided
            merged[field] = _checked(field_value, group["fields"][field])
        parent[name] = merged
    elif "class" in node:
        if not isinstance(value, dict) or not set(value) <= {"class_path", "init_args"}:
            raise _Undecided
        init = value.get("init_args", {})
        if not isinstance(init, dict):
            raise _Undecided
        parent[name] = _switch(parent[name], value.get("class_path"), node, snap)
        spec = snap["classes"][parent[name]["class_path"]]
        args = parent[name]["init_args"]
        for arg, arg_value in init.items():
            if not isinstance(arg, str) or arg not in spec["nodes"]:
                raise _Undecided
            _set_node(args, [arg], spec["nodes"][arg], arg_value, snap, cli)
    else:
        raise _Undecided


def _switch(current: Any, class_path: Any, node: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    """The {class_path, init_args} of a class key after `class_path` is given (None: unchanged class)."""
    import copy

    if class_path is None:
        if not isinstance(current, dict):
            raise _Undecided  # init_args without a class
        return current
    if class_path not in node["class"] or class_path not in snap["classes"]:
        raise _Undecided  # another class (or a short name): the full parser decides
    if isinstance(current, dict) and current.get("class_path") == class_path:
        return current
    spec = snap["classes"][class_path]
    fresh = {"class_path": class_path, "init_args": copy.deepcopy(spec["default"])}
    if isinstance(current, dict):  # init_args the new class accepts are kept, the others discarded
        for arg, arg_value in current["init_args"].items():
            arg_node = spec["nodes"].get(arg)
            if arg_node is None or (arg_value is None and fresh["init_args"].get(arg, 0) is None):
                continue
            if "leaf" not in arg_node:
                raise _Undecided
            try:
                fresh["init_args"][arg] = _checked(arg_value, arg_node["leaf"])
            except _Undecided:
                raise
            except Exception:
                continue
    elif current is not None:
        raise _Undecided
    return fresh


def _apply_cli(state: dict[str, Any], nodes: dict[str, Any], key: str, token: str, snap: dict[str, Any],
               loader: Any, tree: dict[str, Any]) -> None:  # fmt: skip
    """Apply `--key token` from the command line (`tree`: the parser's defaults, before any argument).

    A value the full parser surely refuses raises `_Refused` before anything changes."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        path = ".".join(parts[:n])
        if path in nodes:
            break
    else:
        raise _Undecided
    node, rest = nodes[path], parts[n:]
    target = parts[:n]
    name, default = path, _default(tree, target)
    levels: list[tuple[str, str, str, str]] = []  # the class and group keys above (see cli_values)
    while rest:  # below a class key (`.class_path`, `.init_args.X`) or a group (`.field`)
        current = _get(state, target)
        if "class" in node:
            if rest == ["class_path"]:
                _get(state, target[:-1])[target[-1]] = _switch(current, token, node, snap)
                return
            if len(rest) < 2 or rest[0] != "init_args" or not isinstance(current, dict):
                raise _Undecided
            levels.append((name, node.get("subtypes"), current["class_path"], ".".join(rest[1:])))
            spec = snap["classes"][current["class_path"]]
            node = spec["nodes"].get(rest[1])
            if node is None:
                raise _Undecided
            name, default = rest[1], spec["default"].get(rest[1])
            target, rest = [*target, "init_args", rest[1]], rest[2:]
        elif "group" in node and len(rest) == 1:
            group = snap["groups"][node["group"]]
            if rest[0] not in group["fields"]:
                raise _Undecided
            kind = group["fields"][rest[0]]
            level = (name, node.get("subtypes"), node["group"], rest[0])
            _refuse([*levels, level], rest[0], kind, token, group["default"].get(rest[0]))
            if current is None:
                _get(state, target[:-1])[target[-1]] = current = json.loads(json.dumps(group["default"]))
            current[rest[0]] = _checked(_cli_value(token, kind, loader), kind)
            return
        else:
            raise _Undecided
    if "leaf" not in node:
        raise _Undecided  # a whole class or group given as one value
    parent = _get(state, target[:-1])
    if target[-1] not in parent:
        raise _Undecided
    if "yes_no" in node:  # `--flag/--no_flag`: argparse checks the value itself
        from vss_lightning import cli_values

        if levels:
            raise _Undecided
        if node["yes_no"] and cli_values.yes_no_refused(token):
            raise _Refused(levels, name, node["leaf"], token, node["yes_no"])
    else:
        _refuse(levels, name, node["leaf"], token, default)
    parent[target[-1]] = _checked(_cli_value(token, node["leaf"], loader), node["leaf"])


def _default(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _refuse(levels: list[tuple[str, str, str, str]], name: str, kind: Any, token: str, default: Any) -> None:
    """Raise `_Refused` when the full parser surely refuses `token` for this key (see `cli_values`)."""
    from vss_lightning import cli_values

    rendered = all(isinstance(level[1], str) for level in levels)  # an older snapshot lacks the texts
    if rendered and cli_values.refused(kind, token, default, nested=bool(levels)):
        raise _Refused(levels, name, kind, token)


def _has_str(kind: Any) -> bool:
    if isinstance(kind, dict):
        return any(_has_str(k) for k in kind.get("union", [])) or _has_str(kind.get("list"))
    return kind in ("str", "class", "any")


def _cli_value(token: str, kind: Any, loader: Any) -> Any:
    """A command-line value as the full parser reads it, for the plain forms it reads surely."""
    import yaml

    if _has_str(kind):  # the parser's string fallbacks: only words that read as themselves
        if not _WORD.fullmatch(token) or token.lower() in _YAML_WORDS or Path(token).is_file():
            raise _Undecided
        return token
    items = token[1:-1].split(",") if token.startswith("[") and token.endswith("]") else [token]
    for item in items:
        item = item.strip()
        if not (_INT.fullmatch(item) or _FLOAT.fullmatch(item) or item in ("true", "false", "null")
                or (_WORD.fullmatch(item) and item.lower() not in _YAML_WORDS)):  # fmt: skip
            raise _Undecided
    if Path(token).is_file():
        raise _Undecided
    try:
        return _safe_load(token, loader)
    except yaml.YAMLError:
        raise _Undecided from None


def _checked(value: Any, kind: Any) -> Any:
    """`value` adapted to `kind` as jsonargparse does; `_Undecided` when it is refused or unsure."""
    result = _adapt(value, kind)
    if result is _Reject:
        raise _Undecided  # the full parser reports the error
    return result


def _adapt(value: Any, kind: Any) -> Any:
    if isinstance(kind, dict):
        if "lit" in kind:
            return value if isinstance(value, str) and value in kind["lit"] else _Reject
        if "list" in kind:
            if isinstance(value, str):
                raise _Undecided  # a path to a file of lines
            if not isinstance(value, list):
                return _Reject
            items = [_adapt(v, kind["list"]) for v in value]
            return _Reject if any(v is _Reject for v in items) else items
        if "union" in kind:
            for member in kind["union"]:
                result = _adapt(value, member)
                if result is not _Reject:
                    return result
            return _Reject
        raise _Undecided
    if isinstance(value, str) and kind not in ("str", "class", "any"):
        raise _Undecided  # a string read as YAML by the parser
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else _Reject
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _Reject
        return float(value)
    if kind == "bool":
        return value if isinstance(value, bool) else _Reject
    if kind == "str":
        return value if isinstance(value, str) else _Reject
    if kind == "null":
        return value if value is None else _Reject
    if kind == "class":  # a class path or a dict of one: the full parser decides
        if value is None or isinstance(value, (bool, int, float)):
            return _Reject
        raise _Undecided
    if kind == "seq":  # an iterable of classes
        if value is None or isinstance(value, (bool, int, float, dict)):
            return _Reject
        raise _Undecided
    raise _Undecided
