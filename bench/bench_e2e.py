"""End to end through `vss-lightning predict` (issue #19): the real command path, PNG output, one device.

    python bench/bench_e2e.py --out bench/results/e2e-832x448                 # GPU, the paper's settings
    python bench/bench_e2e.py --size 1280x704 --out bench/results/e2e-1280x704
    python bench/bench_e2e.py --max_batch_images 16 --out bench/results/e2e-24gb   # a 24 GB budget
    python bench/bench_e2e.py --profile --out bench/results/e2e-profile        # + torch.profiler tables
    python bench/bench_e2e.py --smoke --out /tmp/e2e-smoke                     # CPU, tiny backbone, ~30 s

What it does, in one process:

1. Writes a WebDataset shard (`vss_lightning.data.format.encode_sample`, `webdataset.TarWriter`, as
   tests/shards.py does) holding an 84-frame and a 14-frame video made from the 14 JPEGs of the DAVIS
   swan clip (../shared/data/swan): frames played forwards then backwards (0..13, 12..1, 0..13, ...;
   "ping-pong") up to the video's length, resized to `--size` (bicubic) and stored as JPEG (quality 95).
2. Writes a predict config: configs/vspw.yaml (the paper's settings: B = 14, K = 20, CBR, masked
   modulation, fp16) with the backbone replaced by the full-size random-weight SD 2.1-base
   (`RandomStableDiffusion`, same cost as the real checkpoint), `label_mode: cluster` (no ground
   truth), PNG output, `on_error: fail`, and the `--max_batch_images` / `--vae_batch_images` budget.
3. Runs `vss_lightning.cli.main(["predict", "--config", ...])` in this process (exactly what the
   `vss-lightning predict` console script runs), timed by the wall clock. The per-video pipeline
   results (seconds, per-stage seconds: encode, features, context, cbr, modulation (with its parts
   modulation_unet, modulation_decode, modulation_scoring), resize) and the
   time of the writer's PNG writes are recorded by wrapping `PseudoLabelWriter.handle` for the
   duration of the call (nothing in the package is changed); summary.json gives the labelling loop's
   seconds and frame count.
4. With the same loaded segmenter: the segmenter-only time of the 14-frame video
   (`VideoSegmenter.segment`, no Lightning, no data loading, no writing), and the component floors of
   bench/bench_pipeline.py (`component_floors`: UNet forward and VAE decode ms/image, best over batch
   sizes up to the run's budget). Floor per frame = (6 + 12 L) UNet evaluations + 2 L decodes; at
   L = K = 20 that is the issue's 246 + 40. Also given at L = the labels present per frame in the
   written PNGs.
5. Reports s/frame end to end (wall time of the predict call / frames), s/frame of the labelling loop,
   per-stage s/frame, the unaccounted rest (JPEG decode and resize in the loader, Lightning, idle
   device time), peak GPU memory (`torch.cuda.max_memory_allocated`), the floor and the ratio end to
   end / floor. `--out DIR` writes results.json and results.md (a table row for BENCHMARKS.md);
   `--profile` wraps the predict call in torch.profiler and writes profile.txt (key_averages, top 30 by
   CUDA time, self and total; by CPU time on a CPU). A profiled run is slower: do not quote its times.

`--smoke`: CPU, `TinyStableDiffusion` (configs/smoke.yaml), two videos of 4 and 2 frames at 192x128,
K = 4, B = 4, one floor repeat, torch on one thread: tests the script itself without a GPU
(tests/test_bench_e2e.py); its times mean nothing.
Results: BENCHMARKS.md, "End to end through lightning predict (#19)".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SWAN = ROOT.parent / "shared" / "data" / "swan"
FRAMES_SOURCE = (
    "the 14 JPEGs of the DAVIS swan clip played forwards then backwards (0..13, 12..1, 0..13, ...) up to "
    "each video's length, resized (bicubic) to {w}x{h}, stored as JPEG quality 95"
)


def parse_size(text: str) -> tuple[int, int]:
    """'832x448' -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"Expected a size WIDTHxHEIGHT such as 832x448, got {text!r}."
        ) from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"Expected a size of at least 64x64, got {text!r}.")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT (832x448; also 1280x704)")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="frames per video (84 14)")
    p.add_argument("--clusters", type=int, default=None, help="K (20)")
    p.add_argument("--max_batch_images", type=int, default=None, help="speed.max_batch_images (56)")
    p.add_argument("--vae_batch_images", type=int, default=None, help="speed.vae_batch_images (8)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--num_workers", type=int, default=None, help="data.num_workers (4; smoke 0)")
    p.add_argument("--swan", type=Path, default=SWAN, help="folder of the swan JPEGs")
    p.add_argument("--workdir", type=Path, default=None, help="shards and labels here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the shards and labels (with --workdir)")
    p.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    p.add_argument("--profile", action="store_true", help="torch.profiler over the predict call")
    p.add_argument("--no_floor", action="store_true", help="skip the component floors")
    p.add_argument("--no_segmenter_only", action="store_true", help="skip the segmenter-only timing")
    p.add_argument("--floor_warmup", type=int, default=None, help="floor warm-ups (2; smoke 1)")
    p.add_argument("--floor_repeats", type=int, default=None, help="floor repeats (5; smoke 2)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny backbone, 4 + 2 frames at 192x128, K 4")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults of the GPU run or of the smoke run."""
    smoke = args.smoke
    defaults = {
        "size": (192, 128) if smoke else (832, 448),
        "frames": [4, 2] if smoke else [84, 14],
        "clusters": 4 if smoke else 20,
        "max_batch_images": 16 if smoke else 56,
        "vae_batch_images": 8,
        "num_workers": 0 if smoke else 4,
        "floor_warmup": 1 if smoke else 2,
        "floor_repeats": 1 if smoke else 5,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# -- input -------------------------------------------------------------------------------------------
def ping_pong(n_source: int, length: int) -> list[int]:
    """Source frame indices 0..n-1, n-2..1, 0..n-1, ... of `length` frames."""
    period = list(range(n_source)) + list(range(n_source - 2, 0, -1)) if n_source > 1 else [0]
    return [period[i % len(period)] for i in range(length)]


def swan_frames(folder: Path, size: tuple[int, int]) -> list[bytes]:
    """The swan JPEGs resized to `size` (W, H), re-encoded as JPEG."""
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"error: no frames under {folder}; pass --swan DIR (the 14 swan JPEGs).")
    out = []
    for p in paths:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def write_shards(folder: Path, videos: dict[str, int], jpegs: list[bytes], size: tuple[int, int]) -> Path:
    """One shard holding each video (id -> frame count) as one sample; returns the shard path."""
    import webdataset as wds

    from vss_lightning.data.format import VideoMeta, encode_sample

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench-000000.tar"
    w, h = size
    with wds.TarWriter(str(path), encoder=False) as tar:
        for vid, n in videos.items():
            idx = ping_pong(len(jpegs), n)
            meta = VideoMeta(
                video_id=vid,
                frame_names=[f"{vid}_{t:05d}" for t in range(n)],
                sizes=[(h, w)] * n,
                source="bench_e2e: swan ping-pong",
            )
            tar.write(encode_sample(meta, [(jpegs[i], "jpg") for i in idx]))
    return path


def decoded_frames(jpegs: list[bytes], n: int):
    """(n, 3, H, W) uint8 tensor of the ping-pong video (for the segmenter-only timing)."""
    import numpy as np
    import torch
    from PIL import Image

    arr = np.stack(
        [np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB")) for i in ping_pong(len(jpegs), n)]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# -- config ------------------------------------------------------------------------------------------
def predict_config(args: argparse.Namespace, shards: str, labels: Path, cuda: bool) -> dict[str, Any]:
    """The predict config: vspw.yaml (smoke.yaml with --smoke) with the bench's backbone and budget."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / ("smoke.yaml" if args.smoke else "vspw.yaml")).read_text())
    model = cfg["model"]
    seg = model["segmenter"]["init_args"]
    if args.smoke:
        seg["context"].update(batch_size=4, num_clusters=args.clusters)
    else:
        seg["backbone"] = {
            "class_path": "vss_lightning.pipeline.random_backbones.RandomStableDiffusion",
            "init_args": {"seed": 0, "dtype": args.dtype},
        }
        seg["context"]["num_clusters"] = args.clusters
        model["label_mode"] = "cluster"  # no ground truth in the bench shards
        for key in ("num_classes", "class_names"):  # VSPW's, for first_frame_gt / open_vocab only
            model.pop(key, None)
    seg.setdefault("speed", {}).update(
        max_batch_images=args.max_batch_images, vae_batch_images=args.vae_batch_images
    )
    cfg["trainer"].update(accelerator="gpu" if cuda else "cpu", devices=1, enable_progress_bar=False)
    cfg["trainer"].pop("num_nodes", None)
    cfg["data"] = {"shards": shards, "num_workers": args.num_workers}
    cfg.update(output_dir=str(labels), output_format="png", write_previews=False, on_error="fail")
    return cfg


