"""Colour previews of the labels (`write_previews`): a PNG per frame and an overlay video per video.

`<frame>.preview.png` is the label colours blended over the frame (RGB), or a palette PNG of the
labels when the frames are not at hand. The overlay video `preview.mp4` (PyAV) or `preview.gif`
(Pillow, when PyAV has no H.264/MPEG-4 encoder) is streamed clip by clip into a temporary file and
renamed at the video's last clip. Colours come from `vss_lightning.viz`. A clip's previews are one
task, which the writer runs in its background pool (`io.background`); the open videos are kept track
of in the writer's thread.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vss_lightning import viz
from vss_lightning.clips import ClipAssembler
from vss_lightning.data.format import VideoMeta, VideoSample, encode_png

from .background import run_now
from .files import atomic_write
from .summary import VideoLabels

log = logging.getLogger(__name__)

PREVIEW_VIDEO = "preview"  # <video_id>/preview.mp4 (or .gif)
PREVIEW_FPS = 10.0
Submit = Callable[..., Future[Any]]  # `BackgroundWrites.submit` or `run_now`


def preview_png(label: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """A palette PNG showing an (H, W) label map in colour (ids above 255 wrap around).

    Args:
        label: (H, W) integer ids.
        palette: (256, 3) uint8 colours (default: `viz.palette_for()`, the distinct cluster colours).
    """
    table = viz.palette_for() if palette is None else palette
    img = Image.fromarray((label.astype(np.int64) % 256).astype(np.uint8))
    img.putpalette(np.asarray(table, dtype=np.uint8)[:256].flatten().tolist())  # "L" + palette -> "P"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_frames(sample: Any, res: VideoLabels) -> np.ndarray | None:
    """The (T, H, W, 3) uint8 frames of `res` from the step's batch, or None if it does not hold them."""
    if not isinstance(sample, VideoSample) or sample.meta.video_id != res.meta.video_id:
        return None
    frames = sample.frames
    t, h, w = res.labels.shape
    if sample.meta.clip_index != res.meta.clip_index or tuple(frames.shape) != (t, 3, h, w):
        return None
    return frames.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8, copy=False)  # (T, H, W, 3)


def palette(meta: VideoMeta, label_mode: str) -> np.ndarray:
    """The colours of a video's labels: class colours of its dataset, or cluster colours."""
    return viz.palette_for(meta.source, meta.num_classes, label_mode or "cluster")


def _render(
    paths: list[Path],
    arr: np.ndarray,
    frames: np.ndarray | None,
    colours: np.ndarray,
    video: viz.VideoWriter,
    last: bool,
) -> None:
    """Write one clip's preview PNGs to `paths` and append its frames to `video` (closed if `last`);
    on an error the video is aborted (its temporary file goes)."""
    try:
        for i, path in enumerate(paths):  # frame by frame: memory of one frame
            if frames is not None:
                image = viz.overlay(frames[i], arr[i], colours)
                data = encode_png(image)
            else:
                image, data = viz.colorize(arr[i], colours), preview_png(arr[i], colours)
            atomic_write(path, data)
            video.write(image[None])
        if last:
            video.close()
    except BaseException:
        video.abort()
        raise


def preview_image(label: np.ndarray, frame: np.ndarray | None, colours: np.ndarray) -> bytes:
    """A frame's preview: the overlay as an RGB PNG, or a palette PNG of the labels without the frame."""
    if frame is None:
        return preview_png(label, colours)
    return encode_png(viz.overlay(frame, label, colours))


class PreviewVideos:
    """The overlay videos being written, one per video until its last clip.

    Args:
        path: `path(video_id, name)` -> the checked file path in the video's folder.
        label_mode: picks the palette.
    """

    def __init__(self, path: Callable[..., Path], label_mode: str = "cluster") -> None:
        self._path = path
        self.label_mode = label_mode
        self._open: ClipAssembler[viz.VideoWriter] = ClipAssembler()

    def write(self, res: VideoLabels, arr: np.ndarray, frames: np.ndarray | None) -> None:
        """`<frame>.preview.png` per frame and the clip's frames appended to the video's overlay video,
        here and now (`start` with the default `submit`, then its error, if any, raised)."""
        self.finish(res.meta.video_id, self.start(res, arr, frames))

    def start(
        self, res: VideoLabels, arr: np.ndarray, frames: np.ndarray | None, submit: Submit = run_now
    ) -> Future[None]:
        """Start the previews of one clip: `<frame>.preview.png` per frame and the clip's frames appended
        to the video's overlay video, as one task of `submit` (frames in order; the clips of a video must
        be started in order, each after the previous one's task is finished).

        A clip that does not follow the previous one on this rank starts the video afresh (it then
        shows the clips from there on). The bookkeeping of open videos happens here, in the caller's
        thread; hand the task's future to `finish`.

        Args:
            res: the clip's labels.
            arr: (T, H, W) its label array.
            frames: (T, H, W, 3) uint8 its frames, or None (palette previews).
            submit: runs the task (`BackgroundWrites.submit`; default: now, in this thread).
        """
        meta, vid = res.meta, res.meta.video_id
        colours = palette(meta, self.label_mode)
        video = self._open.last(vid) if self._open.follows(meta) else None
        if video is None:
            broken = self._open.pop(vid)
            if broken is not None:  # an earlier run this clip does not follow
                broken.parts[-1].abort()
            if meta.clip_index == 0:
                for stale in self._path(vid).glob(f".{PREVIEW_VIDEO}.*.part"):  # left by a killed run
                    stale.unlink(missing_ok=True)
            else:
                log.warning(
                    f"Video {vid!r}: clip {meta.clip_index} came without clip {meta.clip_index - 1} on "
                    f"this rank; its overlay video starts at this clip."
                )
            video = viz.VideoWriter(self._path(vid, f"{PREVIEW_VIDEO}.{viz.video_format()}"), PREVIEW_FPS)
        paths = [self._path(vid, f"{name}.preview.png") for name in meta.frame_names]
        last = bool(self._open.add(meta, video))  # the video's last clip: the task closes it
        return submit(_render, paths, arr, frames, colours, video, last, weight=len(paths))

    def finish(self, video_id: str, task: Future[None]) -> None:
        """Wait for a clip's task (`start`); on its error forget the video's overlay video, then raise."""
        try:
            task.result()
        except BaseException:
            self.forget(video_id)
            raise

    def forget(self, video_id: str) -> None:
        """Drop the overlay video of `video_id` being written (a clip of it failed); its file goes.
        Call it only once no task of the video is running."""
        run = self._open.pop(video_id)
        if run is not None:
            run.parts[-1].abort()

    def abort_all(self) -> None:
        """Drop the overlay videos whose last clip never came (their temporary files go)."""
        for run in self._open.clear():
            log.warning(f"Video {run.video_id!r}: its last clip never came; no overlay video written.")
            run.parts[-1].abort()
