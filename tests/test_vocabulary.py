"""Corpus vocabulary: prototypes, weighted cosine K-Means, fit and apply (issue #17)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shards import SIZE, one_thread  # noqa: F401
from sklearn.metrics import adjusted_rand_score
from test_wandb import wandb_offline  # noqa: F401

from vss_lightning.data.format import encode_png
from vss_lightning.pipeline.prototypes import PrototypeAccumulator
from vss_lightning.vocabulary import kmeans
from vss_lightning.vocabulary.__main__ import main
from vss_lightning.vocabulary.apply import apply_vocabulary
from vss_lightning.vocabulary.corpus import Corpus
from vss_lightning.vocabulary.fit import VOCABULARY_JSON, fit_vocabulary, load_vocabulary
from vss_lightning.vocabulary.prototypes import (
    PROTOTYPES,
    PrototypeError,
    VideoPrototypes,
    load_prototypes,
    save_prototypes,
)
from vss_lightning.vocabulary.sheet import load_names, shard_frames, typical_examples

DIM, CLASSES = 64, 8
# Noise of a prototype around its class direction: per-channel sigma 0.08 on unit class vectors in 64
# dimensions gives a noise norm of ~0.64, i.e. a cosine to the own class of ~0.84 and to the nearest
# other class of ~0.25 (random class directions): realistic for mean features of one class seen in
# different videos, and far from trivial (each prototype is visibly off its class).
NOISE = 0.08


def _classes(seed: int = 0) -> torch.Tensor:
    return kmeans.normalize(torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(seed)))


def _video(
    vid: str, classes: torch.Tensor, rng: np.random.Generator, frames: int = 3
) -> tuple[VideoPrototypes, dict[int, int]]:
    """A video holding a random subset of the classes under a random permutation of local ids."""
    present = rng.choice(CLASSES, size=int(rng.integers(2, 6)), replace=False)
    local = rng.permutation(20)[: len(present)]
    order = np.argsort(local)
    local, present = local[order], present[order]
    feats = classes[present] + NOISE * torch.from_numpy(rng.standard_normal((len(present), DIM))).float()
    cells = torch.from_numpy(rng.integers(5, 500, len(present)))
    proto = VideoPrototypes(
        video_id=vid,
        labels=torch.from_numpy(local).long(),
        features=feats,
        cells=cells,
        frames=torch.ones((len(present), frames), dtype=torch.uint8),
        settings_hash="abc",
    )
    return proto, dict(zip(local.tolist(), present.tolist(), strict=True))


def _write_video(root: Path, proto: VideoPrototypes, labels: np.ndarray) -> None:
    """A finished png output video: label PNGs, DONE, prototypes."""
    vdir = root / proto.video_id
    vdir.mkdir(parents=True)
    names = [f"f{t:03d}" for t in range(labels.shape[0])]
    for name, lab in zip(names, labels, strict=True):
        (vdir / f"{name}.png").write_bytes(encode_png(lab.astype(np.uint8)))
    save_prototypes(proto, vdir / PROTOTYPES)
    done = {"video_id": proto.video_id, "frame_names": names, "settings_hash": proto.settings_hash}
    (vdir / "DONE").write_text(json.dumps(done))


def _corpus(root: Path, videos: int, seed: int = 0) -> dict[str, dict[int, int]]:
    rng = np.random.default_rng(seed)
    classes = _classes(seed)
    truth = {}
    for v in range(videos):
        proto, mapping = _video(f"v{v:03d}", classes, rng)
        labels = rng.choice(proto.labels.numpy(), size=(3, 8, 12))
        _write_video(root, proto, labels)
        truth[proto.video_id] = mapping
    return truth


def test_weighted_cosine_kmeans_matches_a_naive_reference():
    """Lloyd on unit vectors: each step's centroids equal the normalised weighted member sums."""
    gen = torch.Generator().manual_seed(1)
    x = kmeans.normalize(torch.randn(200, 16, generator=gen, dtype=torch.float64))
    w = torch.rand(200, generator=gen, dtype=torch.float64) + 0.1
    centroids, inertia = kmeans.fit(x, w, 5, n_init=3, seed=0)
    index = (x @ centroids.T).argmax(1)
    for g in range(5):
        members = index == g
        want = (x[members] * w[members, None]).sum(0)
        np.testing.assert_allclose(centroids[g].numpy(), (want / want.norm()).numpy(), atol=1e-6)
    naive = sum(float(w[i] * (1 - x[i] @ centroids[index[i]])) for i in range(200))
    assert inertia == pytest.approx(naive, rel=1e-9)


