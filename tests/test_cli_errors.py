"""A user's mistakes end in one or two lines naming the input and the fix (no traceback), exit statuses
say what happened, and summary.json keeps every run's figures (issue 20)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shards import CONFIGS, make_video, one_thread, predict_args, subprocess_env, video_samples, write_shard  # noqa: F401

from vss_lightning import cli
from vss_lightning.io.summary import with_earlier_runs


def _run(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, list[str]]:
    """Exit status and stderr lines of `vss-lightning <args>` (in process)."""
    code = 0
    try:
        cli.main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _run_out(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str]:
    """Exit status and stdout of `vss-lightning <args>` (in process)."""
    code = 0
    try:
        cli.main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().out


def _short(lines: list[str]) -> str:
    """The one `error:` line of a short message (at most one more line after it), no traceback."""
    assert not any("Traceback" in line for line in lines), lines
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) - errors[0] <= 2, lines
    return lines[errors[0]]


@pytest.fixture
def shard(tmp_path: Path) -> str:
    write_shard(tmp_path / "s-000000.tar", video_samples(make_video("v0", 2, size=(64, 96))))
    return str(tmp_path / "s-000000.tar")


@pytest.mark.parametrize(
    ("option", "suggestion"),
    [
        (["--model.label_mod", "cluster"], "--model.label_mode"),  # also: no silent prefix matching
        (["--outptu_dir", "x"], "--output_dir"),
        (["--model.segmenter.init_args.context.num_cluster", "3"],
         "--model.segmenter.init_args.context.num_clusters"),
        # a key of the flat settings before they were grouped by stage (issue 14) finds its group
        (["--model.segmenter.init_args.max_batch_images", "3"],
         "--model.segmenter.init_args.speed.max_batch_images"),
        (["--model.segmenter.init_args.modulation.strenght", "3"],
         "--model.segmenter.init_args.modulation.strength"),
    ],
)  # fmt: skip
def test_a_misspelled_key_is_one_line_with_did_you_mean(capsys, tmp_path, option, suggestion):
    code, lines = _run(
        capsys, ["predict", "--config", str(CONFIGS / "smoke.yaml"), "--output_dir", str(tmp_path), *option]
    )
    assert code == cli.EXIT_USAGE
    assert len(lines) == 2, lines  # the error, and where the options are listed
    assert lines[0].startswith("error: ") and f"Did you mean `{suggestion}`?" in lines[0]
    assert "--help lists every option" in lines[1]


def test_a_missing_shard_path_names_it(capsys, tmp_path):
    missing = str(tmp_path / "nope" / "*.tar")
    code, lines = _run(capsys, predict_args(missing, tmp_path / "out"))
    assert code == cli.EXIT_ERROR
    error = _short(lines)
    assert "--data.shards" in error and "nope" in error


def test_an_output_dir_that_is_a_file_is_refused(capsys, tmp_path, shard):
    target = tmp_path / "a-file"
    target.write_text("x")
    code, lines = _run(capsys, predict_args(shard, target))
    assert code == cli.EXIT_USAGE
    error = _short(lines)
    assert "is a file" in error and str(target) in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_gpu_config_on_a_machine_without_gpu_says_how_to_go_on(capsys, tmp_path, shard):
    code, lines = _run(capsys, ["predict", "--config", str(CONFIGS / "camvid.yaml"), "--data.shards", shard,
                                "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert code == cli.EXIT_USAGE
    error = _short(lines)
    assert "GPU" in error and "--trainer.accelerator cpu" in error and "configs/smoke.yaml" in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_job_whose_videos_all_failed_exits_with_the_failure_status(capsys, tmp_path, shard, one_thread):  # noqa: F811
    out = tmp_path / "out"
    # first_frame_gt on shards without labels: every video fails alone, the job finishes
    code, lines = _run(capsys, predict_args(shard, out, "--model.label_mode", "first_frame_gt"))
    assert code == cli.EXIT_SOME_FAILED
    assert lines[-1].startswith("error: 1 video(s) could not be labelled") and "summary.json" in lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["failed"] == 1 and summary["failed"][0]["video_id"] == "v0"
    assert "ground-truth" in summary["failed"][0]["error"]


def test_summary_json_keeps_every_run(capsys, tmp_path, shard, one_thread):  # noqa: F811
    out = tmp_path / "out"
    assert _run(capsys, predict_args(shard, out))[0] == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["total"]["frames"] == 2 and [r["run_id"] for r in first["runs"]] == [first["run_id"]]
    assert first["stage"] == "predict" and first["complete"]
    assert _run(capsys, predict_args(shard, out))[0] == 0  # everything is skipped as complete
    second = json.loads((out / "summary.json").read_text())
    assert second["total"]["frames"] == 0 and second["total"]["skipped_videos"] == 1
    runs = second["runs"]
    assert [r["run_id"] for r in runs] == [first["run_id"], second["run_id"]]  # newest last
    assert runs[0]["total"] == first["total"]  # the first run's figures are kept


def test_earlier_runs_survive_rewrites_and_old_summaries():
    run = {"run_id": "b", "total": {"frames": 1}}
    legacy = {"run_id": "a", "total": {"frames": 5}}  # a summary.json from before `runs`
    merged = with_earlier_runs(run, legacy)
    assert [r["run_id"] for r in merged["runs"]] == ["a", "b"] and merged["total"] == {"frames": 1}
    again = with_earlier_runs(run, merged)  # another rank writes the same run: no duplicate
    assert [r["run_id"] for r in again["runs"]] == ["a", "b"]
    assert with_earlier_runs(run, {"runs": "garbage"})["runs"] == [run]


def test_help_is_short_and_runs_do_not_print_third_party_noise(tmp_path, shard, capsys, caplog, one_thread):  # noqa: F811
    """`--help` shows whole subcommand descriptions; a run logs no product tips or known deprecations."""
    code, out = _run_out(capsys, ["--help"])
    assert code == 0 and "Label the videos of the shards into --output_dir" in " ".join(out.split())
    with caplog.at_level(logging.INFO):
        code = 0
        try:
            cli.main(predict_args(shard, tmp_path / "out"))
        except SystemExit as e:
            code = e.code
    captured = capsys.readouterr()
    shown = caplog.text + captured.out + captured.err
    assert code in (0, None) and "GPU available" in caplog.text  # Lightning's own lines still log
    assert "Tip:" not in shown and "LeafSpec" not in shown


def test_help_and_print_config_answer_from_the_cache_without_torch(tmp_path, monkeypatch, capsys):
    """A `--help` / `--print_config` seen before is answered by a process that imports neither torch
    nor Lightning; editing a config file it names renders it again."""
    from vss_lightning import help_cache

    config = tmp_path / "my.yaml"
    config.write_text((CONFIGS / "smoke.yaml").read_text())
    monkeypatch.setenv("VSS_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    requests = (["predict", "--help"], ["predict", "--config", str(config), "--print_config"])
    rendered = []
    for args in requests:  # rendered here, in a process that has imported everything already
        assert help_cache.lookup(args, "vss-lightning") is None
        code, out = _run_out(capsys, args)
        assert code == 0 and len(out.splitlines()) > 20
        assert help_cache.lookup(args, "vss-lightning") == out
        rendered.append(out)
    probe = (
        "import sys\n"
        "from vss_lightning import cli\n"
        f"for args in ({requests!r}):\n"
        "    try:\n"
        "        cli.main(list(args))\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "    print('\\n=====')\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules))\n"
    )
    env = subprocess_env(VSS_LIGHTNING_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    outputs, _, heavy = done.stdout.rpartition("HEAVY=")
    assert heavy.strip() == ""  # answered from the cache: no torch, Lightning or diffusers import
    assert outputs.split("\n=====\n")[:2] == rendered
    config.write_text(config.read_text().replace("num_clusters: 4", "num_clusters: 5"))
    assert help_cache.lookup(list(requests[1]), "vss-lightning") is None  # the key covers the config
    code, out = _run_out(capsys, list(requests[1]))
    assert code == 0 and "num_clusters: 5" in out


@pytest.mark.usefixtures("one_thread")
def test_a_full_disk_fails_the_video_names_the_path_and_keeps_the_summary(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing a video's labels fails that video (one message naming the path, no label
    that looks complete); the job finishes, writes summary.json and exits 3. ENOSPC on summary.json
    itself ends the job with one line, no traceback."""
    import errno

    import vss_lightning.io.files as files_module
    import vss_lightning.io.png_store as png_module
    import vss_lightning.io.summary as summary_module

    write_shard(tmp_path / "s-000000.tar", video_samples(make_video("full", 2, size=(64, 96)))
                + video_samples(make_video("fine", 2, size=(64, 96), seed=1)))  # fmt: skip
    real = files_module.atomic_write

    def disk_full_for(name: str):
        def write(path, data):
            if name in str(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, data)

        return write

    out = tmp_path / "out"
    monkeypatch.setattr(png_module, "atomic_write", disk_full_for("/full/"))
    code, lines = _run(capsys, predict_args(str(tmp_path / "s-000000.tar"), out))
    assert code == cli.EXIT_SOME_FAILED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["videos"] == 1 and [f["video_id"] for f in summary["failed"]] == ["full"]
    assert (
        "No space left on device" in summary["failed"][0]["error"] and "full" in summary["failed"][0]["error"]
    )
    assert not (out / "full" / "DONE").exists() and (out / "fine" / "DONE").exists()

    monkeypatch.setattr(summary_module, "atomic_write", disk_full_for("summary.json"))
    code, lines = _run(capsys, predict_args(str(tmp_path / "s-000000.tar"), tmp_path / "out2"))
    error = _short(lines)
    assert code == cli.EXIT_ERROR and "No space left on device" in error and "summary.json" in error


@pytest.mark.usefixtures("one_thread")
def test_a_read_only_output_folder_ends_in_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """EROFS (a read-only mount; root ignores permission bits, so the error is injected) when the
    writer makes its folder: one line naming the path, exit status 1, no traceback."""
    import errno
    from pathlib import Path

    write_shard(tmp_path / "s-000000.tar", video_samples(make_video("v", 2, size=(64, 96))))
    out = tmp_path / "ro" / "out"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, lines = _run(capsys, predict_args(str(tmp_path / "s-000000.tar"), out))
    error = _short(lines)
    assert code == cli.EXIT_ERROR and "Read-only file system" in error and str(tmp_path / "ro") in error
