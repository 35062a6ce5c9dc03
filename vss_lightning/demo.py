"""The README's main command: segment a short video end to end.

    python -m vss_lightning.demo                      # real SD 2.1-base (downloaded on first use)
    python -m vss_lightning.demo --video my_clip.mp4  # your own short video
    python -m vss_lightning.demo --smoke              # offline, CPU, tiny random backbone

Steps: the video (yours, or a short clip rendered here: a ball and a box moving over sky, hills and
a road) becomes WebDataset shards with `data_tools`, then `vss-lightning predict` labels it with
`configs/demo.yaml` (or `configs/smoke.yaml`) and writes label PNGs, colour previews, `DONE` and
`summary.json` under the output folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def render_clip(folder: Path, frames: int = 16, size: tuple[int, int] = (320, 512)) -> Path:
    """Render a short synthetic video as PNG frames in `folder/<video>/` and return that folder.

    Args:
        folder: where the video folder is created.
        frames: number of frames.
        size: (height, width).
    """
    h, w = size
    video = folder / "demo_clip"
    video.mkdir(parents=True, exist_ok=True)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vss_lightning.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--video", type=Path, help="a short video file (mp4, avi, mkv, webm); default: a rendered clip"
    )
    p.add_argument("--fps", type=float, default=10.0, help="frames per second taken from --video")
    p.add_argument("--smoke", action="store_true", help="offline CPU run with the tiny random backbone")
    p.add_argument(
        "--work_dir", type=Path, default=Path("outputs/demo_work"), help="frames and shards go here"
    )
    p.add_argument(
        "--output_dir", type=Path, default=None, help="labels go here (default outputs/demo[_smoke])"
    )
    args, extra = p.parse_known_args(argv)
    config = REPO / "configs" / ("smoke.yaml" if args.smoke else "demo.yaml")
    out = args.output_dir or Path("outputs/demo_smoke" if args.smoke else "outputs/demo")
    shards = args.work_dir / "shards"
    py = sys.executable
    if args.video is not None:
        convert = [py, "-m", "data_tools", "video", "--root", str(args.video), "--fps", str(args.fps)]
    else:
        small = dict(frames=8, size=(192, 320)) if args.smoke else {}  # the tiny backbone runs on a CPU
        frames = render_clip(args.work_dir / "frames", **small)
        convert = [py, "-m", "data_tools", "frames", "--root", str(frames)]
    convert += ["--out", str(shards / "demo-%06d.tar"), "--overwrite", "--quiet"]
    print("$", " ".join(convert), flush=True)
    rc = subprocess.call(convert, cwd=Path.cwd())
    if rc:
        return rc
    predict = [
        py,
        "-m",
        "vss_lightning",
        "predict",
        "--config",
        str(config),
        "--data.shards",
        str(shards),
        "--output_dir",
        str(out),
        "--write_previews",
        "true",
        *extra,
    ]
    print("$", " ".join(predict), flush=True)
    rc = subprocess.call(predict)
    if rc == 0:
        print(f"labels, previews and summary.json are in {out}/")
    elif not args.smoke:
        print(
            "No GPU or no hub access? Try the offline smoke run: python -m vss_lightning.demo --smoke",
            file=sys.stderr,
        )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
