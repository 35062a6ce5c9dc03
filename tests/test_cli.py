"""The console scripts: config parsing, `--print_config`, the `lightning` hand-over to lightning-sdk,
and real `predict` runs in subprocesses (complete output, skip on rerun, kill and resume)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml
from PIL import Image
from shards import (
    SIZE,
    done_records,
    forked_cli,
    label_files,
    one_torch_thread,
    predict_args,
    reference_run,
    subprocess_env,
)

from vss_lightning import cli
from vss_lightning.data.datamodule import VideoShardDataModule
from vss_lightning.module import ZeroShotVSS
from vss_lightning.pipeline import backbone, random_backbones
from vss_lightning.pipeline.modulation import ModulationSettings
from vss_lightning.pipeline.segmenter import VideoSegmenter

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BIN = Path(sys.executable).parent
# In-process CLI calls pass `args` while pytest's own argv is set: Lightning warns, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

SHIPPED = ["vspw.yaml", "cityscapes.yaml", "camvid.yaml", "demo.yaml", "smoke.yaml"]


def _print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load a backbone fails the test."""

    def refuse(self, device="cpu"):
        raise AssertionError("weights were loaded")

    for cls in (
        backbone.StableDiffusion,
        random_backbones.TinyStableDiffusion,
        random_backbones.RandomStableDiffusion,
    ):
        monkeypatch.setattr(cls, "load", refuse)


@pytest.mark.parametrize("overlay", [None, "multinode.yaml"])
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_parses_fast_without_weights(name, overlay, capsys, no_weights):
    args = ["--config", str(CONFIGS / name)] + (["--config", str(CONFIGS / overlay)] if overlay else [])
    start = time.perf_counter()
    config = _print_config(capsys, *args)
    assert time.perf_counter() - start < 10
    assert config["output_dir"] and config["data"]["shards"]
    seg = config["model"]["segmenter"]
    assert seg["class_path"] == "vss_lightning.pipeline.segmenter.VideoSegmenter"
    real = name != "smoke.yaml"
    want = "backbone.StableDiffusion" if real else "random_backbones.TinyStableDiffusion"
    assert seg["init_args"]["backbone"]["class_path"] == f"vss_lightning.pipeline.{want}"
    if name in ("vspw.yaml", "cityscapes.yaml", "camvid.yaml"):
        assert (
            config["model"]["num_classes"]
            == {"vspw.yaml": 124, "cityscapes.yaml": 19, "camvid.yaml": 11}[name]
        )
        assert seg["init_args"]["backbone"]["init_args"]["dtype"] == "float16"
        assert config["trainer"]["accelerator"] == "gpu"
    if overlay:
        assert config["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.DDPStrategy"


def test_print_config_is_complete(capsys, no_weights):
    """Every constructor argument of the module, segmenter, modulation and data module is a config key."""
    config = _print_config(capsys, "--config", str(CONFIGS / "vspw.yaml"))

    def params(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    assert params(ZeroShotVSS) - {"on_error"} <= set(config["model"])  # on_error: the top-level key
    seg = config["model"]["segmenter"]["init_args"]
    assert params(VideoSegmenter) <= set(seg)
    hints = typing.get_type_hints(VideoSegmenter.__init__)
    groups = {
        name: c for name, hint in hints.items() for c in typing.get_args(hint) if dataclasses.is_dataclass(c)
    }
    assert ModulationSettings in groups.values() and len(groups) == 7  # frames ... speed, by stage
    for name, cls in groups.items():  # every group is printed in full: it reads like the method
        assert {f.name for f in dataclasses.fields(cls)} == set(seg[name]), name
    assert params(VideoShardDataModule) - {"on_error"} <= set(config["data"])
    for key in ("output_dir", "output_format", "write_previews", "on_error", "videos_per_shard"):
        assert key in config


def test_command_line_contract_and_errors(capsys, no_weights):
    config = _print_config(
        capsys, "--config", str(CONFIGS / "smoke.yaml"), "--data.shards", "x/{000000..000003}.tar",
        "--output_dir", "o", "--output_format", "shards", "--model.label_mode", "first_frame_gt",
        "--write_previews", "--on_error", "fail",
    )  # fmt: skip
    assert config["data"]["shards"] == "x/{000000..000003}.tar" and config["output_dir"] == "o"
    assert config["output_format"] == "shards" and config["write_previews"] is True
    assert config["model"]["label_mode"] == "first_frame_gt" and config["on_error"] == "fail"
    with pytest.raises(SystemExit):
        cli.main(
            ["predict", "--config", str(CONFIGS / "smoke.yaml"), "--output_format", "jpg", "--print_config"]
        )
    assert "output_format" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(CONFIGS / "smoke.yaml")])
    assert exit_info.value.code == 2
    assert "training-free" in capsys.readouterr().err


