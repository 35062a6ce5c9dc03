"""`vocabulary apply`: rewrite a corpus's labels as global class ids, without rerunning the pipeline.

    python -m vss_lightning.vocabulary apply --labels OUT --vocab VOCAB --out OUT2 [--output_format F]

Every finished video of OUT (png folders or label shards, see `corpus`) maps each local label to the
global class whose centroid is nearest to the label's prototype (cosine; several local labels may map
to one class). Its prototypes are remapped with it (`remap_prototypes`: the labels mapped to one class
pooled, as `predict --model.vocabulary` writes them), so OUT2 is itself a corpus `fit` can read.

`--output_format` (default: the format of OUT's videos, png when it holds both):

- png: OUT2/<video>/<frame>.png with the same frame names, `prototypes.safetensors`, and
  OUT2/<video>/DONE (the video's frame names and settings hash, the vocabulary's hash, the digest of
  the source's completion record and the local -> global map) written last. Every file is written to a
  temporary name and renamed, so a killed run leaves no half video that a rerun would skip; a rerun
  skips the videos whose DONE names this vocabulary and the same source labels and rewrites the others.
- shards: label shards `labels-rank000-<n>.tar` + `.index.json` as `predict --output_format shards`
  writes them (`io.label_shards.LabelShardStore`, the same code): one sample per clip of the source
  (a png source video becomes one clip), the global-id labels, the remapped prototypes in the last
  clip's sample, and in each `labels.json` the fields of DONE above. A tar is written as `.tmp` and
  renamed once whole (its index first), so a killed run leaves only whole videos under final names;
  a rerun removes the `.tmp`, skips the videos of the finished tars and numbers its tars after them.
  Tar members carry a fixed mtime and the tars close at the same videos, so a killed and resumed run
  writes the same bytes as one uninterrupted run. Tars cannot be rewritten in place: a video of OUT2
  mapped with another vocabulary or from other source labels is an error (use a new `--out`). One job
  at a time per OUT2 (the writer's `labels-rank0.lock`).

Both formats hold each video once: a video id found twice in OUT is an error, and OUT2 may not hold
the other format's output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vss_lightning.data.format import VideoMeta, encode_png, validate_name
from vss_lightning.io.files import atomic_write, json_bytes
from vss_lightning.io.label_shards import LabelShardStore
from vss_lightning.io.locks import FileLock, describe
from vss_lightning.io.png_store import check_video_id
from vss_lightning.io.summary import VideoLabels

from . import kmeans
from .corpus import DONE, LABEL_SHARDS, ShardVideo, Video, find_videos, record_digest, shard_videos
from .fit import load_vocabulary, vocabulary_identity
from .prototypes import PROTOTYPES, PrototypeError, VideoPrototypes

log = logging.getLogger(__name__)

OutputFormat = Literal["png", "shards"]
OUTPUT_FORMATS = ("png", "shards")
LABEL_MODE = "vocabulary"
SHARD_MTIME = 0.0  # every tar member's mtime: byte-identical tars for identical labels


def global_map(prototypes: VideoPrototypes, centroids: torch.Tensor) -> dict[int, int]:
    """Local label id -> global class id (nearest centroid by cosine)."""
    if prototypes.dim != centroids.shape[1]:
        raise PrototypeError(
            f"Expected prototypes of {centroids.shape[1]} channels like the vocabulary, but video "
            f"{prototypes.video_id!r} has {prototypes.dim}: the vocabulary was fitted on another backbone "
            "or feature setting. Fit a vocabulary on this corpus."
        )
    if not prototypes.labels.numel():
        return {}
    index, _ = kmeans.assign(
        kmeans.normalize(prototypes.features.double()), kmeans.normalize(centroids.double())
    )
    return dict(zip(prototypes.labels.tolist(), index.tolist(), strict=True))


def remap_prototypes(prototypes: VideoPrototypes, mapping: dict[int, int]) -> VideoPrototypes:
    """The prototypes of the global ids: the local labels mapped to one id pooled (cell-weighted mean
    of their features, and of their class scores where present; cells summed; the frames where any of
    them appears), as `PrototypeAccumulator.remapped` pools them for `predict --model.vocabulary`
    (here from the stored float32 means, so equal up to float rounding).

    Raises:
        PrototypeError: if a label of the prototypes has no global id in `mapping`.
    """
    local = prototypes.labels.tolist()
    missing = [la for la in local if la not in mapping]
    if missing:
        raise PrototypeError(
            f"Expected a global id for every label of video {prototypes.video_id!r}, but {missing} have "
            "none. Map the video with `global_map` over its own prototypes."
        )
    ids = torch.tensor([mapping[la] for la in local], dtype=torch.int64)
    uniq, inverse = ids.unique(sorted=True, return_inverse=True)
    cells = torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inverse, prototypes.cells.long())
    weights = prototypes.cells.double()[:, None]

    def pool(x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((uniq.numel(), x.shape[1]), dtype=torch.float64)
        total.index_add_(0, inverse, x.double() * weights)
        return (total / cells.clamp(min=1).double()[:, None]).float()

    frames = torch.zeros((uniq.numel(), prototypes.frames.shape[1]), dtype=torch.int64)
    frames = frames.index_add_(0, inverse, prototypes.frames.long()).clamp(max=1).to(torch.uint8)
    scores = prototypes.class_scores  # optional (class names given)
    extra = {"class_scores": pool(scores)} if scores is not None else {}
    return dataclasses.replace(
        prototypes, labels=uniq, features=pool(prototypes.features), cells=cells, frames=frames, **extra
    )


@dataclass
class ApplySummary:
    """What one `apply` run did: the videos it wrote and those it skipped as complete, in order."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    output_format: str = "png"


