"""Files of `output_dir`: atomic writes and JSON (the one place that writes a file under its final name)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name in the same folder and `os.replace`.

    A reader (or a rerun after a kill) sees either the old file, the complete new one, or nothing;
    never a half-written file under the final name.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)  # never through a link
    try:
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_bytes(obj: Any) -> bytes:
    """JSON with NaN/inf written as null (strict JSON readers reject NaN)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return (json.dumps(clean(obj), indent=2, sort_keys=True) + "\n").encode()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def os_error_message(root: Path, video_id: str, e: OSError) -> str:
    """The message of an `OSError` met on the output of `video_id`: the path, the error and the fix."""
    where = e.filename if e.filename else str(root / video_id)
    return (
        f"Expected to read and write the output of video {video_id!r} at {str(where)!r}, but got "
        f"{type(e).__name__}: {e.strerror or e}. Free space, fix the permissions or remove the file."
    )
