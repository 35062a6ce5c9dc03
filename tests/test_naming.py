"""Open-vocabulary naming (`pipeline/naming.py`, label_mode `open_vocab`, issue #18).

- the cross-attention probabilities computed from stored queries equal what the layer itself computes
  in a real forward pass (tiny SD backbone, its tiny CLIP text encoder, a BPE tokenizer whose
  vocab/merges files this test writes);
- a constructed case (identity projections, class-name embeddings along distinct axes) names every
  label right, two labels sharing one class, in every normalisation, with the unknown threshold;
- naming adds no UNet forward and encodes the prompts once per job;
- `lightning test --config configs/camvid.yaml --model.label_mode open_vocab --model.matching none`
  runs end to end on the smoke backbone (real CamVid frames, when the shared data is present).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID
from PIL import Image
from shards import CONFIGS, Video, make_shards, one_thread, predict_args, video_samples, write_shard  # noqa: F401

from vss_lightning.pipeline.naming import (
    ClassNamer,
    NamingSettings,
    PromptEncoder,
    Prompts,
    cross_attention_probs,
    label_classes,
    layer_keys,
    load_class_names,
)
from vss_lightning.pipeline.prototypes import PrototypeAccumulator
from vss_lightning.pipeline.random_backbones import TinyStableDiffusion
from vss_lightning.pipeline.segmenter import VideoSegmenter
from vss_lightning.pipeline.settings import ContextSettings

CROSS_LAYERS = [f"up_blocks.{b // 3}.attentions.{b % 3}.transformer_blocks.0.attn2" for b in range(3, 9)]


def write_bpe_tokenizer(folder: Path):
    """A small byte-pair tokenizer (vocab.json + merges.txt) whose ids fit the tiny text encoder."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz."
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = ["r o", "ro a", "roa d</w>", "s k", "sk y</w>", "p h", "ph o", "pho t", "phot o</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    assert len(vocab) <= 100
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77
    )


def test_cross_attention_probabilities_from_stored_queries_equal_the_layers_own(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor

    loaded = TinyStableDiffusion().load()
    tokenizer = write_bpe_tokenizer(tmp_path / "tokenizer")
    assert (
        tokenizer("a photo of a road.", add_special_tokens=False).input_ids[1]
        == tokenizer.get_vocab()["photo</w>"]
    )
    encoder = PromptEncoder(tokenizer, loaded.prompts.text_encoder)
    prompts = encoder.encode(["a photo of a {}."], ["road", "sky"])
    assert prompts.embeddings.shape == (2, 77, 16)
    assert prompts.name_mask.sum(1).tolist() == [1, 1]  # "road" and "sky" are one merged token each
    unet = loaded.unet
    layers = {name: unet.get_submodule(name) for name in CROSS_LAYERS}
    queries, probs = {}, {}

    def keep_query(name):
        return lambda module, args, out: queries.__setitem__(name, out)

    def keep_probs(name, attn):
        original = attn.get_attention_scores

        def scores(q, k, mask=None):
            out = original(q, k, mask)
            probs[name] = out
            return out

        return scores

    hooks = [attn.to_q.register_forward_hook(keep_query(name)) for name, attn in layers.items()]
    for name, attn in layers.items():
        attn.set_processor(AttnProcessor())  # the classic processor computes the probabilities explicitly
        attn.get_attention_scores = keep_probs(name, attn)
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 24)
    for p in range(2):  # a real forward conditioned on each prompt
        with torch.no_grad():
            unet(latents, 999, encoder_hidden_states=prompts.embeddings[p : p + 1].expand(2, -1, -1))
        for name, attn in layers.items():
            ours = cross_attention_probs(attn, queries[name], layer_keys(attn, prompts.embeddings))[
                :, :, :, p
            ]
            theirs = probs[name].unflatten(0, (2, attn.heads))  # (B, heads, N, S)
            # Both are softmax(q k^T * d^-1/2) of the same float32 tensors, differing only in the
            # order of a 4-to-16-term dot product (baddbmm vs einsum): a few float32 ulps of
            # probabilities in [0, 1], far below the tolerance.
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for h in hooks:
        h.remove()


