"""ZeroShotVSS: the thin LightningModule shell (no parameters, seed keys, clip state, errors, OOM retry,
skip before compute, test-time metrics)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from shards import (  # noqa: F401 (fixture)
    CONFIGS,
    make_shards,
    make_video,
    one_thread,
    video_samples,
    write_shard,
)

from vss_lightning import cli
from vss_lightning.data.datamodule import VideoShardDataModule
from vss_lightning.data.format import FailedSample, SampleError, VideoMeta, VideoSample
from vss_lightning.io.summary import VideoFailed, VideoLabels, VideoSkipped
from vss_lightning.io.writer import PseudoLabelWriter
from vss_lightning.module import ZeroShotVSS, seed_key
from vss_lightning.pipeline.random_backbones import TinyStableDiffusion
from vss_lightning.pipeline.segmenter import BatchLabels, VideoSegmenter
from vss_lightning.pipeline.settings import ContextSettings, SpeedSettings


class FakeSegmenter(VideoSegmenter):
    """Records each call; labels = clip offset + frame index (mod 4); raises OOM on demand."""

    def __init__(self, oom_times: int = 0) -> None:
        super().__init__(TinyStableDiffusion(), context=ContextSettings(batch_size=2, num_clusters=3))
        self.calls: list[dict] = []
        self.oom_times = oom_times
        self._loaded = object()
        self._sampler = SimpleNamespace(max_batch_images=16, vae_batch_images=8)

    def load(self, device="cpu"):
        return self

    def iter_segment(self, frames, first_frame_gt=None, state=None, key="", seconds=None, context_frames=0):
        self.calls.append(
            dict(key=key, state=state, context=dict(state.context), gt=first_frame_gt,
                 budget=(self._sampler.max_batch_images, self._sampler.vae_batch_images))
        )  # fmt: skip
        if self.oom_times > 0:
            self.oom_times -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        t, h, w = frames.shape[0], frames.shape[-2], frames.shape[-1]
        offset = int(key.rsplit(":", 1)[1])
        for start in range(context_frames, t, 2):  # context frames are not emitted
            idx = list(range(start, min(start + 2, t)))
            labels = torch.tensor([(offset + i) % 4 for i in idx]).view(-1, 1, 1).expand(-1, h, w)
            yield BatchLabels(indices=idx, labels=labels.clone(), coarse=torch.zeros(len(idx), 2, 2))
        state.context = {"clips": state.context.get("clips", 0) + 1}


def _sample(
    vid: str, t: int = 3, clip: int = 0, num_clips: int = 1, offset: int = 0, labels=None
) -> VideoSample:
    meta = VideoMeta(vid, [f"f{offset + i}" for i in range(t)], [(8, 12)] * t, clip_index=clip,
                     num_clips=num_clips, frame_offset=offset)  # fmt: skip
    frames = torch.zeros(t, 3, 8, 12, dtype=torch.uint8)
    return VideoSample(meta, frames, labels, key=f"{vid}__c{clip:04d}", url="shard-0.tar")


def test_no_trainable_parameters_even_when_loaded(tiny_backbone):
    module = ZeroShotVSS(
        VideoSegmenter(TinyStableDiffusion(), context=ContextSettings(batch_size=2, num_clusters=3))
    )
    module.load("cpu")
    assert module.segmenter.loaded
    assert sum(p.numel() for p in module.parameters()) == 0
    assert not any(p.requires_grad for p in module.parameters())


def test_seed_key_and_labels_of_one_video():
    seg = FakeSegmenter()
    module = ZeroShotVSS(seg)
    out = module.run_sample(_sample("v", t=3, offset=0))
    assert isinstance(out, VideoLabels) and out.labels.dtype == torch.uint8
    assert out.labels.shape == (3, 8, 12) and out.labels[:, 0, 0].tolist() == [0, 1, 2]
    assert seg.calls[0]["key"] == seed_key("v", 0) == "v:0"


def test_clips_carry_the_state_of_the_same_video_then_drop_it():
    seg = FakeSegmenter()
    module = ZeroShotVSS(seg)
    module.run_sample(_sample("long", 2, clip=0, num_clips=3, offset=0))
    module.run_sample(_sample("other", 2))  # interleaved from another DataLoader worker
    module.run_sample(_sample("long", 2, clip=1, num_clips=3, offset=2))
    module.run_sample(_sample("long", 1, clip=2, num_clips=3, offset=4))
    long_calls = [c for c in seg.calls if c["key"].startswith("long")]
    assert [c["key"] for c in long_calls] == ["long:0", "long:2", "long:4"]
    assert [c["context"] for c in long_calls] == [{}, {"clips": 1}, {"clips": 2}]
    assert long_calls[0]["state"] is long_calls[2]["state"]
    assert len(module.videos.states) == 0  # dropped after the last clip


def test_first_frame_gt_needs_a_label_on_frame_0():
    seg = FakeSegmenter()
    labels = torch.full((3, 8, 12), 255, dtype=torch.long)
    labels[1] = 2
    module = ZeroShotVSS(seg, label_mode="first_frame_gt", num_classes=4)
    out = module.run_sample(_sample("nolabel", labels=labels))
    assert isinstance(out, VideoFailed) and "'nolabel'" in out.error and "frame 0 ('f0')" in out.error
    assert not seg.calls
    labels[0] = 1
    out = module.run_sample(_sample("labelled", labels=labels))
    assert isinstance(out, VideoLabels) and torch.equal(seg.calls[-1]["gt"], labels[0])
    strict = ZeroShotVSS(FakeSegmenter(), label_mode="first_frame_gt", on_error="fail")
    with pytest.raises(RuntimeError, match="nolabel"):
        strict.run_sample(_sample("nolabel", labels=torch.full((3, 8, 12), 255)))


def test_failed_sample_and_failed_clip():
    module = ZeroShotVSS(FakeSegmenter())
    bad = FailedSample(key="k", url="s.tar", error="corrupt frame", video_id="v")
    out = module.run_sample(bad)
    assert isinstance(out, VideoFailed) and out.url == "s.tar" and out.error == "corrupt frame"
    with pytest.raises(SampleError, match="corrupt frame"):
        ZeroShotVSS(FakeSegmenter(), on_error="fail").run_sample(bad)
    # A clip that fails: the later clips of that video are reported, not segmented without context.
    seg = FakeSegmenter(oom_times=2)
    module = ZeroShotVSS(seg)
    first = module.run_sample(_sample("v", 2, clip=0, num_clips=2))
    later = module.run_sample(_sample("v", 2, clip=1, num_clips=2, offset=2))
    assert isinstance(first, VideoFailed) and "OutOfMemoryError" in first.error
    assert isinstance(later, VideoFailed) and "earlier clip" in later.error
    assert len(seg.calls) == 2  # clip 0 twice (OOM retry), clip 1 never


def test_oom_retry_halves_the_budget_once_and_restores_it():
    seg = FakeSegmenter(oom_times=1)
    out = ZeroShotVSS(seg).run_sample(_sample("v"))
    assert isinstance(out, VideoLabels) and out.retried
    assert [c["budget"] for c in seg.calls] == [(16, 8), (8, 4)]
    assert (seg.sampler.max_batch_images, seg.sampler.vae_batch_images) == (16, 8)
    seg = FakeSegmenter(oom_times=1)
    out = ZeroShotVSS(seg, oom_retry=False).run_sample(_sample("v"))
    assert isinstance(out, VideoFailed) and len(seg.calls) == 1


def test_complete_videos_are_skipped_before_the_pipeline_runs():
    seg = FakeSegmenter()
    module = ZeroShotVSS(seg)
    asked = []
    complete = {"done_video"}
    module.set_completeness_check(lambda meta: asked.append(meta.video_id) or meta.video_id in complete)
    out = module.run_sample(_sample("done_video"))
    assert isinstance(out, VideoSkipped) and out.frames == 3 and not seg.calls
    assert isinstance(module.run_sample(_sample("new_video")), VideoLabels)
    assert asked == ["done_video", "new_video"]
    assert isinstance(module.run_sample(_sample("done_video"), skip_complete=False), VideoLabels)


def test_settings_hash_follows_the_settings():
    def segmenter(k: int) -> VideoSegmenter:
        return VideoSegmenter(TinyStableDiffusion(), context=ContextSettings(num_clusters=k))

    a, b = ZeroShotVSS(segmenter(3)), ZeroShotVSS(segmenter(4))
    c = ZeroShotVSS(segmenter(3), label_mode="first_frame_gt")
    assert len({a.settings_hash(), b.settings_hash(), c.settings_hash()}) == 3
    assert a.settings_hash() == ZeroShotVSS(segmenter(3)).settings_hash()
    assert a.output_info()["backbone"] == "TinyStableDiffusion(seed=0)"


# The settings hash of the default settings (Stable Diffusion 2.1 base from the hub, cluster labels).
# A finished video is skipped on resume only under the same hash, so CHANGING THIS VALUE INVALIDATES
# EVERY USER'S FINISHED OUTPUTS (a rerun recomputes them all). Change it only deliberately: when a new
# label-affecting setting is added or the hash's construction changes, and say so in the changelog.
DEFAULT_SETTINGS_HASH = "d732bb2bb9288959"


def test_the_hash_of_the_default_settings_is_pinned():
    module = ZeroShotVSS(VideoSegmenter())
    assert module.segmenter.backbone.description == (
        "StableDiffusion(stabilityai/stable-diffusion-2-1-base@main,default)"
    )
    assert module.settings_hash() == DEFAULT_SETTINGS_HASH, module.segmenter.settings()
    # speed-only settings do not move it; a label-affecting one does
    fast = VideoSegmenter(speed=SpeedSettings(max_batch_images=8, reuse_prefix=False, channels_last=True))
    assert ZeroShotVSS(fast).settings_hash() == DEFAULT_SETTINGS_HASH
    assert ZeroShotVSS(VideoSegmenter(speed=SpeedSettings(vae_tiling=True))).settings_hash() != (
        DEFAULT_SETTINGS_HASH
    )


def test_constructor_errors():
    with pytest.raises(ValueError, match="Expected `label_mode`"):
        ZeroShotVSS(FakeSegmenter(), label_mode="gt")
    with pytest.raises(ValueError, match="Expected `num_classes`"):
        ZeroShotVSS(FakeSegmenter(), num_classes=0)


@pytest.mark.usefixtures("one_thread")
def test_test_stage_scores_and_writes_metrics(tmp_path):
    """Trainer.test with the tiny backbone on labelled shards: labels written, metrics.json computed."""
    videos = make_shards(tmp_path / "shards", [[("lab_a", 3), ("lab_b", 2)]], labelled=True)
    segmenter = VideoSegmenter(TinyStableDiffusion(), context=ContextSettings(batch_size=4, num_clusters=3,
                               kmeans_n_init=1), speed=SpeedSettings(max_batch_images=16))  # fmt: skip
    module = ZeroShotVSS(segmenter, label_mode="first_frame_gt", num_classes=4)
    out = tmp_path / "out"
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PseudoLabelWriter(str(out))])  # fmt: skip
    results = trainer.test(
        module, datamodule=VideoShardDataModule(str(tmp_path / "shards" / "*.tar"), num_workers=0)
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 5 and metrics["videos"] == 2 and metrics["failed_videos"] == 0
    assert (
        0.0 <= metrics["mIoU"] <= 1.0 and metrics["matching"] == "none" and len(metrics["per_class_iou"]) == 4
    )
    assert results[0]["test/mIoU"] == pytest.approx(metrics["mIoU"])
    for vid, video in videos.items():
        assert len(list((out / vid).glob("*.png"))) == len(video.frames)
        assert json.loads((out / vid / "DONE").read_text())["label_mode"] == "first_frame_gt"
    with pytest.raises(ValueError, match="Expected `--model.num_classes` to be set for `test`"):
        ZeroShotVSS(segmenter).setup("test")


@pytest.mark.usefixtures("one_thread")
def test_labels_do_not_depend_on_what_ran_before():
    """The seed key, not the rank or the order, decides a video's labels."""
    v1, v2 = make_video("x1", 3, seed=1), make_video("x2", 3, seed=2)

    def sample(v):
        frames = torch.from_numpy(v.frames).permute(0, 3, 1, 2).contiguous()
        return VideoSample(VideoMeta(v.video_id, v.names, [(128, 192)] * 3), frames, None)

    def run(order):
        seg = VideoSegmenter(
            TinyStableDiffusion(), context=ContextSettings(batch_size=4, num_clusters=3, kmeans_n_init=1)
        )
        module = ZeroShotVSS(seg).load("cpu")
        return {v.video_id: module.run_sample(sample(v)).labels for v in order}

    a, b = run([v1, v2]), run([v2, v1])
    assert torch.equal(a["x1"], b["x1"]) and torch.equal(a["x2"], b["x2"])


