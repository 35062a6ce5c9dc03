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
    value_error,
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


# --- print_config -------------------------------------------------------------------------------------


def real_print_config(parser: Any, argv: list[str]) -> tuple[int, str, str]:
    """The full parser's (exit status, stdout, stderr) for `argv` (a `--print_config` command line)."""
    import contextlib
    import io

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def _render_tree(parser: Any, sub: str, config: dict[str, Any] | None = None) -> tuple[list[str], Any]:
    """(header lines, tree) the full parser prints for `sub [--config CONFIG] --print_config`."""
    import tempfile
    from pathlib import Path

    import yaml

    with tempfile.TemporaryDirectory() as folder:
        argv = [sub]
        if config is not None:
            path = Path(folder) / "config.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            argv += ["--config", str(path)]
        code, out, err = real_print_config(parser, [*argv, "--print_config"])
    if code != 0:
        raise RuntimeError(f"`{' '.join(argv)} --print_config` exited with {code}: {err}")
    lines = out.split("\n")
    header = []
    while lines and lines[0].startswith("# "):
        header.append(lines.pop(0)[2:])
    return header, yaml.safe_load("\n".join(lines))


def _type_kind(hint: Any) -> Any:
    """The fast path's descriptor of a type hint (see `cli_schema`); "any" for what it does not model."""
    import collections.abc
    import dataclasses
    import enum
    import types
    import typing

    from jsonargparse._typehints import ActionTypeHint, get_registered_type

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, bool, str):
        return hint.__name__
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return {"lit": list(args)} if all(isinstance(a, str) for a in args) else "any"
    if origin in (typing.Union, types.UnionType):
        return {"union": [_type_kind(a) for a in args]}
    if origin is list and len(args) == 1:
        return {"list": _type_kind(args[0])}
    if origin in (collections.abc.Iterable, collections.abc.Sequence) and len(args) == 1:
        if _type_kind(args[0]) == "class":
            return "seq"
        return "any"
    if (
        isinstance(hint, type)
        and not dataclasses.is_dataclass(hint)
        and not issubclass(hint, enum.Enum)
        and get_registered_type(hint) is None
        and ActionTypeHint.is_subclass_typehint(hint, all_subtypes=False)
    ):
        return "class"
    return "any"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _node(action: Any, found: dict[str, Any]) -> dict[str, Any] | None:
    """The fast path's node of a parser action (a leaf, a settings group or a class key), or None."""
    import argparse
    import dataclasses
    import typing

    from jsonargparse import ActionYesNo
    from jsonargparse._typehints import ActionTypeHint, get_all_subclass_paths, sort_subtypes_for_union

    if isinstance(action, ActionYesNo):  # argparse's own error for a value it refuses (cli_values)
        name = getattr(action.type, "__name__", repr(action.type))
        prefix = f"argument {argparse._get_action_name(action)}: invalid {name} value: "
        return {"leaf": "bool", "yes_no": prefix}
    if type(action) is not ActionTypeHint:
        return None
    hint = action._typehint
    members = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(members) == 1 and len(typing.get_args(hint)) == 2 and isinstance(members[0], type):
        # `Class | None` as jsonargparse's union errors list it (`cli_values`)
        subtypes = str(sort_subtypes_for_union(typing.get_args(hint), None, None, False))
        if dataclasses.is_dataclass(members[0]):
            found["groups"].add(members[0])
            return {"group": _class_path(members[0]), "subtypes": subtypes}
        if _type_kind(members[0]) == "class":
            paths = [p for p in get_all_subclass_paths(members[0]) if p.startswith("vss_lightning.")]
            found["classes"].update(paths)
            return {"class": sorted(paths), "subtypes": subtypes}
    return {"leaf": _type_kind(hint)}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        flat[prefix + key] = value
        if isinstance(value, dict):
            flat.update(_flat(value, prefix + key + "."))
    return flat