def _constructed_namer(normalize: str = "video") -> ClassNamer:
    """Three classes whose name embeddings lie along axes 0, 1, 2 of an 8-d space (BOS along axis 7,
    padding 0); two layers (full grid and half grid) with identity q/k projections."""
    from diffusers.models.attention_processor import Attention

    layers = {}
    for name in ("full", "half"):
        attn = Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4)
        with torch.no_grad():
            attn.to_q.weight.copy_(torch.eye(8))
            attn.to_k.weight.copy_(torch.eye(8))
        layers[name] = attn.eval()
    emb = torch.zeros(3, 4, 8)  # (classes, tokens, dim): <bos> name <pad> <pad>
    emb[:, 0, 7] = 1.0
    for c in range(3):
        emb[c, 1, c] = 6.0
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, 1] = True
    return ClassNamer(layers, Prompts(emb, mask, ["road", "sky", "tree"]), step=24, normalize=normalize)


def _region_queries(region_class: list[int | None], grid: tuple[int, int]) -> torch.Tensor:
    """(1, h*w, 8) queries: the cells of vertical stripe r point along axis region_class[r] (None: 0)."""
    h, w = grid
    q = torch.zeros(h, w, 8)
    stripe = w // len(region_class)
    for r, c in enumerate(region_class):
        if c is not None:
            q[:, r * stripe : (r + 1) * stripe, c] = 6.0
    return q.reshape(1, h * w, 8)


@pytest.mark.parametrize("normalize", ["video", "frame", "none"])
def test_constructed_attention_names_every_label_two_labels_sharing_a_class(normalize):
    namer = _constructed_namer(normalize)
    grid = (4, 8)
    classes = [2, 0, 0, None]  # stripe r draws attention to class classes[r]'s name; the last to none
    full = _region_queries(classes, grid)
    half = _region_queries(classes, (2, 4))
    scores = namer.scores({"full": full, "half": half}, grid)  # (1, 4, 8, 3)
    assert scores.shape == (1, 4, 8, 3)
    coarse = torch.arange(4).repeat_interleave(2).expand(4, 8)[None]  # label r = stripe r
    acc = PrototypeAccumulator(class_names=namer.class_names)
    acc.add(torch.randn(1, 4, 8, 5), coarse, [0], scores)
    p = acc.result("v")
    named = label_classes(p.class_scores, p.score_range, p.labels.tolist(), normalize)
    assert {k: v for k, v in named.items() if k < 3} == {0: 2, 1: 0, 2: 0}
    # The stripe that attends to no name scores the same for every class: below a threshold it is unknown.
    threshold = {"video": 0.5, "frame": 0.5, "none": 0.5}[normalize]
    named = label_classes(p.class_scores, p.score_range, p.labels.tolist(), normalize, threshold, 255)
    assert named == {0: 2, 1: 0, 2: 0, 3: 255}


def test_video_normalisation_equals_normalising_the_maps_first():
    """`label_classes` normalises the per-label means with the video's score range: exact, since the
    mean of a min-max normalised map is the normalised mean."""
    torch.manual_seed(1)
    scores = torch.rand(3, 5, 6, 4)
    coarse = torch.randint(0, 3, (3, 5, 6))
    acc = PrototypeAccumulator(class_names=list("abcd"))
    acc.add(torch.randn(2, 5, 6, 2), coarse[:2], [0, 1], scores[:2])  # two batches of one video
    acc.add(torch.randn(1, 5, 6, 2), coarse[2:], [2], scores[2:])
    p = acc.result("v")
    flat = scores.reshape(-1, 4).double()
    lo, hi = flat.min(0).values, flat.max(0).values
    normalised = (flat - lo) / (hi - lo)
    labels = coarse.reshape(-1)
    want = {la: int(normalised[labels == la].mean(0).argmax()) for la in labels.unique().tolist()}
    assert label_classes(p.class_scores, p.score_range, p.labels.tolist(), "video") == want


def test_class_scores_survive_the_prototypes_file():
    from vss_lightning.pipeline.prototypes import VideoPrototypes

    acc = PrototypeAccumulator(class_names=["road", "sky"])
    acc.add(torch.randn(1, 2, 2, 3), torch.tensor([[[0, 1], [1, 1]]]), [0], torch.rand(1, 2, 2, 2))
    p = acc.result("v", "hash")
    back = VideoPrototypes.from_bytes(p.to_bytes(), {"video_id": "v", "class_names": '["road", "sky"]'}, "x")
    assert back.class_names == ["road", "sky"]
    torch.testing.assert_close(back.class_scores, p.class_scores)
    torch.testing.assert_close(back.score_range, p.score_range)


