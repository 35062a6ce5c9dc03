"""Speed and memory of the pipeline on the full-size random-weight SD 2.1-base architecture.

Random weights cost the same time and memory as the real checkpoint. Timings use CUDA events (or
perf_counter on CPU) after warm-up; medians of repeats. Measures, in one run:

- component floors: UNet forward ms/image and VAE decode ms/image at several batch sizes (best kept);
- the whole pipeline in seconds per frame, broken down by stage, with the number of labels present
  per frame, and the floor of that run: (6 + 12 L) UNet evaluations + 2 L decodes per frame at the
  best batch sizes, L = mean labels per frame (L = K = 20 gives the 246 + 40 of the issue);
- peak GPU memory.

Usage (GPU):  python bench/bench_pipeline.py --frames-dir ../shared/data/swan --out bench/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vss_lightning.pipeline.random_backbones import RandomStableDiffusion, TinyStableDiffusion  # noqa: E402
from vss_lightning.pipeline.segmenter import VideoSegmenter  # noqa: E402
from vss_lightning.pipeline.settings import ContextSettings, SpeedSettings  # noqa: E402


def _timer(device: torch.device):
    if device.type == "cuda":

        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0

    else:

        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    return run


def median_time(fn, device, warmup: int, repeats: int) -> float:
    timer = _timer(device)
    for _ in range(warmup):
        timer(fn)
    return statistics.median(timer(fn) for _ in range(repeats))


@torch.no_grad()
def component_floors(seg: VideoSegmenter, h: int, w: int, args) -> dict:
    bb = seg.sampler.bb
    dev, dt = bb.device, bb.dtype
    lat = (h // 8, w // 8)
    out: dict = {"unet_ms_per_image": {}, "vae_decode_ms_per_image": {}}
    for bs in args.unet_batches:
        x = torch.randn(bs, 4, *lat, device=dev, dtype=dt)
        emb = bb.cond_embedding.expand(bs, -1, -1)
        t = torch.tensor(119, device=dev)
        s = median_time(
            lambda x=x, emb=emb, t=t: bb.unet(x, t, encoder_hidden_states=emb), dev, args.warmup, args.repeats
        )
        out["unet_ms_per_image"][bs] = 1000 * s / bs
    for bs in args.vae_batches:
        z = torch.randn(bs, 4, *lat, device=dev, dtype=dt)
        s = median_time(lambda z=z: bb.vae.decode(z), dev, args.warmup, args.repeats)
        out["vae_decode_ms_per_image"][bs] = 1000 * s / bs
    out["unet_best_ms"] = min(out["unet_ms_per_image"].values())
    out["vae_best_ms"] = min(out["vae_decode_ms_per_image"].values())
    return out


def load_frames(args) -> torch.Tensor:
    if args.frames_dir and Path(args.frames_dir).is_dir():
        paths = sorted(p for p in Path(args.frames_dir).iterdir() if p.suffix.lower() in (".jpg", ".png"))
        paths = paths[: args.frames]
        arr = np.stack(
            [np.asarray(Image.open(p).convert("RGB").resize((args.width, args.height))) for p in paths]
        )
    else:
        g = np.random.default_rng(0)
        arr = g.integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["random", "tiny"], default="random")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--height", type=int, default=448)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--frames-dir", default=None, help="real frames (resized to --width x --height)")
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--max-batch-images", type=int, default=56)
    p.add_argument("--vae-batch-images", type=int, default=8)
    p.add_argument("--unet-batches", type=int, nargs="+", default=[14, 28, 56])
    p.add_argument("--vae-batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pipeline-repeats", type=int, default=2)
    p.add_argument("--no-prefix-reuse", action="store_true", help="recompute the UNet prefix (before/after)")
    p.add_argument("--compile-vae", action="store_true", help="torch.compile the VAE decoder")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bb = RandomStableDiffusion(dtype=args.dtype) if args.backbone == "random" else TinyStableDiffusion()
    seg = VideoSegmenter(
        backbone=bb,
        context=ContextSettings(batch_size=args.frames, num_clusters=args.clusters),
        speed=SpeedSettings(
            max_batch_images=args.max_batch_images,
            vae_batch_images=args.vae_batch_images,
            reuse_prefix=not args.no_prefix_reuse,
            compile_vae_decoder=args.compile_vae,
            channels_last=args.channels_last,
        ),
    ).load(device)
    frames = load_frames(args)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "size": [args.height, args.width],
        "frames": args.frames,
        "clusters": args.clusters,
        "max_batch_images": args.max_batch_images,
        "vae_batch_images": args.vae_batch_images,
        "prefix_reuse": not args.no_prefix_reuse,
        "compile_vae_decoder": args.compile_vae,
        "channels_last": args.channels_last,
        "date": time.strftime("%Y-%m-%d"),
        "input": "real frames " + args.frames_dir if args.frames_dir else "random frames",
    }
    result["floors"] = component_floors(seg, args.height, args.width, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for i in range(args.pipeline_repeats + 1):  # the first run is warm-up
        t0 = time.perf_counter()
        res = seg.segment(frames, key=f"bench:{i}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        if i > 0:
            runs.append((total, res))
    total, res = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    labels_per_frame = float(np.mean([len(res.coarse[t].unique()) for t in range(res.coarse.shape[0])]))
    fl = result["floors"]
    floor = (6 + 12 * labels_per_frame) * fl["unet_best_ms"] / 1000 + 2 * labels_per_frame * fl[
        "vae_best_ms"
    ] / 1000
    floor_k = (6 + 12 * args.clusters) * fl["unet_best_ms"] / 1000 + 2 * args.clusters * fl[
        "vae_best_ms"
    ] / 1000
    result["pipeline"] = {
        "seconds_per_frame": total / args.frames,
        "stage_seconds_per_frame": {k: v / args.frames for k, v in res.seconds.items()},
        "labels_per_frame": labels_per_frame,
        "floor_seconds_per_frame_at_measured_labels": floor,
        "ratio_to_floor": (total / args.frames) / floor,
        "floor_seconds_per_frame_at_K_labels": floor_k,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
