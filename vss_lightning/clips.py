"""Joining the clips of a video: one `ClipAssembler` for everything kept per video until its last clip.

A long video reaches the tool as clips: samples that share `video_id` and carry `clip_index` of
`num_clips` (`data.format.VideoMeta`). Whatever is kept per video across its clips is kept here: the
pipeline's `VideoState` (`pipeline.video`), the module's evaluation parts, the writer's overlay video
and label tars, the W&B callback's per-video rows and `evaluate`'s ground truth. The assembler joins
the clips' parts in clip order, says when a video is whole, and when a clip breaks the order (a clip
missing, repeated or out of order), so each of its users decides once what that means for it.

Standard library only (no torch, Lightning or data layer): the pipeline may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Clip(Protocol):
    """What identifies a clip (`data.format.VideoMeta` is one)."""

    @property
    def video_id(self) -> str: ...

    @property
    def clip_index(self) -> int: ...

    @property
    def num_clips(self) -> int: ...


class ClipOrderError(ValueError):
    """A clip that repeats one already held (clips in any order)."""


def is_last_clip(clip: Clip) -> bool:
    """Whether `clip` is the last clip of its video (an unsplit video is its own last clip)."""
    return clip.clip_index >= clip.num_clips - 1


@dataclass
class ClipRun(Generic[T]):
    """Clips of one video held together and their parts, in clip order.

    Attributes:
        video_id: the video.
        num_clips: the video's number of clips.
        clips: the clip indices held, ascending.
        parts: one part per clip of `clips`.
    """

    video_id: str
    num_clips: int
    clips: list[int] = field(default_factory=list)
    parts: list[T] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether the run holds every clip of the video, 0 .. num_clips - 1."""
        return self.clips == list(range(self.num_clips))


class ClipAssembler(Generic[T]):
    """Joins one part per clip into whole videos.

    Args:
        any_order: False (streaming, one rank's samples): a clip follows the clips held of its video
            when its index is the next one (0 when none is held); one that does not ends the held run
            (incomplete) and starts a new run at itself. True (reading shards): clips may come in any
            order and a video is whole once all its clips are held; a repeated clip is an error.
    """

    def __init__(self, any_order: bool = False) -> None:
        self.any_order = any_order
        self._runs: dict[str, ClipRun[T]] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._runs

    def follows(self, clip: Clip) -> bool:
        """Whether `clip` is the next clip of its video: clip 0 of a video none of whose clips is held,
        or the clip after the last one held."""
        run = self._runs.get(clip.video_id)
        return clip.clip_index == (run.clips[-1] + 1 if run is not None else 0)

    def last(self, video_id: str) -> T | None:
        """The part of the latest clip held of `video_id`, or None."""
        run = self._runs.get(video_id)
        return run.parts[-1] if run is not None else None

    def add(self, clip: Clip, part: T) -> list[ClipRun[T]]:
        """Hold `part` of `clip`.

        Returns:
            The runs this clip ended, oldest first: the video's earlier run when the clip does not
            follow it (streaming; incomplete), and the video's run when it is whole (streaming: this
            was its last clip; any order: all of its clips are held).

        Raises:
            ClipOrderError: with `any_order`, if the clip is already held (nothing changes).
        """
        ended: list[ClipRun[T]] = []
        vid = clip.video_id
        run = self._runs.get(vid)
        if self.any_order and run is not None and clip.clip_index in run.clips:
            raise ClipOrderError(
                f"Expected video {vid!r} clip {clip.clip_index} to occur once, but it repeats."
            )
        if not self.any_order and run is not None and not self.follows(clip):
            ended.append(self._runs.pop(vid))
            run = None
        if run is None:
            run = self._runs[vid] = ClipRun(vid, clip.num_clips)
        at = next((i for i, k in enumerate(run.clips) if k > clip.clip_index), len(run.clips))
        run.clips.insert(at, clip.clip_index)
        run.parts.insert(at, part)
        whole = len(run.clips) >= clip.num_clips if self.any_order else is_last_clip(clip)
        if whole:
            ended.append(self._runs.pop(vid))
        return ended

    def pop(self, video_id: str) -> ClipRun[T] | None:
        """Forget `video_id`; returns its run, if one was held."""
        return self._runs.pop(video_id, None)

    def pending(self) -> list[ClipRun[T]]:
        """The runs of the videos whose last clip has not come (in the order they started)."""
        return list(self._runs.values())

    def clear(self) -> list[ClipRun[T]]:
        """Forget every video; returns the runs that were held."""
        runs = self.pending()
        self._runs.clear()
        return runs
