"""Test fixtures: tiny random Stable Diffusion models saved with save_pretrained, the real CLIP tokenizer.

Every test loads these folders through the same code path users use for a real model.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "clip_tokenizer"
SEED_EXAMPLE = ROOT / "configs"


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)


def build_tiny_sd(folder, text_dim=32, prediction_type="epsilon", seed=0):
    """UNet (32, 64 channels), VAE with four down blocks (latents 1/8), 1-layer CLIP text model of width text_dim."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny epsilon-prediction SD with a 32-d text encoder."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    """The same architecture as a v-prediction model."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_model_1024(tmp_path_factory):
    """A tiny SD whose text encoder is 1024-d, so the seed's SD 2.1 residual files fit."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_1024"), text_dim=1024, prediction_type="v_prediction")


@pytest.fixture()
def seed_configs(tmp_path):
    """A copy of configs/ to edit freely."""
    target = tmp_path / "configs"
    shutil.copytree(SEED_EXAMPLE, target)
    return target