def _segmenter() -> VideoSegmenter:
    return VideoSegmenter(
        TinyStableDiffusion(), context=ContextSettings(batch_size=3, num_clusters=4, kmeans_n_init=2)
    )


def test_naming_adds_no_unet_forward_and_encodes_the_prompts_once():
    frames = torch.randint(
        0, 255, (4, 3, 128, 192), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    counts = {}
    plain = _segmenter().load()
    named = _segmenter().load()
    for key, seg in (("plain", plain), ("named", named)):
        counts[key] = 0

        def count(*_, key=key):
            counts[key] += 1

        seg._loaded.unet.register_forward_hook(count)
    encodes = []
    named._loaded.prompts.text_encoder.register_forward_hook(lambda *_: encodes.append(1))
    named.enable_naming(["road", "sky", "tree"])
    named.enable_naming(["road", "sky", "tree"])  # the same names again: nothing re-encoded
    assert len(encodes) == 1
    for video in range(2):
        a = plain.segment(frames, key=f"v{video}")
        b_out = list(named.iter_segment(frames, key=f"v{video}"))
        torch.testing.assert_close(torch.cat([o.labels for o in b_out]), a.labels)  # naming changes no label
        assert all(o.class_scores.shape[-1] == 3 for o in b_out)
    assert counts["named"] == counts["plain"] > 0
    assert len(encodes) == 1  # once per job, not per video
    named.enable_naming(["road", "car"])
    assert len(encodes) == 2


def test_backbone_without_text_encoder_is_a_clear_error():
    from vss_lightning.module import ZeroShotVSS
    from vss_lightning.pipeline.random_backbones import TinyStableVideoDiffusion
    from vss_lightning.pipeline.svd_modulation import svd_modulation_settings

    seg = VideoSegmenter(TinyStableVideoDiffusion(), modulation=svd_modulation_settings())
    with pytest.raises(ValueError, match="Use the Stable Diffusion backbone for naming"):
        ZeroShotVSS(seg, label_mode="open_vocab", class_names=["road"])


def test_class_names_from_list_yaml_and_text(tmp_path):
    (tmp_path / "a.yaml").write_text("- road\n- sky\n")
    (tmp_path / "b.yaml").write_text("1: sky\n0: road\n")
    (tmp_path / "c.txt").write_text("# CamVid\nroad\n\nsky\n")
    for source in (
        ["road", "sky"],
        str(tmp_path / "a.yaml"),
        str(tmp_path / "b.yaml"),
        str(tmp_path / "c.txt"),
    ):
        assert load_class_names(source) == ["road", "sky"]
    (tmp_path / "d.yaml").write_text("0: road\n2: sky\n")
    with pytest.raises(ValueError, match="0..1"):
        load_class_names(str(tmp_path / "d.yaml"))
    with pytest.raises(ValueError, match="distinct"):
        load_class_names(["road", "road"])
    with pytest.raises(ValueError, match="not a file"):
        load_class_names(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="exactly one"):
        NamingSettings(templates=["a photo"])


def test_a_template_that_merges_the_name_with_its_words_is_refused():
    loaded = TinyStableDiffusion().load()
    with pytest.raises(ValueError, match="space or punctuation"):
        loaded.prompts.token_ids(["photo{}s"], ["road"])  # would not be refused with a space


@pytest.mark.usefixtures("one_thread")
def test_lightning_test_open_vocab_on_the_camvid_config_end_to_end(tmp_path):
    """`vss-lightning test --config configs/camvid.yaml --model.label_mode open_vocab --model.matching none`
    with the smoke backbone on CPU: class ids named from the cross-attention, scored without matching."""
    from data_tools.camvid import CLASSES_11
    from vss_lightning.cli import main

    images = sorted((CAMVID / "images").glob("*.png"))[:4]
    if not images:
        pytest.skip(f"real data not present: {CAMVID} (the shared data folder is only on project machines)")
    frames = np.stack([np.asarray(Image.open(p).convert("RGB").resize((192, 128))) for p in images])
    gt = np.stack(
        [np.asarray(Image.open(CAMVID / "labels" / p.name).resize((192, 128), Image.NEAREST)) for p in images]
    )
    gt = np.where(gt == 11, 255, gt).astype(np.uint8)  # the SegNet release's void (11) is ignored
    folder = tmp_path / "shards"
    write_shard(
        folder / "camvid-000000.tar",
        video_samples(Video("0006R0", frames, gt, [p.stem for p in images]), labelled=True, num_classes=11),
    )
    (folder / "manifest.json").write_text(
        json.dumps({"shards": [{"name": "camvid-000000.tar"}], "num_classes": 11, "class_names": CLASSES_11})
    )
    out = tmp_path / "out"
    main([
        "test", "--config", str(CONFIGS / "camvid.yaml"),
        "--model.segmenter.init_args.backbone", "vss_lightning.pipeline.random_backbones.TinyStableDiffusion",
        "--model.segmenter.init_args.context.batch_size", "3",
        "--model.segmenter.init_args.context.kmeans_n_init", "2",
        "--model.segmenter.init_args.context.num_clusters", "5",
        "--model.label_mode", "open_vocab", "--model.matching", "none",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--data.shards", str(folder), "--data.num_workers", "0", "--output_dir", str(out),
    ])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_mode"] == "open_vocab" and metrics["matching"] == "none"
    assert metrics["class_names"] == CLASSES_11  # from configs/camvid.yaml, checked against the manifest
    assert metrics["videos"] == 1 and metrics["frames"] == 4 and 0.0 <= metrics["mIoU"] <= 1.0
    labels = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "0006R0").glob("*.png"))])
    assert set(np.unique(labels).tolist()) <= set(range(11))  # class ids, no threshold: every label named
    p = json.loads((out / "0006R0" / "DONE").read_text())
    assert p["settings_hash"] == metrics["settings_hash"]


