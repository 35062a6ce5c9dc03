"""Naming shards: the one way a shard argument (`--data.shards`, `--gt`) becomes a list of shard urls.

A shard argument is a brace pattern (`out/x-{000000..000009}.tar`, inclusive ranges), a glob
(`out/*.tar`), a folder holding the `manifest.json` written by `python -m data_tools`, a remote url
(`pipe:...`, `https://...`, taken as is), or a list of these. Whatever the form, the result is the
sorted list of urls, each named once, local ones checked to exist.

The `manifest.json` next to local shards also tells how many samples each shard holds (to catch a
shard cut between two samples, which tar itself cannot detect) and the dataset's `num_classes` and
`class_names` (`dataset_info`), so evaluation needs no `num_classes` argument for such shards.

Standard library and braceexpand only: command-line tools can resolve their arguments before any
heavy import.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import braceexpand

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What the manifests of a set of shards record about their dataset.

    Attributes:
        num_classes: the number of classes, or None if no manifest records it.
        class_names: the class names by id, or None if no manifest records them.
        manifests: the `manifest.json` files read (for messages).
    """

    num_classes: int | None = None
    class_names: list[str] | None = None
    manifests: tuple[str, ...] = ()


def is_remote(url: str) -> bool:
    """Whether `url` has a scheme other than `file` (`pipe:`, `https://`, `s3://`, ...)."""
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"


def as_local(path: str) -> str:
    """A path found on disk, made safe to pass as a shard url: a file named like `pipe:cmd.tar` gets a
    `./` prefix (WebDataset's `gopen`, which opens the shards, runs `pipe:` urls as shell commands)."""
    return os.path.join(os.curdir, path) if urlparse(path).scheme else path


def read_manifest(folder: str, arg: str = "shards") -> dict[str, Any]:
    """Read the `manifest.json` of data_tools in `folder` and check its shard names.

    Args:
        folder: the folder holding `manifest.json`.
        arg: the user-facing argument the folder came from, for messages.

    Raises:
        ValueError: if the manifest cannot be read or names its shards other than by plain file names.
    """
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        names = [s["name"] for s in manifest["shards"]]
        if not all(isinstance(n, str) and n and os.path.basename(n) == n for n in names):
            raise ValueError(f"shard names must be plain file names, got {names[:3]}")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(
            f"Expected {path} (next to the shards of `{arg}`) to be the {MANIFEST} written by data_tools, "
            f"but reading it failed with {type(e).__name__}: {e}. Rewrite it with "
            "`python -m data_tools ... --overwrite`."
        ) from e
    return manifest


def _expand(item: str, arg: str) -> list[str]:
    """The urls one item of a shard argument names, in its own order."""
    if is_remote(item):
        return list(braceexpand.braceexpand(item))
    item = os.path.expanduser(item)
    if os.path.isdir(item):
        if not os.path.isfile(os.path.join(item, MANIFEST)):
            raise ValueError(
                f"Expected the folder {item!r} in `{arg}` to hold the {MANIFEST} of data_tools, but it has "
                f"none. Pass a pattern such as {os.path.join(item, '*.tar')!r} instead."
            )
        return [as_local(os.path.join(item, s["name"])) for s in read_manifest(item, arg)["shards"]]
    urls: list[str] = []
    for path in braceexpand.braceexpand(item):
        if glob.has_magic(path):
            found = sorted(as_local(p) for p in glob.glob(path))
            if not found:
                raise ValueError(
                    f"Expected the pattern {path!r} in `{arg}` to match shard files, but it matches none. "
                    "Check the folder and the pattern."
                )
            urls.extend(found)
        else:
            urls.append(path)
    return urls


def _manifest_of(folder: str, arg: str) -> dict[str, Any] | None:
    """The manifest of `folder`, or None if it has none."""
    return read_manifest(folder, arg) if os.path.isfile(os.path.join(folder, MANIFEST)) else None


