"""The naming sheet of a vocabulary: what each global class looks like, and a page to name them.

For each global class, the prototypes closest to its centroid (highest cosine, over the whole
corpus) are its most typical examples; each is shown as one frame of its video with the label's
pixels tinted in the class's colour, on a contact sheet `VOCAB/sheets/class_<g>.png`. Frames come
from a `frame_source` (the input shards, when given); without one the example shows the label's
mask on grey, which still shows its shape and place.

`VOCAB/index.html` shows every sheet with the class's size and a text field per class; its
"Export names.yaml" button downloads the names as YAML (plain HTML and JavaScript: it opens from
disk, no server). A `names.yaml` written by hand in the same form (`<id>: <name>` per line) is
read by `load_names`.
"""

from __future__ import annotations

import heapq
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from vss_lightning.data.format import encode_png
from vss_lightning.viz import distinct_palette, overlay, resize_max

from . import kmeans
from .corpus import Corpus, FrameSource, Video

SHEETS = "sheets"
INDEX_HTML = "index.html"
NAMES_YAML = "names.yaml"
THUMB = 160  # longer side of an example, pixels


@dataclass(order=True)
class Example:
    """A typical example of a class: a (video, local label) pair and its cosine to the centroid."""

    cosine: float
    video_id: str = field(compare=False)
    label: int = field(compare=False)
    frame: int = field(compare=False)
    video: Video = field(compare=False)


