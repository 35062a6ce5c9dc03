"""Read WebDataset shards of the `format` schema: one `VideoSample` (or `FailedSample`) per step.

Pipeline per DataLoader worker: the sorted shard urls (`shards.resolve_shards`), split by rank then
by worker, go through `reader.tar_samples` (raw samples: only the schema's fields are read, their
sizes checked from the tar headers first; nothing is ever unpickled), each mapped with
`format.decode_sample`. The loader uses `batch_size=None` and a pass-through `collate_fn`: a step's
batch is the dataclass itself. Order is never shuffled: within a worker, shards are read in order and
samples in tar order, so the clips of a video (written consecutively into one shard by data_tools)
arrive in order.

Split strategy (every shard, hence every video, read exactly once):
    The shard urls are sorted (brace patterns, globs, lists and manifest.json all end up sorted) and
    dealt round-robin, first over ranks (rank r of W gets shards r, r + W, r + 2W, ...), then over the
    DataLoader workers of that rank (worker w of N gets the w-th, (w + N)-th, ... of those). Rank and
    world size are taken when the DataLoader is built, from the attached Trainer (global rank, world
    size over all nodes), else `torch.distributed` if initialised, else the `RANK`/`WORLD_SIZE`
    environment variables, else 0/1; they are passed to the workers explicitly, so this works with
    fork and spawn workers alike. A rank or worker may get zero shards (fewer shards than
    `world_size * num_workers`): it yields nothing and ends normally; no error, and no hang as long as
    the LightningModule runs no per-step collective. Balance needs `#shards >= world_size *
    num_workers` (better a multiple of it) of similar size: `python -m data_tools ...
    --max-videos-per-shard N` or a smaller `--shard-size` makes many small shards.

Memory per worker is bounded by about two decoded samples: tar members are streamed (no shard is read
into memory as a whole), one raw sample is grouped and decoded at a time, and the loader keeps at most
`PREFETCH_FACTOR` (= 1) finished sample per worker in its queue. `max_frames`, `max_pixels` and
`max_sample_pixels` bound the size of one sample, raw and decoded (checked from tar headers, image
headers and metadata before anything large is read or decoded); split long videos into clips with
`--max-frames-per-clip`. Members outside the schema are never read; their count per sample is
`VideoSample.ignored_fields` (in `summary.json` as `ignored_fields`), logged once per shard.

Errors: a sample that fails to decode (`SampleError`: corrupt frame, wrong label size, missing
`meta.json`, ...) or a shard that cannot be read (missing, truncated, not a tar) becomes a
`FailedSample` (key, shard url, message, video id if known) in the stream with `on_error="skip"`, so
the job records it; with `"fail"` it raises `SampleError`. Samples before a truncation point are
delivered, the ones after it are lost, and the `FailedSample` names the shard. When the shard's folder
holds the `manifest.json` of data_tools, a shard that yields fewer samples than the manifest lists
(e.g. cut exactly at a member boundary, which tar itself cannot detect) is reported the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Literal, TypeVar

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SAMPLE_PIXELS,
    FailedSample,
    SampleError,
    VideoMeta,
    VideoSample,
    decode_sample,
)
from .reader import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_SHARD_BYTES,
    EmptyShardError,
    TarLimitError,
    tar_samples,
)
from .shards import MANIFEST, DatasetInfo, dataset_info, resolve_shards

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 1  # finished samples queued per worker; each holds a whole decoded clip
SHARDS_ARG = "--data.shards"  # how the CLI names `shards`, in messages
# What a corrupt member can raise from the decoders besides SampleError (caught in decode_sample).
_DECODE_ERRORS = (SampleError, OSError, ValueError, EOFError, SyntaxError, KeyError, IndexError)

T = TypeVar("T")


def split_by_rank(src: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """Round-robin share of rank `rank` out of `world_size`: items rank, rank + W, rank + 2W, ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected `rank` to be in [0, {world_size}), but got {rank}.")
    return islice(src, rank, None, world_size)


