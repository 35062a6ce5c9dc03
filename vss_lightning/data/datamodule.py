"""Read WebDataset shards of the `format` schema: one `VideoSample` (or `FailedSample`) per step.

The dataset (`VideoShardDataset`) is a `webdataset.DataPipeline` of five stages, run in each
DataLoader worker:

    wds.SimpleShardList(urls)   the sorted shard urls (`shards.resolve_shards`, shared with evaluate)
    split_by_rank(rank, W)      this rank's shards: rank, rank + W, rank + 2W, ... (see below)
    wds.split_by_worker         this worker's share of those, the same way over the rank's workers
    read_shards                 the guarded tar stage: raw samples via `reader.read_shard` (only the
                                schema's fields are read, sizes checked from the tar headers first;
                                nothing is ever unpickled); a shard that cannot be read on becomes a
                                `FailedSample` in the stream, as does one with fewer samples than its
                                `manifest.json` lists
    decode_samples              `format.decode_sample` per raw sample; a failure is a `FailedSample`

The loader uses `batch_size=None` and a pass-through `collate_fn`: a step's batch is the dataclass
itself. Order is never shuffled: within a worker, shards are read in order and samples in tar order,
so the clips of a video (written consecutively into one shard by data_tools) arrive in order.

Split strategy (every shard, hence every video, read exactly once):
    The sorted shard urls are dealt round-robin, first over ranks, then over the DataLoader workers
    of that rank (`wds.split_by_worker`: worker w of N gets the w-th, (w + N)-th, ... of the rank's
    shards). Rank and world size are taken when the DataLoader is built (`rank_and_world_size`: the
    attached Trainer's, else torch.distributed's, else RANK/WORLD_SIZE, else 0/1) and passed to the
    workers in the `split_by_rank` stage, which says why `wds.split_by_node` is not used as is. A
    rank or worker may get zero shards (fewer shards than `world_size * num_workers`): it yields
    nothing and ends normally; no error, and no hang as long as the LightningModule runs no per-step
    collective. Balance needs `#shards >= world_size * num_workers` (better a multiple of it) of
    similar size: `python -m data_tools ... --max-videos-per-shard N` or a smaller `--shard-size`.

Memory per worker is bounded by about two decoded samples: tar members are streamed (no shard is read
into memory as a whole), one raw sample is grouped and decoded at a time, and the loader keeps at most
`PREFETCH_FACTOR` (= 1) finished sample per worker in its queue. `max_frames`, `max_pixels` and
`max_sample_pixels` bound the size of one sample, raw and decoded (checked from tar headers, image
headers and metadata before anything large is read or decoded); split long videos into clips with
`--max-frames-per-clip`. Members outside the schema are never read; their count per sample is
`VideoSample.ignored_fields` (in `summary.json` as `ignored_fields`), logged once per shard.

Errors: a sample that fails to decode (`SampleError`: corrupt frame, wrong label size, missing
`meta.json`, ...) or a shard that cannot be read (missing, truncated, not a tar, empty, past a tar
limit) becomes a `FailedSample` (key, shard url, message, video id if known) in the stream with
`on_error="skip"`, so the job records it; with `"fail"` it raises `SampleError`. Samples before a
truncation point are delivered, the ones after it are lost, and the `FailedSample` names the shard.
When the shard's folder holds the `manifest.json` of data_tools, a shard that yields fewer samples
than the manifest lists (e.g. cut exactly at a member boundary, which tar itself cannot detect) is
reported the same way.

Length: just over 400 lines, most of them the error messages of damaged shards and the arguments'
documentation (they are the `--data.*` keys users read in `--help`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice
from typing import Any, Literal, TypeVar

import lightning as L
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader

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
    DEFAULT_MAX_COMPRESSION_RATIO,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_SHARD_BYTES,
    EmptyShardError,
    TarLimitError,
    read_shard,
)
from .shards import MANIFEST, DatasetInfo, dataset_info, resolve_shards

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 1  # finished samples queued per worker; each holds a whole decoded clip
SHARDS_ARG = "--data.shards"  # how the CLI names `shards`, in messages
# What a corrupt member can raise from the decoders besides SampleError (caught in decode_sample).
_DECODE_ERRORS = (SampleError, OSError, ValueError, EOFError, SyntaxError, KeyError, IndexError)

T = TypeVar("T")


def split_by_rank(src: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """The node-split stage: round-robin share of rank `rank` of `world_size` (items rank, rank + W, ...).

    `wds.split_by_node` slices the same way but finds the rank itself: from RANK/WORLD_SIZE, which
    Lightning's launcher does not set (it sets LOCAL_RANK, NODE_RANK, WORLD_SIZE), else from the
    process group, which a DataLoader worker sees only when forked (not under the spawn or forkserver
    start methods); without either it gives every rank every shard. Here the rank is passed in, taken
    from the Trainer when the DataLoader is built, so each shard is read exactly once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected `rank` to be in [0, {world_size}), but got {rank}.")
    return islice(src, rank, None, world_size)


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


