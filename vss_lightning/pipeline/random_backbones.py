"""Random-weight backbones built in code (no download, no files): tiny ones for tests and the CPU
smoke configs, full-size ones (the real architectures) for speed and memory benchmarks.

`TinyStableDiffusion` and `TinyStableVideoDiffusion` have the diffusers classes and layer names of
SD 2.1-base and SVD img2vid at a few channels; `RandomStableDiffusion` and
`RandomStableVideoDiffusion` are the full-size architectures (the configs below are those of the hub
checkpoints) with seeded random weights, which cost the same time and memory as the real ones.
They are backbones of the SD and SVD families like the real ones (`backbone.SDBackbone`,
`svd.SVDBackbone`), so everything downstream runs on them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)

from .backbone import DTypeName, SDBackbone, resolve_dtype
from .naming import PromptEncoder
from .sd import LoadedBackbone
from .svd import SVDBackbone
from .svd_sampler import LoadedVideoBackbone, SVDSettings

# The SD 2.1-base architecture (unet/config.json, vae/config.json, scheduler of the hub checkpoint).
SD21_UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    use_linear_projection=True,
    upcast_attention=False,
)
SD21_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="trailing",
)
SD21_TEXT_LENGTH = 77
SD21_TEXT_DIM = 1024


# The SVD img2vid architecture (unet/, vae/, image_encoder/ configs and scheduler of the hub checkpoint).
SVD_UNET_CONFIG = dict(
    sample_size=96,
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=768,
    layers_per_block=2,
    cross_attention_dim=1024,
    transformer_layers_per_block=1,
    num_attention_heads=(5, 10, 20, 20),
    num_frames=14,
)
SVD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=768,
    scaling_factor=0.18215,
    force_upcast=True,
)
SVD_IMAGE_ENCODER_CONFIG = dict(  # OpenCLIP ViT-H/14 vision tower with its 1024-d projection
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=16,
    num_hidden_layers=32,
    patch_size=14,
    image_size=224,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
SVD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    use_karras_sigmas=True,
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's generators while random weights are built; the CPU generator is restored after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def char_tokenizer(max_length: int = SD21_TEXT_LENGTH):
    """A character-level `CLIPTokenizer` for the tiny text encoder (ids below its 100-word vocabulary).

    Special tokens as SD 2.1's tokenizer has them (<|startoftext|>, <|endoftext|>, pad "!"), then
    every lowercase letter, digit and a few punctuation marks, alone and word-final ("</w>"), with no
    merges: a word is spelled out letter by letter. Written to a temporary folder (the tokenizer
    reads its vocabulary and merges from files) and read back at once.
    """
    import json
    import string
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in string.ascii_lowercase + string.digits + ".,-'":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"),
            str(Path(tmp) / "merges.txt"),
            pad_token="!",
            model_max_length=max_length,
        )


# -- Stable Diffusion ----------------------------------------------------------------------------------
class TinyStableDiffusion(SDBackbone):
    """A tiny random-weight backbone of the same diffusers classes and layer names as SD 2.1-base.

    Four UNet levels with two layers per block, so `up_blocks.2.attentions.{0,1,2}` exist and the
    feature grid is 1/16 of the frame; an 8x VAE. Cheap on a CPU: 8-16 channels, attention only at
    the 1/16 and 1/32 levels (SD 2.1 also attends at 1/8, where a 448x320 frame has 2,240 tokens)
    and none in the VAE's middle block. Built from `seed` in code: no download, no files.
    A tiny CLIP text encoder gives the empty-prompt embedding; a character-level CLIP tokenizer
    (`char_tokenizer`, built in code) lets it encode class prompts for open-vocabulary naming.

    Args:
        seed: seed of the random weights.
        dtype: compute dtype ("float16" is computed as float32 on CPU).
    """

    def __init__(self, seed: int = 0, dtype: DTypeName = "float32") -> None:
        self.seed = seed
        self.dtype = dtype

    @property
    def description(self) -> str:
        return f"TinyStableDiffusion(seed={self.seed})"

    @property
    def has_text_encoder(self) -> bool:
        return True

    def load(self, device: torch.device | str = "cpu") -> LoadedBackbone:
        from transformers import CLIPTextConfig, CLIPTextModel

        device = torch.device(device)
        dtype = resolve_dtype(self.dtype, device)
        with seeded(self.seed):
            unet = UNet2DConditionModel(
                block_out_channels=(8, 8, 16, 16),
                layers_per_block=2,
                sample_size=32,
                in_channels=4,
                out_channels=4,
                # attention at the 1/16 and 1/32 levels only (SD 2.1 also has it at 1/8, which costs
                # a CPU most of the tiny model's time); the feature blocks up_blocks.2 are there
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=16,
                attention_head_dim=(1, 2, 2, 2),
                norm_num_groups=4,
                use_linear_projection=True,
            )
            vae = AutoencoderKL(
                block_out_channels=[4, 4, 8, 8],
                in_channels=3,
                out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=4,
                norm_num_groups=2,
                layers_per_block=1,
                mid_block_add_attention=False,
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    bos_token_id=0,
                    eos_token_id=2,
                    pad_token_id=1,
                    hidden_size=16,
                    intermediate_size=32,
                    num_attention_heads=2,
                    num_hidden_layers=2,
                    vocab_size=100,
                    max_position_embeddings=77,
                )
            ).eval()
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
        tokenizer = char_tokenizer()
        ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():  # the empty prompt: <bos> <eos> <pad>...
            cond = text_encoder(ids)[0]
        prompts = PromptEncoder(tokenizer, text_encoder.requires_grad_(False))
        return LoadedBackbone.ready(unet, vae, scheduler, cond, device, dtype, prompts)


class RandomStableDiffusion(SDBackbone):
    """The full-size SD 2.1-base UNet and VAE with random weights, built from their configs.

    Costs the same time and memory as the real checkpoint: this is how speed and memory are measured
    without a download. The empty-prompt embedding is a seeded random (1, 77, 1024) tensor.

    Args:
        seed: seed of the random weights.
        dtype: compute dtype.
    """

    def __init__(self, seed: int = 0, dtype: DTypeName = "float16") -> None:
        self.seed = seed
        self.dtype = dtype

    @property
    def description(self) -> str:
        return f"RandomStableDiffusion(seed={self.seed})"

    def load(self, device: torch.device | str = "cpu") -> LoadedBackbone:
        device = torch.device(device)
        dtype = resolve_dtype(self.dtype, device)
        with seeded(self.seed):
            with device:
                unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
                vae = AutoencoderKL(**SD21_VAE_CONFIG)
            cond = torch.randn(1, SD21_TEXT_LENGTH, SD21_TEXT_DIM)
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
        return LoadedBackbone.ready(unet, vae, scheduler, cond, device, dtype)


# -- Stable Video Diffusion ----------------------------------------------------------------------------
class TinyStableVideoDiffusion(SVDBackbone):
    """A tiny random-weight SVD of the same diffusers classes and layer names as the real one.

    Four UNet levels with two layers per block (so decoder blocks 6-8, `up_blocks.2.attentions.{0,1,2}`,
    exist and the feature grid is 1/16 of the frame; attention only at the 1/16 and 1/32 levels, which
    keeps it cheap on a CPU), an 8x temporal-decoder VAE and a tiny CLIP
    vision encoder at 224 pixels (patch 14). 32 channels everywhere (diffusers' SVD blocks use 32
    norm groups). Built from `seed` in code: no download, no files.

    Args:
        seed: seed of the random weights.
        dtype: compute dtype ("float16" is computed as float32 on CPU).
        settings: image conditioning and guidance ramp (default: `SVDSettings()`).
    """

    def __init__(
        self, seed: int = 0, dtype: DTypeName = "float32", settings: SVDSettings | None = None
    ) -> None:
        self.seed = seed
        self.dtype = dtype
        self.settings = settings if settings is not None else SVDSettings()

    @property
    def description(self) -> str:
        return self._describe(f"TinyStableVideoDiffusion(seed={self.seed}")

    def load(self, device: torch.device | str = "cpu") -> LoadedVideoBackbone:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        device = torch.device(device)
        dtype = resolve_dtype(self.dtype, device)
        with seeded(self.seed):
            unet = UNetSpatioTemporalConditionModel(
                sample_size=32,
                block_out_channels=(32, 32, 32, 32),
                layers_per_block=2,
                cross_attention_dim=32,
                num_attention_heads=(2, 2, 2, 2),
                down_block_types=(
                    "DownBlockSpatioTemporal",
                    "CrossAttnDownBlockSpatioTemporal",
                    "CrossAttnDownBlockSpatioTemporal",
                    "DownBlockSpatioTemporal",
                ),
                up_block_types=(
                    "UpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal",
                    "UpBlockSpatioTemporal",
                ),
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=24,
                num_frames=14,
            )
            vae = AutoencoderKLTemporalDecoder(
                block_out_channels=(32, 32, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4,
                layers_per_block=1,
                latent_channels=4,
            )
            image_encoder = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=37,
                    num_attention_heads=4,
                    num_hidden_layers=2,
                    image_size=224,
                    patch_size=14,
                    projection_dim=32,
                )
            )
        scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
        return LoadedVideoBackbone.ready(
            unet, vae, image_encoder, scheduler, CLIP_MEAN, CLIP_STD, device, dtype
        )


class RandomStableVideoDiffusion(SVDBackbone):
    """The full-size SVD img2vid UNet, VAE and CLIP ViT-H/14 image encoder with random weights.

    Costs the same time and memory as the real checkpoint: this is how speed and memory are measured
    without a download.

    Args:
        seed: seed of the random weights.
        dtype: compute dtype.
        settings: image conditioning and guidance ramp (default: `SVDSettings()`).
    """

    def __init__(
        self, seed: int = 0, dtype: DTypeName = "float16", settings: SVDSettings | None = None
    ) -> None:
        self.seed = seed
        self.dtype = dtype
        self.settings = settings if settings is not None else SVDSettings()

    @property
    def description(self) -> str:
        return self._describe(f"RandomStableVideoDiffusion(seed={self.seed}")

    def load(self, device: torch.device | str = "cpu") -> LoadedVideoBackbone:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        device = torch.device(device)
        dtype = resolve_dtype(self.dtype, device)
        with seeded(self.seed), device:
            unet = UNetSpatioTemporalConditionModel(**SVD_UNET_CONFIG)
            vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER_CONFIG))
        scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
        return LoadedVideoBackbone.ready(
            unet, vae, image_encoder, scheduler, CLIP_MEAN, CLIP_STD, device, dtype
        )