def split_by_worker(
    src: Iterable[T], worker: int | None = None, num_workers: int | None = None
) -> Iterator[T]:
    """Round-robin share of one DataLoader worker (by default the current one; all items outside workers)."""
    if worker is None or num_workers is None:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if not 0 <= worker < num_workers:
        raise ValueError(f"Expected `worker` to be in [0, {num_workers}), but got {worker}.")
    return islice(src, worker, None, num_workers)


def shards_for(
    urls: list[str], rank: int, world_size: int, worker: int = 0, num_workers: int = 1
) -> list[str]:
    """The shards one worker of one rank reads (the composition of the two splitters)."""
    return list(split_by_worker(split_by_rank(urls, rank, world_size), worker, num_workers))


def rank_and_world_size(trainer: Any = None) -> tuple[int, int]:
    """Global rank and world size: the Trainer's, else torch.distributed's, else RANK/WORLD_SIZE, else 0/1.

    Raises:
        RuntimeError: if WORLD_SIZE > 1 is set without RANK and nothing else tells the rank.
    """
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), world
    if world > 1:
        raise RuntimeError(
            f"Expected `RANK` to be set with WORLD_SIZE={world}, but it is not, and no Trainer or "
            "torch.distributed process group is available. Build the dataloaders inside the Trainer."
        )
    return 0, 1


def _peek_video_id(raw: dict[str, Any]) -> str | None:
    try:
        return VideoMeta.from_json(raw["meta.json"]).video_id
    except (KeyError, SampleError):
        return None