def resolve_shards(shards: str | list[str], arg: str = "shards") -> tuple[list[str], dict[str, int]]:
    """Expand a shard argument into the sorted shard urls and the sample counts the manifests list.

    Args:
        shards: a brace pattern (`out/x-{000000..000009}.tar`), a glob (`out/*.tar`), a folder holding
            `manifest.json`, a remote url (`pipe:...`, `https://...`, taken as is), or a list of these.
        arg: the user-facing name of the argument (`--data.shards`, `--gt`), named by every message.

    Returns:
        (sorted urls, {url: expected number of samples} for the shards listed in a `manifest.json`
        next to them).

    Raises:
        ValueError: if nothing matches, a local shard is missing, a shard is named twice, or a manifest
            cannot be read.
    """
    items = [shards] if isinstance(shards, str) else list(shards)
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError(
            f"Expected `{arg}` to be a non-empty string or list of strings (a brace pattern, a glob, a "
            f"folder with {MANIFEST} or a url), but got {shards!r}."
        )
    urls = [url for item in items for url in _expand(item, arg)]
    if not urls:
        raise ValueError(
            f"Expected `{arg}` to name at least one shard, but {shards!r} names none. Check that the "
            f"folder's {MANIFEST} lists its shards."
        )
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise ValueError(
            f"Expected every shard named by `{arg}` to exist, but {missing[0]!r} does not ({len(missing)} "
            f"of {len(urls)} missing). Check the pattern (brace ranges are inclusive), or pass the folder "
            f"that holds the shards and their {MANIFEST}."
        )
    if len(set(urls)) != len(urls):
        dup = sorted({u for u in urls if urls.count(u) > 1})
        raise ValueError(
            f"Expected each shard once in `{arg}`, but got {dup[:3]} more than once. Name each shard by "
            "one pattern, path or folder only."
        )
    urls.sort()
    expected: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}  # folder -> {shard name: samples}
    for url in urls:
        if is_remote(url):
            continue
        folder = os.path.dirname(url) or "."
        if folder not in counts:
            manifest = _manifest_of(folder, arg)
            counts[folder] = (
                {s["name"]: int(s.get("clips", 0)) for s in manifest["shards"]} if manifest else {}
            )
        if os.path.basename(url) in counts[folder]:
            expected[url] = counts[folder][os.path.basename(url)]
    return urls, expected


def _check_info(path: str, num_classes: Any, class_names: Any) -> None:
    if num_classes is not None and not (
        isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1
    ):
        raise ValueError(
            f"Expected `num_classes` in {path} to be a positive integer or null, but got {num_classes!r}. "
            "Rewrite it with `python -m data_tools ... --overwrite`."
        )
    if class_names is not None and not (
        isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)
    ):
        raise ValueError(
            f"Expected `class_names` in {path} to be a list of strings or null, but got "
            f"{type(class_names).__name__}. Rewrite it with `python -m data_tools ... --overwrite`."
        )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} names ({', '.join(map(repr, value[:3]))}{', ...' if len(value) > 3 else ''})"
    return repr(value)


def dataset_info(urls: Iterable[str], arg: str = "shards") -> DatasetInfo:
    """`num_classes` and `class_names` from the `manifest.json` next to the local shards.

    Only a manifest that lists a shard of `urls` counts (a manifest of other shards in the same
    folder says nothing about these); remote shards are skipped. A value a manifest leaves null (or
    out) is unknown and agrees with any other.

    Args:
        urls: shard urls, e.g. from `resolve_shards`.
        arg: the user-facing argument the shards came from, for messages.

    Raises:
        ValueError: if a manifest cannot be read or records a malformed value, or if two manifests
            record different values (the message names both).
    """
    manifests: dict[str, tuple[dict[str, Any], set[str]] | None] = {}  # folder -> (manifest, names)
    read: list[str] = []
    found: dict[str, tuple[Any, str]] = {}  # key -> (value, manifest path)
    for url in urls:
        if is_remote(url):
            continue
        folder = os.path.dirname(url) or "."
        path = os.path.join(folder, MANIFEST)
        if path in read:
            continue
        if folder not in manifests:
            m = _manifest_of(folder, arg)
            manifests[folder] = (m, {s["name"] for s in m["shards"]}) if m is not None else None
        if manifests[folder] is None or os.path.basename(url) not in manifests[folder][1]:
            continue
        manifest = manifests[folder][0]
        read.append(path)
        values = {"num_classes": manifest.get("num_classes"), "class_names": manifest.get("class_names")}
        _check_info(path, **values)
        for key, value in values.items():
            if value is None:
                continue
            if key in found and found[key][0] != value:
                other, where = found[key]
                raise ValueError(
                    f"Expected the {MANIFEST} files of the shards in `{arg}` to agree on `{key}`, but "
                    f"{where} records {_show(other)} and {path} records {_show(value)}. Pass the shards "
                    "of one dataset (or of one conversion with the same options)."
                )
            found.setdefault(key, (value, path))
    return DatasetInfo(
        num_classes=found["num_classes"][0] if "num_classes" in found else None,
        class_names=list(found["class_names"][0]) if "class_names" in found else None,
        manifests=tuple(read),
    )
