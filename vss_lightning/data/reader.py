"""Raw samples from tar shards: only the fields of the sample schema are read, sizes checked first.

`read_shard` and `tar_samples` take the place of WebDataset's `tar_file_expander` + `group_by_keys`,
which read every member into memory whole, whatever its name or size; a compressed shard (`.tar.gz`,
which `tarfile` opens transparently) can expand a small file into gigabytes. Here each member's size
comes from its tar header, and a member is read only when it is a schema field
(`format.is_schema_field`) that fits:

- a symbolic or hard link member is never followed: as a schema field it fails its sample with a
  `Refused` naming the link; otherwise it is counted as ignored like the next item;
- a valid tar holding no sample at all is reported (`EmptyShardError`);
- any other member (a pickle, a `.pth`, notes, ...) is skipped unread and counted in the sample's
  `__ignored__` field (`format.decode_sample` adds it to `VideoSample.ignored_fields`; the first few
  field names are kept in `__ignored_names__` for messages);
- a schema field larger than `format.field_byte_limit` (e.g. `meta.json` over `MAX_META_BYTES`), one
  that repeats, or one that would take the sample past `max_sample_bytes` (tar blocks counted) is
  skipped unread and stored as `format.Refused`, which fails its sample in `decode_sample`.

Tar headers are bounded too (`GuardedTarInfo`), before anything they announce is read: a PAX or
GNU long-name header larger than `max_header_bytes` (`tarfile` reads those whole into memory), and a
member that would take the shard's decompressed stream past `max_shard_bytes`, stop the shard with
`TarLimitError` (the samples before it delivered). The stream is decompressed
and skipped in fixed-size blocks, so memory stays bounded whatever a compressed shard expands to.

A member that is read into memory is also held to `max_compression_ratio` (its decompressed bytes
per compressed byte of the shard consumed while reading it, checked after each chunk once it is past
`COMPRESSION_GRACE_BYTES`): frames and label PNGs are already compressed, so in a real `.tar.gz`
shard they stay near 1:1, while a gzip bomb expands about 1000:1. Such a member stops the shard
(`TarLimitError`) after a few tens of megabytes instead of filling memory with what it expands to
within the per-field and per-sample bounds. (Members skipped unread are decompressed in blocks and
never held, so they cost time, bounded by `max_shard_bytes`, not memory.)

Members are grouped into samples by the part of their name before the first dot of the base name,
as WebDataset does (`base_plus_ext`), in tar order. `read_shard` reads one shard and raises when it
cannot be opened or read on to its end, after yielding the sample being read when the damage was
found (so its decoding names it). `tar_samples` is the same over a stream of shards with a WebDataset
error handler (return True to go on with the next shard); the DataModule's pipeline stage
(`datamodule.read_shards`) calls `read_shard` itself, to report each shard's error in the stream.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .format import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SAMPLE_PIXELS,
    MAX_META_BYTES,
    Refused,
    field_byte_limit,
    is_schema_field,
)

_BLOCK = tarfile.BLOCKSIZE
DEFAULT_MAX_HEADER_BYTES = 1 << 20  # one PAX / GNU long-name header (a path is at most a few KiB)
DEFAULT_MAX_SHARD_BYTES = 64 << 30  # decompressed bytes of one shard (streamed: not held in memory)
DEFAULT_MAX_COMPRESSION_RATIO = 100.0  # decompressed / compressed bytes of a shard (gzip bombs: ~1000)
COMPRESSION_GRACE_BYTES = 32 << 20  # decompressed bytes before the ratio is checked (small shards vary)
READ_CHUNK_BYTES = 8 << 20  # a member is read in chunks of this size, the ratio checked after each


class TarLimitError(ValueError):
    """A tar header breaks a limit of `tar_samples`; the rest of the shard is not read."""


class EmptyShardError(ValueError):
    """A shard that is a valid tar file but holds no sample (no regular or link member with a key)."""


class GuardedTarInfo(tarfile.TarInfo):
    """A `TarInfo` that refuses, from the header alone, a PAX or GNU long-name header larger than
    `max_header_bytes` and any header or member that ends past `max_shard_bytes` of the stream.

    `tar_samples` makes a subclass with the limits set (`tarfile.open(..., tarinfo=cls)`).
    """

    max_header_bytes = DEFAULT_MAX_HEADER_BYTES
    max_shard_bytes = DEFAULT_MAX_SHARD_BYTES

    def _check_header(self, tar: tarfile.TarFile, what: str) -> None:
        if self.size > self.max_header_bytes:
            raise TarLimitError(
                f"its {what} header at byte {self.offset} says {self.size} bytes, over the limit of "
                f"{self.max_header_bytes} bytes (`max_header_bytes`); it was not read"
            )
        if tar.offset + _BLOCK + self.size > self.max_shard_bytes:
            raise TarLimitError(
                f"its {what} header at byte {self.offset} ends past {self.max_shard_bytes} decompressed "
                "bytes, the limit per shard (`max_shard_bytes`); it was not read"
            )

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_header(tar, "GNU long-name")
        return super()._proc_gnulong(tar)

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_header(tar, "PAX extended")
        return super()._proc_pax(tar)


class CountingReader:
    """A read-only file wrapper that counts the bytes read from the underlying (compressed) file."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


