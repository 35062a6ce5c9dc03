"""`bench/bench_e2e.py --smoke`: the end-to-end benchmark (issue #19) runs through the real predict path
on the CPU and writes results.json with the fields BENCHMARKS.md quotes."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_e2e.py"
SWAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "swan"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ping_pong_repeats_the_clip_forwards_then_backwards():
    bench = load_script()
    assert bench.ping_pong(4, 10) == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert bench.ping_pong(14, 84)[:16] == [*range(14), 12, 11]
    assert len(bench.ping_pong(14, 84)) == 84
    assert bench.parse_size("832x448") == (832, 448)


@pytest.mark.slow  # 15-20 s on 2 cores: a benchmark script, run with -m slow
@pytest.mark.skipif(not SWAN.is_dir(), reason="needs the swan frames in ../shared/data/swan")
def test_smoke_run_writes_results(tmp_path):
    bench = load_script()
    out, work = tmp_path / "out", tmp_path / "work"
    result = bench.main(["--smoke", "--out", str(out), "--workdir", str(work), "--keep"])
    data = json.loads((out / "results.json").read_text())
    assert data["frames"] == result["frames"]
    assert (out / "results.md").read_text().startswith("| device |")

    # frames == what the shards hold
    with tarfile.open(work / "shards" / "bench-000000.tar") as tar:
        jpgs = [m.name for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert data["frames"] == data["summary_frames"] == len(jpgs) == sum(data["videos"].values()) == 6
    assert len([p for p in (work / "labels").glob("*/*.png")]) == 6

    assert data["smoke"] is True and data["backbone"] == "TinyStableDiffusion"
    assert data["seconds_per_frame"] > 0 and data["loop_seconds_per_frame"] > 0
    assert data["seconds_per_frame"] == pytest.approx(data["predict_wall_seconds"] / data["frames"])
    stages = data["stage_seconds_per_frame"]
    for key in ("encode", "features", "context", "cbr", "modulation", "resize", "png_write", "loop_other"):
        assert stages[key] >= 0, key
    assert stages["modulation"] > 0
    assert data["peak_memory_gib"] is None  # CPU
    # the floor is measured on any device (bench_pipeline.component_floors); null only with --no_floor
    assert data["floor_evaluations_per_frame"] == {"unet": 6 + 12 * 4, "vae_decode": 2 * 4}
    assert data["floor_seconds_per_frame"] > 0
    assert data["ratio_to_floor"] == pytest.approx(
        data["seconds_per_frame"] / data["floor_seconds_per_frame"]
    )
    assert data["segmenter_only"]["frames"] == 2 and data["segmenter_only"]["seconds_per_frame"] > 0
