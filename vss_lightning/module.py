"""`ZeroShotVSS`: the LightningModule shell around the plain-PyTorch pipeline.

No trainable parameters and no training: `predict_step` labels one video (or clip) per step and
hands the labels to the writer (`io.writer.PseudoLabelWriter`); `test_step` (also the
`validation_step`) does the same and scores the labels against the ground truth. The backbone is
loaded in `setup` (on this rank's device), so building the module (`--help`, `--print_config`) costs
nothing. The video-level algorithm (state across clips, ground-truth anchors, OOM retry) is
`pipeline.video.VideoLabeller`; this shell adds what Lightning and the output need:

1. a `FailedSample` becomes a `VideoFailed` (or raises with `on_error="fail"`);
2. in predict, the completeness check a writer registered (`set_completeness_check`) is asked
   whether the video is already complete with the same settings hash; if so the step returns
   `VideoSkipped` without running the pipeline;
3. the labeller labels the clip; any error becomes a `VideoFailed` naming the video and shard.

No collective runs per step, so ranks with different numbers of videos never wait on each other;
the evaluation metrics sync once, at the end of test/validate, on every rank, and the result is
kept in `eval_results` (the writer writes it to `metrics.json`).

(Longer than 400 lines because the label modes' glue to Lightning — the settings hash, the class
names of open-vocabulary naming resolved against the shards' manifest, the vocabulary — is here; the
algorithms are in `pipeline` and `vocabulary`.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics.aggregation import SumMetric

from vss_lightning.clips import ClipAssembler
from vss_lightning.data.format import FailedSample, SampleError, VideoMeta, VideoSample
from vss_lightning.io.summary import VideoFailed, VideoLabels, VideoResult, VideoSkipped
from vss_lightning.metrics import VideoSegmentationMetrics, join_parts, labelled_part
from vss_lightning.pipeline.naming import NamingSettings, label_classes, load_class_names, resolve_class_names
from vss_lightning.pipeline.prototypes import VideoPrototypes
from vss_lightning.pipeline.segmenter import VideoSegmenter
from vss_lightning.pipeline.video import FrameListener, GtAnchor, VideoLabeller, seed_key

log = logging.getLogger(__name__)

__all__ = ["ZeroShotVSS", "seed_key"]

LabelMode = Literal["cluster", "first_frame_gt", "open_vocab"]


class ZeroShotVSS(L.LightningModule):
    """Zero-shot video semantic segmentation (no training) as a LightningModule.

    Args:
        segmenter: the pipeline and its settings (default: `VideoSegmenter()`, Stable Diffusion 2.1
            base with the paper's settings).
        label_mode: "cluster" (labels are cluster ids, consistent within a video; pure zero-shot),
            "first_frame_gt" (each cluster takes the majority ground-truth class of frame 0, which
            must be labelled; the evaluation protocol of the paper) or "open_vocab" (each cluster
            takes the class of `class_names` its cells attend to most in the UNet's cross-attention:
            class ids without any ground truth; Stable Diffusion backbones only).
        gt_anchor: which ground-truth frame `first_frame_gt` starts from: "first_frame" (frame 0, the
            paper's protocol) or "first_labelled" (the first frame with a label, e.g. the 20th frame
            of a Cityscapes snippet: the video is segmented forwards from that frame and, for the
            frames before it, backwards from it, each direction with its own context model).
        num_classes: number of ground-truth classes, for the metrics of test/validate; None takes the
            datamodule's `dataset_info` (the shards' `manifest.json`), which must agree when both are set.
        matching: how predicted ids meet classes in the metrics: "auto" ("none" for first_frame_gt,
            per-"video" Hungarian matching for cluster), "none", "video" or "dataset".
        on_error: "skip" records a video that cannot be read or segmented as failed and goes on;
            "fail" raises.
        oom_retry: on a GPU out-of-memory error, retry the video once with half the segmenter's
            `speed.max_batch_images` and `speed.vae_batch_images`, then record it as failed.
        vocabulary: a corpus vocabulary folder (`python -m vss_lightning.vocabulary fit`): labels are
            written as its global class ids (each label to the class nearest to its prototype), the
            same ids in every video. It must have been fitted on labels of this job's settings.
        class_names: the classes of `open_vocab`, in id order: a list, or a YAML (list or `{id: name}`)
            or text file (one per line); None takes the shards' manifest `class_names`. In
            `cluster` mode, given names make every video's prototypes carry class scores, which
            `vocabulary name` turns into names for a corpus vocabulary's classes; `first_frame_gt`
            ignores them.
        naming: how the cross-attention names labels (default: `NamingSettings()`).
        vocabulary_names: with `vocabulary`, its `names.yaml` (`<global id>: <name>`, from the naming
            page or `vocabulary name`): labels are written as the dataset class ids of those names
            (the shards' manifest `class_names`), so `--model.matching none` scores them; unnamed ids
            and names that are not the dataset's are written as `context.ignore_index`.
    """

    def __init__(
        self,
        segmenter: VideoSegmenter | None = None,
        label_mode: LabelMode = "cluster",
        gt_anchor: GtAnchor = "first_frame",
        num_classes: int | None = None,
        matching: Literal["auto", "none", "video", "dataset"] = "auto",
        on_error: Literal["skip", "fail"] = "skip",
        oom_retry: bool = True,
        vocabulary: str | None = None,
        class_names: list[str] | str | None = None,
        naming: NamingSettings | None = None,
        vocabulary_names: str | None = None,
    ) -> None:
        super().__init__()
        if label_mode not in ("cluster", "first_frame_gt", "open_vocab"):
            raise ValueError(
                "Expected `label_mode` to be 'cluster', 'first_frame_gt' or 'open_vocab', but got "
                f"{label_mode!r}."
            )
        if gt_anchor not in ("first_frame", "first_labelled"):
            raise ValueError(
                f"Expected `gt_anchor` to be 'first_frame' or 'first_labelled', but got {gt_anchor!r}."
            )
        if matching not in ("auto", "none", "video", "dataset"):
            raise ValueError(
                f"Expected `matching` to be 'auto', 'none', 'video' or 'dataset', but got {matching!r}."
            )
        if on_error not in ("skip", "fail"):
            raise ValueError(f"Expected `on_error` to be 'skip' or 'fail', but got {on_error!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(
                f"Expected `num_classes` to be a positive integer or None, but got {num_classes!r}."
            )
        self.segmenter = segmenter if segmenter is not None else VideoSegmenter()
        backbone = self.segmenter.backbone
        names_used = label_mode == "open_vocab" or (label_mode == "cluster" and class_names is not None)
        if names_used and not backbone.has_text_encoder:
            raise ValueError(
                f"Expected a backbone with a text encoder for open-vocabulary naming (label_mode open_vocab "
                f"or class_names), but {backbone.description} has none: Stable Video Diffusion is "
                "conditioned on an image. Use the Stable Diffusion backbone for naming, or label_mode "
                "cluster without class_names."
            )
        if label_mode == "open_vocab" and vocabulary is not None:
            raise ValueError(
                "Expected either `label_mode: open_vocab` (class ids from the cross-attention) or "
                "`vocabulary` (a corpus vocabulary's global ids), but got both. Name a vocabulary's classes "
                "with `python -m vss_lightning.vocabulary name` instead."
            )
        self.class_names = class_names
        self.naming = naming if naming is not None else NamingSettings()
        self._class_names = load_class_names(class_names) if class_names is not None else None
        self._names_resolved = False
        self.label_mode = label_mode
        self.gt_anchor = gt_anchor
        self.num_classes = num_classes
        self._given_num_classes = num_classes  # `num_classes` resolves against the manifest per test run
        self.matching = matching if matching != "auto" else ("video" if label_mode == "cluster" else "none")
        self.on_error = on_error
        self.oom_retry = oom_retry
        self.vocabulary = vocabulary
        if vocabulary_names is not None and vocabulary is None:
            raise ValueError(
                "Expected `vocabulary_names` to come with `vocabulary` (the names of its global classes), "
                "but no vocabulary was given. Pass --model.vocabulary VOCAB too."
            )
        self.vocabulary_names = vocabulary_names
        labeller_mode = (
            "first_frame_gt" if label_mode == "first_frame_gt" else "cluster"
        )  # open_vocab names clusters
        self.videos = VideoLabeller(self.segmenter, labeller_mode, gt_anchor, oom_retry)
        self.metrics: VideoSegmentationMetrics | None = None
        self.failed_count: SumMetric | None = None
        self.eval_results: dict[str, Any] | None = None  # the last test/validate metrics (metrics.json)
        self._eval_parts: ClipAssembler[tuple[torch.Tensor, torch.Tensor]] = ClipAssembler()
        self._is_complete: Callable[[VideoMeta], bool] | None = None
        self._hash: str | None = None
        self._vocabulary: tuple[torch.Tensor, dict[str, str]] | None = None  # `vocabulary`, loaded

    def add_frame_listener(self, listener: FrameListener) -> None:
        """Call `listener(video_id, frames_done, frames_total)` whenever a batch of a video's frames is
        labelled (e.g. a progress bar showing progress inside long videos). Added once."""
        if listener not in self.videos.listeners:
            self.videos.listeners.append(listener)

    def set_completeness_check(self, check: Callable[[VideoMeta], bool] | None) -> None:
        """Register `check(meta)` (the writer's `is_complete`), asked in predict before a sample is
        computed: True skips it. None removes it."""
        self._is_complete = check

    # -- set-up ---------------------------------------------------------------------------------
    def load(self, device: torch.device | str = "cpu") -> ZeroShotVSS:
        """Load the backbone on `device` (done by `setup` under a Trainer); returns self."""
        if not self.segmenter.loaded:
            self.segmenter.load(device)
        return self

    def setup(self, stage: str) -> None:
        if stage in ("test", "validate"):
            self.num_classes = self._eval_num_classes(stage)
            self.metrics = VideoSegmentationMetrics(self.num_classes, matching=self.matching)
            self.failed_count = SumMetric()
            self.failed_count.update(0.0)  # a defined sum on every rank, even with no failure
            self.eval_results = None
        self.load(self.trainer.strategy.root_device)
        self._use_naming()
        self._use_vocabulary()
        self._reset_videos()

    def _dataset_info(self) -> Any:
        """The datamodule's `dataset_info` (the shards' manifest: `num_classes`, `class_names`), or None
        without a trainer or such a datamodule."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "dataset_info", None)

    def naming_class_names(self) -> list[str] | None:
        """The class names the labels are scored for: `class_names` as given, else (for `open_vocab`)
        the shards' manifest `class_names`; None without naming (and always in `first_frame_gt`, whose
        labels are the ground truth's classes already).

        Raises:
            ValueError: for `open_vocab` without class names, or given names that differ from the
                manifest's (naming the manifest and the fix).
        """
        if self.label_mode == "first_frame_gt":
            return None
        if self._names_resolved:
            return self._class_names
        info = self._dataset_info()
        manifest = getattr(info, "class_names", None)
        where = ", ".join(getattr(info, "manifests", ())) or "the shards' manifest.json"
        names = resolve_class_names(self._class_names, manifest, where, self.label_mode == "open_vocab")
        self._class_names, self._names_resolved = names, self._trainer is not None
        return names

    def _use_naming(self) -> None:
        """With class names, score every label for them (`pipeline.naming`); `open_vocab` writes the
        class each label attends to most."""
        names = self.naming_class_names()
        self.segmenter.enable_naming(names, self.naming)
        if self.label_mode == "open_vocab":
            self.videos.relabel = self._label_classes

    def _label_classes(self, prototypes: VideoPrototypes) -> dict[int, int]:
        n = self.naming
        return label_classes(
            prototypes.class_scores,
            prototypes.score_range,
            prototypes.labels.tolist(),
            n.normalize,
            n.unknown_threshold,
            self.segmenter.context.ignore_index,
        )

    def _use_vocabulary(self) -> None:
        """With `vocabulary`, map every video's labels to its global ids (checked against the settings)."""
        if self.vocabulary is None or self.videos.relabel is not None:
            return
        from vss_lightning.vocabulary.apply import global_map

        centroids, meta = self._loaded_vocabulary()
        fitted_on, ours = meta.get("settings_hash", ""), self._local_settings_hash()
        if fitted_on and fitted_on != ours:
            raise ValueError(
                f"Expected the vocabulary {self.vocabulary!r} to be fitted on labels of this job's settings "
                f"(hash {ours}), but it was fitted on {fitted_on}. Fit a vocabulary on a corpus labelled "
                "with these settings, or run with the settings it was fitted on."
            )
        to_class = self._vocabulary_classes(centroids.shape[0]) if self.vocabulary_names is not None else None
        if to_class is None:
            self.videos.relabel = lambda prototypes: global_map(prototypes, centroids)
        else:
            self.videos.relabel = lambda prototypes: {
                local: to_class[g] for local, g in global_map(prototypes, centroids).items()
            }

    def _vocabulary_classes(self, num_global: int) -> list[int]:
        """Global id -> the dataset class id of its name in `vocabulary_names` (ignore_index if none).

        Raises:
            ValueError: if the shards' manifest records no class names (naming it and the fix).
        """
        from vss_lightning.vocabulary.sheet import class_ids_of_names, load_names

        names = load_names(self.vocabulary_names, num_global)
        info = self._dataset_info()
        classes = getattr(info, "class_names", None)
        if not classes:
            raise ValueError(
                "Expected the shards' manifest.json to record `class_names` for `vocabulary_names` "
                f"{self.vocabulary_names!r}, but it records none. Rebuild the shards with `python -m "
                "data_tools` (it records them for known datasets), or score the global ids with "
                "--model.matching dataset."
            )
        ignore = self.segmenter.context.ignore_index
        found, unknown = class_ids_of_names(names, classes)
        if unknown:
            log.warning(
                f"Names of {self.vocabulary_names} that are not the dataset's classes (written as "
                f"{ignore}): {sorted(set(unknown))}"
            )
        return [found.get(g, ignore) for g in range(num_global)]

    def _loaded_vocabulary(self) -> tuple[torch.Tensor, dict[str, str]]:
        """The vocabulary's centroids and metadata, read once (the hash and the labelling share them)."""
        if self._vocabulary is None:
            from vss_lightning.vocabulary.fit import load_vocabulary

            self._vocabulary = load_vocabulary(self.vocabulary)
        return self._vocabulary

    def _eval_num_classes(self, stage: str) -> int:
        """C for the metrics: `num_classes` as given, else the datamodule's manifest (`dataset_info`).

        Raises:
            ValueError: if neither tells C, or the given value disagrees with the manifest.
        """
        info = self._dataset_info()
        manifest = getattr(info, "num_classes", None)
        where = ", ".join(getattr(info, "manifests", ()))
        if self._given_num_classes is None:
            if manifest is None and self.label_mode == "open_vocab":
                return len(self.naming_class_names())
            if manifest is None:
                raise ValueError(
                    f"Expected `--model.num_classes` to be set for `{stage}` (the metrics need it), but got "
                    "None and the shards' manifest.json records none. Set it in the config (e.g. 124 for "
                    "VSPW) or pass --model.num_classes N."
                )
            return manifest
        if manifest is not None and manifest != self._given_num_classes:
            raise ValueError(
                f"Expected `--model.num_classes` to match the shards' manifest.json ({manifest}), but got "
                f"{self._given_num_classes}. Pass --model.num_classes {manifest}, or leave it unset to take "
                f"it from {where}."
            )
        return self._given_num_classes

    def settings_hash(self) -> str:
        """A hash of everything that changes the labels: the segmenter's label-affecting settings
        (`VideoSegmenter.settings`, with the backbone's description) and the label mode.

        A finished video is skipped on resume only under the same hash. Built since issue #14 from
        the explicit list `pipeline.settings.LABEL_SETTINGS` (a deliberate change that gave every
        earlier output a new hash); tests/test_module.py pins the hash of the default settings.
        """
        if self._hash is None:
            if self.vocabulary is None:
                self._hash = self._local_settings_hash()
            else:  # global ids: the vocabulary is part of what the labels are
                from vss_lightning.vocabulary.fit import vocabulary_identity

                identity = vocabulary_identity(*self._loaded_vocabulary())
                parts = [self._local_settings_hash(), identity]
                if self.vocabulary_names is not None:  # class ids by name: the names are part of them
                    from vss_lightning.vocabulary.sheet import load_names

                    parts.append(sorted(load_names(self.vocabulary_names).items()))
                text = json.dumps(parts)
                self._hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._hash

    def _local_settings_hash(self) -> str:
        """The settings hash of the local (per-video) labels, without a vocabulary (with class names,
        the names and naming settings are part of it: they make the class ids and class scores)."""
        payload: dict[str, Any] = {"segmenter": self.segmenter.settings(), "label_mode": self.label_mode}
        names = self.naming_class_names()
        if names is not None:
            payload["naming"] = {"class_names": names, **dataclasses.asdict(self.naming)}
        text = json.dumps(payload, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def output_info(self) -> dict[str, Any]:
        """What the writer records next to the labels."""
        info = {
            "settings_hash": self.settings_hash(),
            "label_mode": self.label_mode,
            "backbone": self.segmenter.backbone.description,
        }
        if self.vocabulary is not None:
            info["vocabulary"] = str(self.vocabulary)
        names = self.naming_class_names()
        if names is not None:
            info["class_names"] = names
        return info

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Frames stay on the CPU: the segmenter moves one frame batch at a time to its device.
        return batch

    def _reset_videos(self) -> None:
        self.videos.reset()
        self._eval_parts.clear()

    # -- steps ----------------------------------------------------------------------------------
    def predict_step(self, batch: VideoSample | FailedSample, batch_idx: int) -> VideoResult:
        return self.run_sample(batch, skip_complete=True)

    def test_step(self, batch: VideoSample | FailedSample, batch_idx: int) -> VideoResult:
        """Label the sample and score it (test and validate)."""
        result = self.run_sample(batch, skip_complete=False)
        self._score(batch, result)
        return result

    validation_step = test_step

    def run_sample(self, sample: VideoSample | FailedSample, skip_complete: bool = True) -> VideoResult:
        """Label one sample; see the module docstring for the steps.

        Args:
            sample: a `VideoSample` (frames (T, 3, H, W) uint8) or a `FailedSample`.
            skip_complete: ask the registered completeness check first and skip a complete video.

        Returns:
            `VideoLabels` ((T, H, W) labels on the CPU), `VideoSkipped` or `VideoFailed`.
        """
        if isinstance(sample, FailedSample):
            if self.on_error == "fail":
                raise SampleError(sample.error)
            log.warning(f"Failed sample {sample.where}: {sample.error}")
            return VideoFailed(sample.video_id, sample.key, sample.url, sample.error)
        if not isinstance(sample, VideoSample):
            raise TypeError(
                "Expected each batch to be one VideoSample or FailedSample (VideoShardDataModule, "
                f"batch_size=None), but got {type(sample).__name__}."
            )
        meta = sample.meta
        refused = self.videos.earlier_failure(meta)
        if refused is not None:
            return VideoFailed(meta.video_id, sample.key, sample.url, refused, meta.clip_index)
        if skip_complete and self._is_complete is not None and self._is_complete(meta):
            self.videos.skip(meta)
            return VideoSkipped(meta, sample.key, sample.url, ignored_fields=sample.ignored_fields)
        try:
            out = self.videos.label(meta, sample.frames, sample.labels, sample.where)
        except Exception as e:  # noqa: BLE001 - one bad video must not stop a labelling job (on_error)
            message = f"Expected to segment {sample.where}, but it failed with {type(e).__name__}: {e}"
            if self.on_error == "fail":
                raise RuntimeError(f"{message}. Pass --on_error skip to record it and go on.") from e
            log.warning(message)
            return VideoFailed(meta.video_id, sample.key, sample.url, message, meta.clip_index)
        return VideoLabels(
            meta, out.labels, sample.key, sample.url, out.seconds, out.retried, out.stage_seconds,
            ignored_fields=sample.ignored_fields,  # shard members outside the schema (issue #11)
            prototypes=out.prototypes,  # the video's label prototypes, with its last clip (issue #17)
        )  # fmt: skip

    # -- evaluation -----------------------------------------------------------------------------
    def _score(self, sample: VideoSample | FailedSample, result: VideoResult) -> None:
        """Add a video's labelled frames to the metrics (clips are joined per video first)."""
        if self.metrics is None:
            return
        if isinstance(result, VideoFailed):
            self.failed_count.update(1.0)
            if result.video_id is not None:
                self._eval_parts.pop(result.video_id)
            return
        if not isinstance(result, VideoLabels) or sample.labels is None:
            return
        for run in self._eval_parts.add(result.meta, labelled_part(result.labels, sample.labels)):
            self._update_metrics(run.parts)

    def _update_metrics(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        pred, target = join_parts(parts)
        pred, target = pred.to(self.device), target.to(self.device)
        self.metrics.update(pred, target, torch.ones(target.shape[0], dtype=torch.bool, device=self.device))

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def _finish_eval(self, prefix: str) -> None:
        """Compute the metrics on every rank (the one sync), log them and keep them in `eval_results`."""
        if self.metrics is None:
            return
        for run in self._eval_parts.clear():  # videos whose last clip was not seen on this rank
            self._update_metrics(run.parts)
        results: dict[str, Any] = self.metrics.compute()
        results["failed_videos"] = int(self.failed_count.compute())
        scalars = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
        self.log_dict({f"{prefix}/{k}": v for k, v in scalars.items()}, rank_zero_only=True)
        self.eval_results = {
            **results,
            **self.output_info(),
            "stage": prefix,
            "matching": self.matching,
            "num_classes": self.num_classes,
        }
        self.metrics.reset()
        self.failed_count.reset()

    def on_predict_epoch_end(self) -> None:
        self._reset_videos()