def test_vocabulary_name_names_each_global_class_from_its_labels_scores(tmp_path):
    """Synthetic corpus: labels of true class k attend most to dataset name NAMES[perm[k]] (with noise and
    a per-video offset and scale that the video normalisation removes); `vocabulary name` names every
    global class with the name of its members' true class."""
    import dataclasses

    from test_vocabulary import CLASSES, _classes, _video, _write_video

    from vss_lightning.vocabulary.__main__ import main as vocabulary_main
    from vss_lightning.vocabulary.apply import global_map
    from vss_lightning.vocabulary.fit import load_vocabulary
    from vss_lightning.vocabulary.sheet import load_names

    names = [f"class{c}" for c in range(CLASSES + 2)]  # two dataset classes no label attends to
    rng = np.random.default_rng(3)
    perm = rng.permutation(CLASSES + 2)[:CLASSES]
    classes = _classes(3)
    labels_root, truth = tmp_path / "out", {}
    for v in range(30):
        proto, mapping = _video(f"v{v:03d}", classes, rng)
        true = [mapping[la] for la in proto.labels.tolist()]
        scores = 0.3 * torch.from_numpy(rng.random((len(true), len(names)))).float()
        scores[torch.arange(len(true)), torch.tensor(perm[true])] += 1.0
        offset, scale = float(rng.random()), 0.5 + float(rng.random())  # per-video attention level
        scores = offset + scale * scores
        score_range = torch.stack([scores.min(0).values - 0.01, scores.max(0).values + 0.01])
        proto = dataclasses.replace(proto, class_scores=scores, score_range=score_range, class_names=names)
        _write_video(labels_root, proto, rng.choice(proto.labels.numpy(), size=(2, 4, 6)))
        truth[proto.video_id] = (proto, true)
    vocab = tmp_path / "vocab"
    vocabulary_main(["fit", "--labels", str(labels_root), "--num_classes", str(CLASSES), "--out", str(vocab)])
    vocabulary_main(["name", "--labels", str(labels_root), "--vocab", str(vocab)])
    named = load_names(vocab / "names.yaml", CLASSES)
    centroids, _ = load_vocabulary(vocab)
    for proto, true in truth.values():
        mapping = global_map(proto, centroids)
        for label, k in zip(proto.labels.tolist(), true, strict=True):
            assert named[mapping[label]] == names[perm[k]]