def test_streaming_fit_equals_in_memory_fit_on_a_corpus_larger_than_its_sample():
    gen = torch.Generator().manual_seed(2)
    centres = kmeans.normalize(torch.randn(6, 32, generator=gen, dtype=torch.float64))
    x = centres[torch.arange(3000) % 6] + 0.05 * torch.randn(3000, 32, generator=gen, dtype=torch.float64)
    w = torch.rand(3000, generator=gen, dtype=torch.float64) + 0.5
    chunks = lambda: ((x[i : i + 250], w[i : i + 250]) for i in range(0, 3000, 250))  # noqa: E731
    streamed, inertia, total = kmeans.fit_streaming(chunks, 6, sample_size=300, passes=20, seed=0)
    assert total == 3000
    truth = torch.arange(3000) % 6
    got = kmeans.assign(kmeans.normalize(x), streamed)[0]
    assert adjusted_rand_score(truth.numpy(), got.numpy()) == 1.0
    in_memory, _ = kmeans.fit(x, w, 6, seed=0)
    # Same partition, so the same centroids up to their order.
    order = kmeans.assign(in_memory, streamed)[0]
    assert sorted(order.tolist()) == list(range(6))
    np.testing.assert_allclose(streamed[order].numpy(), in_memory.numpy(), atol=1e-9)


def test_accumulator_means_features_over_the_cells_of_each_label():
    feats = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    coarse = torch.tensor([[[0, 0, 1], [1, 1, 1]], [[2, 2, 2], [0, 2, 2]]])
    acc = PrototypeAccumulator(num_frames=5)
    acc.add(feats, coarse, [3, 4])
    p = acc.result("vid", "h")
    assert p.labels.tolist() == [0, 1, 2]
    flat, lab = feats.reshape(-1, 4), coarse.reshape(-1)
    for i, label in enumerate([0, 1, 2]):
        torch.testing.assert_close(p.features[i], flat[lab == label].mean(0))
    assert p.cells.tolist() == [3, 4, 5]
    assert p.frames.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


def test_prototypes_round_trip_and_a_missing_file_names_the_fix(tmp_path):
    proto, _ = _video("a", _classes(), np.random.default_rng(0))
    save_prototypes(proto, tmp_path / PROTOTYPES)
    back = load_prototypes(tmp_path / PROTOTYPES)
    assert back.video_id == "a" and back.settings_hash == "abc"
    torch.testing.assert_close(back.features, proto.features)
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(PrototypeError, match="does not exist. Label the video"):
        load_prototypes(tmp_path / "nope" / PROTOTYPES)


def test_fit_and_apply_recover_the_global_classes_of_a_corpus(tmp_path):
    """60 videos, each a random subset of 8 classes under a random local-id permutation."""
    labels, vocab, out = tmp_path / "labels", tmp_path / "vocab", tmp_path / "global"
    truth = _corpus(labels, 60)
    record = fit_vocabulary([labels], CLASSES, vocab, seed=0)
    assert record["videos"] == 60 and len(record["classes"]) == CLASSES
    assert json.loads((vocab / VOCABULARY_JSON).read_text())["vocabulary_hash"] == record["vocabulary_hash"]
    summary = apply_vocabulary(labels, vocab, out)
    assert len(summary.written) == 60
    true_ids, got_ids = [], []
    for vid, mapping in truth.items():
        done = json.loads((out / vid / "DONE").read_text())
        for local, cls in mapping.items():
            true_ids.append(cls)
            got_ids.append(done["global_ids"][str(local)])
        for name in done["frame_names"]:  # the PNGs carry the mapped ids
            local_png = np.asarray(Image.open(labels / vid / f"{name}.png"))
            global_png = np.asarray(Image.open(out / vid / f"{name}.png"))
            lut = {int(k): v for k, v in done["global_ids"].items()}
            assert (global_png == np.vectorize(lut.get)(local_png)).all()
    assert adjusted_rand_score(true_ids, got_ids) >= 0.99


def test_the_same_video_under_two_ids_gets_identical_global_labels(tmp_path):
    labels, vocab, out = tmp_path / "labels", tmp_path / "vocab", tmp_path / "global"
    _corpus(labels, 20)
    twin = labels / "twin"
    twin.mkdir()
    for p in (labels / "v003").iterdir():
        (twin / p.name).write_bytes(p.read_bytes())
    fit_vocabulary([labels], CLASSES, vocab)
    apply_vocabulary(labels, vocab, out)
    for p in sorted((out / "v003").glob("*.png")):
        assert (out / "twin" / p.name).read_bytes() == p.read_bytes()


