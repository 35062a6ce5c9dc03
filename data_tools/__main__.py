"""Command line: `python -m data_tools <source> --root SRC --out 'out/name-%06d.tar' [options]`."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import camvid, cityscapes, frames, video, vspw
from .common import ConversionError, Scan
from .writer import convert

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Parse a byte count such as `1000000`, `500M` or `1.5G` (K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not m or float(m[1]) * _UNITS[m[2].upper()] < 1:
        raise argparse.ArgumentTypeError(f"Expected a size such as 500M or 2G, but got {text!r}.")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m data_tools`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, required=True, help="the dataset folder (or video file)")
    common.add_argument("--out", required=True, help="shard path pattern, e.g. out/camvid-%%06d.tar")
    common.add_argument(
        "--shard-size",
        type=parse_size,
        default="256M",
        help="max bytes per shard, e.g. 500M, 2G (default 256M; one larger video gets its own)",
    )
    common.add_argument(
        "--max-videos-per-shard",
        type=int,
        default=0,
        help="max videos per shard (default 0: no limit); small values give many shards",
    )
    common.add_argument(
        "--max-frames-per-clip",
        type=int,
        default=0,
        help="split longer videos into consecutive clips (default 0: never)",
    )
    common.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="on bad input stop (fail, default) or leave the item out and list it (skip)",
    )
    common.add_argument("--overwrite", action="store_true", help="replace existing shards and manifest")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("vspw", parents=[common], help="VSPW: data/<video>/origin|mask + <split>.txt")
    p.add_argument("--split", required=True, choices=vspw.SPLITS)
    p = sub.add_parser("cityscapes", parents=[common], help="Cityscapes sequence snippets or images + gtFine")
    p.add_argument("--split", required=True, choices=cityscapes.SPLITS)
    p = sub.add_parser("camvid", parents=[common], help="CamVid SegNet 11-class, original 32-colour or flat")
    p.add_argument("--split", choices=("train", "val", "test"), help="for the split layouts only")
    p = sub.add_parser("frames", parents=[common], help="a folder of frames per video")
    p.add_argument("--labels", type=Path, help="label folder: <video>/<frame>.png class ids")
    p.add_argument(
        "--image-format",
        choices=("png", "jpg"),
        default="png",
        help="encoding for frames not stored as they are (bmp, tif); default png",
    )
    p = sub.add_parser("video", parents=[common], help="video files decoded with PyAV")
    p.add_argument("--fps", type=float, default=0.0, help="frames per second to keep (default 0: all)")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="frame encoding (jpg q95)")
    return parser


def scan_source(args: argparse.Namespace) -> Scan:
    """Scan the source named by the parsed arguments."""
    if args.source == "vspw":
        return vspw.scan(args.root, args.split)
    if args.source == "cityscapes":
        return cityscapes.scan(args.root, args.split)
    if args.source == "camvid":
        return camvid.scan(args.root, args.split)
    if args.source == "frames":
        return frames.scan(args.root, args.labels)
    return video.scan(args.root, args.fps, args.image_format)


def main(argv: list[str] | None = None) -> int:
    """Run a conversion; returns the exit status (0 done, 1 bad input or nothing written)."""
    args = build_parser().parse_args(argv)
    if not args.root.exists():
        print(f"error: Expected `--root` to exist, but got {str(args.root)!r}.", file=sys.stderr)
        return 1
    if args.max_videos_per_shard < 0 or args.max_frames_per_clip < 0:
        print(
            "error: Expected `--max-videos-per-shard` and `--max-frames-per-clip` to be >= 0, but got "
            f"{args.max_videos_per_shard} and {args.max_frames_per_clip}.",
            file=sys.stderr,
        )
        return 1
    try:
        manifest = convert(
            scan_source(args),
            args.out,
            shard_size=args.shard_size,
            max_videos_per_shard=args.max_videos_per_shard,
            max_frames_per_clip=args.max_frames_per_clip,
            on_error=args.on_error,
            image_format=getattr(args, "image_format", "png") if args.source == "frames" else "png",
            overwrite=args.overwrite,
            progress=not args.quiet,
            options={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{len(manifest['shards'])} shard(s): {manifest['videos']} videos ({manifest['clips']} clips), "
        f"{manifest['frames']} frames, {manifest['labelled_frames']} labelled; "
        f"{len(manifest['skipped'])} skipped, {len(manifest['ignored_files'])} files ignored "
        f"(see {Path(args.out % 0).parent / 'manifest.json'})",
        file=sys.stderr,
    )
    if not manifest["videos"]:
        print("error: Expected at least one video to be written, but all were skipped.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
