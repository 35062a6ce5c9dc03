"""CPU figures of the offline path: the smoke config labelling real CamVid frames end to end.

    python bench/bench_smoke_cpu.py [--frames 30] [--camvid ../shared/data/camvid/0006R0]

Converts the first `--frames` CamVid frames (480x360) into a shard with data_tools, runs
`python -m vss_lightning predict --config configs/smoke.yaml` on it in a fresh process (the real
command: start-up, Lightning, PNG writing), and reports the wall-clock time of the whole command,
the labelling seconds and frames/s from its summary.json, and the time of an uncached and a cached
`predict --help`. Writes the JSON to `bench/results/smoke_cpu-<date>.json`. Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--camvid", type=Path, default=ROOT.parent / "shared" / "data" / "camvid" / "0006R0")
    args = parser.parse_args()
    images = sorted((args.camvid / "images").glob("*.png"))[: args.frames]
    if not images:
        raise SystemExit(f"error: no CamVid frames under {args.camvid / 'images'}; pass --camvid DIR.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = tmp / "frames" / args.camvid.name
        video.mkdir(parents=True)
        for p in images:
            (video / p.name).symlink_to(p.resolve())
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", VSS_LIGHTNING_CACHE=str(tmp / "cache")
        )
        py = sys.executable
        convert = [py, "-m", "data_tools", "frames", "--root", str(tmp / "frames"),
                   "--out", str(tmp / "shards" / "s-%06d.tar"), "--quiet"]  # fmt: skip
        subprocess.run(convert, check=True, env=env, cwd=ROOT)
        help_cmd = [py, "-m", "vss_lightning", "predict", "--config", "configs/smoke.yaml", "--help"]
        help_first, _ = _timed(help_cmd, env)
        help_cached, _ = _timed(help_cmd, env)
        wall, done = _timed([py, "-m", "vss_lightning", "predict", "--config", "configs/smoke.yaml",
                             "--data.shards", str(tmp / "shards"), "--output_dir", str(tmp / "out"),
                             "--trainer.enable_progress_bar", "false"], env)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"error: the smoke run failed:\n{done.stderr[-3000:]}")
        total = json.loads((tmp / "out" / "summary.json").read_text())["total"]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "frames": total["frames"],
        "frame_size": "480x360 (resized to 448x320)",
        "command_wall_s": round(wall, 2),
        "labelling_s": round(total["seconds"], 2),
        "frames_per_s": round(total["frames_per_second"], 3),
        "help_first_s": round(help_first, 2),
        "help_cached_s": round(help_cached, 2),
    }
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / f"smoke_cpu-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