class _Stream:
    """The state of one iteration in one worker: the shards opened so far, samples read per shard,
    read errors waiting to be emitted."""

    def __init__(self, ds: VideoShardDataset) -> None:
        self.ds = ds
        self.opened: list[str] = []
        self.counts: dict[str, int] = {}
        self.broken: set[str] = set()
        self.pending: list[FailedSample] = []
        self.checked = 0
        self.warned: set[str] = set()

    def worker_split(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in split_by_worker(src):
            self.opened.append(item["url"] if isinstance(item, dict) else str(item))
            yield item

    def handle(self, exn: Exception) -> bool:
        """Error handler of `reader.tar_samples` for shard-level errors (open, tar read)."""
        url = self.opened[-1] if self.opened else "<no shard opened yet>"
        what = str(exn)
        if isinstance(exn, EmptyShardError):
            msg = (
                f"Expected shard {url!r} to hold at least one sample, but {what}. Check the pattern in "
                "`--data.shards`, or rebuild the shard with `python -m data_tools`."
            )
        elif isinstance(exn, TarLimitError):
            msg = (
                f"Expected the tar headers of shard {url!r} to stay within the reader's limits, but "
                f"{what}. Samples before it were delivered; the rest of this shard was not read. Raise "
                "`--data.max_header_bytes` / `--data.max_shard_bytes` only if the shard is trusted."
            )
        else:
            msg = (
                f"Expected shard {url!r} to be a readable, complete tar file, but reading it failed with "
                f"{type(exn).__name__}: {what}. Samples before the damage were delivered; the rest of "
                "this shard is lost. Rebuild it with `python -m data_tools`."
            )
        if self.ds.on_error == "fail":
            raise SampleError(msg) from exn
        if url not in self.broken:  # one report per shard; later errors are echoes of the first
            self.broken.add(url)
            self.pending.append(FailedSample(key="", url=url, error=msg))
        return True

    def _fail(self, failed: FailedSample, exn: Exception | None = None) -> FailedSample:
        if self.ds.on_error == "fail":
            raise SampleError(failed.error) from exn
        return failed

    def _flush(self, upto: str | None) -> Iterator[FailedSample]:
        """Emit pending read errors, then check the shards finished before `upto` (None: all)."""
        pending, self.pending = self.pending, []
        yield from pending
        end = self.opened.index(upto) if upto in self.opened else len(self.opened)
        for url in self.opened[self.checked : end]:
            want, got = self.ds.expected.get(url), self.counts.get(url, 0)
            if url not in self.broken and want is not None and got < want:
                msg = (
                    f"Expected shard {url!r} to hold {want} samples as its {MANIFEST} says, but only "
                    f"{got} could be read: the shard is truncated (or was rewritten after the manifest). "
                    "The samples read were delivered; rebuild the shard with `python -m data_tools`."
                )
                yield self._fail(FailedSample(key="", url=url, error=msg))
        self.checked = max(self.checked, end)

    def _decode(self, raw: dict[str, Any]) -> VideoSample | FailedSample:
        key, url = str(raw.get("__key__", "")), str(raw.get("__url__", ""))
        try:
            sample = decode_sample(raw, self.ds.max_pixels, self.ds.max_frames, self.ds.max_sample_pixels)
        except _DECODE_ERRORS as e:
            msg = str(e) if isinstance(e, SampleError) else (
                f"Expected sample {key!r} of shard {url!r} to decode, but got {type(e).__name__}: {e}. "
                "Rebuild the shard with `python -m data_tools`."
            )  # fmt: skip
            return self._fail(FailedSample(key=key, url=url, error=msg, video_id=_peek_video_id(raw)), e)
        if sample.ignored_fields and url not in self.warned:
            self.warned.add(url)
            log.warning(
                f"Shard {url!r}: sample {key!r} holds {sample.ignored_fields} member(s) outside the sample "
                "schema (e.g. pickles); they were not read. Counted per video in summary.json "
                "(`ignored_fields`); logged once per shard."
            )
        return sample

    def run(self, src: Iterable[dict[str, Any]]) -> Iterator[VideoSample | FailedSample]:
        for raw in src:
            url = str(raw.get("__url__", ""))
            yield from self._flush(url)
            self.counts[url] = self.counts.get(url, 0) + 1
            yield self._decode(raw)
        yield from self._flush(None)


class VideoShardDataset(IterableDataset):
    """The samples of one rank's share of the shards, split further over DataLoader workers.

    Args:
        urls: all shard urls (every rank passes the same list; it is sorted here).
        rank: this process's global rank.
        world_size: number of processes over all nodes.
        max_pixels: largest frame (H * W) decoded.
        max_frames: largest number of frames per sample.
        on_error: "skip" yields a `FailedSample` for a bad sample or shard, "fail" raises `SampleError`.
        expected: samples per shard url from the manifests (for truncation checks), or None.
        max_sample_pixels: largest number of pixels of one sample (frames x H x W).
        max_header_bytes: largest PAX or GNU long-name tar header (`reader.GuardedTarInfo`).
        max_shard_bytes: largest decompressed tar stream of one shard.
    """

    def __init__(
        self,
        urls: list[str],
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_frames: int = DEFAULT_MAX_FRAMES,
        on_error: Literal["skip", "fail"] = "skip",
        expected: dict[str, int] | None = None,
        max_sample_pixels: int = DEFAULT_MAX_SAMPLE_PIXELS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"Expected `rank` to be in [0, `world_size`={world_size}), but got {rank}.")
        if len(set(urls)) != len(urls):
            raise ValueError("Expected each shard url once in `urls`, but some repeat.")
        if on_error not in ("skip", "fail"):
            raise ValueError(f"Expected `on_error` to be 'skip' or 'fail', but got {on_error!r}.")
        self.urls = sorted(urls)
        self.rank, self.world_size = rank, world_size
        self.max_pixels, self.max_frames, self.on_error = max_pixels, max_frames, on_error
        self.max_sample_pixels = max_sample_pixels
        self.max_header_bytes, self.max_shard_bytes = max_header_bytes, max_shard_bytes
        self.expected = dict(expected or {})

    def __iter__(self) -> Iterator[VideoSample | FailedSample]:
        stream = _Stream(self)
        urls = ({"url": url} for url in self.urls)
        mine = stream.worker_split(split_by_rank(urls, self.rank, self.world_size))
        raw = tar_samples(
            mine, stream.handle, self.max_pixels, self.max_frames, self.max_sample_pixels,
            self.max_header_bytes, self.max_shard_bytes,
        )  # fmt: skip
        return stream.run(raw)


def _passthrough(sample: T) -> T:
    return sample


class VideoShardDataModule(L.LightningDataModule):
    """Videos from WebDataset shards made by `python -m data_tools`, one sample per step.

    The same dataset serves predict, test and validate. Each step's batch is a `format.VideoSample`
    (frames (T, 3, H, W) uint8, labels (T, H, W) int64 or None, meta) or a `format.FailedSample`.
    `dataset_info` gives what the shards' `manifest.json` records (`num_classes`, `class_names`); the
    LightningModule takes `num_classes` from it in test/validate when not given.

    Args:
        shards: a brace pattern (`out/x-{000000..000009}.tar`), a glob, a folder holding the
            `manifest.json` of data_tools, or a list of these.
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        max_pixels: largest frame (H * W) decoded, checked from the image header; larger frames fail
            the sample.
        max_frames: largest number of frames per sample; longer samples fail.
        on_error: "skip" hands a bad sample or shard on as a `FailedSample`; "fail" raises.
        max_sample_pixels: largest number of pixels of one sample (frames x H x W), checked from its
            metadata before decoding; bounds a sample's memory. Larger samples fail; split long videos
            into clips with `python -m data_tools ... --max-frames-per-clip N`.
        max_header_bytes: largest PAX or GNU long-name tar header (default 1 MiB); a larger one stops
            its shard (reported in `summary.json`) before it is read.
        max_shard_bytes: largest decompressed tar stream of one shard (default 64 GiB), checked from
            each member's header before it is read or skipped; reading is streamed, so memory does not
            grow with it. A shard past it stops there (reported); its earlier samples are delivered.
    """

    def __init__(
        self,
        shards: str | list[str],
        num_workers: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_frames: int = DEFAULT_MAX_FRAMES,
        on_error: Literal["skip", "fail"] = "skip",
        max_sample_pixels: int = DEFAULT_MAX_SAMPLE_PIXELS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        super().__init__()
        if isinstance(shards, str):
            ok = bool(shards)
        else:
            ok = (
                isinstance(shards, (list, tuple)) and bool(shards) and all(isinstance(s, str) for s in shards)
            )
        if not ok:
            raise ValueError(
                f"Expected `shards` to be a non-empty string or list of strings, but got {shards!r}."
            )
        limits = (("num_workers", num_workers, 0), ("max_pixels", max_pixels, 1),
                  ("max_frames", max_frames, 1), ("max_sample_pixels", max_sample_pixels, 1),
                  ("max_header_bytes", max_header_bytes, 512),
                  ("max_shard_bytes", max_shard_bytes, 1024))  # fmt: skip
        for name, value, low in limits:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Expected `{name}` to be an integer >= {low}, but got {value!r}.")
        if on_error not in ("skip", "fail"):
            raise ValueError(f"Expected `on_error` to be 'skip' or 'fail', but got {on_error!r}.")
        self.save_hyperparameters()
        self.shards = shards if isinstance(shards, str) else list(shards)
        self.num_workers, self.max_pixels, self.max_frames = num_workers, max_pixels, max_frames
        self.max_sample_pixels = max_sample_pixels
        self.max_header_bytes, self.max_shard_bytes = max_header_bytes, max_shard_bytes
        self.on_error = on_error
        self._urls: list[str] | None = None
        self._expected: dict[str, int] = {}
        self._info: DatasetInfo | None = None

    @property
    def urls(self) -> list[str]:
        """The sorted shard urls (resolved on first use)."""
        if self._urls is None:
            self._urls, self._expected = resolve_shards(self.shards, SHARDS_ARG)
        return self._urls

    @property
    def dataset_info(self) -> DatasetInfo:
        """`num_classes` and `class_names` from the shards' `manifest.json` (None where unrecorded).

        Read on first use (a few small JSON files); raises ValueError if two manifests disagree.
        """
        if self._info is None:
            self._info = dataset_info(self.urls, SHARDS_ARG)
        return self._info

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard list (checks that local shards exist)."""
        _ = self.urls

    def dataset(self) -> VideoShardDataset:
        """This rank's dataset (rank and world size are taken now, see the module docstring)."""
        rank, world_size = rank_and_world_size(self.trainer)
        return VideoShardDataset(
            self.urls, rank, world_size, self.max_pixels, self.max_frames, self.on_error, self._expected,
            self.max_sample_pixels, self.max_header_bytes, self.max_shard_bytes,
        )  # fmt: skip

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset(),
            batch_size=None,
            shuffle=False,
            collate_fn=_passthrough,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=PREFETCH_FACTOR if self.num_workers > 0 else None,
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()