class RatioGuard:
    """Stops a member being read into memory that outgrows `max_ratio` x the compressed bytes it took."""

    def __init__(self, counter: CountingReader, max_ratio: float) -> None:
        self.counter, self.max_ratio = counter, max_ratio
        self.start = 0

    def begin(self) -> None:
        """A member starts being read."""
        self.start = self.counter.count

    def check(self, name: str, decompressed: int) -> None:
        """After `decompressed` bytes of member `name` were read."""
        compressed = max(self.counter.count - self.start, 1)
        if decompressed > COMPRESSION_GRACE_BYTES and decompressed > self.max_ratio * compressed:
            raise TarLimitError(
                f"member {name[:200]!r} decompressed to {decompressed} bytes from {compressed} compressed "
                f"bytes ({decompressed / compressed:.0f}:1, over the limit of {self.max_ratio:g}:1, "
                "`max_compression_ratio`): a compression bomb, or a member that is not an encoded image; "
                "the rest of the shard was not read"
            )


def _guarded(max_header_bytes: int, max_shard_bytes: int) -> type[GuardedTarInfo]:
    return type(
        "ShardTarInfo",
        (GuardedTarInfo,),
        {"max_header_bytes": max_header_bytes, "max_shard_bytes": max_shard_bytes},
    )


BYTES_PER_SAMPLE_PIXEL = 4  # encoded frame + label bytes allowed per pixel of `max_sample_pixels`


def reraise(exn: Exception) -> bool:
    """The default handler: shard errors propagate."""
    raise exn


def sample_byte_limit(max_sample_pixels: int = DEFAULT_MAX_SAMPLE_PIXELS) -> int:
    """Tar bytes (headers and padding included) one sample may take: `meta.json` plus 4 bytes per pixel."""
    return MAX_META_BYTES + BYTES_PER_SAMPLE_PIXEL * max_sample_pixels


