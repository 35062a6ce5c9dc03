"""Untrusted inputs (issue #11): shards, metadata, images, weights and configs never execute code, never
write outside `--output_dir`, and are refused (that video only) quickly and with little memory."""

from __future__ import annotations

import ast
import contextlib
import gzip
import io
import json
import os
import pickle
import resource
import struct
import tarfile
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import EpsImagePlugin, Image
from shards import SIZE, jpeg, make_video, one_torch_thread, predict_args, write_shard

from data_tools.__main__ import main as data_tools_main
from vss_lightning import cli
from vss_lightning.data.datamodule import VideoShardDataModule, resolve_shards
from vss_lightning.data.format import (
    MAX_META_BYTES,
    FailedSample,
    SampleError,
    VideoMeta,
    VideoSample,
    decode_image,
    decode_label,
    decode_sample,
    encode_png,
    encode_sample,
    sample_key,
    validate_name,
)
from vss_lightning.io.summary import atomic_write

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PACKAGES = [ROOT / "vss_lightning", ROOT / "data_tools"]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


# -- helpers -------------------------------------------------------------------------------------------
class _Touch:
    """Unpickling this creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_payloads(marker: Path) -> dict[str, bytes]:
    """Members that create `marker` when deserialised: pickle, torch checkpoint, object .npy."""
    buf = io.BytesIO()
    torch.save({"state": _Touch(marker)}, buf)
    npy = io.BytesIO()
    np.save(npy, np.array([_Touch(marker)], dtype=object), allow_pickle=True)
    return {
        "payload.pyd": pickle.dumps(_Touch(marker)),
        "payload.pickle": pickle.dumps(_Touch(marker)),
        "weights.pth": buf.getvalue(),
        "array.npy": npy.getvalue(),
    }


def clip_sample(video_id: str, frame_names: list[str], seed: int = 0) -> dict:
    """A sample of `len(frame_names)` synthetic frames with exactly these names (not checked here)."""
    video = make_video("v", len(frame_names), seed=seed)
    meta = VideoMeta(video_id, frame_names, [video.frames.shape[1:3]] * len(frame_names), source="test")
    sample = encode_sample(meta, [(jpeg(f), "jpg") for f in video.frames])
    sample["__key__"] = sample_key(video_id.replace(".", "_").replace("/", "_"))
    return sample


def png_declaring(width: int, height: int, mode: str = "RGB") -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (its data holds one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour, channels = {"RGB": (2, 3), "L": (0, 1)}[mode]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    row = b"\0" + b"\0" * (channels * min(width, 1024))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b"")
    )


def write_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A tar with the given members; an int is a member of that many zero bytes, stored as a sparse
    hole (it takes no disk space)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            f.write(info.tobuf(format=tarfile.PAX_FORMAT))
            if isinstance(data, int):
                f.seek(data, os.SEEK_CUR)
            else:
                f.write(data)
            f.write(b"\0" * (-info.size % tarfile.BLOCKSIZE))
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        f.write(b"\0" * (-f.tell() % tarfile.RECORDSIZE))
    return path


def write_tar_gz(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A gzip-compressed tar with the given members (`tarfile` opens it transparently)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_members(sample: dict) -> list[tuple[str, bytes]]:
    return [(f"{sample['__key__']}.{k}", v) for k, v in sample.items() if not k.startswith("__")]


class _Cost:
    """Wall time, peak traced Python memory and growth of the peak RSS of a block."""

    def __enter__(self) -> _Cost:
        tracemalloc.start()
        self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        self.rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0) / 1024


def read_all(shards: str, **kwargs) -> list[VideoSample | FailedSample]:
    dm = VideoShardDataModule(shards, num_workers=0, **kwargs)
    dm.setup("predict")
    return list(dm.predict_dataloader())


# -- end to end ----------------------------------------------------------------------------------------
def test_hostile_shards_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vss-lightning predict` over shards holding pickles, path traversal, a decompression bomb, an
    oversized and a malformed `meta.json` among good videos: the good videos are labelled, every bad
    one is failed with a clear message in summary.json, nothing runs and nothing lands outside."""
    shards, out, marker = tmp_path / "shards", tmp_path / "out", tmp_path / "UNPICKLED"
    good_a = clip_sample("good_a", ["a0", "a1", "a2"], seed=1)
    good_a.update(pickle_payloads(marker))
    escape = clip_sample("../../x", ["f0", "f1"])
    absolute = clip_sample("abs_frame", [str(tmp_path / "escaped"), "f1"])
    bomb = clip_sample("bomb", ["b0", "b1"])
    bomb["00000.jpg"] = png_declaring(100_000, 100_000)  # stored under .jpg: the content decides
    deep = {"__key__": "deep", "meta.json": b"[" * 100_000, "00000.jpg": good_a["00000.jpg"]}
    bad_clips = clip_sample("bad_clips", ["c0"])
    meta = json.loads(bad_clips["meta.json"])
    bad_clips["meta.json"] = json.dumps(meta | {"num_clips": "x"}).encode()
    write_shard(shards / "s-000000.tar", [good_a, {"__key__": "evil", "pyd": pickle.dumps(_Touch(marker))},
                                          escape, absolute, bomb, deep, bad_clips])  # fmt: skip
    good_b = clip_sample("good_b", ["b0", "b1"], seed=2)
    write_tar(shards / "s-000001.tar", [("big.meta.json", MAX_META_BYTES + 1), *tar_members(good_b)])

    with one_torch_thread(), pytest.raises(SystemExit) as e:  # hostile samples fail alone; the rest finish
        cli.main(predict_args(str(shards / "s-*.tar"), out))
    assert e.value.code == cli.EXIT_SOME_FAILED

    assert not marker.exists()
    summary = json.loads((out / "summary.json").read_text())
    total = summary["total"]
    assert (total["videos"], total["frames"], total["ignored_fields"]) == (2, 5, 4)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["good_a", "good_b"]
    assert (out / "good_a" / "DONE").is_file() and (out / "good_b" / "DONE").is_file()
    errors = {f["key"]: f["error"] for f in summary["failed"]}
    assert set(errors) == {"evil", escape["__key__"], absolute["__key__"], "bomb__c0000", "deep",
                           "bad_clips__c0000", "big"}  # fmt: skip
    assert "meta.json" in errors["evil"]
    assert "video id" in errors[escape["__key__"]] and "'../../x'" in errors[escape["__key__"]]
    assert "frame name" in errors[absolute["__key__"]] and "plain file name" in errors[absolute["__key__"]]
    assert "at most 67108864 pixels" in errors["bomb__c0000"] and "--data.max_pixels" in errors["bomb__c0000"]
    assert "valid JSON" in errors["deep"]
    assert "num_clips" in errors["bad_clips__c0000"]
    assert f"over the limit of {MAX_META_BYTES}" in errors["big"]
    # Nothing was written outside the output folder (and the shards' folder we made).
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(out) and not p.is_relative_to(shards)]
    assert outside == [] and not (tmp_path.parent / "x").exists() and not (tmp_path / "escaped").exists()