def test_vocabulary_name_needs_class_scores(tmp_path):
    from test_vocabulary import _corpus

    from vss_lightning.vocabulary.__main__ import main as vocabulary_main

    _corpus(tmp_path / "out", 4)
    vocabulary_main(
        ["fit", "--labels", str(tmp_path / "out"), "--num_classes", "2", "--out", str(tmp_path / "v")]
    )
    with pytest.raises(SystemExit):
        vocabulary_main(["name", "--labels", str(tmp_path / "out"), "--vocab", str(tmp_path / "v")])


def test_the_real_loader_keeps_a_text_encoder_for_naming(tmp_path):
    """`StableDiffusion(local folder)` (the real loading code) keeps its tokenizer and text encoder, and a
    segmenter on it names with them."""
    import shutil

    from test_backbone import _save_tiny_checkpoint

    from vss_lightning.pipeline.backbone import StableDiffusion
    from vss_lightning.pipeline.random_backbones import char_tokenizer

    _save_tiny_checkpoint(tmp_path)
    shutil.rmtree(tmp_path / "tokenizer")
    char_tokenizer().save_pretrained(tmp_path / "tokenizer")  # letters: every class name tokenizes
    seg = VideoSegmenter(
        StableDiffusion(str(tmp_path), dtype="float32"), context=ContextSettings(batch_size=2, num_clusters=2)
    ).load()
    assert seg._loaded.prompts is not None
    seg.enable_naming(["road", "sky"])
    frames = torch.randint(
        0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    (out,) = list(seg.iter_segment(frames))
    assert out.class_scores.shape == (2, 4, 4, 2) and bool((out.class_scores > 0).all())


@pytest.mark.usefixtures("one_thread")
def test_lightning_test_with_vocabulary_names_writes_dataset_class_ids(tmp_path):
    """`test --model.vocabulary VOCAB --model.vocabulary_names names.yaml --model.matching none`: every
    global id is written as the dataset class id of its name (the manifest's class names); an unknown
    name becomes 255; the labels are apply's global ids mapped by name."""
    from shards import label_files

    from vss_lightning.cli import main as cli_main
    from vss_lightning.vocabulary.__main__ import main as vocabulary_main

    make_shards(tmp_path / "shards", [[("a", 3), ("b", 2)], [("c", 3)]], labelled=True)  # C = 4
    tars = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    (tmp_path / "shards" / "manifest.json").write_text(
        json.dumps(
            {"shards": [{"name": n} for n in tars], "num_classes": 4, "class_names": ["w", "x", "y", "z"]}
        )
    )
    shards = str(tmp_path / "shards" / "*.tar")
    local, vocab, applied, tested = (tmp_path / n for n in ("local", "vocab", "applied", "tested"))
    cli_main(predict_args(shards, local))
    vocabulary_main(["fit", "--labels", str(local), "--num_classes", "3", "--out", str(vocab)])
    vocabulary_main(["apply", "--labels", str(local), "--vocab", str(vocab), "--out", str(applied)])
    names = tmp_path / "names.yaml"
    names.write_text("0: y\n1: W\n2: not a class\n")
    args = predict_args(
        shards, tested, "--model.vocabulary", str(vocab), "--model.vocabulary_names", str(names)
    )
    cli_main(["test", *args[1:], "--model.matching", "none"])
    metrics = json.loads((tested / "metrics.json").read_text())
    assert metrics["matching"] == "none" and metrics["videos"] == 3 and 0.0 <= metrics["mIoU"] <= 1.0
    lut = np.array([2, 0, 255], dtype=np.uint8)
    want = {k: lut[np.asarray(Image.open(io.BytesIO(v)))] for k, v in label_files(applied).items()}
    got = {k: np.asarray(Image.open(io.BytesIO(v))) for k, v in label_files(tested).items()}
    assert sorted(got) == sorted(want) and len(got) == 8
    for k in got:
        np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="with `vocabulary`"):
        from vss_lightning.module import ZeroShotVSS

        ZeroShotVSS(_segmenter(), vocabulary_names=str(names))