@dataclass
class _Mapped:
    """One source video with its map to global ids and the fields its completion record carries."""

    video: Video
    mapping: dict[int, int]
    prototypes: VideoPrototypes  # remapped to the global ids
    record: dict  # vocabulary hash, source digest, global ids, label mode

    def __post_init__(self) -> None:
        self.lut = np.zeros(max([*self.mapping, 0]) + 1, dtype=np.int64)  # local id -> global id
        for local, g in self.mapping.items():
            self.lut[local] = g

    def label(self, name: str) -> np.ndarray:
        """Frame `name`'s labels in global ids (int64).

        Raises:
            PrototypeError: if a label of the frame has no prototype.
        """
        vid = self.video.video_id
        validate_name(name, f"frame name of video {vid!r}")
        arr = self.video.label(name)
        unknown = np.setdiff1d(np.unique(arr), np.asarray(list(self.mapping), dtype=arr.dtype))
        if unknown.size:
            raise PrototypeError(
                f"Expected every label of frame {name!r} of {self.video.where} to have a prototype, but "
                f"{unknown.tolist()} have none. Relabel the video (delete its DONE and rerun `predict`)."
            )
        return self.lut[arr]


def _map(video: Video, centroids: torch.Tensor, meta: dict[str, str], vhash: str) -> _Mapped:
    """Check a video against the vocabulary's settings and map its labels (prototypes read once)."""
    if meta.get("settings_hash") and video.settings_hash() != meta["settings_hash"]:
        raise PrototypeError(
            f"Expected {video.where} to come from the settings the vocabulary was fitted on "
            f"({meta['settings_hash']}), but it records {video.settings_hash()!r}. Fit a vocabulary on "
            "this corpus, or apply this one to labels of its own settings."
        )
    prototypes = video.prototypes()
    mapping = global_map(prototypes, centroids)
    record = {
        "vocabulary_hash": vhash,
        "source_done": record_digest(video),
        "global_ids": {str(k): v for k, v in mapping.items()},
        "label_mode": LABEL_MODE,
    }
    return _Mapped(video, mapping, remap_prototypes(prototypes, mapping), record)


def _source_videos(labels: Path) -> list[Video]:
    """The finished videos of `labels`, each id once (a png folder and a tar may both hold one)."""
    videos, seen = [], {}
    for video in find_videos([labels]):
        if video.video_id in seen:
            raise PrototypeError(
                f"Expected each video once in `--labels` {str(labels)!r}, but {video.where} repeats "
                f"{seen[video.video_id]}. Keep one of them (delete the other's folder or label shard)."
            )
        seen[video.video_id] = video.where
        videos.append(video)
    return videos


