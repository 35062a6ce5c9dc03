"""Render `cli_schema.json`, the committed snapshot of the CLI's parser (see `cli_schema`).

    python -m vss_lightning.cli_schema_build --write | --check | --print

This module builds the full LightningCLI parser (torch, Lightning) and probes it; `cli_schema` reads
the snapshot at run time with the standard library only. Kept apart so that the run-time side never
imports the CLI it stands in for.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from vss_lightning.cli_schema import (
    FORMAT,
    PACKAGE_DIR,
    PROGS,
    SCHEMA_FILE,
    WRITE_COMMAND,
    installed_versions,
    precheck,
    source_hash,
)
from vss_lightning.help_cache import HELP_COLUMNS


def _subparsers(parser: Any) -> dict[str, Any]:
    for action in parser._actions:
        if hasattr(action, "_name_parser_map"):
            return dict(action._name_parser_map)
    raise RuntimeError("the CLI parser has no subcommands")


def _kind(action: Any) -> str:
    import argparse

    name = type(action).__name__
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or "Help" in name:
        return "help"
    if "Print" in name or name == "ActionFail":
        return "help"
    if name == "_ActionConfigLoad":
        return "container"  # `--model`, `--data`, `--trainer`: every sub-key is an option of its own
    if name == "ActionConfigFile":
        return "config"
    return "value"


def _options(parser: Any) -> dict[str, list[Any]]:
    options = {}
    for action in parser._actions:
        for string in action.option_strings:
            if string.startswith("-"):
                options[string] = [_kind(action), action.nargs]
    return dict(sorted(options.items()))


def _base_name(node: Any) -> str:
    import ast

    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    return ""


def _subclass_names(root: str) -> list[str]:
    """Names of the classes of this package that derive (directly or not) from the class `root`."""
    import ast

    bases: dict[str, set[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, set()).update(_base_name(b) for b in node.bases)
    found: set[str] = set()
    frontier = {root}
    while frontier:
        frontier = {name for name, parents in bases.items() if parents & frontier} - found - {root}
        found |= frontier
    return sorted(found)


def _init_args(lc: Any, parser: Any) -> dict[str, Any]:
    """The arguments of the default segmenter class that the full parser's errors know."""
    import typing

    names = sorted(lc._init_arg_names())
    owners = {n.split(".init_args.")[0] for n in names}
    if len(owners) != 1 or not all(".init_args." in n for n in names):
        raise RuntimeError(
            f"expected `--X.init_args.*` names of one option from _init_arg_names, got {owners}"
        )
    option = owners.pop()
    actions = [a for a in parser._actions if option in a.option_strings]
    typehint = getattr(actions[0], "_typehint", None) if actions else None
    classes = [c for c in typing.get_args(typehint) if isinstance(c, type) and c is not type(None)]
    if len(classes) != 1:
        raise RuntimeError(f"expected `{option}` to take one class (or None), got {typehint!r}")
    containers = {option + ".init_args"} | {n for n in names if any(m.startswith(n + ".") for m in names)}
    return {
        "option": option,
        "class_path": f"{classes[0].__module__}.{classes[0].__qualname__}",
        "subclass_names": _subclass_names(classes[0].__name__),
        "containers": sorted(containers),
        "names": names,
    }


def _grab_parser(lc: Any, prog: str, epilog: str) -> Any:
    """The full parser that `run_cli` builds for `prog`, without parsing anything."""

    class Built(Exception):
        pass

    def stop(self: Any, parser: Any, args: Any) -> None:
        raise Built(parser)

    original = lc.VSSLightningCLI.parse_arguments
    lc.VSSLightningCLI.parse_arguments = stop
    try:
        lc.run_cli([], prog=prog, epilog=epilog)
    except Built as built:
        return built.args[0]
    finally:
        lc.VSSLightningCLI.parse_arguments = original
    raise RuntimeError("run_cli did not build a parser")


def _probe(lc: Any, parser: Any, argv: list[str]) -> tuple[list[str], list[tuple[str, list[str], str]]]:
    """Parse `argv` with the full parser: its stderr lines and each (message, known, suggestion)."""
    import contextlib
    import io

    calls: list[tuple[str, list[str], str]] = []
    original = lc.did_you_mean

    def recording(message: str, known: set[str]) -> str:
        suggestion = original(message, known)
        calls.append((message, sorted(known), suggestion))
        return suggestion

    err = io.StringIO()
    lc.did_you_mean = recording
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as e:
        if e.code != 2:
            raise RuntimeError(f"expected exit status 2 from {argv}, got {e.code}") from None
    else:
        raise RuntimeError(f"expected {argv} to be refused by the full parser")
    finally:
        lc.did_you_mean = original
    if len(calls) != 1:
        raise RuntimeError(f"expected one error from {argv}, got {calls}")
    return err.getvalue().splitlines(), calls


def _render_help(lc: Any, argv: list[str], prog: str, epilog: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            lc.run_cli(argv, prog=prog, epilog=epilog)
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"`{prog} {' '.join(argv)}` exited with {e.code}") from None
    return out.getvalue()