def read_shard(
    url: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_sample_pixels: int = DEFAULT_MAX_SAMPLE_PIXELS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard: `{"__key__", "__url__", "__ignored__", field: bytes, ...}`.

    Raises whatever a shard that cannot be opened or read on to its end raises (`TarLimitError`,
    `EmptyShardError`, `tarfile.ReadError`, `OSError`, ...), after yielding the sample being read when
    the damage was found (so its decoding says what is missing).

    Args:
        url: the shard (a path or a url `webdataset.gopen` opens).
        max_pixels: largest frame (H * W); bounds each image member's bytes (`field_byte_limit`).
        max_frames: a sample keeps at most `2 * max_frames + 1` schema fields (frames, labels, meta).
        max_sample_pixels: bounds the bytes of one sample (`sample_byte_limit`).
        max_header_bytes: largest PAX or GNU long-name header (`GuardedTarInfo`).
        max_shard_bytes: largest decompressed tar stream of the shard, checked from each header
            before its member is read or skipped.
        max_compression_ratio: largest decompressed / compressed bytes of the shard (`RatioGuard`).
    """
    max_fields = 2 * max_frames + 1
    max_bytes = sample_byte_limit(max_sample_pixels)
    info_class = _guarded(max_header_bytes, max_shard_bytes)
    sample: dict[str, Any] | None = None
    try:
        with (
            gopen(url) as raw,
            tarfile.open(fileobj=(counter := CountingReader(raw)), mode="r|*", tarinfo=info_class) as tar,
        ):
            guard = RatioGuard(counter, max_compression_ratio)
            yielded = nbytes = 0
            for info in tar:
                tar.members = []  # stream mode keeps every header otherwise
                if info.offset_data + info.size > max_shard_bytes:  # before it is read or skipped
                    raise TarLimitError(
                        f"member {info.name[:200]!r} at byte {info.offset} ends at byte "
                        f"{info.offset_data + info.size}, past {max_shard_bytes} decompressed bytes, the "
                        "limit per shard (`max_shard_bytes`); it was not read"
                    )
                link = info.issym() or info.islnk()
                key, field = base_plus_ext(info.name) if info.isreg() or link else (None, None)
                if key is None:  # directories, devices, names without a key
                    continue
                field = field.lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample, nbytes = {"__key__": key, "__url__": url, "__ignored__": 0}, 0
                    yielded += 1
                if link and is_schema_field(field):  # never followed: its sample fails, saying why
                    kind = "symbolic" if info.issym() else "hard"
                    sample[field] = Refused(
                        f"member {info.name[:200]!r} is a {kind} link (to {info.linkname[:200]!r}), "
                        "which is never followed; store the file itself in the shard"
                    )
                    continue
                if link or not is_schema_field(field):
                    sample["__ignored__"] += 1
                    if len(sample.setdefault("__ignored_names__", [])) < 8:  # for messages
                        sample["__ignored_names__"].append(field)
                    continue
                nbytes += _BLOCK + -(-info.size // _BLOCK) * _BLOCK
                sample[field] = _read(
                    tar, info, field, sample, nbytes, max_bytes, max_fields, max_pixels, guard
                )
        last, sample = sample, None
        if last is not None:
            yield last
        if yielded == 0:
            raise EmptyShardError("it is a valid tar file but holds no sample")
    except Exception:
        if sample is not None:
            yield sample  # read up to the damage; decoding it says what is missing
        raise


def tar_samples(
    src: Iterable[dict[str, Any] | str],
    handler: Callable[[Exception], bool] = reraise,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_sample_pixels: int = DEFAULT_MAX_SAMPLE_PIXELS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
) -> Iterator[dict[str, Any]]:
    """`read_shard` over a stream of shards, as a WebDataset pipeline stage with a WebDataset handler.

    Args:
        src: shard urls, or dicts with a "url" (as WebDataset's shard lists and splitters pass them).
        handler: called with the exception when a shard cannot be opened or read on; True goes on with
            the next shard, False stops.
        max_pixels, max_frames, max_sample_pixels, max_header_bytes, max_shard_bytes,
            max_compression_ratio: as in `read_shard`.
    """
    for item in src:
        url = item["url"] if isinstance(item, dict) else str(item)
        try:
            yield from read_shard(
                url, max_pixels, max_frames, max_sample_pixels, max_header_bytes, max_shard_bytes,
                max_compression_ratio,
            )  # fmt: skip
        except Exception as exn:  # noqa: BLE001 - whatever a damaged shard raises goes to the handler
            if not handler(exn):
                break


def _read(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    field: str,
    sample: dict[str, Any],
    nbytes: int,
    max_bytes: int,
    max_fields: int,
    max_pixels: int,
    guard: RatioGuard | None = None,
) -> bytes | Refused:
    """A member's bytes (read in chunks, the compression ratio checked after each), or `Refused`
    (unread) when it repeats or is too large."""
    limit = field_byte_limit(field, max_pixels)
    if field in sample:
        return Refused(f"the shard holds it more than once (member {info.name!r})")
    if info.size > limit:
        return Refused(f"its tar header says {info.size} bytes, over the limit of {limit} for this field")
    if nbytes > max_bytes:
        return Refused(
            f"the sample's members exceed {max_bytes} bytes in all (raise `--data.max_sample_pixels` "
            "if the video is genuine)"
        )
    if len(sample) - 3 >= max_fields:
        return Refused(f"the sample has more than {max_fields} frame, label and meta fields")
    f = tar.extractfile(info)
    if f is None:
        return b""
    parts, done = [], 0
    if guard is not None:
        guard.begin()
    while done < info.size:
        chunk = f.read(min(READ_CHUNK_BYTES, info.size - done))
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
        if guard is not None:
            guard.check(info.name, done)
    return b"".join(parts)