def test_apply_is_idempotent_and_resumes_after_a_kill(tmp_path):
    labels, vocab, out = tmp_path / "labels", tmp_path / "vocab", tmp_path / "global"
    _corpus(labels, 10)
    fit_vocabulary([labels], CLASSES, vocab)
    first = apply_vocabulary(labels, vocab, out)
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    again = apply_vocabulary(labels, vocab, out)
    assert again.skipped == first.written and not again.written
    # A kill in the middle of a video: its DONE is gone and one PNG half written (as a temp file).
    (out / "v004" / "DONE").unlink()
    (out / "v004" / "f001.png").unlink()
    (out / "v004" / ".f001.png.x.tmp").write_bytes(b"partial")
    resumed = apply_vocabulary(labels, vocab, out)
    assert resumed.written == ["v004"]
    assert not list(out.rglob(".*.tmp"))
    for p, data in files.items():
        assert p.read_bytes() == data, p


def test_bad_input_is_named(tmp_path):
    labels, vocab = tmp_path / "labels", tmp_path / "vocab"
    _corpus(labels, 3)
    with pytest.raises(ValueError, match="at least 20 prototypes for 20 global classes"):
        fit_vocabulary([labels], 20, vocab)
    (labels / "v001" / PROTOTYPES).unlink()
    with pytest.raises(PrototypeError, match="v001.*is missing"):
        fit_vocabulary([labels], 2, vocab)
    with pytest.raises(PrototypeError, match="Make one with"):
        load_vocabulary(tmp_path / "none")


def test_a_corpus_of_two_settings_is_refused(tmp_path):
    labels = tmp_path / "labels"
    _corpus(labels, 4)
    p = load_prototypes(labels / "v002" / PROTOTYPES)
    p.settings_hash = "other"
    save_prototypes(p, labels / "v002" / PROTOTYPES)
    with pytest.raises(PrototypeError, match="one settings hash"):
        fit_vocabulary([labels], 2, tmp_path / "vocab")


