"""The README's main command: segment a short video end to end.

    python -m vss_lightning.demo                      # real SD 2.1-base (downloaded on first use)
    python -m vss_lightning.demo --video my_clip.mp4  # your own short video
    python -m vss_lightning.demo --smoke              # offline, CPU, tiny random backbone

Steps: the video (yours, or a short clip rendered here: a ball and a box moving over sky, hills and
a road) becomes WebDataset shards with `data_tools`, then `vss-lightning predict` labels it with
`configs/demo.yaml` (or `configs/smoke.yaml`) and writes label PNGs, colour previews, `DONE` and
`summary.json` under the output folder.

Each mode has its own folders, so runs of different modes never mix: labels go to `outputs/<mode>/`,
frames and shards to `outputs/<mode>_work/`, where <mode> is `demo`, `demo_smoke` (`--smoke`),
`demo_video` (`--video`) or `demo_video_smoke` (both). In its work folder the demo replaces only what
it wrote there itself: its rendered frames (`frames/demo_clip/<5 digits>.png`) and its shards and
manifest (`shards/`). A rerun skips videos already labelled with the same settings, and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLIP = "demo_clip"  # the rendered video's id
FRAME_NAME = re.compile(r"\d{5}\.png")  # the file names `render_clip` writes, and the only ones it removes
SMOKE_CLIP = dict(frames=8, size=(192, 320))  # the tiny backbone runs on a CPU


def render_clip(folder: Path, frames: int = 16, size: tuple[int, int] = (320, 512)) -> Path:
    """Render a short synthetic video as PNG frames in `folder/demo_clip/` and return `folder`.

    Frames an earlier call left there (of another count or size) are removed first; other files are
    left alone.

    Args:
        folder: where the video folder is created.
        frames: number of frames.
        size: (height, width).
    """
    h, w = size
    video = folder / CLIP
    video.mkdir(parents=True, exist_ok=True)
    for old in video.iterdir():
        if FRAME_NAME.fullmatch(old.name) and old.is_file():
            old.unlink()
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    texture = rng.normal(0, 6, (h, w, 1))
    for t in range(frames):
        img = np.zeros((h, w, 3), np.float64)
        img[:] = (110, 160, 230)  # sky
        hills = yy > h * 0.45 + 18 * np.sin(xx / 40.0 + t * 0.05)
        img[hills] = (70, 140, 60)
        road = yy > h * 0.75
        img[road] = (90, 90, 95)
        cx, cy = 60 + 18 * t, h * 0.55  # a red ball rolling right
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < 30**2] = (210, 40, 40)
        bx = w - 120 - 10 * t  # a yellow box on the road moving left
        img[(xx > bx) & (xx < bx + 70) & (yy > h * 0.78) & (yy < h * 0.92)] = (230, 200, 40)
        img = np.clip(img + texture, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(video / f"{t:05d}.png")
    return folder


def mode_folders(smoke: bool, video: bool) -> tuple[Path, Path]:
    """The default (work, output) folders of a mode: `outputs/<mode>_work` and `outputs/<mode>`."""
    mode = "demo" + ("_video" if video else "") + ("_smoke" if smoke else "")
    return Path("outputs") / f"{mode}_work", Path("outputs") / mode


def _error(*lines: str) -> int:
    print(f"error: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)
    return 1


def _convert(args: list[str]) -> int:
    """`python -m data_tools ARGS`, in this process; returns its exit status."""
    from data_tools.__main__ import main as data_tools_main

    print("$ python -m data_tools", shlex.join(args), flush=True)
    return data_tools_main(args)


def _predict(args: list[str], out: Path, smoke: bool) -> int:
    """`python -m vss_lightning ARGS` (labels to `out`), in this process, then `_report`; the exit status.

    A backbone that cannot be found ends in its message (what is missing, how to fix it), no traceback.
    """
    from vss_lightning.cli import user_error_types
    from vss_lightning.lightning_cli import run_cli
    from vss_lightning.pipeline.backbone import BackboneNotFoundError

    print("$ python -m vss_lightning", shlex.join(args), flush=True)
    try:
        with warnings.catch_warnings():  # LightningCLI warns that sys.argv (the demo's own) is not used
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            run_cli(args, prog="python -m vss_lightning")
    except BackboneNotFoundError as e:
        alternative = "" if smoke else " From the demo: `python -m vss_lightning.demo --smoke`."
        return _error(f"{e}{alternative}")
    except SystemExit as e:  # a bad extra argument (or --help): jsonargparse has printed why
        return e.code if isinstance(e.code, int) else 1
    except user_error_types() as e:  # a bad path or value: the message names it and the fix
        return _error(" ".join(str(e).split()))
    return _report(out)


def _report(out: Path) -> int:
    """Say what the labelling run did, from its `summary.json`; `EXIT_SOME_FAILED` if a video failed."""
    from vss_lightning.io.summary import SUMMARY

    summary = json.loads((out / SUMMARY).read_text())
    skipped = summary["total"]["skipped_videos"]
    if skipped:
        print(
            f"{skipped} video(s) already labelled in {out}/ with these settings were skipped (resume); "
            f"delete {out}/<video>/ to label one again."
        )
    if summary["failed"]:
        first = summary["failed"][0]
        _error(
            f"Expected every video to be labelled, but {len(summary['failed'])} failed, e.g. "
            f"{first['video_id']!r}: {first['error']}"
        )
        from vss_lightning.cli import EXIT_SOME_FAILED

        return EXIT_SOME_FAILED
    print(f"labels, previews and summary.json are in {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 done, 1 bad input or a failed step, 2 bad arguments,
    3 some videos could not be labelled)."""
    p = argparse.ArgumentParser(
        prog="python -m vss_lightning.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments go to `vss-lightning predict`, e.g. --trainer.accelerator cpu.",
    )
    p.add_argument(
        "--video", type=Path, help="a short video file (mp4, avi, mkv, webm, mov); default: a rendered clip"
    )
    p.add_argument("--fps", type=float, default=10.0, help="frames per second taken from --video")
    p.add_argument("--smoke", action="store_true", help="offline CPU run with the tiny random backbone")
    p.add_argument(
        "--work_dir", type=Path, default=None, help="frames and shards go here (default outputs/<mode>_work)"
    )
    p.add_argument("--output_dir", type=Path, default=None, help="labels go here (default outputs/<mode>)")
    args, extra = p.parse_known_args(argv)
    default_work, default_out = mode_folders(args.smoke, args.video is not None)
    work, out = args.work_dir or default_work, args.output_dir or default_out
    if args.video is not None:
        if not args.video.is_file():
            what = "a folder" if args.video.is_dir() else "which does not exist"
            return _error(
                f"Expected `--video` to be a video file (mp4, avi, mkv, webm, mov), but got "
                f"{str(args.video)!r}, {what}. Pass a short video, or leave `--video` out for the "
                "rendered clip."
            )
        if not (args.fps >= 0 and math.isfinite(args.fps)):
            return _error(f"Expected `--fps` to be >= 0 (0: every frame), but got {args.fps}.")
    shards = work / "shards"
    if args.video is not None:
        source = ["video", "--root", str(args.video), "--fps", str(args.fps)]
    else:
        frames = render_clip(work / "frames", **(SMOKE_CLIP if args.smoke else {}))
        source = ["frames", "--root", str(frames)]
    rc = _convert([*source, "--out", str(shards / "demo-%06d.tar"), "--overwrite", "--quiet"])
    if rc:
        if args.video is not None:
            print(
                f"The demo cannot read `--video` {args.video}: re-encode it (e.g. `ffmpeg -i "
                f"{shlex.quote(str(args.video))} -c:v libx264 -pix_fmt yuv420p clip.mp4`) or pass "
                "another video.",
                file=sys.stderr,
            )
        return rc
    config = REPO / "configs" / ("smoke.yaml" if args.smoke else "demo.yaml")
    predict = ["predict", "--config", str(config), "--data.shards", str(shards), "--output_dir", str(out)]
    return _predict([*predict, "--write_previews", "true", *extra], out, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