def _print_config_snapshot(parser: Any, subparsers: dict[str, Any]) -> dict[str, Any]:
    """What `cli_schema.print_config` needs, rendered by the full parser: per subcommand the printed
    tree without arguments and the nodes of its keys; the init_args and defaults of every class that a
    class key takes; the fields and defaults of the settings dataclasses."""
    import importlib
    import pkgutil

    from jsonargparse._common import parser_context
    from jsonargparse._typehints import ActionTypeHint

    from vss_lightning import pipeline

    for module in pkgutil.iter_modules(pipeline.__path__):
        importlib.import_module(f"{pipeline.__name__}.{module.name}")
    found: dict[str, set[Any]] = {"groups": set(), "classes": set()}
    trees, nodes, headers = {}, {}, set()
    class_keys: dict[str, dict[str, Any]] = {}  # a class key of each subcommand: where to render classes
    for sub, subparser in subparsers.items():
        header, tree = _render_tree(parser, sub)
        headers.add(tuple(header))
        flat = _flat(tree)
        trees[sub], nodes[sub] = tree, {}
        for action in subparser._actions:
            node = _node(action, found) if action.dest in flat else None
            if node is not None:
                nodes[sub][action.dest] = node
                if "class" in node:
                    class_keys.setdefault(action.dest, node)
    if len(headers) != 1:
        raise RuntimeError(f"the subcommands print different headers: {headers}")
    sub = next(iter(subparsers))
    classes: dict[str, Any] = {}
    groups: dict[str, Any] = {}

    def nest(dotted: str, value: Any) -> dict[str, Any]:
        for part in reversed(dotted.split(".")):
            value = {part: value}
        return value

    # Render each class where it can be given: at a class key of the tree, or as an init arg of a
    # class rendered before (e.g. the backbone inside the segmenter's init_args).
    pending = [(key, [], path) for key, node in class_keys.items() for path in node["class"]]
    while pending:
        key, outer, path = pending.pop(0)
        if path in classes:
            continue
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        with parser_context(parent_parser=subparsers[sub]):
            class_parser = ActionTypeHint.get_class_parser(cls, {"fail_untyped": False, "sub_configs": True})
        spec_nodes = {}
        for action in class_parser._actions:
            node = _node(action, found)
            if node is not None and "." not in action.dest:
                spec_nodes[action.dest] = node

        def spec_config(init_args: dict[str, Any], outer: list[Any] = outer, path: str = path) -> Any:
            value: Any = {"class_path": path, "init_args": init_args}
            for outer_arg, outer_path in reversed(outer):
                value = {"class_path": outer_path, "init_args": {outer_arg: value}}
            return value

        _, tree = _render_tree(parser, sub, nest(key, spec_config({})))
        default = _flat(tree)[".".join([key, *[f"init_args.{a}" for a, _ in outer], "init_args"])]
        if list(default) != list(spec_nodes):
            raise RuntimeError(f"the printed init_args of {path} are not its parser's: {list(default)}")
        classes[path] = {"nodes": spec_nodes, "default": default}
        expanded = {arg: {} for arg, node in spec_nodes.items() if "group" in node}
        if expanded:
            _, tree = _render_tree(parser, sub, nest(key, spec_config(expanded)))
            printed = _flat(tree)[".".join([key, *[f"init_args.{a}" for a, _ in outer], "init_args"])]
            for arg in expanded:
                groups.setdefault(spec_nodes[arg]["group"], printed[arg])
        for arg, node in spec_nodes.items():
            if "class" in node:
                pending += [(key, [*outer, (arg, path)], inner) for inner in node["class"]]
    for key, node in nodes[sub].items():  # settings groups of the tree itself (e.g. model.naming)
        if "group" in node and node["group"] not in groups:
            _, tree = _render_tree(parser, sub, nest(key, {}))
            groups[node["group"]] = _flat(tree)[key]
    for cls in found["groups"]:
        path = _class_path(cls)
        if path not in groups:
            continue  # a group inside a group: its keys are "any" (the fast path defers)
        with parser_context(parent_parser=subparsers[sub]):
            group_parser = ActionTypeHint.get_class_parser(cls, {"fail_untyped": False, "sub_configs": True})
        fields = {}
        for action in group_parser._actions:
            if type(action) is ActionTypeHint and "." not in action.dest:
                node = _node(action, {"groups": set(), "classes": set()})
                fields[action.dest] = node["leaf"] if node and "leaf" in node else "any"
        if list(fields) != list(groups[path]):
            raise RuntimeError(f"the printed fields of {path} are not its parser's: {list(groups[path])}")
        groups[path] = {"fields": fields, "default": groups[path]}
    missing = sorted({n["group"] for sub_nodes in nodes.values() for n in sub_nodes.values() if "group" in n}
                     - set(groups))  # fmt: skip
    if missing:
        raise RuntimeError(f"settings groups without rendered defaults: {missing}")
    return {
        "header": list(headers.pop()),
        "trees": trees,
        "nodes": nodes,
        "classes": dict(sorted(classes.items())),
        "groups": dict(sorted(groups.items())),
    }


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
                printing_parser = parser, {s: subparsers[s] for s in lc.SUBCOMMANDS}
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
                value_argv = [sub, _int_option(subparsers[sub]), "zz_bad_value"]
                value_lines, [(_, value_known, _)] = _probe(lc, parser, value_argv)
                if len(value_lines) != 2 or value_lines[1] != lines[1]:
                    raise RuntimeError(f"unexpected error output for a refused value: {value_lines}")
                errors[sub] = {
                    "hint": lines[1],
                    "unrecognized": prefix,
                    "known_unrecognized": known_index(known),
                    "not_an_option": first.replace(key, "{key}"),
                    "known_not_an_option": known_index(init_known),
                    "known_value": known_index(value_known),
                }
            progs[prog] = {"errors": errors, "help": helps}
        # Last: it imports every module of the package's pipeline (a class path given in a config
        # names any of their classes), which would add classes to the help texts rendered above.
        printing = _print_config_snapshot(*printing_parser)
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
        "print_config": printing,
    }
    _self_check(lc, schema)
    _check_value_errors(printing_parser[0], schema)
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


