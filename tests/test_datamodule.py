"""VideoShardDataModule: shard resolution, exact-once splitting over ranks x workers, bad input."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vss_lightning.data import shards as shards_module
from vss_lightning.data.datamodule import (
    VideoShardDataModule,
    VideoShardDataset,
    rank_and_world_size,
    resolve_shards,
    split_by_rank,
)
from vss_lightning.data.format import (
    FailedSample,
    SampleError,
    VideoMeta,
    VideoSample,
    encode_png,
    encode_sample,
    sample_key,
)
from vss_lightning.data.shards import DatasetInfo, dataset_info


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def sample(
    video_id: str, n: int = 2, h: int = 4, w: int = 6, label_hw: tuple[int, int] | None = None
) -> dict:
    """A valid raw sample (PNG frames, a label on frame 0)."""
    rng = np.random.default_rng(len(video_id))
    frames = [(encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "png") for _ in range(n)]
    meta = VideoMeta(video_id, [f"{i:05d}" for i in range(n)], [(h, w)] * n, labelled=[0], source="test")
    label = encode_png(np.ones(label_hw or (h, w), np.uint8))
    return encode_sample(meta, frames, {0: label})


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as tar:
        for s in samples:
            tar.write(s)
    return str(path)


def write_manifest(folder: Path, counts: dict[str, int], **info) -> None:
    """A manifest.json as data_tools writes it (the fields read here), plus `info` (num_classes, ...)."""
    shards = [{"name": k, "clips": v, "videos": v} for k, v in counts.items()]
    (folder / "manifest.json").write_text(json.dumps({"shards": shards, **info}))


def read(dm: VideoShardDataModule) -> list[VideoSample | FailedSample]:
    dm.setup("predict")
    return list(dm.predict_dataloader())


def test_init_is_cheap_and_checks_arguments(tmp_path: Path) -> None:
    dm = VideoShardDataModule(str(tmp_path / "nothing-{000000..000003}.tar"))  # no file access yet
    with pytest.raises(ValueError, match="to exist"):
        dm.setup("predict")
    for kwargs in ({"num_workers": -1}, {"max_frames": 0}, {"on_error": "ignore"}, {"shards": []}):
        with pytest.raises(ValueError, match="Expected"):
            VideoShardDataModule(**{"shards": "x.tar", **kwargs})


def test_resolve_shards_patterns(tmp_path: Path) -> None:
    urls = [write_shard(tmp_path / f"x-{i:06d}.tar", [sample(f"v{i}")]) for i in range(3)]
    (tmp_path / "x-000009.tar.tmp").write_bytes(b"")  # an unfinished shard is never picked up
    write_manifest(tmp_path, {"x-000001.tar": 1, "x-000000.tar": 1, "x-000002.tar": 1})
    assert resolve_shards(str(tmp_path / "x-{000000..000002}.tar")) == (urls, dict.fromkeys(urls, 1))
    assert resolve_shards(str(tmp_path / "x-*.tar"))[0] == urls
    assert resolve_shards([urls[2], urls[0], urls[1]])[0] == urls
    assert resolve_shards(str(tmp_path))[0] == urls
    with pytest.raises(ValueError, match="more than once"):
        resolve_shards([urls[0], urls[0]])
    with pytest.raises(ValueError, match="match shard files"):
        resolve_shards(str(tmp_path / "y-*.tar"))
    with pytest.raises(ValueError, match="manifest.json"):
        resolve_shards(str(tmp_path.parent))


def test_resolve_shards_errors_name_the_argument_and_the_fix(tmp_path: Path) -> None:
    url = write_shard(tmp_path / "x-000000.tar", [sample("a")])
    (tmp_path / "bare").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    cases = [
        ([], "to be a non-empty string or list of strings"),
        (str(tmp_path / "bare"), r"to hold the manifest.json of data_tools.*Pass a pattern such as"),
        (str(tmp_path / "broken"), r"manifest.json \(next to the shards of `--gt`\).*--overwrite"),
        (str(tmp_path / "y-*.tar"), "to match shard files, but it matches none"),
        (str(tmp_path / "x-{000000..000002}.tar"), r"x-000001.tar' does not \(2 of 3 missing\).*inclusive"),
        ([url, str(tmp_path / "x-*.tar")], "more than once. Name each shard by one"),
    ]
    for shards, message in cases:
        for arg in ("--gt", "--data.shards"):
            with pytest.raises(ValueError, match=message.replace("`--gt`", f"`{arg}`")) as e:
                resolve_shards(shards, arg)
            assert f"`{arg}`" in str(e.value), (shards, str(e.value))


def test_dataset_info_reads_the_manifests_next_to_the_shards(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (a, b, c):
        folder.mkdir()
    ua = write_shard(a / "x-000000.tar", [sample("a")])
    ub = write_shard(b / "x-000000.tar", [sample("b")])
    uc = write_shard(c / "x-000000.tar", [sample("c")])
    names = ["sky", "road", "car"]
    write_manifest(a, {"x-000000.tar": 1}, num_classes=3, class_names=names)
    write_manifest(b, {"x-000000.tar": 1}, num_classes=3, class_names=None)  # null: unknown, agrees
    write_manifest(c, {"other.tar": 1}, num_classes=7)  # does not list this shard: says nothing about it
    urls = resolve_shards([str(a), str(b), str(c / "*.tar")])[0]
    assert urls == sorted([ua, ub, uc])
    info = dataset_info(urls)
    assert (info.num_classes, info.class_names) == (3, names)
    assert info.manifests == (str(a / "manifest.json"), str(b / "manifest.json"))
    assert dataset_info([uc, "pipe:cat x.tar"]) == DatasetInfo()  # no manifest counts; remote skipped
    write_manifest(b, {"x-000000.tar": 1}, num_classes=4)
    with pytest.raises(ValueError, match=r"agree on `num_classes`, but .*a/manifest.json records 3 and "
                       r".*b/manifest.json records 4") as e:  # fmt: skip
        dataset_info(urls, "--gt")
    assert "`--gt`" in str(e.value)
    write_manifest(b, {"x-000000.tar": 1}, class_names=["sky", "road", "bus"])
    with pytest.raises(ValueError, match=r"agree on `class_names`.*a/manifest.json.*b/manifest.json"):
        dataset_info(urls)
    write_manifest(b, {"x-000000.tar": 1}, num_classes="3")
    with pytest.raises(ValueError, match=r"Expected `num_classes` in .*b/manifest.json to be a positive"):
        dataset_info(urls)


def test_datamodule_exposes_the_manifest_and_names_its_argument(tmp_path: Path) -> None:
    write_shard(tmp_path / "x-000000.tar", [sample("a")])
    write_manifest(tmp_path, {"x-000000.tar": 1}, num_classes=5, class_names=None)
    dm = VideoShardDataModule(str(tmp_path), num_workers=0)
    dm.setup("test")
    assert dm.dataset_info == DatasetInfo(5, None, (str(tmp_path / "manifest.json"),))
    assert VideoShardDataModule(str(tmp_path / "*.tar")).dataset_info.num_classes == 5  # any form
    with pytest.raises(ValueError, match="Expected every shard named by `--data.shards` to exist"):
        VideoShardDataModule(str(tmp_path / "x-000009.tar")).setup("predict")


def test_shard_naming_imports_no_torch_or_lightning() -> None:
    """`data/shards.py` is usable by command-line tools before any heavy import."""
    path = Path(shards_module.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('shards', {str(path)!r})\n"
        "module = sys.modules['shards'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'numpy', 'webdataset') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def shards_for(
    urls: list[str], rank: int, world: int, worker: int, workers: int, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """The shards one worker of one rank reads: the dataset's own shard-list and split stages (the
    first three of its pipeline), with the DataLoader worker given as webdataset's WORKER env vars."""
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(workers))
    stages = VideoShardDataset(urls, rank=rank, world_size=world).pipeline[:3]
    return [item["url"] for item in wds.DataPipeline(stages)]


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_rank_worker_split_is_exact_once(num_shards: int, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = [f"s{i}" for i in range(num_shards)]
    for world in (1, 2, 4):
        for workers in (1, 2, 3):
            got = [
                u
                for r in range(world)
                for w in range(workers)
                for u in shards_for(urls, r, world, w, workers, monkeypatch)
            ]
            assert sorted(got) == urls  # zero shards for some rank/worker is fine
            first = shards_for(urls, 0, world, 0, workers, monkeypatch)
            assert first == urls[:: world * workers][: len(urls)]


def test_node_split_takes_the_rank_given_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's launcher sets no RANK: the rank comes from the Trainer, never from the environment."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert list(split_by_rank(range(7), 1, 3)) == [1, 4]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        split_by_rank(range(7), 3, 3)
    assert isinstance(VideoShardDataset(["a.tar"]), wds.DataPipeline)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_every_video_exactly_once_over_ranks_and_workers(
    tmp_path: Path, num_shards: int, num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = [f"v{i:02d}" for i in range(2 * num_shards)]  # two videos per shard
    for i in range(num_shards):
        write_shard(tmp_path / f"x-{i:06d}.tar", [sample(v, n=1) for v in videos[2 * i : 2 * i + 2]])
    for world in (1, 2, 4):
        seen = Counter()
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            dm = VideoShardDataModule(str(tmp_path / "*.tar"), num_workers=num_workers)
            got = read(dm)
            assert all(isinstance(s, VideoSample) for s in got)
            seen.update(s.video_id for s in got)
        assert seen == Counter(videos), (world, num_workers)


def test_rank_and_world_size_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world_size() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK"):
        rank_and_world_size()
    monkeypatch.setenv("RANK", "1")
    assert rank_and_world_size() == (1, 2)

    class FakeTrainer:
        global_rank, world_size = 3, 8

    assert rank_and_world_size(FakeTrainer()) == (3, 8)


def _bad_then_good(tmp_path: Path, bad: dict) -> VideoShardDataModule:
    write_shard(tmp_path / "x-000000.tar", [sample("a"), bad, sample("c")])
    write_shard(tmp_path / "x-000001.tar", [sample("d")])
    return VideoShardDataModule(str(tmp_path / "x-{000000..000001}.tar"), num_workers=0)


def test_corrupt_jpeg_frame_becomes_failed_sample(tmp_path: Path) -> None:
    bad = sample("b")
    good = jpeg(np.zeros((4, 6, 3), np.uint8))
    del bad["00001.png"]
    bad["00001.jpg"] = good[: len(good) // 2]  # truncated JPEG
    got = read(_bad_then_good(tmp_path, bad))
    assert [type(s).__name__ for s in got] == ["VideoSample", "FailedSample", "VideoSample", "VideoSample"]
    failed = got[1]
    assert failed.video_id == "b" and failed.key == sample_key("b") and failed.url.endswith("x-000000.tar")
    assert "'b'" in failed.error and "x-000000.tar" in failed.error and "00001" in failed.error


def test_label_of_wrong_size_becomes_failed_sample(tmp_path: Path) -> None:
    got = read(_bad_then_good(tmp_path, sample("b", label_hw=(3, 6))))
    assert [getattr(s, "video_id", None) for s in got] == ["a", "b", "c", "d"]
    assert isinstance(got[1], FailedSample) and "(4, 6)" in got[1].error and "x-000000.tar" in got[1].error


def test_sample_without_meta_becomes_failed_sample(tmp_path: Path) -> None:
    got = read(_bad_then_good(tmp_path, {"__key__": "lonely", "notes.txt": b"no meta"}))
    failed = got[1]
    assert isinstance(failed, FailedSample) and failed.key == "lonely" and failed.video_id is None
    assert "meta.json" in failed.error and "x-000000.tar" in failed.error
    assert [s.video_id for s in got if isinstance(s, VideoSample)] == ["a", "c", "d"]


def test_on_error_fail_raises(tmp_path: Path) -> None:
    dm = _bad_then_good(tmp_path, {"__key__": "lonely", "notes.txt": b"no meta"})
    dm.on_error = "fail"
    with pytest.raises(SampleError, match="meta.json"):
        read(dm)


def _shards_with_manifest(tmp_path: Path) -> tuple[str, list[tarfile.TarInfo]]:
    first = write_shard(tmp_path / "x-000000.tar", [sample(v, n=3) for v in ("a", "b", "c")])
    write_shard(tmp_path / "x-000001.tar", [sample("d")])
    write_manifest(tmp_path, {"x-000000.tar": 3, "x-000001.tar": 1})
    with tarfile.open(first) as tar:
        return first, tar.getmembers()


def test_truncated_tar_keeps_earlier_videos_and_names_the_shard(tmp_path: Path) -> None:
    first, members = _shards_with_manifest(tmp_path)
    cut = next(m for m in members if m.name.startswith("b__")).offset_data + 100  # inside video b
    Path(first).write_bytes(Path(first).read_bytes()[:cut])
    got = read(VideoShardDataModule(str(tmp_path / "x-*.tar"), num_workers=0))
    assert [s.video_id for s in got if isinstance(s, VideoSample)] == ["a", "d"]  # c is lost
    failed = [s for s in got if isinstance(s, FailedSample)]
    assert failed and all(f.url == first for f in failed)
    assert any("x-000000.tar" in f.error and f.key == "" for f in failed)


def test_truncated_tar_with_on_error_fail_raises(tmp_path: Path) -> None:
    first, members = _shards_with_manifest(tmp_path)
    Path(first).write_bytes(Path(first).read_bytes()[: members[-1].offset_data + 10])
    dm = VideoShardDataModule(str(tmp_path), num_workers=0, on_error="fail")
    with pytest.raises(SampleError, match="x-000000.tar"):
        read(dm)


def test_tar_cut_between_samples_is_caught_by_the_manifest(tmp_path: Path) -> None:
    first, members = _shards_with_manifest(tmp_path)
    cut = next(m for m in members if m.name.startswith("c__")).offset  # tar alone cannot tell
    Path(first).write_bytes(Path(first).read_bytes()[:cut])
    got = read(VideoShardDataModule(str(tmp_path), num_workers=0))
    assert [type(s).__name__ for s in got] == ["VideoSample", "VideoSample", "FailedSample", "VideoSample"]
    assert got[2].url == first and "3 samples" in got[2].error and "only 2" in got[2].error


def test_unreadable_shard_becomes_failed_sample(tmp_path: Path) -> None:
    write_shard(tmp_path / "x-000000.tar", [sample("a")])
    (tmp_path / "x-000001.tar").write_bytes(b"this is not a tar file at all" * 40)
    write_shard(tmp_path / "x-000002.tar", [sample("c")])
    got = read(VideoShardDataModule(str(tmp_path / "x-*.tar"), num_workers=0))
    assert [type(s).__name__ for s in got] == ["VideoSample", "FailedSample", "VideoSample"]
    assert got[1].url.endswith("x-000001.tar")


class _Touch:
    """Unpickling this creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_member_is_never_unpickled(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(probe)))
    assert probe.exists()  # the payload works when unpickled
    marker = tmp_path / "marker"
    s = sample("a")
    s["payload.pyd"] = pickle.dumps(_Touch(marker))
    write_shard(tmp_path / "x-000000.tar", [s])
    (got,) = read(VideoShardDataModule(str(tmp_path / "x-000000.tar"), num_workers=0))
    assert isinstance(got, VideoSample) and got.ignored_fields == 1
    assert not marker.exists()


class _Recorder(L.LightningModule):
    def predict_step(self, batch, batch_idx):
        if isinstance(batch, FailedSample):
            return ("failed", batch.key)
        assert isinstance(batch, VideoSample) and batch.frames.dtype == torch.uint8
        return (batch.video_id, tuple(batch.frames.shape))


def test_trainer_predict_receives_samples_unchanged(tmp_path: Path) -> None:
    write_shard(tmp_path / "x-000000.tar", [sample("a", n=3), {"__key__": "junk", "txt": b"x"}])
    write_shard(tmp_path / "x-000001.tar", [sample("b")])
    dm = VideoShardDataModule(str(tmp_path / "x-*.tar"), num_workers=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    out = trainer.predict(_Recorder(), datamodule=dm)
    assert sorted(out) == [("a", (3, 3, 4, 6)), ("b", (2, 3, 4, 6)), ("failed", "junk")]


def test_dataset_pickles_for_spawned_workers(tmp_path: Path) -> None:
    url = write_shard(tmp_path / "x-000000.tar", [sample("a")])
    ds = pickle.loads(pickle.dumps(VideoShardDataset([url], rank=0, world_size=1)))
    assert [s.video_id for s in ds] == ["a"]