def build_schema() -> dict[str, Any]:
    """Render the snapshot from the full parser (imports torch and Lightning; run it in a fresh process:
    help texts list the imported subclasses of Callback, Logger, ..., so a process that imported more
    classes than the CLI does renders other texts)."""
    import warnings

    from vss_lightning import cli, help_cache
    from vss_lightning import lightning_cli as lc

    known_sets: list[list[str]] = []

    def known_index(known: list[str]) -> int:
        if known not in known_sets:
            known_sets.append(known)
        return known_sets.index(known)

    progs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    init: dict[str, Any] | None = None
    with help_cache.help_width(HELP_COLUMNS), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        for prog in PROGS:
            epilog = cli.epilog(prog)
            helps = {}
            for sub in ("", *lc.SUBCOMMANDS):
                argv = [sub, "--help"] if sub else ["--help"]
                helps[sub] = _render_help(lc, argv, prog, epilog).split("\n")
            parser = _grab_parser(lc, prog, epilog)
            subparsers = _subparsers(parser)
            if init is None:
                init = _init_args(lc, subparsers[lc.SUBCOMMANDS[0]])
            errors = {}
            for sub in lc.SUBCOMMANDS:
                options[sub] = _options(subparsers[sub])
                token = "--zz_unknown_probe"
                lines, [(message, known, suggestion)] = _probe(lc, parser, [sub, token, "1"])
                prefix = message[: message.find(token)]
                if message != f"{prefix}{token} 1" or len(lines) != 2:
                    raise RuntimeError(f"unexpected error output for an unknown option: {lines}")
                key = init["names"][0] + "zz"
                init_lines, [(_, init_known, init_suggestion)] = _probe(lc, parser, [sub, key, "1"])
                first = init_lines[0].removeprefix("error: ")
                first = first[: len(first) - len(init_suggestion)]
                if key not in first or len(init_lines) != 2 or init_lines[1] != lines[1]:
                    raise RuntimeError(
                        f"unexpected error output for an unknown segmenter argument: {init_lines}"
                    )
                errors[sub] = {
                    "hint": lines[1],
                    "unrecognized": prefix,
                    "known_unrecognized": known_index(known),
                    "not_an_option": first.replace(key, "{key}"),
                    "known_not_an_option": known_index(init_known),
                }
            progs[prog] = {"errors": errors, "help": helps}
    schema = {
        "format": FORMAT,
        "written_by": WRITE_COMMAND,
        "columns": HELP_COLUMNS,
        "versions": installed_versions(),
        "source_hash": source_hash(),
        "init_args": init,
        "options": options,
        "known_sets": known_sets,
        "progs": progs,
    }
    _self_check(lc, schema)
    return schema


def _self_check(lc: Any, schema: dict[str, Any]) -> None:
    """The fast path answers the probes exactly as the full parser did."""
    from vss_lightning import cli

    for prog in PROGS:
        parser = None
        for argv in (
            ["predict", "--outptu_dir", "x"],
            ["predict", schema["init_args"]["names"][-1] + "x", "1"],
        ):
            fast = precheck(argv, prog, schema)
            if fast is None:
                continue
            parser = parser or _grab_parser(lc, prog, cli.epilog(prog))
            lines, _ = _probe(lc, parser, argv)
            if fast.splitlines() != lines:
                raise RuntimeError(
                    f"the fast path answers {argv} with {fast!r}, the full parser with {lines}"
                )


def dumps(schema: dict[str, Any]) -> str:
    """The snapshot as committed: one help line per JSON line, so that diffs are readable."""
    return json.dumps(schema, indent=1, ensure_ascii=False) + "\n"


def differences(old: Any, new: dict[str, Any]) -> list[str]:
    """Which parts of the snapshot `old` differ from `new` (for messages)."""
    if not isinstance(old, dict):
        return ["the whole snapshot (missing or unreadable)"]
    found = [k for k in new if k != "progs" and old.get(k) != new[k]]
    for prog, entry in new["progs"].items():
        before = old.get("progs", {}).get(prog, {})
        found += [" ".join(filter(None, (prog, sub, "--help"))) for sub in entry["help"]
                  if before.get("help", {}).get(sub) != entry["help"][sub]]  # fmt: skip
        if before.get("errors") != entry["errors"]:
            found.append(f"{prog} error texts")
    return found


def main(args: list[str] | None = None) -> int:
    """`python -m vss_lightning.cli_schema_build --write | --check | --print`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vss_lightning.cli_schema_build", description=__doc__.split("\n\n")[0]
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help=f"render the snapshot into {SCHEMA_FILE.name}")
    group.add_argument("--check", action="store_true", help="exit status 1 when the snapshot is stale")
    group.add_argument("--print", action="store_true", help="print a freshly rendered snapshot")
    options = parser.parse_args(args)
    schema = build_schema()
    text = dumps(schema)
    if options.print:
        sys.stdout.write(text)
        return 0
    if options.write:
        SCHEMA_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_FILE}")
        return 0
    try:
        old = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    changed = differences(old, schema)
    if changed:
        print(f"{SCHEMA_FILE} is stale ({', '.join(changed)}); run `{WRITE_COMMAND}`.", file=sys.stderr)
        return 1
    print(f"{SCHEMA_FILE} is current.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