# -- shards -------------------------------------------------------------------------------------------
def test_pickle_members_are_never_read(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    payloads = pickle_payloads(marker)
    torch.load(io.BytesIO(payloads["weights.pth"]), weights_only=False)
    assert marker.exists()  # the payload works when deserialised
    marker.unlink()
    sample = clip_sample("a", ["f0", "f1"]) | payloads
    write_shard(tmp_path / "x-000000.tar", [sample, clip_sample("b", ["g0"])])
    got = read_all(str(tmp_path / "x-*.tar"))
    assert [(s.video_id, s.ignored_fields) for s in got] == [("a", 4), ("b", 0)]
    assert not marker.exists()


def test_a_1gb_meta_json_is_never_read(tmp_path: Path) -> None:
    write_tar(
        tmp_path / "x-000000.tar", [("big.meta.json", 1 << 30), *tar_members(clip_sample("ok", ["f0"]))]
    )
    with _Cost() as cost:
        got = read_all(str(tmp_path / "x-000000.tar"))
    assert isinstance(got[0], FailedSample) and "1073741824 bytes" in got[0].error
    assert f"over the limit of {MAX_META_BYTES}" in got[0].error
    assert isinstance(got[1], VideoSample) and got[1].video_id == "ok"
    assert cost.peak_mib < 64 and cost.rss_growth_mib < 256, (cost.peak_mib, cost.rss_growth_mib)


def test_compressed_shard_cannot_expand_a_member_into_memory(tmp_path: Path) -> None:
    """`tarfile` opens .tar.gz transparently: a 64 KiB file holding a 64 MiB `meta.json`."""
    members = [("big.meta.json", b" " * (64 << 20)), *tar_members(clip_sample("ok", ["f0"]))]
    path = write_tar_gz(tmp_path / "x-000000.tar.gz", members)
    assert path.stat().st_size < 1 << 20
    with _Cost() as cost:
        got = read_all(str(path))
    assert isinstance(got[0], FailedSample) and "meta.json" in got[0].error
    assert [s.video_id for s in got[1:]] == ["ok"]
    assert cost.peak_mib < 32, cost.peak_mib


def test_meta_json_is_bounded_and_checked() -> None:
    good = json.loads(clip_sample("a", ["f0"])["meta.json"])
    with pytest.raises(SampleError, match=f"at most {MAX_META_BYTES} bytes"):
        VideoMeta.from_json(b" " * (MAX_META_BYTES + 1))
    bad = [
        b"[" * 100_000,  # RecursionError in json
        b'{"x": ' + b"1" * 5000 + b"}",  # int digits limit
        json.dumps(good | {"num_clips": 10**9}).encode(),
        json.dumps(good | {"clip_index": 3, "num_clips": 2}).encode(),
        json.dumps(good | {"frame_offset": -1}).encode(),
        json.dumps(good | {"class_names": [1, 2]}).encode(),
        json.dumps(good | {"sizes": [[0, 5]]}).encode(),
        json.dumps(good | {"frame_names": "f0"}).encode(),
    ]
    for data in bad:
        with pytest.raises(SampleError):
            VideoMeta.from_json(data, "test")


@pytest.mark.parametrize(
    "name",
    ["../../x", "..", ".", ".hidden", "/etc/passwd", "a/b", "a\\b", "C:evil", "a\x00b", "a\nb", "a\x1b[31m",
     "\u202eevil", "\udc80", "", "x" * 201, "é" * 101, 5, None,
     "e\u0301t\u00e9", "CON", "nul.txt", "Com1", "LPT9.tar", "aux .x", "name.", "name ", "a.preview",
     "b.PREVIEW"],
)  # fmt: skip
def test_unsafe_names_are_refused(name) -> None:
    with pytest.raises(SampleError, match="Expected the video id to be"):
        validate_name(name, "video id")


@pytest.mark.parametrize(
    "name", ["video_01", "frame 0001", "00001", "日本の動画", "a.b", "x" * 200, "\u00e9t\u00e9", "console",
             "COM10", "preview", "a.previews", "a.preview.b"],
)  # fmt: skip
def test_safe_names_pass(name: str) -> None:
    assert validate_name(name, "frame name") == name


def test_file_named_like_a_pipe_url_is_read_as_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WebDataset's `gopen` runs `pipe:` urls in a shell; a shard found by a glob is always a file."""
    monkeypatch.chdir(tmp_path)
    write_shard(tmp_path / "pipe:touch PIPED; cat a.tar #.tar", [clip_sample("a", ["f0"])])
    urls, _ = resolve_shards("*.tar")
    assert urls == ["./pipe:touch PIPED; cat a.tar #.tar"]
    assert [s.video_id for s in read_all("*.tar")] == ["a"]
    assert not (tmp_path / "PIPED").exists()


# -- images ---------------------------------------------------------------------------------------------
def test_png_declaring_100000_squared_pixels_is_refused_fast_and_small() -> None:
    data = png_declaring(100_000, 100_000)
    assert len(data) < 1024
    with _Cost() as cost, pytest.raises(SampleError, match="at most 67108864 pixels") as e:
        decode_image(data, "frame 'f0'")
    assert "--data.max_pixels" in str(e.value)
    with pytest.raises(SampleError, match="at most 67108864 pixels"):
        decode_label(png_declaring(100_000, 100_000, "L"), "label of frame 'f0'")
    assert cost.seconds < 2 and cost.peak_mib < 16 and cost.rss_growth_mib < 64, vars(cost)


def test_size_limit_is_checked_from_the_header_without_pil_warnings() -> None:
    """9500 x 9500 is over our default limit and over PIL's warning threshold (MAX_IMAGE_PIXELS)."""
    with warnings.catch_warnings(record=True) as seen, _Cost() as cost:
        warnings.simplefilter("always")
        with pytest.raises(SampleError, match="declares 9500x9500"):
            decode_image(png_declaring(9500, 9500), "frame 'f0'")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert cost.seconds < 2 and cost.rss_growth_mib < 64
    small = encode_png(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(SampleError, match="at most 1000 pixels, but its header declares 64x64"):
        decode_image(small, "frame 'f0'", max_pixels=1000)


def test_sample_pixels_and_frames_are_bounded_before_decoding(tmp_path: Path) -> None:
    h, w = SIZE
    write_shard(tmp_path / "x-000000.tar", [clip_sample("long", ["f0", "f1", "f2"])])  # 3 frames of h x w
    (got,) = read_all(str(tmp_path / "x-000000.tar"), max_sample_pixels=2 * h * w)
    assert isinstance(got, FailedSample) and "--max-frames-per-clip" in got.error
    (got,) = read_all(str(tmp_path / "x-000000.tar"), max_frames=2)
    assert isinstance(got, FailedSample) and "at most 2 frames" in got.error
    (got,) = read_all(str(tmp_path / "x-000000.tar"), max_pixels=h * (w - 1))
    assert isinstance(got, FailedSample) and "--data.max_pixels" in got.error


def test_only_jpeg_png_webp_reach_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    """An EPS file (PIL hands EPS to Ghostscript) stored as a frame never reaches PIL's EPS plugin."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    opened = []
    real_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(
        EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1) or real_open(self)
    )
    with contextlib.suppress(OSError):  # without a format list, PIL picks its EPS plugin by content
        Image.open(io.BytesIO(eps))
    assert opened == [1]
    with pytest.raises(SampleError, match="JPEG/PNG/WEBP"):
        decode_image(eps, "frame 'f0'")
    with pytest.raises(SampleError, match="PNG"):
        decode_label(jpeg(np.zeros((8, 8, 3), np.uint8)), "label of frame 'f0'")
    raw = clip_sample("a", ["f0"]) | {"__url__": "x.tar"}
    raw["00000.jpg"] = eps
    with pytest.raises(SampleError, match="'f0'"):
        decode_sample(raw)
    assert opened == [1]


def test_data_tools_refuses_other_formats_and_bombs(tmp_path: Path) -> None:
    video = tmp_path / "src" / "v"
    video.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(video / "0001.png")
    (video / "0002.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    bombs = tmp_path / "src" / "w"
    bombs.mkdir()
    (bombs / "0001.png").write_bytes(png_declaring(100_000, 100_000))
    out = tmp_path / "out"
    args = ["frames", "--root", str(tmp_path / "src"), "--out", str(out / "x-%06d.tar"), "--quiet"]
    assert data_tools_main([*args, "--on-error", "skip"]) == 1  # every video skipped
    reasons = {s["item"]: s["reason"] for s in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert "0002.jpg" in reasons["v"] and "JPEG/PNG/WEBP/BMP/TIFF" in reasons["v"]
    assert "0001.png" in reasons["w"] and "pixels" in reasons["w"]


# -- outputs ------------------------------------------------------------------------------------------
def test_atomic_write_never_follows_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / f".summary.json.{os.getpid()}.tmp").symlink_to(outside)
    with pytest.raises(OSError):
        atomic_write(out / "summary.json", b"{}")
    assert outside.read_text() == "keep" and not (out / "summary.json").exists()


# -- weights ------------------------------------------------------------------------------------------
def test_weights_load_from_safetensors_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import ModelMixin
    from test_backbone import _save_tiny_checkpoint
    from transformers import PreTrainedModel

    from vss_lightning.pipeline.backbone import BackboneNotFoundError, StableDiffusion

    calls = []
    for base in (ModelMixin, PreTrainedModel):
        real = base.from_pretrained.__func__

        def spy(cls, *args, _real=real, **kwargs):
            calls.append((cls.__name__, kwargs))
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(base, "from_pretrained", classmethod(spy))
    _save_tiny_checkpoint(tmp_path / "safe")
    calls.clear()
    StableDiffusion(str(tmp_path / "safe"), dtype="float32").load("cpu")
    assert {name for name, _ in calls} == {"UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"}
    assert all(kw.get("use_safetensors") is True and not kw.get("trust_remote_code") for _, kw in calls)

    _save_tiny_checkpoint(tmp_path / "pickled", with_weights="bin")
    with pytest.raises(BackboneNotFoundError) as e:
        StableDiffusion(str(tmp_path / "pickled"), dtype="float32").load("cpu")
    assert "safetensors" in str(e.value) and "save_pretrained(DIR, safe_serialization=True)" in str(e.value)


def test_ckpt_path_is_not_an_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A Lightning checkpoint is a pickle, and LightningCLI would apply the hyperparameters it holds."""
    ckpt = tmp_path / "model.ckpt"
    torch.save({"x": _Touch(tmp_path / "UNPICKLED")}, ckpt)
    for extra in (["--ckpt_path", str(ckpt)], ["--weights_only", "false"]):
        with pytest.raises(SystemExit) as e:
            cli.main(predict_args(str(tmp_path / "*.tar"), tmp_path / "out", *extra))
        assert e.value.code == 2 and extra[0] in capsys.readouterr().err
    assert not (tmp_path / "UNPICKLED").exists() and not (tmp_path / "out").exists()


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            out.append((ast.unparse(node.func), node))
    return out


def test_package_code_has_no_unsafe_deserialisation() -> None:
    """No pickle/torch.load/unsafe YAML/eval/shell in the package and data_tools; no remote code."""
    banned = {"torch.load", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "eval", "exec",
              "os.system", "np.load", "numpy.load", "marshal.loads", "shelve.open"}  # fmt: skip
    found = []
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            for name, call in _calls(ast.parse(path.read_text())):
                flags = {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg}
                if (
                    name in banned
                    or flags.get("trust_remote_code", "False") != "False"
                    or flags.get("shell", "False") != "False"
                    or flags.get("allow_pickle", "False") != "False"
                ):
                    found.append(f"{path.relative_to(ROOT)}:{call.lineno} {ast.unparse(call)[:80]}")
    assert found == []


# -- configs ------------------------------------------------------------------------------------------
def _print_config(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", "--config", str(CONFIGS / "smoke.yaml"), *args, "--print_config"])
    return e.value.code


def test_yaml_tags_in_configs_never_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "RAN"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed_everything: {tag}\ndata:\n  shards: {tag}\n")
    assert _print_config("--config", str(config)) != 0
    assert "could not determine a constructor" in capsys.readouterr().err
    assert _print_config("--data.shards", tag) == 0  # a value that fails safe YAML stays a string
    assert yaml.safe_load(capsys.readouterr().out)["data"]["shards"] == tag
    popen = {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}
    assert _print_config(f"--trainer.callbacks={json.dumps([popen])}") != 0  # not a Callback subclass
    config.write_text(
        "model:\n  segmenter:\n    class_path: subprocess.Popen\n"
        f"    init_args:\n      args: touch {marker}\n      shell: true\n"
    )
    assert _print_config("--config", str(config)) != 0
    assert "does not correspond to a subclass" in capsys.readouterr().err
    assert not marker.exists()


# -- tar header limits ----------------------------------------------------------------------------------
def _gzip_pax_bomb(path: Path, header_bytes: int) -> Path:
    """A .tar.gz holding a PAX extended header that says `header_bytes` (zeros that follow, compressed
    to well under 1 MiB), then an ordinary sample: `tarfile` alone would read the header whole."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, header_bytes
    chunk = b"\0" * (1 << 20)
    with gzip.GzipFile(path, "wb", compresslevel=1) as f:
        f.write(pax.tobuf(format=tarfile.USTAR_FORMAT))
        for _ in range(header_bytes // len(chunk)):
            f.write(chunk)
        for name, data in tar_members(clip_sample("after_bomb", ["f0"])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    return path


def test_a_400mb_pax_header_is_refused_unread_and_the_job_goes_on(tmp_path: Path) -> None:
    """Issue #16: a gzip'd shard whose 400 MB PAX header took +1.2 GB. Refused from its size field."""
    write_tar(tmp_path / "x-000000.tar", tar_members(clip_sample("before", ["f0"])))
    bomb = _gzip_pax_bomb(tmp_path / "x-000001.tar.gz", 400 << 20)
    write_tar(tmp_path / "x-000002.tar", tar_members(clip_sample("after", ["f0"])))
    assert bomb.stat().st_size < 2 << 20
    with _Cost() as cost:
        got = read_all(str(tmp_path / "x-{000000..000002}.tar*"))
    assert [type(s).__name__ for s in got] == ["VideoSample", "FailedSample", "VideoSample"]
    assert [got[0].video_id, got[2].video_id] == ["before", "after"]
    error = got[1].error
    assert got[1].url.endswith("x-000001.tar.gz") and str(bomb) in error
    assert f"PAX extended header at byte 0 says {400 << 20} bytes, over the limit of {1 << 20}" in error
    assert "`max_header_bytes`" in error and "was not read" in error
    assert cost.peak_mib < 16, cost.peak_mib  # the 400 MB were neither read nor decompressed
    assert cost.seconds < 5, cost.seconds


def test_a_gnu_long_name_over_the_limit_stops_its_shard(tmp_path: Path) -> None:
    path = tmp_path / "x-000000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [*tar_members(clip_sample("first", ["f0"])), ("n" * 3000 + ".txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = read_all(str(path), max_header_bytes=2048)
    assert [type(s).__name__ for s in got] == ["VideoSample", "FailedSample"] and got[0].video_id == "first"
    assert "GNU long-name header" in got[1].error and "3005 bytes, over the limit of 2048" in got[1].error
    assert [s.video_id for s in read_all(str(path))] == ["first", None]  # default limit: read, then ignored


def test_decompressed_bytes_per_shard_are_bounded_from_the_header(tmp_path: Path) -> None:
    """A member that would take the shard past `max_shard_bytes` stops it before it is read or skipped."""
    write_tar(
        tmp_path / "x-000000.tar",
        [
            *tar_members(clip_sample("first", ["f0"])),
            ("junk.bin", 1 << 30),
            *tar_members(clip_sample("no", ["f0"])),
        ],
    )
    write_tar(tmp_path / "x-000001.tar", tar_members(clip_sample("next", ["f0"])))
    with _Cost() as cost:
        got = read_all(str(tmp_path / "x-{000000..000001}.tar"), max_shard_bytes=1 << 20)
    assert [getattr(s, "video_id", None) for s in got] == ["first", None, "next"]
    assert isinstance(got[1], FailedSample) and "x-000000.tar" in got[1].error
    assert "'junk.bin'" in got[1].error and f"past {1 << 20} decompressed bytes" in got[1].error
    assert "`max_shard_bytes`" in got[1].error
    assert cost.seconds < 5 and cost.peak_mib < 16, (cost.seconds, cost.peak_mib)
    with pytest.raises(ValueError, match="max_header_bytes"):
        VideoShardDataModule(str(tmp_path / "x-000000.tar"), max_header_bytes=0)


def test_links_and_empty_shards_are_reported_not_dropped(tmp_path: Path) -> None:
    """A frame stored as a symbolic or hard link fails its video with a message naming the link; a
    valid but empty tar is reported as such; the other videos are read."""
    good = clip_sample("good", ["f0"])
    for kind, video in ((tarfile.SYMTYPE, "sym"), (tarfile.LNKTYPE, "hard")):
        sample = clip_sample(video, ["f0"])
        path = tmp_path / f"{video}-000000.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in tar_members(sample):
                info = tarfile.TarInfo(name)
                if name.endswith(".jpg"):  # the frame is a link to a file elsewhere
                    info.type, info.linkname = kind, "/etc/passwd"
                else:
                    info.size = len(data)
                tar.addfile(info, None if name.endswith(".jpg") else io.BytesIO(data))
    with tarfile.open(tmp_path / "empty-000000.tar", "w") as tar:
        info = tarfile.TarInfo("just-a-folder")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    write_tar(tmp_path / "zgood-000000.tar", tar_members(good))
    got = read_all(str(tmp_path / "*.tar"))
    by_url = {Path(getattr(s, "url", "")).name: s for s in got}
    assert [s.video_id for s in got if isinstance(s, VideoSample)] == ["good"]
    empty = by_url["empty-000000.tar"]
    assert isinstance(empty, FailedSample) and "holds no sample" in empty.error
    for video, kind in (("sym", "symbolic"), ("hard", "hard")):
        failed = by_url[f"{video}-000000.tar"]
        assert isinstance(failed, FailedSample) and failed.video_id == video
        assert f"is a {kind} link (to '/etc/passwd'), which is never followed" in failed.error


def test_a_gzip_bomb_member_stops_its_shard_before_it_fills_memory(tmp_path: Path, monkeypatch) -> None:
    """A frame member of 128 MiB of zeros (within the per-field bound) gzips to ~130 KiB (~1000:1)."""
    from vss_lightning.data import reader

    monkeypatch.setattr(reader, "COMPRESSION_GRACE_BYTES", 4 << 20)
    monkeypatch.setattr(reader, "READ_CHUNK_BYTES", 1 << 20)
    members = [*tar_members(clip_sample("ok", ["f0"])), ("bomb.00000.jpg", bytes(128 << 20))]
    path = write_tar_gz(tmp_path / "x-000000.tar.gz", members)
    assert path.stat().st_size < 1 << 20
    with _Cost() as cost:
        got = read_all(str(path))
    assert [s.video_id for s in got[:1]] == ["ok"]  # the sample before the bomb is delivered
    assert isinstance(got[-1], FailedSample) and "max_compression_ratio" in got[-1].error, got[-1]
    # Stopped after ~5 MiB of the 128; tarfile inflates ~10 KiB of compressed input at a time, which
    # is up to ~10 MiB of zeros (copied a few times in its buffer): measured peak ~32 MiB.
    assert cost.peak_mib < 64, cost.peak_mib


def test_incompressible_members_of_a_gzipped_shard_pass_the_compression_ratio(
    tmp_path: Path, monkeypatch
) -> None:
    """Encoded frames barely compress: a 6 MiB member of random bytes reads whole past a 1 MiB grace."""
    from vss_lightning.data import reader

    monkeypatch.setattr(reader, "COMPRESSION_GRACE_BYTES", 1 << 20)
    monkeypatch.setattr(reader, "READ_CHUNK_BYTES", 1 << 20)
    data = np.random.default_rng(0).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
    path = write_tar_gz(tmp_path / "x-000000.tar.gz", [("v.meta.json", b"{}"), ("v.00000.jpg", data)])
    (sample,) = list(reader.read_shard(str(path)))
    assert sample["00000.jpg"] == data