def typical_examples(corpus: Corpus, centroids: torch.Tensor, per_class: int) -> list[list[Example]]:
    """The `per_class` examples of each class with the highest cosine (streaming: G x n kept)."""
    heaps: list[list[Example]] = [[] for _ in range(centroids.shape[0])]
    unit = kmeans.normalize(centroids.double())
    for video, p in zip(corpus.files, corpus.videos(), strict=True):
        if not p.labels.numel():
            continue
        index, cos = kmeans.assign(kmeans.normalize(p.features.double()), unit)
        for i, (g, c) in enumerate(zip(index.tolist(), cos.tolist(), strict=True)):
            present = p.frames[i].nonzero().flatten().tolist()
            frame = present[len(present) // 2] if present else 0  # the middle of its appearances
            ex = Example(c, p.video_id, int(p.labels[i]), frame, video)
            if len(heaps[g]) < per_class:
                heapq.heappush(heaps[g], ex)
            else:
                heapq.heappushpop(heaps[g], ex)
    return [sorted(h, reverse=True) for h in heaps]


def _frame_name(ex: Example) -> str:
    return ex.video.frame_names()[ex.frame]


def shard_frames(shards: str | list[str], wanted: set[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """The `wanted` (video id, frame name) frames, read in one pass over the input shards.

    Args:
        shards: the shards the corpus was labelled from (as `--data.shards` names them).
        wanted: the frames to keep; all others are decoded and dropped at once.

    Returns:
        (H, W, 3) uint8 frames by (video id, frame name); frames not found are absent.
    """
    from vss_lightning.data.datamodule import VideoShardDataset
    from vss_lightning.data.format import VideoSample
    from vss_lightning.data.shards import resolve_shards

    urls, expected = resolve_shards(shards, "--shards")
    videos = {vid for vid, _ in wanted}
    found: dict[tuple[str, str], np.ndarray] = {}
    for sample in VideoShardDataset(urls, expected=expected):
        if not isinstance(sample, VideoSample) or sample.video_id not in videos:
            continue  # a failed sample costs only its example's frame (grey instead)
        for i, name in enumerate(sample.meta.frame_names):
            if (sample.video_id, name) in wanted:
                found[(sample.video_id, name)] = sample.frames[i].permute(1, 2, 0).numpy().copy()
    return found


def _example_image(ex: Example, colour: np.ndarray, frame_source: FrameSource | None) -> np.ndarray:
    name = _frame_name(ex)
    labels = ex.video.label(name)
    mask = (labels == ex.label).astype(np.uint8)
    frame = frame_source(ex.video_id, name) if frame_source is not None else None
    if frame is None or frame.shape[:2] != mask.shape:
        frame = np.full((*mask.shape, 3), 96, np.uint8)
    palette = np.stack([np.zeros(3, np.uint8), colour])
    return resize_max(overlay(frame, mask, palette, alpha=0.55, ignore_index=0), THUMB)


def contact_sheet(images: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Images laid out on a grid of `columns`, each in a THUMB x THUMB cell (white background)."""
    rows = max(1, -(-len(images) // columns))
    sheet = np.full((rows * (THUMB + 4), columns * (THUMB + 4), 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        y, x = r * (THUMB + 4) + 2, c * (THUMB + 4) + 2
        sheet[y : y + img.shape[0], x : x + img.shape[1]] = img
    return sheet


def write_sheets(
    vocab: Path,
    corpus: Corpus,
    centroids: torch.Tensor,
    classes: list[dict],
    frame_source: FrameSource | None = None,
    per_class: int = 8,
    shards: str | list[str] | None = None,
) -> Path:
    """Write the contact sheets and `index.html` into `vocab`; returns the page's path.

    Frames come from `frame_source`, else from one pass over `shards` (the corpus's input shards),
    else the examples show the label's mask on grey.
    """
    vocab = Path(vocab)
    (vocab / SHEETS).mkdir(parents=True, exist_ok=True)
    palette = distinct_palette(256)
    examples = typical_examples(corpus, centroids, per_class)
    if frame_source is None and shards is not None:
        frames = shard_frames(shards, {(ex.video_id, _frame_name(ex)) for exs in examples for ex in exs})
        frame_source = lambda video_id, name: frames.get((video_id, name))  # noqa: E731
    for g, exs in enumerate(examples):
        images = [_example_image(ex, palette[g % 256], frame_source) for ex in exs]
        sheet = contact_sheet(images) if images else np.full((THUMB, THUMB, 3), 255, np.uint8)
        (vocab / SHEETS / f"class_{g:03d}.png").write_bytes(encode_png(sheet))
    page = vocab / INDEX_HTML
    page.write_text(naming_page(classes, examples), encoding="utf-8")
    return page


def naming_page(classes: list[dict], examples: list[list[Example]]) -> str:
    """The HTML page: a row per class (sheet, size, examples' videos, a name field) and an export button."""
    rows = []
    for c, exs in zip(classes, examples, strict=True):
        g = int(c["id"])
        videos = ", ".join(html.escape(e.video_id) for e in exs[:4])
        rows.append(
            f'<tr><td>{g}</td><td><img src="{SHEETS}/class_{g:03d}.png" alt="class {g}"></td>'
            f"<td>{c['cells']} cells<br>{c['videos']} videos<br>{100 * c['mean_share']:.1f}% of a video"
            f"<br><small>{videos}</small></td>"
            f'<td><input class="name" data-id="{g}" placeholder="name of class {g}"></td></tr>'
        )
    return _PAGE.replace("{rows}", "\n".join(rows))


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Name the global classes</title>
<style>body{font-family:sans-serif} td{padding:6px;vertical-align:top} img{max-width:680px}</style>
</head><body>
<h1>Name the global classes</h1>
<p>Type a name per class (leave unknown ones empty), then export <code>names.yaml</code> and put it
in the vocabulary folder.</p>
<button id="export">Export names.yaml</button>
<table>
{rows}
</table>
<script>
function namesYaml() {
  const lines = [];
  for (const input of document.querySelectorAll("input.name")) {
    const name = input.value.trim();
    if (name) lines.push(input.dataset.id + ": " + JSON.stringify(name));
  }
  return lines.join("\\n") + "\\n";
}
document.getElementById("export").addEventListener("click", () => {
  const blob = new Blob([namesYaml()], {type: "text/yaml"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "names.yaml";
  a.click();
});
</script>
</body></html>
"""


def load_names(path: Path, num_classes: int | None = None) -> dict[int, str]:
    """Read a `names.yaml` (`<id>: <name>` per class; missing classes stay unnamed).

    Raises:
        ValueError: if it is not such a mapping or names a class outside [0, num_classes).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(
            f"Expected {str(path)!r} to be YAML lines `<id>: <name>`, but it does not parse: {e}"
        ) from e
    if not isinstance(data, dict):
        raise ValueError(
            f"Expected {str(path)!r} to map class ids to names, but got a {type(data).__name__}."
        )
    names = {}
    for key, value in data.items():
        bound = num_classes if num_classes is not None else 1 << 16
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < bound:
            raise ValueError(
                f"Expected the class ids of {str(path)!r} to be integers in [0, {bound}), but got {key!r}."
            )
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"Expected the name of class {key} in {str(path)!r} to be text, but got {value!r}."
            )
        names[key] = value.strip()
    return names


def class_ids_of_names(names: dict[int, str], class_names: Sequence[str]) -> tuple[dict[int, int], list[str]]:
    """The dataset class id of each named id (names compared trimmed and case-insensitively).

    Returns:
        (id -> class id for the names that are dataset classes, the names that are not, in order).
    """
    index = {str(n).strip().lower(): c for c, n in enumerate(class_names)}
    found, unknown = {}, []
    for g, name in names.items():
        c = index.get(name.strip().lower())
        if c is None:
            unknown.append(name)
        else:
            found[g] = c
    return found, unknown


def log_to_wandb(vocab: Path, classes: list[dict], project: str, names: dict[int, str] | None = None) -> None:
    """Log the naming sheet as a W&B table `vocabulary/classes` (class, name, size, examples image).

    The run lives in `vocab/wandb/`; `WANDB_MODE=offline` keeps it local (sync it later with
    `wandb sync`). Requires the `wandb` package (a dependency of this project).
    """
    import wandb

    vocab = Path(vocab)
    names = names or {}
    run = wandb.init(project=project, dir=str(vocab), job_type="vocabulary", reinit="finish_previous")
    try:
        table = wandb.Table(columns=["class", "name", "cells", "videos", "mean_share", "examples"])
        for c in classes:
            g = int(c["id"])
            sheet = wandb.Image(str(vocab / SHEETS / f"class_{g:03d}.png"))
            table.add_data(g, names.get(g, ""), c["cells"], c["videos"], c["mean_share"], sheet)
        run.log({"vocabulary/classes": table})
        run.summary["vocabulary/num_classes"] = len(classes)
    finally:
        run.finish()