def test_gt_anchor_first_labelled_segments_forwards_and_backwards_from_it():
    seg = FakeSegmenter()
    labels = torch.full((5, 8, 12), 255, dtype=torch.long)
    labels[2] = 1  # only the middle frame is labelled, like a Cityscapes snippet
    module = ZeroShotVSS(seg, label_mode="first_frame_gt", gt_anchor="first_labelled", num_classes=4)
    out = module.run_sample(_sample("snippet", t=5, labels=labels))
    assert isinstance(out, VideoLabels)
    assert [c["key"] for c in seg.calls] == ["snippet:2", "snippet:backward:2"]
    assert all(torch.equal(c["gt"], labels[2]) for c in seg.calls)
    # forward: frames 2, 3, 4 <- (2 + i) % 4; backward over frames 2, 1, 0: frame 2 - i <- (2 + i) % 4
    assert out.labels[:, 0, 0].tolist() == [0, 3, 2, 3, 0]
    assert seg.calls[1]["state"] is not seg.calls[0]["state"]
    none = ZeroShotVSS(FakeSegmenter(), label_mode="first_frame_gt", gt_anchor="first_labelled")
    failed = none.run_sample(_sample("unlabelled", t=3, labels=torch.full((3, 8, 12), 255)))
    assert isinstance(failed, VideoFailed) and "at least one labelled frame" in failed.error


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_lightning_test_takes_num_classes_from_the_manifest(tmp_path, capsys):
    """`test` without `--model.num_classes`: C comes from the shards' manifest.json; a different C given
    is an error before any video is segmented."""
    shards, out = tmp_path / "shards", tmp_path / "out"
    video = make_video("m", 2, size=(64, 96))
    write_shard(shards / "m-000000.tar", video_samples(video, labelled=True))  # samples record no C
    manifest = {"num_classes": 6, "class_names": None, "shards": [{"name": "m-000000.tar", "clips": 1}]}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    args = ["test", "--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards), "--output_dir",
            str(out), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli.main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 6 and len(metrics["per_class_iou"]) == 6 and metrics["frames"] == 2
    iou = metrics["per_class_iou"]
    assert None not in iou[:4] and iou[4:] == [None, None]  # classes 4, 5 are absent from the labels
    with pytest.raises((ValueError, SystemExit)) as error:  # SystemExit: the CLI prints user errors
        cli.main([*args[:-2], "--output_dir", str(tmp_path / "other"), "--model.num_classes", "4"])
    message = str(error.value) if isinstance(error.value, ValueError) else capsys.readouterr().err
    want = r"Expected `--model.num_classes` to match the shards' manifest.json \(6\), but got 4. Pass "
    assert re.search(want + r"--model.num_classes 6, or leave it unset", message), message
    assert not (tmp_path / "other" / "m").exists()


def test_validate_takes_num_classes_from_each_datamodule_it_runs_on(tmp_path):
    """The manifest's C is taken per run: the same module validates two datasets with their own C."""
    module = ZeroShotVSS(FakeSegmenter())
    for num_classes in (6, 3):
        shards = tmp_path / f"c{num_classes}"
        video = make_video("m", 2, size=(16, 24))
        write_shard(shards / "m-000000.tar", video_samples(video, labelled=True))
        manifest = {"num_classes": num_classes, "shards": [{"name": "m-000000.tar", "clips": 1}]}
        (shards / "manifest.json").write_text(json.dumps(manifest))
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        results = trainer.validate(module, datamodule=VideoShardDataModule(str(shards), num_workers=0))
        assert module.num_classes == num_classes and module.metrics.iou.num_classes == num_classes
        assert 0.0 <= results[0]["val/mIoU"] <= 1.0


def test_frame_listeners_hear_progress_inside_a_video():
    """A progress bar learns after every batch how many of a video's frames are labelled."""
    from vss_lightning.io.progress import VideoProgressBar, _duration

    module = ZeroShotVSS(FakeSegmenter())  # batches of 2 frames
    events: list[tuple[str, int, int]] = []
    other: list[int] = []

    def count(video_id: str, done: int, total: int) -> None:
        other.append(done)

    module.add_frame_listener(lambda *e: events.append(e))
    module.add_frame_listener(count)  # another listener ...
    module.add_frame_listener(count)  # ... is added once
    assert isinstance(module.run_sample(_sample("v", t=5)), VideoLabels)
    assert events == [("v", 0, 5), ("v", 2, 5), ("v", 4, 5), ("v", 5, 5)]
    assert other == [0, 2, 4, 5]

    class Bar:
        disable = False
        postfix: dict = {}

        def set_postfix(self, **kwargs):
            self.postfix = kwargs

    bar, clock = Bar(), iter([100.0, 104.0])
    progress = VideoProgressBar()
    progress._bar = bar
    import vss_lightning.io.progress as progress_module

    real = progress_module.time.perf_counter
    progress_module.time.perf_counter = lambda: next(clock)
    try:
        progress.on_frames("v", 0, 30)  # starts at t = 100 s
        progress.on_frames("v", 8, 30)  # 8 frames in 4 s: 2 frames/s, 22 left: 11 s
    finally:
        progress_module.time.perf_counter = real
    assert bar.postfix["video_frames"] == "8/30" and bar.postfix["video_fps"] == "2.00"
    assert bar.postfix["video_eta"] == "11s" and bar.postfix["video"] == "v"
    assert (_duration(3725), _duration(185), _duration(float("nan"))) == ("1h02m", "3m05s", "?")


def test_clip_assembler_joins_in_order_and_reports_breaks():
    """The one clip assembler: whole videos in clip order, a clip out of order ends the held run,
    any-order mode (evaluate) completes on the last missing clip and refuses a repeat."""
    from vss_lightning.clips import ClipAssembler, ClipOrderError

    def clip(vid, k, n):
        return VideoMeta(vid, ["f"], [(1, 1)], clip_index=k, num_clips=n)

    stream: ClipAssembler[str] = ClipAssembler()
    assert stream.add(clip("a", 0, 3), "a0") == [] and stream.follows(clip("a", 1, 3))
    assert stream.add(clip("b", 0, 1), "b0")[0].parts == ["b0"]  # an unsplit video is whole at once
    assert stream.add(clip("a", 1, 3), "a1") == [] and stream.last("a") == "a1"
    (whole,) = stream.add(clip("a", 2, 3), "a2")
    assert whole.parts == ["a0", "a1", "a2"] and whole.complete and len(stream) == 0
    stream.add(clip("c", 0, 3), "c0")
    # Clip 1 missing: the held run ends, incomplete; clip 2, the last, ends a run of its own.
    broken, last = stream.add(clip("c", 2, 3), "c2")
    assert (broken.parts, last.parts, last.clips) == (["c0"], ["c2"], [2])
    assert not broken.complete and not last.complete and stream.pending() == []
    any_order: ClipAssembler[str] = ClipAssembler(any_order=True)
    assert any_order.add(clip("d", 1, 2), "d1") == []
    with pytest.raises(ClipOrderError):
        any_order.add(clip("d", 1, 2), "again")
    (run,) = any_order.add(clip("d", 0, 2), "d0")
    assert run.parts == ["d0", "d1"] and run.complete