# -- recording ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def recording():
    """Record each result the writer handles (seconds, stage seconds, write time) and the module."""
    from vss_lightning.io.summary import VideoLabels
    from vss_lightning.io.writer import PseudoLabelWriter

    rec: dict[str, Any] = {"videos": [], "module": None}
    handle, setup = PseudoLabelWriter.handle, PseudoLabelWriter.setup

    def timed_handle(self, result, sample=None, **kwargs):
        t0 = time.perf_counter()
        out = handle(self, result, sample, **kwargs)
        write_s = time.perf_counter() - t0
        entry = {"type": type(result).__name__, "write_seconds": write_s}
        if isinstance(result, VideoLabels):
            entry.update(
                video_id=result.meta.video_id,
                frames=result.frames,
                seconds=result.seconds,
                retried_oom=result.retried,
                stage_seconds=dict(result.stage_seconds),
            )
        rec["videos"].append(entry)
        return out

    def capturing_setup(self, trainer, pl_module, stage):
        rec["module"] = pl_module
        return setup(self, trainer, pl_module, stage)

    PseudoLabelWriter.handle, PseudoLabelWriter.setup = timed_handle, capturing_setup
    try:
        yield rec
    finally:
        PseudoLabelWriter.handle, PseudoLabelWriter.setup = handle, setup


