"""The full parser's error for a value it refuses, from the snapshot (stdlib only; see `cli_schema`).

`cli_schema.value_error` walks a command line with the `print_config` machinery (config files
applied, overrides checked in order) and stops at the first override that the full parser surely
refuses: a value of a key whose type is built only from `int`, `float`, `bool`, `None` and string
`Literal`s (and unions of these), given as a plain word, an integer, a decimal number, `true`,
`false` or `null`; or a non-boolean word for a `--flag/--no_flag` option. This module renders the
message jsonargparse raises for it, line for line (its indentation, its union error lists and their
`Got value` clean-ups), and the two lines `lightning_cli.VSSArgumentParser.error` prints from it.
Messages rendered here are compared with the full parser's by `cli_schema_build` (each type of key of
the snapshot, each kind of value, each nesting) before a snapshot is written, and by
`tests/test_cli_fast.py`; this file is part of the snapshot's source hash, so an edit here switches
the fast path off until the snapshot is rendered (and checked) again.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

# Plain forms whose reading by jsonargparse is sure (cf. `cli_schema`): its `load_basic` for numbers
# and true/false/null, PyYAML for the rest (a word that is no YAML keyword stays a string).
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
_NAMES = {"int": "int", "float": "float", "bool": "bool", "null": "NoneType"}
NESTED_TYPE = "<class 'jsonargparse._util.NestedArg'>"
YES_NO = ("true", "yes", "false", "no")  # what `ActionYesNo` accepts, in any case
UNREAD = object()  # a token outside the forms read for sure


def read_token(token: str) -> Any:
    """(raw, loaded) for a command-line value, or `UNREAD`.

    `raw` is what a jsonargparse action checks first (`parse_value_or_config` keeps the token of a
    scalar, turns `null` into None); `loaded` is what its type checks compare (`load_basic`/YAML).
    """
    if token == "null":
        return None, None
    if token in ("true", "false"):
        return token, token == "true"
    if _INT.fullmatch(token):
        return token, int(token)
    if _FLOAT.fullmatch(token):
        return token, float(token)
    if _WORD.fullmatch(token) and token.lower() not in _YAML_WORDS:
        try:
            if Path(token).exists():  # a path may be read as a file by some actions
                return UNREAD
        except OSError:
            return UNREAD
        return token, token
    return UNREAD


def members(kind: Any) -> list[Any] | None:
    """The union members of a leaf kind when every one is modelled here (else None), NoneType last."""
    found = kind["union"] if isinstance(kind, dict) and "union" in kind else [kind]
    for member in found:
        if isinstance(member, dict):
            if set(member) != {"lit"} or not all(isinstance(v, str) for v in member["lit"]):
                return None
        elif member not in _NAMES:
            return None
    return sorted(found, key=lambda m: m == "null")  # jsonargparse's union order (a stable sort)


def _accepts(member: Any, raw: Any, loaded: Any) -> bool:
    if isinstance(member, dict):
        return raw in member["lit"]
    if member == "null":
        return loaded is None
    if isinstance(loaded, bool):
        return member == "bool"
    if member == "int":
        return isinstance(loaded, int)
    if member == "float":
        return isinstance(loaded, (int, float))
    return False


def refused(kind: Any, token: str, default: Any = None, nested: bool = False) -> bool:
    """Whether the full parser surely refuses `token` for a key of `kind` (False: accepted or unsure).

    `nested`: the key is below a class or settings-group key, where `null` is taken (as unset)."""
    found = members(kind)
    read = read_token(token)
    if found is None or read is UNREAD or token == default or (nested and token == "null"):
        return False  # (a token equal to a string default is taken as it is)
    raw, loaded = read
    if any(_accepts(m, raw, loaded) for m in found):
        return False
    # A refused first reading is retried with the token itself: only `null` reads differently.
    return not (raw is None and any(_accepts(m, token, token) for m in found if isinstance(m, dict)))


def type_text(member: Any) -> str:
    if isinstance(member, dict):
        return "typing.Literal[" + ", ".join(repr(v) for v in member["lit"]) + "]"
    return f"<class '{_NAMES[member]}'>"


def indent_text(text: str, first_line: bool = True) -> str:
    """jsonargparse's `indent_text`."""
    if first_line:
        return textwrap.indent(text, "  ")
    lines = text.splitlines()
    if len(lines) == 1:
        return text
    return lines[0] + os.linesep + textwrap.indent(os.linesep.join(lines[1:]), "  ")


def union_error(subtypes: str, errors: list[str], given_type: str, given: str) -> str:
    """jsonargparse's `raise_union_unexpected_value` message."""
    text = indent_text("- " + "\n- ".join(indent_text(e, first_line=False) for e in errors))
    text = text.replace(f". Got value: {given}", "").replace(f" {given} ", " ")
    return (
        f"Does not validate against any of the Union subtypes\nSubtypes: {subtypes}"
        f"\nErrors:\n{text}\nGiven value type: {given_type}\nGiven value: {given}"
    )


def _member_error(member: Any, raw: Any, loaded: Any) -> str:
    shown = raw if isinstance(member, dict) else loaded
    return f"Expected a {type_text(member)}. Got value: {shown}"


def leaf_error(kind: Any, token: str) -> str:
    """The error of a refused `token` for a key of `kind` (below its `Parser key` line)."""
    found = members(kind)
    raw, loaded = read_token(token)
    if found is None:
        raise ValueError(f"kind {kind!r} is not modelled")
    if not isinstance(kind, dict) or "union" not in kind:
        return _member_error(kind, raw, loaded)
    errors = [_member_error(m, raw, loaded) for m in found]
    subtypes = "[" + ", ".join(type_text(m) for m in found) + "]"
    return union_error(subtypes, errors, f"<class '{type(raw).__name__}'>", f"{raw}")


def parser_key(name: str, error: str) -> str:
    return f'Parser key "{name}":\n{indent_text(error)}'


def message(levels: list[tuple[str, str, str, str]], name: str, kind: Any, token: str) -> str:
    """jsonargparse's message for `token` refused at key `name` of kind `kind`, below `levels`.

    `levels` are the class and settings-group keys the value was given through, outermost first:
    (their `Parser key` name, the text of their `Class | None` subtypes, the class path in effect,
    the sub-key handed down to them). The value reaches them as a `NestedArg` of that sub-key.
    """
    text = parser_key(name, leaf_error(kind, token))
    raw = read_token(token)[0]
    for level_name, subtypes, class_path, key in reversed(levels):
        nested = f"NestedArg(key={key!r}, val={raw!r})"
        problem = f"Problem with given class_path {class_path!r}:\n{indent_text(text)}"
        none = f"Expected a <class 'NoneType'>. Got value: {nested}"
        text = parser_key(level_name, union_error(subtypes, [problem, none], NESTED_TYPE, nested))
    return text


def yes_no_refused(token: str) -> bool:
    return token.lower() not in YES_NO


def yes_no_message(prefix: str, token: str) -> str:
    """argparse's message for a `--flag/--no_flag` value `ActionYesNo` refuses (`prefix` from the build)."""
    return f"{prefix}{token!r}"


def user_error(text: str, known: list[str], hint: str) -> str:
    """What `VSSArgumentParser.error` prints for the message `text` (the same steps, in order)."""
    from vss_lightning.cli_schema import did_you_mean, unknown_init_arg

    first = " ".join(text.split())
    unknown = unknown_init_arg(first)
    if unknown:
        first = f"`{unknown}` is not an option (on the command line or in a config file)."
    if len(first) > 600:
        first = first[:600] + " ..."
    return f"error: {first}{did_you_mean(text, known)}\n{hint}\n"