def apply_vocabulary(
    labels: Path,
    vocab: Path,
    out: Path,
    output_format: OutputFormat | None = None,
    videos_per_shard: int = 100,
    shard_max_bytes: int = 1 << 30,
) -> ApplySummary:
    """Map every finished video of `labels` to global ids under `out` (see the module docstring).

    Args:
        labels: an output folder of `predict` (png or label shards).
        vocab: a vocabulary folder of `fit`.
        out: the new output folder (not `labels`).
        output_format: "png" or "shards"; None: the format of `labels`' videos (png when mixed).
        videos_per_shard: with "shards", close a tar after this many videos.
        shard_max_bytes: with "shards", close a tar once it holds this many bytes of labels.

    Raises:
        PrototypeError: on videos without (matching) prototypes or of other settings.
        ValueError: on a bad argument, or an `out` holding other output (see the module docstring).
    """
    labels, out = Path(labels), Path(out)
    if out.resolve() == labels.resolve():
        raise ValueError(
            f"Expected `--out` to differ from `--labels` ({str(out)!r}): apply never rewrites its input."
        )
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise ValueError(f"Expected `--output_format` to be 'png' or 'shards', but got {output_format!r}.")
    centroids, meta = load_vocabulary(vocab)
    vhash = vocabulary_identity(centroids, meta)
    videos = _source_videos(labels)
    if output_format is None:
        output_format = "shards" if all(isinstance(v, ShardVideo) for v in videos) else "png"
    out.mkdir(parents=True, exist_ok=True)
    summary = ApplySummary(output_format=output_format)
    mapped = (_map(video, centroids, meta, vhash) for video in videos)
    if output_format == "png":
        _apply_png(mapped, out, summary, np.uint8 if centroids.shape[0] <= 256 else np.uint16)
    else:
        _apply_shards(videos, mapped, out, summary, vhash, videos_per_shard, shard_max_bytes)
    log.info(
        f"vocabulary apply: {len(summary.written)} videos written ({output_format}), "
        f"{len(summary.skipped)} skipped as complete."
    )
    return summary


def _apply_png(mapped: Iterator[_Mapped], out: Path, summary: ApplySummary, dtype: type) -> None:
    """Write each video as a png folder (labels, prototypes, DONE last), skipping complete ones."""
    if next(out.glob(LABEL_SHARDS), None) is not None:
        raise ValueError(
            f"Expected `--out` {str(out)!r} to hold no label shards for png output, but it holds "
            f"{LABEL_SHARDS}. Use a new `--out`, or `--output_format shards` to resume those."
        )
    for m in mapped:
        vid = m.video.video_id
        target = out / check_video_id(vid)
        done_path = target / DONE
        if done_path.is_file():
            previous = json.loads(done_path.read_bytes())
            if all(previous.get(k) == m.record[k] for k in ("vocabulary_hash", "source_done")):
                summary.skipped.append(vid)
                continue
        target.mkdir(exist_ok=True)
        done_path.unlink(missing_ok=True)
        for stale in target.glob(".*.tmp"):  # left by a killed run: only this run writes here
            stale.unlink(missing_ok=True)
        names = m.video.frame_names()
        for name in names:
            atomic_write(target / f"{name}.png", encode_png(m.label(name).astype(dtype)))
        # before DONE, as predict does: a complete video always has its prototypes
        atomic_write(target / PROTOTYPES, m.prototypes.to_bytes())
        done = {
            "video_id": vid,
            "frame_names": names,
            "frames": len(names),
            "settings_hash": m.video.settings_hash(),
            **m.record,
        }
        atomic_write(done_path, json_bytes(done))
        summary.written.append(vid)


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """(T, H, W) labels of a clip's frames (an empty clip: (0, 0, 0))."""
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, 0, 0), dtype=torch.int64)