def _report(failed: FailedSample, on_error: str, exn: Exception | None = None) -> FailedSample:
    """`failed` for the stream (on_error="skip"), or raised as `SampleError` (on_error="fail")."""
    if on_error == "fail":
        raise SampleError(failed.error) from exn
    return failed


def _shard_error(url: str, exn: Exception) -> str:
    what = str(exn)
    if isinstance(exn, EmptyShardError):
        return (
            f"Expected shard {url!r} to hold at least one sample, but {what}. Check the pattern in "
            "`--data.shards`, or rebuild the shard with `python -m data_tools`."
        )
    if isinstance(exn, TarLimitError):
        return (
            f"Expected the tar headers of shard {url!r} to stay within the reader's limits, but "
            f"{what}. Samples before it were delivered; the rest of this shard was not read. Raise "
            "`--data.max_header_bytes` / `--data.max_shard_bytes` / `--data.max_compression_ratio` only "
            "if the shard is trusted."
        )
    return (
        f"Expected shard {url!r} to be a readable, complete tar file, but reading it failed with "
        f"{type(exn).__name__}: {what}. Samples before the damage were delivered; the rest of "
        "this shard is lost. Rebuild it with `python -m data_tools`."
    )


def read_shards(
    src: Iterable[dict[str, Any] | str],
    on_error: Literal["skip", "fail"] = "skip",
    expected: dict[str, int] | None = None,
    **limits: int,
) -> Iterator[dict[str, Any] | FailedSample]:
    """The guarded tar stage: each shard's raw samples (`reader.read_shard`), then, if it is damaged
    or holds fewer samples than its manifest lists (`expected`), one `FailedSample` naming it.

    Args:
        src: shard urls or `{"url": ...}` dicts (as `wds.SimpleShardList` and the splitters pass them).
        on_error: "skip" puts the `FailedSample` in the stream, "fail" raises `SampleError`.
        expected: samples per shard url from the manifests, or None.
        limits: `max_pixels`, `max_frames`, `max_sample_pixels`, `max_header_bytes`,
            `max_shard_bytes` for `reader.read_shard`.
    """
    for item in src:
        url = item["url"] if isinstance(item, dict) else str(item)
        count = 0
        try:
            for raw in read_shard(url, **limits):
                count += 1
                yield raw
        except Exception as exn:  # noqa: BLE001 - whatever a damaged shard raises is reported
            yield _report(FailedSample(key="", url=url, error=_shard_error(url, exn)), on_error, exn)
            continue
        want = (expected or {}).get(url)
        if want is not None and count < want:
            msg = (
                f"Expected shard {url!r} to hold {want} samples as its {MANIFEST} says, but only "
                f"{count} could be read: the shard is truncated (or was rewritten after the manifest). "
                "The samples read were delivered; rebuild the shard with `python -m data_tools`."
            )
            yield _report(FailedSample(key="", url=url, error=msg), on_error)


def _peek_video_id(raw: dict[str, Any]) -> str | None:
    try:
        return VideoMeta.from_json(raw["meta.json"]).video_id
    except (KeyError, SampleError):
        return None