def _fake_sdk(root: Path) -> Path:
    pkg = root / "lightning_sdk" / "cli"
    pkg.mkdir(parents=True)
    (root / "lightning_sdk" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "entrypoint.py").write_text(
        "import sys\n\ndef main_cli():\n    print('FAKE-SDK', sys.argv[1:])\n    return 7\n"
    )
    return root


def test_lightning_script_hands_other_subcommands_to_lightning_sdk(tmp_path):
    lightning = str(BIN / "lightning")
    env = subprocess_env(PYTHONPATH=str(_fake_sdk(tmp_path / "sdk")))
    out = subprocess.run(
        [lightning, "login", "--name", "x"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 7 and "FAKE-SDK ['login', '--name', 'x']" in out.stdout
    # Without the SDK: a clear error that lists our subcommands.
    out = subprocess.run(
        [lightning, "login"], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "predict, test, validate" in out.stderr and "lightning-sdk" in out.stderr
    out = subprocess.run([lightning, "fit"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "training-free" in out.stderr and "FAKE-SDK" not in out.stdout


def test_python_dash_m_runs_the_cli():
    """`python -m vss_lightning` is the same CLI as the scripts (help comes from the fast path)."""
    proc = subprocess.run([sys.executable, "-m", "vss_lightning", "predict", "--help"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: vss-lightning") and "--model.segmenter" in proc.stdout


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_predict_rerun_skips_and_a_killed_run_resumes(tmp_path, tmp_path_factory, monkeypatch):
    # 1. `predict` (run once per session by `reference_run`): every frame labelled at
    #    its frame's size, one DONE per video with its frame count.
    videos, shards, out = reference_run(tmp_path_factory.getbasetemp())
    expected = {f"{v}/{name}.png" for v, video in videos.items() for name in video.names}
    labels = label_files(out)
    assert set(labels) == expected
    for rel in labels:
        img = Image.open(out / rel)
        assert img.mode == "L" and img.size == SIZE[::-1]
    assert {v: d["frames"] for v, d in done_records(out).items()} == {
        v: len(x.frames) for v, x in videos.items()
    }
    n_frames = sum(len(v.frames) for v in videos.values())
    total = _summary(out)["total"]
    assert (total["videos"], total["clips"], total["frames"], total["failed"]) == (
        len(videos),
        9,
        n_frames,
        0,
    )

    # 2. `lightning predict` into the same folder: everything is skipped, nothing rewritten.
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in labels}
    with monkeypatch.context() as m:  # in this process (the script's own start is tested elsewhere)
        m.setattr(sys, "argv", ["lightning", *predict_args(shards, out)])
        with one_torch_thread():
            cli.lightning_main()
    total = _summary(out)["total"]
    assert (total["videos"], total["skipped_videos"], total["skipped_frames"]) == (0, len(videos), n_frames)
    assert {rel: (out / rel).stat().st_mtime_ns for rel in labels} == mtimes

    # 3. A job SIGKILLed once the first video is done (a forked child of this process: no interpreter
    #    start to wait for), then run again.
    resumed = tmp_path / "resumed"
    proc = forked_cli(predict_args(shards, resumed), tmp_path / "killed.log")
    deadline = time.monotonic() + 180
    while not list(resumed.glob("*/DONE")) and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    done_at_kill = len(list(resumed.glob("*/DONE")))
    assert 1 <= done_at_kill < len(videos), "the run should have been killed midway"
    with one_torch_thread():
        cli.main(predict_args(shards, resumed))  # the restart, in this process
    total = _summary(resumed)["total"]
    assert total["skipped_videos"] == done_at_kill and total["videos"] == len(videos) - done_at_kill
    assert label_files(resumed) == labels  # no missing, no extra frame; the same bytes as uninterrupted
    assert not [p for p in resumed.rglob("*") if p.name.endswith(".tmp")]
    assert len(done_records(resumed)) == len(videos)


def test_sigterm_stops_after_the_current_video(tmp_path, tmp_path_factory):
    """Lightning's predict loop ignores SIGTERM; the writer stops the job after the sample in hand."""
    videos, shards, _ = reference_run(tmp_path_factory.getbasetemp())
    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = forked_cli(predict_args(shards, out), log)  # a whole job in a forked child of this process
    deadline = time.monotonic() + 180
    while not list(out.glob("*/DONE")) and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.terminate()  # SIGTERM
    proc.join(timeout=120)
    assert proc.exitcode == 143, log.read_text()[-2000:]
    (rank_file,) = out.glob("summary-rank0-*.json")  # one run so far
    rank = json.loads(rank_file.read_text())
    assert rank["interrupted"] and rank["videos"] < len(videos)
    assert 1 <= len(done_records(out)) <= rank["videos"]  # a video in clips may stop between clips
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_predict_needs_an_output_dir(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--config", str(CONFIGS / "smoke.yaml"), "--output_dir", ""])
    assert "Expected `--output_dir` to be set" in capsys.readouterr().err


def test_help_lists_our_subcommands_only(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "predict" in text and "validate" in text and "{fit" not in text and "fit," not in text