def profile_tables(prof, cuda: bool) -> str:
    """key_averages tables, top 30: by self and total CUDA time (CPU time on a CPU)."""
    ka = prof.key_averages()
    parts = []
    keys = ("self_cuda_time_total", "cuda_time_total") if cuda else ("self_cpu_time_total", "cpu_time_total")
    for key in keys:
        try:
            table = ka.table(sort_by=key, row_limit=30)
        except (KeyError, AttributeError, ValueError):  # newer torch names it device_time
            table = ka.table(sort_by=key.replace("cuda", "device"), row_limit=30)
        parts.append(f"== key_averages sorted by {key}, top 30 ==\n{table}")
    return "\n\n".join(parts) + "\n"


def labels_per_frame(labels: Path) -> float | None:
    """Mean count of distinct label ids per written PNG (previews excluded)."""
    import numpy as np
    from PIL import Image

    counts = [
        len(np.unique(np.asarray(Image.open(p))))
        for p in sorted(labels.glob("*/*.png"))
        if not p.name.endswith(".preview.png")
    ]
    return float(np.mean(counts)) if counts else None


def floor_per_frame(unet_ms: float, vae_ms: float, labels: float) -> float:
    """(6 + 12 L) UNet evaluations + 2 L decodes per frame, in seconds (bench_pipeline's floor)."""
    return ((6 + 12 * labels) * unet_ms + 2 * labels * vae_ms) / 1000