def _int_option(parser: Any) -> str:
    """An option of `parser` that takes one int (to probe the error of a refused value)."""
    from jsonargparse._typehints import ActionTypeHint

    for action in parser._actions:
        if type(action) is ActionTypeHint and action._typehint is int and action.nargs is None:
            return action.option_strings[0]
    raise RuntimeError("the CLI parser has no int option")


VALUE_TOKENS = ("zz_bad", "a", "2", "1.5", "true", "null")  # "a": jsonargparse's union clean-up removes " a "


def _value_slots(snap: dict[str, Any], sub: str) -> list[tuple[list[str], str, Any, tuple[str, ...]]]:
    """(argv before, option, kind, nesting) of each key of `sub` whose refused values `cli_values` renders:
    top-level keys, settings-group fields, and init_args of every class a class key takes (given by a
    class_path switch before), at every nesting."""
    from vss_lightning import cli_values

    slots: list[tuple[list[str], str, Any, tuple[str, ...]]] = []

    def group(prefix: list[str], key: str, node: dict[str, Any], shape: tuple[str, ...]) -> None:
        for field, kind in snap["groups"][node["group"]]["fields"].items():
            slots.append((prefix, f"--{key}.{field}", kind, (*shape, "group")))

    def classes(prefix: list[str], key: str, node: dict[str, Any], shape: tuple[str, ...]) -> None:
        for path in node["class"]:
            if path not in snap["classes"] or len(shape) > 3:
                continue
            before = [*prefix, f"--{key}.class_path", path]
            for arg, arg_node in snap["classes"][path]["nodes"].items():
                arg_key = f"{key}.init_args.{arg}"
                if "leaf" in arg_node:
                    slots.append((before, "--" + arg_key, arg_node["leaf"], (*shape, "class")))
                elif "group" in arg_node:
                    group(before, arg_key, arg_node, (*shape, "class"))
                elif "class" in arg_node:
                    classes(before, arg_key, arg_node, (*shape, "class"))

    for path, node in snap["nodes"][sub].items():
        if "leaf" in node:
            slots.append(([], "--" + path, node["leaf"] if "yes_no" not in node else "yes_no", ()))
        elif "group" in node:
            group([], path, node, ())
        elif "class" in node:
            classes([], path, node, ())
    return [s for s in slots if s[2] == "yes_no" or cli_values.members(s[2]) is not None]


def _check_value_errors(parser: Any, schema: dict[str, Any]) -> None:
    """`cli_schema.value_error` prints exactly the full parser's error for refused values: each kind of
    key with each kind of value, each nesting (class init_args, settings groups) with two."""
    sub, prog = "predict", "vss-lightning"
    seen_kinds: set[str] = set()
    seen: set[tuple[Any, ...]] = set()
    wrong, answered = [], 0
    for before, key, kind, shape in _value_slots(schema["print_config"], sub):
        kind_text = json.dumps(kind)
        if (shape, kind_text) in seen:
            continue
        seen.add((shape, kind_text))
        if kind == "yes_no":
            tokens: tuple[str, ...] = ("zz_bad", "on", "1", "yes")
        else:
            tokens = VALUE_TOKENS if kind_text not in seen_kinds else ("zz_bad", "null")
        seen_kinds.add(kind_text)
        for token in tokens:
            argv = [sub, *before, key, token]
            fast = value_error(argv, prog, schema)
            if fast is None:
                continue
            answered += 1
            code, out, err = real_print_config(parser, argv)
            if (code, out, err) != (2, "", fast):
                wrong.append(f"{argv}: the fast path prints {fast!r}, the full parser {code} {err!r}")
    if wrong or not answered:
        found = "\n".join(wrong[:5]) or "no refused value was answered"
        raise RuntimeError(f"cli_values renders refused values unlike the full parser:\n{found}")


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