def _clips(m: _Mapped) -> Iterator[tuple[VideoLabels, dict]]:
    """The video's clips as the writer's `VideoLabels` (global ids; the prototypes on the last one),
    each with the fields its `labels.json` adds to the store's record: the source's clips with their
    `meta.json` as stored, or one clip of the whole video for a png folder."""
    video = m.video
    if not isinstance(video, ShardVideo):
        done = json.loads(video.record())
        names = video.frame_names()
        arrays = [m.label(name) for name in names]
        sizes = sorted({a.shape for a in arrays})
        if len(sizes) > 1:
            raise ValueError(
                f"Expected the frames of video {video.video_id!r} ({str(video.folder)!r}) to share one "
                f"size to store them as one label-shard sample, but got {sizes}. Use `--output_format png`."
            )
        meta = VideoMeta(video_id=video.video_id, frame_names=names, sizes=[a.shape for a in arrays])
        source = {"sources": list(done.get("sources") or [""]), "keys": list(done.get("keys") or [""])}
        yield VideoLabels(meta, _stack(arrays), prototypes=m.prototypes), {**m.record, **source}
        return
    for k, rec in enumerate(video.records):
        raw = video.clip_meta(k)
        names = list(rec.get("frame_names") or [])
        meta = VideoMeta.from_json(raw, video.where) if raw is not None else None
        if meta is None or list(meta.frame_names) != names:
            raise PrototypeError(
                f"Expected clip {k} of {video.where} to hold a meta.json naming its frames {names[:3]}..., "
                f"but it {'has none' if meta is None else 'names others'}. Relabel the video with "
                "`predict` into a new output folder."
            )
        labels = _stack([m.label(name) for name in names])
        last = k == len(video.records) - 1
        source = {"sources": rec.get("sources") or [""], "keys": rec.get("keys") or [""]}
        yield VideoLabels(meta, labels, prototypes=m.prototypes if last else None), {**m.record, **source}


def _apply_shards(
    videos: list[Video],
    mapped: Iterator[_Mapped],
    out: Path,
    summary: ApplySummary,
    vhash: str,
    videos_per_shard: int,
    shard_max_bytes: int,
) -> None:
    """Write the videos as label shards with `LabelShardStore` (rank 0 of 1), skipping complete ones."""
    if next(out.glob(f"*/{DONE}"), None) is not None:
        raise ValueError(
            f"Expected `--out` {str(out)!r} to hold no png videos (<video>/DONE) for label shards, but it "
            "does. Use a new `--out`, or `--output_format png` to resume those."
        )
    hashes = sorted({v.settings_hash() for v in videos})
    if len(hashes) > 1:
        raise ValueError(
            f"Expected the videos of `--labels` to come from one settings hash to store them in label "
            f"shards, but got {hashes}. Use `--output_format png`, or apply per settings."
        )
    first = json.loads(videos[0].record()) if videos else {}  # png: DONE; shards: the clips' records
    backbone = (first[-1] if isinstance(first, list) else first).get("backbone")
    info = {"settings_hash": hashes[0] if hashes else "", "label_mode": LABEL_MODE, "backbone": backbone}
    lock = FileLock(out / "labels-rank0.lock")  # the writer's: no predict or apply job into `out` meanwhile
    holder = lock.acquire()
    if holder is not None:
        raise ValueError(
            f"Expected no other job to write label shards into {str(out)!r}, but {describe(holder)} holds "
            f"{str(lock.path)!r}. Wait for it, or use another `--out` (the lock of a dead job is taken over)."
        )
    store = None
    try:
        previous = {v.video_id: v.records for v in shard_videos(out)}  # what earlier runs finished
        store = LabelShardStore(
            out, 0, 1, info["settings_hash"], f"vocabulary-apply-{vhash}", videos_per_shard,
            shard_max_bytes, info,
            mtime=SHARD_MTIME,
        ).open()  # fmt: skip
        for m in mapped:
            vid = m.video.video_id
            if store.is_complete(vid):
                last = (previous.get(vid) or [{}])[-1]
                if all(last.get(k) == m.record[k] for k in ("vocabulary_hash", "source_done")):
                    summary.skipped.append(vid)
                    continue
                raise ValueError(
                    f"Expected video {vid!r} of the label shards in {str(out)!r} to be mapped with this "
                    f"vocabulary ({m.record['vocabulary_hash']}) from the current labels of {m.video.where}, "
                    f"but it was mapped with {last.get('vocabulary_hash')!r} from source "
                    f"{last.get('source_done')!r}. Shards cannot be rewritten in place: use a new `--out`."
                )
            for res, record in _clips(m):
                store.write(res, record=record)
            summary.written.append(vid)
        store.close()
    except BaseException:
        if store is not None:
            store.abort()  # the open tar's videos are not complete: a rerun writes them again
        raise
    finally:
        lock.release()