# -- the run -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_environment(smoke: bool):
    """Offline, W&B off, and (smoke) torch on one thread; all restored after (the test runs in-process)."""
    import torch

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "WANDB_MODE")}
    threads = torch.get_num_threads()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if smoke:
        torch.set_num_threads(1)  # tiny models on a small shared CPU: more threads only thrash
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with run_environment(args.smoke):
        return _run(args, work)


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    import yaml

    from vss_lightning import cli

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    bench_pipeline = importlib.import_module("bench_pipeline")  # the component floors, not duplicated

    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    w, h = args.size
    videos = {f"swan{n}_{i}": n for i, n in enumerate(args.frames)}
    jpegs = swan_frames(args.swan, args.size)
    shard = write_shards(work / "shards", videos, jpegs, args.size)
    labels = work / "labels"
    cfg = predict_config(args, str(shard), labels, cuda)
    cfg_path = work / "bench_e2e.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = ["predict", "--config", str(cfg_path)]

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    prof_ctx: Any = contextlib.nullcontext()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof_ctx = profile(activities=acts)
    saved_argv = sys.argv
    # As the console script: `vss-lightning predict ...` is `cli.main()` reading sys.argv.
    sys.argv = ["vss-lightning", *argv]
    try:
        with recording() as rec, prof_ctx as prof:
            t0 = time.perf_counter()
            cli.main()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    finally:
        sys.argv = saved_argv
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    peak_reserved = torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else None

    summary = json.loads((labels / "summary.json").read_text())["total"]
    done = [v for v in rec["videos"] if v["type"] == "VideoLabels"]
    frames = sum(v["frames"] for v in done)
    expected = sum(args.frames)
    if frames != expected or summary["frames"] != expected or summary["failed"]:
        raise SystemExit(
            f"error: expected {expected} frames labelled, but the run labelled {frames} (summary.json: "
            f"{summary['frames']} frames, {summary['failed']} failed)."
        )
    from vss_lightning.pipeline.context import CONTEXT_CLOCKS
    from vss_lightning.pipeline.modulation import MODULATION_CLOCKS

    stages: dict[str, float] = {}
    for v in done:
        for k, s in v["stage_seconds"].items():
            stages[k] = stages.get(k, 0.0) + s
    pipeline_s = sum(v["seconds"] for v in done)
    write_s = sum(v["write_seconds"] for v in rec["videos"])
    loop_s = float(summary["seconds"])
    per_frame = {k: s / frames for k, s in stages.items()}
    per_frame["png_write"] = write_s / frames
    # the context and modulation parts are inside their stages: not added again
    parts = (*CONTEXT_CLOCKS, *MODULATION_CLOCKS)
    top_level = sum(s for k, s in stages.items() if k not in parts)
    per_frame["pipeline_other"] = max(pipeline_s - top_level, 0.0) / frames
    per_frame["loop_other"] = max(loop_s - pipeline_s - write_s, 0.0) / frames

    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} CPUs)",
        "machine": f"{platform.machine()}, {platform.platform()}",
        "torch": torch.__version__,
        "command": "vss-lightning predict --config <bench_e2e.yaml> (cli.main() in-process, sys.argv set)",
        "config": cfg["model"]["segmenter"]["init_args"],
        "backbone": cfg["model"]["segmenter"]["init_args"]["backbone"]["class_path"].rsplit(".", 1)[-1],
        "smoke": args.smoke,
        "profiled": args.profile,
        "size": f"{w}x{h}",
        "videos": videos,
        "input": FRAMES_SOURCE.format(w=w, h=h),
        "clusters": args.clusters,
        "max_batch_images": args.max_batch_images,
        "vae_batch_images": args.vae_batch_images,
        "frames": frames,
        "summary_frames": summary["frames"],
        "retried_oom": summary["retried_oom"],
        "predict_wall_seconds": wall,
        "labelling_loop_seconds": loop_s,
        "startup_and_teardown_seconds": wall - loop_s,
        "seconds_per_frame": wall / frames,
        "loop_seconds_per_frame": loop_s / frames,
        "pipeline_seconds_per_frame": pipeline_s / frames,
        "stage_seconds_per_frame": per_frame,
        "stage_notes": {
            "encode..resize": "the segmenter's own stage clocks (CUDA-synchronised), summed over videos",
            "modulation_unet, modulation_decode, modulation_scoring": "parts of `modulation` (the units' "
            "UNet runs, their VAE decodes, difference maps and argmax); `modulation` is their total",
            "png_write": "PseudoLabelWriter.handle per video: PNG encoding, atomic writes, DONE, summary",
            "pipeline_other": "a video's pipeline seconds outside the stages (label copies, prototypes)",
            "loop_other": "labelling loop minus pipeline and writes: JPEG decode/resize in the loader, "
            "Lightning, idle device time",
        },
        "per_video": done,
        "peak_memory_gib": peak,
        "peak_reserved_gib": peak_reserved,
        "labels_per_frame_in_pngs": labels_per_frame(labels),
    }

    seg = rec["module"].segmenter if rec["module"] is not None else None
    if seg is not None and not args.no_segmenter_only:
        n = min(args.frames)
        x = decoded_frames(jpegs, n)
        t0 = time.perf_counter()
        res = seg.segment(x, key="bench_e2e:segmenter_only")
        if cuda:
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        result["segmenter_only"] = {
            "frames": n,
            "seconds_per_frame": s / n,
            "stage_seconds_per_frame": {k: v / n for k, v in res.seconds.items()},
            "note": "VideoSegmenter.segment on the decoded frames of the shortest video, after the run",
        }
    if seg is not None and not args.no_floor:
        budget = args.max_batch_images
        vae_budget = args.vae_batch_images
        fargs = SimpleNamespace(  # bench_pipeline's batch sizes within the run's budget (smoke: the budget)
            unet_batches=sorted({b for b in (14, 28, 56) if b <= budget and not args.smoke} | {budget}),
            vae_batches=sorted({b for b in (1, 4, 8) if b <= vae_budget and not args.smoke} | {vae_budget}),
            warmup=args.floor_warmup,
            repeats=args.floor_repeats,
        )
        fl = bench_pipeline.component_floors(seg, h, w, fargs)
        floor_k = floor_per_frame(fl["unet_best_ms"], fl["vae_best_ms"], args.clusters)
        lpf = result["labels_per_frame_in_pngs"]
        floor_l = floor_per_frame(fl["unet_best_ms"], fl["vae_best_ms"], lpf) if lpf else None
        result["floors"] = fl
        result["floor_seconds_per_frame"] = floor_k
        result["floor_evaluations_per_frame"] = {
            "unet": 6 + 12 * args.clusters,
            "vae_decode": 2 * args.clusters,
        }
        result["ratio_to_floor"] = result["seconds_per_frame"] / floor_k
        result["loop_ratio_to_floor"] = result["loop_seconds_per_frame"] / floor_k
        result["floor_seconds_per_frame_at_png_labels"] = floor_l
        result["ratio_to_floor_at_png_labels"] = result["seconds_per_frame"] / floor_l if floor_l else None
    else:
        result.update(
            floors=None, floor_seconds_per_frame=None, ratio_to_floor=None, loop_ratio_to_floor=None
        )
    if args.profile:
        result["profile_table"] = profile_tables(prof, cuda)
    return result