def decode_samples(
    src: Iterable[dict[str, Any] | FailedSample],
    on_error: Literal["skip", "fail"] = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_sample_pixels: int = DEFAULT_MAX_SAMPLE_PIXELS,
) -> Iterator[VideoSample | FailedSample]:
    """The decode stage: `format.decode_sample` per raw sample; `FailedSample`s pass through.

    A sample that fails to decode becomes a `FailedSample` (on_error="skip") or raises `SampleError`
    ("fail"). Members outside the schema are logged once per shard.
    """
    warned: set[str] = set()
    for raw in src:
        if isinstance(raw, FailedSample):
            yield raw
            continue
        key, url = str(raw.get("__key__", "")), str(raw.get("__url__", ""))
        try:
            sample = decode_sample(raw, max_pixels, max_frames, max_sample_pixels)
        except _DECODE_ERRORS as e:
            msg = str(e) if isinstance(e, SampleError) else (
                f"Expected sample {key!r} of shard {url!r} to decode, but got {type(e).__name__}: {e}. "
                "Rebuild the shard with `python -m data_tools`."
            )  # fmt: skip
            failed = FailedSample(key=key, url=url, error=msg, video_id=_peek_video_id(raw))
            yield _report(failed, on_error, e)
            continue
        if sample.ignored_fields and url not in warned:
            warned.add(url)
            log.warning(
                f"Shard {url!r}: sample {key!r} holds {sample.ignored_fields} member(s) outside the sample "
                "schema (e.g. pickles); they were not read. Counted per video in summary.json "
                "(`ignored_fields`); logged once per shard."
            )
        yield sample


class VideoShardDataset(wds.DataPipeline):
    """The samples of one rank's share of the shards, split further over DataLoader workers: the
    `wds.DataPipeline` of the module docstring (picklable, for spawned workers).

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
        max_compression_ratio: largest decompressed / compressed bytes of a shard.
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
        max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"Expected `rank` to be in [0, `world_size`={world_size}), but got {rank}.")
        if not urls or len(set(urls)) != len(urls):
            raise ValueError(f"Expected `urls` to name at least one shard, each once, but got {urls!r}.")
        if on_error not in ("skip", "fail"):
            raise ValueError(f"Expected `on_error` to be 'skip' or 'fail', but got {on_error!r}.")
        size = {"max_pixels": max_pixels, "max_frames": max_frames, "max_sample_pixels": max_sample_pixels}
        tar = {
            "max_header_bytes": max_header_bytes,
            "max_shard_bytes": max_shard_bytes,
            "max_compression_ratio": max_compression_ratio,
        }
        self.urls = sorted(urls)
        super().__init__(
            wds.SimpleShardList(self.urls),
            partial(split_by_rank, rank=rank, world_size=world_size),
            wds.split_by_worker,
            partial(read_shards, on_error=on_error, expected=dict(expected or {}), **size, **tar),
            partial(decode_samples, on_error=on_error, **size),
        )
        self.rank, self.world_size, self.on_error = rank, world_size, on_error


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
        max_compression_ratio: largest decompressed / compressed bytes of a compressed shard (default
            100; real `.tar.gz` shards of images stay near 1, a gzip bomb is about 1000), checked while
            reading, so a bomb stops its shard (reported) after a few tens of megabytes.
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
        max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
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
        if isinstance(max_compression_ratio, bool) or not max_compression_ratio >= 1:
            raise ValueError(
                f"Expected `max_compression_ratio` to be a number >= 1, but got {max_compression_ratio!r}."
            )
        if on_error not in ("skip", "fail"):
            raise ValueError(f"Expected `on_error` to be 'skip' or 'fail', but got {on_error!r}.")
        self.save_hyperparameters()
        self.shards = shards if isinstance(shards, str) else list(shards)
        self.num_workers, self.max_pixels, self.max_frames = num_workers, max_pixels, max_frames
        self.max_sample_pixels = max_sample_pixels
        self.max_header_bytes, self.max_shard_bytes = max_header_bytes, max_shard_bytes
        self.max_compression_ratio = float(max_compression_ratio)
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
        if "WORKER" in os.environ and "NUM_WORKERS" in os.environ:
            log.warning(
                "WORKER and NUM_WORKERS are set in the environment: `wds.split_by_worker` takes the "
                "DataLoader worker from them instead of PyTorch, so every worker of this rank reads the "
                "same shards unless they are set per worker. Unset them to read each shard once."
            )
        return VideoShardDataset(
            self.urls, rank, world_size, self.max_pixels, self.max_frames, self.on_error, self._expected,
            self.max_sample_pixels, self.max_header_bytes, self.max_shard_bytes, self.max_compression_ratio,
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
