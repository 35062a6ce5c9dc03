"""Masked modulation: injection/blending identities, locality, batching, the difference map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerance import assert_equal_up_to_rounding

from vss_lightning.pipeline.attention import AttentionControl
from vss_lightning.pipeline.modulation import ModulationSettings, decoder_block_layer
from vss_lightning.pipeline.random_backbones import TinyStableDiffusion
from vss_lightning.pipeline.scoring import difference_maps, gaussian_blur, upsample_labels
from vss_lightning.pipeline.sd import SDModulation, SDSampler
from vss_lightning.pipeline.settings import SpeedSettings

FEAT = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def batch(tiny_backbone):
    """An unmodulated pass over 3 random 128x192 'frames' (latent 16x24, feature grid 8x12)."""
    sm = SDSampler(tiny_backbone, max_batch_images=64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 128, 192, generator=g) * 2 - 1
    zt = sm.add_noise(sm.encode(x), torch.randn(3, 4, 16, 24, generator=g))
    record = sm.unmodulated_pass(zt, sm.condition(x), AttentionControl(), [FEAT], 24)
    return sm, record


def test_decoder_block_names():
    assert decoder_block_layer(7, "cross") == "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert decoder_block_layer(11, "self") == "up_blocks.3.attentions.2.transformer_blocks.0.attn1"
    with pytest.raises(ValueError, match="decoder block"):
        decoder_block_layer(2, "self")


def test_zero_strength_with_injection_reproduces_the_unmodulated_pass(batch):
    sm, record = batch
    mm = SDModulation(ModulationSettings(strength=0.0), sm)
    masks = torch.zeros(3, 8, 12)
    masks[:, 2:6, 3:9] = 1
    z = mm.run_units(record, torch.arange(3), masks, torch.ones(3))
    # Same math in other batch shapes: float32 rounding, hardly amplified by the tiny SD UNet over 3
    # steps (measured 0 on x86-64); 1000 eps = 1.2e-4 relative, far below a modulation's effect.
    assert_equal_up_to_rounding(z, record.latents[24], 1000, "zero-strength latents")


def test_modulation_changes_latents_and_signs_differ(batch):
    sm, record = batch
    mm = SDModulation(ModulationSettings(strength=50.0, blend=False), sm)
    masks = torch.ones(2, 8, 12)
    z = mm.run_units(record, torch.tensor([0, 0]), masks, torch.tensor([1.0, -1.0]))
    assert not torch.allclose(z[0], record.latents[24][0], atol=1e-3)
    assert not torch.allclose(z[0], z[1], atol=1e-3)


def test_blending_keeps_latents_outside_the_mask(batch):
    sm, record = batch
    mm = SDModulation(ModulationSettings(strength=50.0, blend_steps=[22, 23, 24]), sm)
    masks = torch.zeros(1, 8, 12)
    masks[0, 2:5, 4:8] = 1
    z = mm.run_units(record, torch.tensor([1]), masks, torch.tensor([1.0]))
    up = torch.nn.functional.interpolate(masks[:, None], size=(16, 24), mode="nearest")[0, 0].bool()
    orig = record.latents[24][1]
    assert torch.equal(z[0][:, ~up], orig[:, ~up])
    assert not torch.allclose(z[0][:, up], orig[:, up], atol=1e-3)


def test_difference_map_is_largest_inside_the_label_region(batch):
    # Blending after every step confines the +/- difference to the mask in latent space; the VAE
    # decoder spreads it only locally, so the map must peak inside the region.
    sm, record = batch
    mm = SDModulation(ModulationSettings(strength=50.0, blend_steps=[22, 23, 24], mask_filter=False), sm)
    masks = torch.zeros(2, 8, 12)
    masks[:, 1:4, 1:5] = 1  # top-left region
    z = mm.run_units(record, torch.tensor([2, 2]), masks, torch.tensor([1.0, -1.0]))
    img = sm.decode(z)
    d = difference_maps(img[:1], img[1:], 5, 3.0)[0]  # (128, 192)
    inside = d[16:64, 16:80].mean()
    far = d[96:, 120:].mean()
    assert d.max() == pytest.approx(1.0, abs=1e-4)
    assert inside > 5 * far


def test_gaussian_blur_matches_a_naive_reflect101_convolution():
    x = torch.rand(2, 9, 11, dtype=torch.float64)
    out = gaussian_blur(x, 5, 3.0).numpy()
    k1 = np.exp(-((np.arange(5) - 2.0) ** 2) / 18.0)
    k2 = np.outer(k1, k1) / np.outer(k1, k1).sum()
    pad = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2)), mode="reflect")  # numpy 'reflect' == OpenCV REFLECT_101
    ref = np.zeros_like(x.numpy())
    for i in range(9):
        for j in range(11):
            ref[:, i, j] = (pad[:, i : i + 5, j : j + 5] * k2).sum((1, 2))
    # float64, 25-term weighted sums of values in [0, 1]: < 100 eps whatever the summation order.
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def _coarse():
    coarse = torch.zeros(3, 8, 12, dtype=torch.long)
    coarse[:, :, 6:] = 4
    coarse[0, :3, :4] = 9  # label 9 only in frame 0
    return coarse


def test_batched_equals_one_at_a_time_and_absent_labels_cost_nothing(batch, tiny_backbone, monkeypatch):
    sm, record = batch
    coarse = _coarse()
    settings = ModulationSettings(strength=50.0)
    big = SDModulation(settings, SDSampler(tiny_backbone, max_batch_images=64)).labels(
        record, coarse, (128, 192)
    )
    small_mm = SDModulation(settings, SDSampler(tiny_backbone, max_batch_images=4))
    seen = []
    real = small_mm.run_units
    monkeypatch.setattr(
        small_mm, "run_units", lambda r, f, m, s: (seen.extend(f.tolist()), real(r, f, m, s))[1]
    )
    small = small_mm.labels(record, coarse, (128, 192))
    assert torch.equal(big, small)
    # frame 0 has labels {0, 4, 9}, frames 1-2 have {0, 4}: 7 (frame, label) units x 2 signs
    assert sorted(seen) == sorted([0] * 6 + [1] * 4 + [2] * 4)
    assert big.shape == (3, 128, 192)
    for f in range(3):
        assert set(big[f].unique().tolist()) <= set(coarse[f].unique().tolist())


def test_no_modulation_is_bilinear_upsampling(batch):
    sm, record = batch
    coarse = _coarse()
    labels = SDModulation(ModulationSettings(enabled=False), sm).labels(record, coarse, (128, 192))
    assert torch.equal(labels, upsample_labels(coarse, (128, 192)))
    nearest = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)
    assert (labels == nearest).float().mean() > 0.9


def test_settings_are_validated(batch):
    sm, _ = batch
    with pytest.raises(ValueError, match="modulation.steps"):
        SDModulation(ModulationSettings(steps=[3]), sm)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(torch.zeros(1, 4, 4), 4, 1.0)


def test_prefix_reuse_leaves_latents_and_labels_unchanged(tiny_backbone):
    from vss_lightning.pipeline.prefix import prefix_modules

    layer = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert prefix_modules(tiny_backbone.unet, layer)[-3:] == [
        "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1",
        "up_blocks.2.attentions.0",
    ]
    sm = SDSampler(tiny_backbone, max_batch_images=4)  # chunked recording: 2 frames per forward
    reusing = SDSampler(tiny_backbone, max_batch_images=4, prefix_layer=layer)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, 128, 192, generator=g) * 2 - 1
    zt = sm.add_noise(sm.encode(x), torch.randn(3, 4, 16, 24, generator=g))
    plain = sm.unmodulated_pass(zt, sm.condition(x), AttentionControl(), [FEAT], 24)
    reused = reusing.unmodulated_pass(zt, sm.condition(x), AttentionControl(), [FEAT], 24)
    assert reused.prefix is not None and set(reused.prefix.outputs) == set(reused.prefix.names)
    settings = ModulationSettings(strength=50.0)
    mm = SDModulation(settings, sm)
    masks = torch.zeros(4, 8, 12)
    masks[:, 2:6, 3:9] = 1
    frames, signs = torch.tensor([2, 0, 2, 1]), torch.tensor([1.0, -1.0, -1.0, 1.0])
    z_plain = mm.run_units(plain, frames, masks, signs)
    z_reused = mm.run_units(reused, frames, masks, signs)
    # The reused prefix is the same computation cached: float32 rounding of other batch shapes.
    assert_equal_up_to_rounding(z_reused, z_plain, 1000, "prefix-reuse latents")
    coarse = _coarse()
    assert torch.equal(mm.labels(reused, coarse, (128, 192)), mm.labels(plain, coarse, (128, 192)))
    # the patched forwards are gone afterwards
    assert "forward" not in vars(tiny_backbone.unet.get_submodule("down_blocks.0"))


def test_the_family_sets_up_the_pass_for_its_modulation(tiny_backbone):
    family = TinyStableDiffusion()
    sm = family.make_sampler(tiny_backbone, ModulationSettings(), SpeedSettings(max_batch_images=8))
    assert sm.qk_layers == sm.layers and sm.prefix_layer == ModulationSettings().layer
    assert sm.max_batch_images == 8
    plain = family.make_sampler(
        tiny_backbone, ModulationSettings(inject=False), SpeedSettings(reuse_prefix=False)
    )
    assert plain.qk_layers == [] and plain.prefix_layer is None
    off = family.make_sampler(tiny_backbone, ModulationSettings(enabled=False))
    assert off.qk_layers == [] and off.prefix_layer is None
    assert isinstance(family.make_modulation(ModulationSettings(), sm), SDModulation)


def test_a_record_without_qk_is_refused_for_injection(batch, tiny_backbone):
    sm, record = batch
    bare = SDSampler(tiny_backbone, qk_layers=[])
    x = torch.zeros(3, 3, 128, 192)
    no_qk = bare.unmodulated_pass(record.start_latent, bare.condition(x), AttentionControl(), [FEAT], 24)
    with pytest.raises(ValueError, match="q/k for injection"):
        SDModulation(ModulationSettings(), sm).labels(no_qk, _coarse(), (128, 192))


def test_frames_already_emitted_are_neither_modulated_nor_decoded_and_labels_do_not_change(monkeypatch):
    """The overlapping last batch (4 frames, B = 3: batches 0-2 and 1-3) modulates and decodes only
    frame 3's units; its labels equal those of modulating every frame of the batch and keeping frame 3's."""
    from vss_lightning.pipeline.modulation import Modulation
    from vss_lightning.pipeline.segmenter import VideoSegmenter
    from vss_lightning.pipeline.settings import ContextSettings

    frames = torch.randint(
        0, 255, (4, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    seg = VideoSegmenter(
        TinyStableDiffusion(), context=ContextSettings(batch_size=3, num_clusters=3, kmeans_n_init=1)
    )
    seg.load()
    decoded: list[int] = []
    decode = seg.sampler.decode
    monkeypatch.setattr(seg.sampler, "decode", lambda z: decoded.append(z.shape[0]) or decode(z))

    def run() -> tuple[list, list[int]]:
        outs, images = [], []
        for out in seg.iter_segment(frames, key="v"):  # a batch's decodes happen before its yield
            outs.append(out)
            images.append(sum(decoded))
            decoded.clear()
        return outs, images

    skipping, skipping_images = run()
    labels = Modulation.labels

    def every_frame(self, record, coarse, image_size, output_size=None, first=0, clocks=None):  # plain path
        return labels(self, record, coarse, image_size, output_size, 0, clocks)[first:]

    monkeypatch.setattr(Modulation, "labels", every_frame)
    plain, plain_images = run()
    assert [o.indices for o in skipping] == [o.indices for o in plain] == [[0, 1, 2], [3]]
    for a, b in zip(skipping, plain, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.coarse, b.coarse)
    assert skipping_images[0] == plain_images[0]
    # the second batch: one + and one - unit per label of frame 3 only (the plain path: of frames 1-3)
    assert skipping_images[1] == 2 * int(skipping[1].coarse[0].unique().numel())
    assert plain_images[1] > skipping_images[1]


def test_processors_are_installed_once_per_batch_not_per_chunk_of_units(monkeypatch):
    """With a small budget the units run in many chunks; the controlled processors are installed once
    for the batch (and the UNet's own processors restored after), with the labels unchanged."""
    from vss_lightning.pipeline.modulation import Modulation
    from vss_lightning.pipeline.segmenter import VideoSegmenter
    from vss_lightning.pipeline.settings import ContextSettings

    frames = torch.randint(
        0, 255, (2, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    seg = VideoSegmenter(
        TinyStableDiffusion(),
        context=ContextSettings(batch_size=2, num_clusters=4, kmeans_n_init=1),
        speed=SpeedSettings(max_batch_images=4),  # one unit (2 signs x 2 CFG branches) per UNet forward
    ).load()
    unet = seg._loaded.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    installs = []
    original = type(unet).set_attn_processor
    monkeypatch.setattr(
        type(unet), "set_attn_processor", lambda self, p: installs.append(1) or original(self, p)
    )
    once = seg.segment(frames, key="v").labels
    per_batch = len(installs)  # unmodulated pass + modulation: install and restore each
    assert per_batch == 4
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before

    processors = Modulation.processors

    def every_chunk(self):  # the earlier behaviour: a fresh install per chunk of units
        self._control = None
        return processors(self)

    monkeypatch.setattr(Modulation, "processors", every_chunk)
    installs.clear()
    assert torch.equal(seg.segment(frames, key="v").labels, once)
    assert len(installs) > per_batch


# -- work the units share, done once (#19) ---------------------------------------------------------------
class _EagerControl(AttentionControl):
    """The earlier path, as a reference: the injected q/k of every layer gathered to the units' rows
    when a step's injection is set (all alive through the forward), and no context cache."""

    def __setattr__(self, name, value):
        if name == "context_cache":
            value = None
        if name == "inject_rows" and value is not None:
            super().__setattr__("inject", {n: (value(q), value(k)) for n, (q, k) in self.inject.items()})
            value = None
        super().__setattr__(name, value)


def _attn2_layers(unet):
    return [n for n, m in unet.named_modules() if n.startswith("up_blocks.") and n.endswith(".attn2")]


def test_shared_work_leaves_latents_and_labels_bit_identical(batch, tiny_backbone, monkeypatch):
    """Context projections computed once and q/k gathered inside each layer: the same operations on the
    same values, so the latents and labels are bit for bit those of the earlier path."""
    import vss_lightning.pipeline.modulation as modulation

    _, record = batch
    sm = SDSampler(tiny_backbone, max_batch_images=8)  # 2 units per forward: several chunks
    mm = SDModulation(ModulationSettings(strength=50.0), sm)
    masks = torch.zeros(4, 8, 12)
    masks[:, 2:6, 3:9] = 1
    masks[1, :2] = 1
    frames, signs = torch.tensor([2, 0, 2, 1]), torch.tensor([1.0, -1.0, -1.0, 1.0])
    coarse = _coarse()
    z = mm.run_units(record, frames, masks, signs)
    labels = mm.labels(record, coarse, (128, 192))
    monkeypatch.setattr(modulation, "AttentionControl", _EagerControl)
    assert torch.equal(mm.run_units(record, frames, masks, signs), z)
    assert torch.equal(mm.labels(record, coarse, (128, 192)), labels)


def test_cross_attention_context_projections_run_once_per_batch_shape(batch, tiny_backbone, monkeypatch):
    """The context of every decoder cross-attention is the empty prompt's conditioning: its value
    projection runs once per layer and chunk shape for the batch's units, not per chunk and step
    (its key projection not at all: the keys are injected)."""
    import vss_lightning.pipeline.modulation as modulation

    _, record = batch
    unet = tiny_backbone.unet
    layers = _attn2_layers(unet)
    assert layers and all(n in record.qk[22] for n in layers)  # every decoder attn2 is injected
    calls = {"to_k": 0, "to_v": 0}
    handles = [
        unet.get_submodule(f"{n}.{proj}").register_forward_hook(
            lambda *_, proj=proj: calls.__setitem__(proj, calls[proj] + 1)
        )
        for n in layers
        for proj in calls
    ]
    coarse = _coarse()  # 7 (frame, label) pairs: chunks of 2, 2, 2 and 1 pairs (2 signs each)
    mm = SDModulation(ModulationSettings(strength=50.0), SDSampler(tiny_backbone, max_batch_images=8))
    try:
        once = mm.labels(record, coarse, (128, 192))
        counted = dict(calls)
        calls.update(to_k=0, to_v=0)
        monkeypatch.setattr(modulation, "AttentionControl", _EagerControl)
        every = mm.labels(record, coarse, (128, 192))
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(once, every)
    steps = len(mm.sampler.steps)  # 22, 23, 24
    assert counted == {"to_k": 0, "to_v": len(layers) * 2}  # two chunk shapes: 4 and 2 units
    assert calls == {"to_k": 0, "to_v": len(layers) * steps * 4}  # every chunk at every step


def test_injected_qk_is_gathered_inside_its_own_layer(batch, tiny_backbone, monkeypatch):
    """The processors receive the record's own q/k tensors (no copy) and gather the units' rows in
    their call: no layer's gathered q/k is alive when the next layer runs (the earlier path kept
    every injected layer's gathered q/k through the whole forward)."""
    import weakref

    import vss_lightning.pipeline.modulation as modulation
    from vss_lightning.pipeline.attention import ControlledAttnProcessor

    _, record = batch
    recorded = {id(t) for layers in record.qk.values() for qk in layers.values() for t in qk}
    gathered: list[weakref.ref] = []
    alive_on_entry: list[int] = []
    received: list[bool] = []
    real_call = ControlledAttnProcessor.__call__

    def call(self, attn, *args, **kwargs):
        ctl = self.control
        rows = ctl.inject_rows
        if rows is not None and not getattr(rows, "counted", False):

            def counted(t):
                out = rows(t)
                gathered.append(weakref.ref(out))
                return out

            counted.counted = True
            ctl.inject_rows = counted
        if self.name in ctl.inject:
            received.append(all(id(t) in recorded for t in ctl.inject[self.name]))
        alive_on_entry.append(sum(r() is not None for r in gathered))
        return real_call(self, attn, *args, **kwargs)

    monkeypatch.setattr(ControlledAttnProcessor, "__call__", call)
    mm = SDModulation(ModulationSettings(strength=50.0), SDSampler(tiny_backbone, max_batch_images=64))
    masks = torch.ones(2, 8, 12)
    frames, signs = torch.tensor([0, 2]), torch.tensor([1.0, -1.0])
    z = mm.run_units(record, frames, masks, signs)
    injected = len(record.qk[22])
    assert received and all(received) and len(received) == injected * 3
    assert len(gathered) == 2 * injected * 3  # q and k of each injected layer at each of 3 steps
    assert max(alive_on_entry) == 0
    # the reference path: gathered when the step's injection is set, all alive at every layer call
    gathered.clear(), alive_on_entry.clear(), received.clear()
    monkeypatch.setattr(modulation, "AttentionControl", _EagerControl)
    assert torch.equal(mm.run_units(record, frames, masks, signs), z)
    assert not any(received)  # it received copies


def test_the_modulation_stage_clocks_its_parts(batch, tiny_backbone):
    """`labels` adds the seconds of its parts (UNet runs, decodes, scoring) when asked; the
    segmenter keeps `modulation` as the stage's total and has the parts too."""
    from vss_lightning.pipeline.modulation import MODULATION_CLOCKS
    from vss_lightning.pipeline.segmenter import VideoSegmenter
    from vss_lightning.pipeline.settings import ContextSettings

    _, record = batch
    mm = SDModulation(ModulationSettings(strength=50.0), SDSampler(tiny_backbone, max_batch_images=64))
    clocks: dict[str, float] = {"modulation_unet": 0.0}
    labels = mm.labels(record, _coarse(), (128, 192), clocks=clocks)
    assert set(clocks) == set(MODULATION_CLOCKS)
    assert all(v >= 0 for v in clocks.values())
    assert torch.equal(labels, mm.labels(record, _coarse(), (128, 192)))  # no clocks: the same labels

    frames = torch.randint(
        0, 255, (2, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    seg = VideoSegmenter(
        TinyStableDiffusion(), context=ContextSettings(batch_size=2, num_clusters=3, kmeans_n_init=1)
    ).load()
    seconds = seg.segment(frames, key="v").seconds
    assert set(seconds) >= {"modulation", *MODULATION_CLOCKS}
    assert all(seconds[k] >= 0 for k in MODULATION_CLOCKS)
    # nested readings of one monotonic clock: the parts lie within the stage
    assert sum(seconds[k] for k in MODULATION_CLOCKS) <= seconds["modulation"] + 1e-9