def test_command_line_fit_then_apply(tmp_path, capsys):
    labels, vocab, out = tmp_path / "labels", tmp_path / "vocab", tmp_path / "global"
    _corpus(labels, 12)
    main(["fit", "--labels", str(labels), "--num_classes", str(CLASSES), "--out", str(vocab)])
    assert json.loads(capsys.readouterr().out)["videos"] == 12
    main(["apply", "--labels", str(labels), "--vocab", str(vocab), "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == {"written": 12, "skipped": 0}
    with pytest.raises(SystemExit) as e:
        main(["apply", "--labels", str(labels), "--vocab", str(tmp_path / "missing"), "--out", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: Expected a vocabulary at")


def test_naming_sheet_shows_each_class_and_names_yaml_is_read(tmp_path):
    labels, vocab = tmp_path / "labels", tmp_path / "vocab"
    _corpus(labels, 12)
    frames_seen = []

    def frame_source(video_id: str, name: str) -> np.ndarray:
        frames_seen.append((video_id, name))
        return np.full((8, 12, 3), 200, np.uint8)

    fit_vocabulary([labels], CLASSES, vocab, frame_source=frame_source, examples_per_class=3)
    sheets = sorted((vocab / "sheets").glob("class_*.png"))
    assert [p.name for p in sheets] == [f"class_{g:03d}.png" for g in range(CLASSES)]
    assert frames_seen  # the examples were drawn over source frames
    page = (vocab / "index.html").read_text()
    assert page.count('class="name"') == CLASSES and "Export names.yaml" in page
    (vocab / "names.yaml").write_text('0: road\n3: "sky"\n')
    assert load_names(vocab / "names.yaml", CLASSES) == {0: "road", 3: "sky"}
    (vocab / "names.yaml").write_text("9: tree\n")
    with pytest.raises(ValueError, match=r"integers in \[0, 8\)"):
        load_names(vocab / "names.yaml", CLASSES)


def test_typical_examples_are_the_prototypes_closest_to_their_centroid(tmp_path):
    labels, vocab = tmp_path / "labels", tmp_path / "vocab"
    _corpus(labels, 15)
    fit_vocabulary([labels], CLASSES, vocab)
    centroids, _ = load_vocabulary(vocab)
    corpus = Corpus.scan([labels])
    examples = typical_examples(corpus, centroids, 2)
    unit = kmeans.normalize(centroids.double())
    best = [[] for _ in range(CLASSES)]  # naive: every prototype's cosine to its own centroid
    for p in corpus.videos():
        index, cos = kmeans.assign(kmeans.normalize(p.features.double()), unit)
        for g, c in zip(index.tolist(), cos.tolist(), strict=True):
            best[g].append(c)
    for g in range(CLASSES):
        assert [e.cosine for e in examples[g]] == pytest.approx(sorted(best[g], reverse=True)[:2])


def test_shard_frames_reads_the_wanted_frames_from_the_input_shards(tmp_path):
    import io

    from shards import jpeg, make_video, video_samples, write_shard

    video = make_video("a", 3)
    write_shard(tmp_path / "s-000000.tar", video_samples(video) + video_samples(make_video("b", 2, seed=1)))
    got = shard_frames(str(tmp_path / "s-000000.tar"), {("a", "a_f0001"), ("b", "nope")})
    assert list(got) == [("a", "a_f0001")]
    want = np.asarray(Image.open(io.BytesIO(jpeg(video.frames[1]))).convert("RGB"))
    np.testing.assert_array_equal(got[("a", "a_f0001")], want)


@pytest.mark.usefixtures("one_thread")
def test_predict_writes_prototypes_then_fit_apply_evaluate_run_end_to_end(tmp_path, capsys, local_labels):
    """The corpus path on the smoke config: predict -> fit -> apply -> evaluate (dataset matching)."""
    from shards import predict_args

    from vss_lightning.cli import main as cli_main
    from vss_lightning.evaluate import evaluate

    videos, shards, out = local_labels.videos, local_labels.shards, local_labels.png
    grid = (SIZE[0] // 16) * (SIZE[1] // 16)  # the tiny backbone's feature grid of the synthetic frames
    for vid, video in videos.items():
        p = load_prototypes(out / vid / PROTOTYPES)
        done = json.loads((out / vid / "DONE").read_text())
        assert p.video_id == vid and p.settings_hash == done["settings_hash"]
        assert int(p.cells.sum()) == len(video.frames) * grid  # every cell of every frame, once
        assert p.frames.shape[1] == len(video.frames) and bool(p.frames.any(0).all())
        png_ids = set()
        for name in done["frame_names"]:
            png_ids |= set(np.unique(np.asarray(Image.open(out / vid / f"{name}.png"))).tolist())
        assert png_ids <= set(p.labels.tolist())  # modulation picks among the coarse labels
    vocab, global_out = tmp_path / "vocab", tmp_path / "global"
    main(["fit", "--labels", str(out), "--num_classes", "3", "--out", str(vocab), "--shards", shards])
    main(["apply", "--labels", str(out), "--vocab", str(vocab), "--out", str(global_out)])
    assert sorted(p.name for p in global_out.iterdir()) == sorted(videos)
    result = evaluate(str(global_out), shards, num_classes=4, matching="dataset")
    assert result["videos"] == 3 and 0.0 <= result["mIoU"] <= 1.0
    # A later job emits global ids directly; for a video stored in one clip ("b", "c": at most
    # CLIP_FRAMES frames) they equal fit + apply byte for byte ("a" is split in two clips: its first
    # clip is mapped with the first clip's prototypes only).
    direct = tmp_path / "direct"
    cli_main(predict_args(shards, direct, "--model.vocabulary", str(vocab)))
    for vid in ("b", "c"):
        names = json.loads((global_out / vid / "DONE").read_text())["frame_names"]
        for name in names:
            assert (direct / vid / f"{name}.png").read_bytes() == (
                global_out / vid / f"{name}.png"
            ).read_bytes()
    ids = np.unique(np.asarray(Image.open(next((direct / "a").glob("*.png")))))
    assert ids.max() < 3
    assert json.loads((direct / "a" / "DONE").read_text())["settings_hash"] != done["settings_hash"]
    other = predict_args(shards, tmp_path / "other", "--model.vocabulary", str(vocab),
                         "--model.segmenter.init_args.context.num_clusters", "3")  # fmt: skip
    with pytest.raises(SystemExit) as e:
        cli_main(other)
    assert e.value.code == 1 and "Expected the vocabulary" in capsys.readouterr().err


def test_remapped_prototypes_pool_the_labels_mapped_to_one_id_and_labels_map():
    from vss_lightning.pipeline.video import map_labels

    feats = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    coarse = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[2, 2, 2], [0, 1, 2]]])
    acc = PrototypeAccumulator()
    acc.add(feats, coarse, [0, 1])
    pooled = acc.remapped({0: 5, 1: 5, 2: 7}).result("v")
    flat, lab = feats.reshape(-1, 4), coarse.reshape(-1)
    assert pooled.labels.tolist() == [5, 7] and pooled.cells.tolist() == [6, 6]
    torch.testing.assert_close(pooled.features[0], flat[lab <= 1].mean(0))
    torch.testing.assert_close(pooled.features[1], flat[lab == 2].mean(0))
    mapped = map_labels(coarse.to(torch.uint8), {0: 5, 1: 5, 2: 300})
    assert mapped.dtype == torch.int32 and mapped[0, 0, 2] == 5 and mapped[1, 0, 0] == 300
    with pytest.raises(ValueError, match=r"\[2\] have none"):
        map_labels(coarse, {0: 1, 1: 1})


def test_evaluate_scores_global_ids_by_their_names_with_no_matching(tmp_path, capsys):
    """`evaluate --names names.yaml`: each predicted id is the dataset class of its name."""
    from shards import make_shards

    from vss_lightning.evaluate import main as evaluate_main

    folder = tmp_path / "gt"
    videos = make_shards(folder, [[("a", 2), ("b", 2)]], labelled=True)
    manifest = {"shards": [{"name": "test-000000.tar", "clips": 2}], "num_classes": 4,
                "class_names": ["background", "Road", "sky", "car"]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    # Predictions in "global ids" 10 + class: names.yaml names them by the dataset's classes.
    for vid, video in videos.items():
        (tmp_path / "pred" / vid).mkdir(parents=True)
        for name, lab in zip(video.names, video.labels, strict=True):
            (tmp_path / "pred" / vid / f"{name}.png").write_bytes(encode_png((lab + 10).astype(np.uint8)))
    names = tmp_path / "names.yaml"
    names.write_text('10: background\n11: road\n12: "Sky"\n13: car\n')
    evaluate_main(["--pred", str(tmp_path / "pred"), "--gt", str(folder), "--names", str(names)])
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(1.0)
    names.write_text("10: background\n11: road\n12: sky\n13: bus\n")  # "bus" is not a class: wrong
    evaluate_main(["--pred", str(tmp_path / "pred"), "--gt", str(folder), "--names", str(names)])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["per_class_iou"][3] == 0.0 and "['bus']" in captured.err
    with pytest.raises(SystemExit) as e:
        evaluate_main(
            ["--pred", str(tmp_path / "pred"), "--gt", str(folder), "--names", str(tmp_path / "no")]
        )
    assert e.value.code == 2 and "Expected `--names`" in capsys.readouterr().err


@pytest.mark.usefixtures("wandb_offline")
def test_fit_logs_the_naming_sheet_as_a_wandb_table(tmp_path):
    from test_wandb import read_offline_run

    labels, vocab = tmp_path / "labels", tmp_path / "vocab"
    _corpus(labels, 10)
    main(["fit", "--labels", str(labels), "--num_classes", str(CLASSES), "--out", str(vocab),
          "--wandb_project", "vocab-test"])  # fmt: skip
    history, _ = read_offline_run(vocab)
    (row,) = [row for row in history if "vocabulary/classes/_type" in row]
    assert row["vocabulary/classes/_type"] == "table-file"
    assert (row["vocabulary/classes/nrows"], row["vocabulary/classes/ncols"]) == (CLASSES, 6)


@pytest.mark.usefixtures("one_thread")
def test_label_shards_give_the_same_vocabulary_and_global_labels_as_png_folders(tmp_path, local_labels):
    """fit and apply read `--output_format shards` outputs (prototypes in the last clip's sample)."""
    from shards import label_files

    from vss_lightning.vocabulary.fit import vocabulary_hash

    png, tars = local_labels.png, local_labels.tars
    assert list(tars.glob("labels-rank*.tar")) and not list(tars.glob("*/DONE"))
    for name, out in (("png", png), ("tars", tars)):
        vocab, applied = tmp_path / f"{name}-vocab", tmp_path / f"{name}-global"
        main(["fit", "--labels", str(out), "--num_classes", "3", "--out", str(vocab)])
        main(["apply", "--labels", str(out), "--vocab", str(vocab), "--out", str(applied),
              "--output_format", "png"])  # fmt: skip
    assert vocabulary_hash(tmp_path / "png-vocab") == vocabulary_hash(tmp_path / "tars-vocab")
    from_png, from_tars = label_files(tmp_path / "png-global"), label_files(tmp_path / "tars-global")
    assert from_png == from_tars and len(from_png) == 12
    assert (tmp_path / "tars-vocab" / "sheets" / "class_000.png").is_file()


@pytest.mark.slow
def test_the_naming_page_exports_names_yaml_in_a_real_browser(tmp_path):
    """The page's own `namesYaml()` (what "Export names.yaml" downloads) run by headless Chromium on
    names typed into its fields; the result is read back by `load_names`. (The download itself, a
    Blob link click, is not driven here.) Needs Chromium (Debian: `apt-get install chromium`)."""
    import html as html_lib
    import re
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    labels, vocab = tmp_path / "labels", tmp_path / "vocab"
    _corpus(labels, 10)
    fit_vocabulary([labels], CLASSES, vocab)
    typed = {0: "road", 3: 'sky "blue"', 7: "  car  "}
    fill = "".join(
        f"document.querySelector('input.name[data-id=\"{g}\"]').value = {json.dumps(name)};"
        for g, name in typed.items()
    )
    page = (vocab / "index.html").read_text()
    probe = page.replace(
        "</body>", f"<script>{fill} document.body.dataset.yaml = namesYaml();</script></body>"
    )
    (vocab / "probe.html").write_text(probe)
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"]
    dom = subprocess.run(
        [*command, (vocab / "probe.html").as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    exported = html_lib.unescape(re.search(r'data-yaml="([^"]*)"', dom).group(1))
    (vocab / "names.yaml").write_text(exported)
    assert load_names(vocab / "names.yaml", CLASSES) == {0: "road", 3: 'sky "blue"', 7: "car"}


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_remapped_prototypes_pool_the_stored_means_by_their_cells():
    from vss_lightning.vocabulary.apply import remap_prototypes

    proto, _ = _video("v", _classes(), np.random.default_rng(3), frames=4)
    proto.frames = torch.from_numpy(np.random.default_rng(4).integers(0, 2, tuple(proto.frames.shape))).to(
        torch.uint8
    )
    local = proto.labels.tolist()
    mapping = {la: (7 if i % 2 else 2) for i, la in enumerate(local)}
    pooled = remap_prototypes(proto, mapping)
    assert pooled.labels.tolist() == sorted(set(mapping.values())) and pooled.video_id == "v"
    for i, g in enumerate(pooled.labels.tolist()):
        members = torch.tensor([mapping[la] == g for la in local])
        w = proto.cells[members].double()
        want = (proto.features[members].double() * w[:, None]).sum(0) / w.sum()
        torch.testing.assert_close(pooled.features[i], want.float())
        assert int(pooled.cells[i]) == int(w.sum())
        assert pooled.frames[i].tolist() == proto.frames[members].amax(0).tolist()
    with pytest.raises(PrototypeError, match=r"have none"):
        remap_prototypes(proto, {local[0]: 1})


def test_apply_writes_label_shards_once_and_a_killed_run_resumes_byte_identically(tmp_path, monkeypatch):
    """`--output_format shards`: predict's tar layout (one tar per 3 videos here), the png path's global
    labels and prototypes byte for byte; a rerun skips, a kill or an error resumes to the same bytes."""
    from vss_lightning.vocabulary import apply as apply_module
    from vss_lightning.vocabulary.corpus import shard_videos

    labels, vocab, png, tars = tmp_path / "labels", tmp_path / "vocab", tmp_path / "png", tmp_path / "tars"
    _corpus(labels, 10)
    fit_vocabulary([labels], CLASSES, vocab)
    assert apply_vocabulary(labels, vocab, png).output_format == "png"  # the source's format
    first = apply_vocabulary(labels, vocab, tars, "shards", videos_per_shard=3)
    assert first.output_format == "shards" and first.written == [f"v{i:03d}" for i in range(10)]
    reference = _tree(tars)
    assert sorted(reference) == [
        f"labels-rank000-{i:06d}.{e}" for i in range(4) for e in ("index.json", "tar")
    ]
    videos = list(shard_videos(tars))
    assert sorted(v.video_id for v in videos) == first.written  # each video once
    for v in videos:
        done = json.loads((png / v.video_id / "DONE").read_text())
        assert v.frame_names() == done["frame_names"] and len(v.records) == 1
        for name in v.frame_names():
            want = np.asarray(Image.open(png / v.video_id / f"{name}.png"))
            np.testing.assert_array_equal(v.label(name), want)
        record = v.records[-1]
        assert record["label_mode"] == "vocabulary" and record["settings_hash"] == "abc"
        for key in ("vocabulary_hash", "source_done", "global_ids"):
            assert record[key] == done[key], key
        assert v.prototypes().labels.tolist() == sorted(set(done["global_ids"].values()))
        assert v._read(v.prototypes_member) == (png / v.video_id / PROTOTYPES).read_bytes()
    # The applied shards are a corpus: fit reads them (the global-id prototypes).
    assert Corpus.scan([tars]).dim == DIM
    again = apply_vocabulary(labels, vocab, tars, "shards", videos_per_shard=3)
    assert again.skipped == first.written and not again.written and _tree(tars) == reference
    # Killed while tar 1 was written, after its index and before its rename: tars 1-3 are gone, tar 1
    # is a half `.tmp`; the rerun removes it and writes the same tars again.
    for i in (1, 2, 3):
        (tars / f"labels-rank000-{i:06d}.tar").unlink()
        if i > 1:
            (tars / f"labels-rank000-{i:06d}.index.json").unlink()
    (tars / "labels-rank000-000001.tar.tmp").write_bytes(reference["labels-rank000-000001.tar"][:3000])
    resumed = apply_vocabulary(labels, vocab, tars, "shards", videos_per_shard=3)
    assert resumed.skipped == first.written[:3] and resumed.written == first.written[3:]
    assert _tree(tars) == reference
    # An error in video v005: the open tar (v003, v004) is dropped, the finished one kept.
    for p in tars.iterdir():
        p.unlink()
    real = apply_module._Mapped.label

    def failing(self, name):
        if self.video.video_id == "v005":
            raise PrototypeError("boom")
        return real(self, name)

    monkeypatch.setattr(apply_module._Mapped, "label", failing)
    with pytest.raises(PrototypeError, match="boom"):
        apply_vocabulary(labels, vocab, tars, "shards", videos_per_shard=3)
    assert sorted(p.name for p in tars.iterdir()) == [
        "labels-rank000-000000.index.json",
        "labels-rank000-000000.tar",
    ]
    monkeypatch.undo()
    apply_vocabulary(labels, vocab, tars, "shards", videos_per_shard=3)
    assert _tree(tars) == reference
    # Tars are not rewritten in place, and one output folder holds one format.
    fit_vocabulary([labels], CLASSES, tmp_path / "vocab2", seed=1)
    with pytest.raises(ValueError, match="mapped with this vocabulary .* use a new `--out`"):
        apply_vocabulary(labels, tmp_path / "vocab2", tars, "shards")
    with pytest.raises(ValueError, match="to hold no label shards for png output"):
        apply_vocabulary(labels, vocab, tars, "png")
    with pytest.raises(ValueError, match="to hold no png videos"):
        apply_vocabulary(labels, vocab, png, "shards")
    assert _tree(tars) == reference and not list(tmp_path.rglob("*.lock"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_apply_to_predicts_label_shards_writes_their_samples_in_global_ids(tmp_path, local_labels):
    """Label shards in, label shards out (the default): one sample per source clip with its meta.json
    and record as predict wrote them, the labels mapped, the remapped prototypes in the last clip."""
    import webdataset as wds

    tars, vocab, out = local_labels.tars, tmp_path / "vocab", tmp_path / "global"  # "a": two clips
    main(["fit", "--labels", str(tars), "--num_classes", "3", "--out", str(vocab)])
    main(["apply", "--labels", str(tars), "--vocab", str(vocab), "--out", str(out)])
    assert list(out.glob("labels-rank000-*.tar")) and not list(out.glob("*/DONE"))

    def samples(folder: Path) -> dict[str, dict]:
        urls = sorted(str(p) for p in folder.glob("labels-rank*.tar"))
        return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}

    src, dst = samples(tars), samples(out)
    assert sorted(dst) == sorted(src) == ["a__c0000", "a__c0001", "b__c0000", "c__c0000"]
    for key, s in src.items():
        d = dst[key]
        assert d["meta.json"] == s["meta.json"]
        before, after = json.loads(s["labels.json"]), json.loads(d["labels.json"])
        for field_name in ("video_id", "identity", "frame_names", "clip_index", "num_clips", "sources"):
            assert after[field_name] == before[field_name], field_name
        assert after["label_mode"] == "vocabulary" and after["settings_hash"] == before["settings_hash"]
        lut = {int(k): v for k, v in after["global_ids"].items()}
        assert sorted(set(lut.values())) <= [0, 1, 2]
        for i in range(len(before["frame_names"])):
            local = np.asarray(Image.open(io.BytesIO(s[f"{i:05d}.label.png"])))
            mapped = np.asarray(Image.open(io.BytesIO(d[f"{i:05d}.label.png"])))
            np.testing.assert_array_equal(mapped, np.vectorize(lut.get)(local))
        assert ("prototypes.safetensors" in d) == ("prototypes.safetensors" in s) == (key != "a__c0000")
    vid_b = VideoPrototypes.from_bytes(dst["b__c0000"]["prototypes.safetensors"], {}, "b")
    assert vid_b.labels.tolist() == sorted(
        set(json.loads(dst["b__c0000"]["labels.json"])["global_ids"].values())
    )


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_lightning_test_with_a_vocabulary_scores_the_global_ids_apply_writes(tmp_path, local_labels):
    """`test --model.vocabulary VOCAB --model.matching dataset` on the smoke config: metrics.json scores
    global ids, and the labels it wrote and scored are those `vocabulary apply` made from predict's
    (for the videos stored in one clip, where the direct map equals apply's; "a" is in two clips: its
    first clip is mapped with that clip's prototypes only)."""
    from shards import label_files, predict_args

    from vss_lightning.cli import main as cli_main
    from vss_lightning.evaluate import evaluate

    shards, local = local_labels.shards, local_labels.png  # C = 4
    vocab, applied, tested = (tmp_path / n for n in ("vocab", "applied", "tested"))
    main(["fit", "--labels", str(local), "--num_classes", "3", "--out", str(vocab)])
    main(["apply", "--labels", str(local), "--vocab", str(vocab), "--out", str(applied)])
    args = predict_args(
        shards,
        tested,
        "--model.vocabulary",
        str(vocab),
        "--model.matching",
        "dataset",
        "--model.num_classes",
        "4",
    )
    cli_main(["test", *args[1:]])
    metrics = json.loads((tested / "metrics.json").read_text())
    assert metrics["stage"] == "test" and metrics["matching"] == "dataset" and metrics["num_classes"] == 4
    assert metrics["vocabulary"] == str(vocab) and metrics["frames"] == 12 and metrics["videos"] == 3
    assert all(key in metrics for key in ("mIoU", "pixel_acc", "per_class_iou"))
    written, by_apply = label_files(tested), label_files(applied)
    first_clip_of_a = {f"a/a_f{t:04d}.png" for t in range(4)}
    assert len(written) == 12 and sorted(written) == sorted(by_apply)
    assert {k: v for k, v in written.items() if k not in first_clip_of_a} == {
        k: v for k, v in by_apply.items() if k not in first_clip_of_a
    }
    assert max(int(np.asarray(Image.open(p)).max()) for p in tested.glob("*/*.png")) < 3  # global ids
    want = evaluate(str(tested), shards, num_classes=4, matching="dataset")  # what it wrote, scored again
    assert metrics["mIoU"] == pytest.approx(want["mIoU"]) and metrics["pixel_acc"] == pytest.approx(
        want["pixel_acc"]
    )
    local_score = evaluate(str(local), shards, num_classes=4, matching="dataset")
    assert local_score["mIoU"] != pytest.approx(metrics["mIoU"])  # the check can tell local ids apart


@pytest.mark.usefixtures("one_thread")
def test_corpus_path_end_to_end_on_camvid_shards(tmp_path):
    """predict (smoke config) -> fit -> apply -> evaluate with dataset matching, and with names.yaml and no
    matching, on shards of real CamVid frames (three 4-frame videos cut from the sequence, with their
    ground truth and a manifest recording the 11 class names)."""
    from conftest import CAMVID
    from shards import Video, predict_args, video_samples, write_shard

    from data_tools.camvid import CLASSES_11
    from vss_lightning.cli import main as cli_main
    from vss_lightning.evaluate import evaluate

    images = sorted((CAMVID / "images").glob("*.png"))[:12]
    if len(images) < 12:
        pytest.skip(f"real data not present: {CAMVID} (the shared data folder is only on project machines)")
    size = (192, 128)
    frames = np.stack([np.asarray(Image.open(p).convert("RGB").resize(size)) for p in images])
    gt = np.stack(
        [np.asarray(Image.open(CAMVID / "labels" / p.name).resize(size, Image.NEAREST)) for p in images]
    )
    gt = np.where(gt == 11, 255, gt).astype(np.uint8)  # the SegNet release's void (11) is ignored
    folder = tmp_path / "shards"
    samples = []
    for v in range(3):
        sl = slice(4 * v, 4 * v + 4)
        video = Video(f"camvid{v}", frames[sl], gt[sl], [p.stem for p in images[sl]])
        samples += video_samples(video, labelled=True, num_classes=11)
    write_shard(folder / "camvid-000000.tar", samples)
    (folder / "manifest.json").write_text(
        json.dumps({"shards": [{"name": "camvid-000000.tar"}], "num_classes": 11, "class_names": CLASSES_11})
    )
    local, vocab, applied = tmp_path / "local", tmp_path / "vocab", tmp_path / "global"
    cli_main(predict_args(str(folder), local))
    main(["fit", "--labels", str(local), "--num_classes", "4", "--out", str(vocab), "--shards", str(folder)])
    main(["apply", "--labels", str(local), "--vocab", str(vocab), "--out", str(applied)])
    assert sorted(p.name for p in applied.iterdir() if p.is_dir()) == ["camvid0", "camvid1", "camvid2"]
    ids = {int(i) for p in applied.glob("*/*.png") for i in np.unique(np.asarray(Image.open(p)))}
    assert ids <= set(range(4))  # global ids, the same meaning in every video
    scored = evaluate(str(applied), str(folder), matching="dataset")
    assert scored["videos"] == 3 and scored["frames"] == 12 and 0.0 <= scored["mIoU"] <= 1.0
    assert (vocab / "index.html").is_file() and len(list((vocab / "sheets").glob("class_*.png"))) == 4
    # A names.yaml (as the naming page exports it) scores the global ids with no matching at all.
    (tmp_path / "names.yaml").write_text("0: road\n1: sky\n2: building\n3: tree\n")
    names = load_names(tmp_path / "names.yaml", 4)
    by_name = evaluate(str(applied), str(folder), matching="none", names=names)
    assert by_name["frames"] == 12 and 0.0 <= by_name["mIoU"] <= 1.0