def markdown(r: dict[str, Any]) -> str:
    """A table row (with its header) for BENCHMARKS.md."""

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "-" if v is None else fmt.format(v)

    st = r["stage_seconds_per_frame"]
    names = ["encode", "features", "context", "cbr", "modulation", "modulation_unet", "modulation_decode"]
    names += ["modulation_scoring", "resize", "png_write", "loop_other"]
    head = (
        "| device | size | max_batch_images | frames | s/frame end to end | loop s/frame "
        "| segmenter-only s/frame | floor s/frame (K) | ratio | " + " | ".join(names) + " | peak GPU memory |"
    )
    sep = "|" + "---|" * (10 + len(names))
    seg_only = (r.get("segmenter_only") or {}).get("seconds_per_frame")
    row = (
        f"| {r['device']} | {r['size']} | {r['max_batch_images']} | {r['frames']} | "
        f"**{f(r['seconds_per_frame'])}** | {f(r['loop_seconds_per_frame'])} | {f(seg_only)} | "
        f"{f(r['floor_seconds_per_frame'])} | {f(r['ratio_to_floor'], '{:.2f}')} | "
        + " | ".join(f(st.get(k)) for k in names)
        + f" | {f(r['peak_memory_gib'], '{:.1f} GiB')} |"
    )
    dtype = r["config"]["backbone"].get("init_args", {}).get("dtype")
    notes = (
        f"\n{r['date']}, torch {r['torch']}, {r['backbone']} ({dtype}), K = {r['clusters']}, "
        f"videos {r['videos']}: {r['input']}. Start-up and teardown of the predict call: "
        f"{r['startup_and_teardown_seconds']:.1f} s. Stage columns are s/frame."
        + (" Profiled run (slower)." if r["profiled"] else "")
        + "\n"
    )
    return "\n".join([head, sep, row]) + "\n" + notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = resolve(build_parser().parse_args(argv))
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
            if (work / "labels").exists() and any((work / "labels").iterdir()):
                raise SystemExit(f"error: {work / 'labels'} is not empty (a resumed run skips every video).")
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_e2e-")))
        result = run(args, work)
        if args.workdir is not None and not args.keep:
            import shutil

            shutil.rmtree(work / "labels", ignore_errors=True)
            shutil.rmtree(work / "shards", ignore_errors=True)
    table = result.pop("profile_table", None)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    md = markdown(result)
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(text + "\n")
        (args.out / "results.md").write_text(md)
        if table is not None:
            (args.out / "profile.txt").write_text(table)
    return result


if __name__ == "__main__":
    main()
