"""A tiny random Stable Diffusion in diffusers format, for tests and CPU smoke runs.

    python tests/tiny_model.py tiny_sd              # 32-d text encoder, 64 px
    python tests/tiny_model.py tiny_sd_1024 --text_dim 1024 --prediction_type v_prediction   # fits SD 2.1 residuals

The real CLIP tokenizer (tests/fixtures/clip_tokenizer) with random 1-layer text encoder, UNet and VAE.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "clip_tokenizer"


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)


def build_tiny_sd(folder, text_dim=32, prediction_type="epsilon", seed=0):
    """UNet (32, 64 channels), VAE with four down blocks (latents 1/8), 1-layer CLIP text model of width text_dim."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from layout_guidance import SD_BETAS

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
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    # written as Stable Diffusion 2.1's own file is (no timestep_spacing key: LMS then spaces linearly)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", **SD_BETAS, "clip_sample": False,
        "prediction_type": prediction_type, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}))
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return folder


def build_tiny_sdxl(folder, seed=0):
    """A tiny random SDXL: two CLIP text encoders (32-d each, 2 layers; the second with a 32-d projection), a UNet
    with SDXL's "text_time" added conditioning and no attention at its first level, a VAE that asks for float32,
    the real tokenizer twice (the second padding with "!", as SDXL's does) and SDXL's scheduler settings."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from layout_guidance import SD_BETAS

    torch.manual_seed(seed)
    text_config = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                       pad_token_id=49407)
    first = CLIPTextModel(CLIPTextConfig(**text_config))
    second = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.13025, force_upcast=True)
    folder = Path(folder)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", first), ("text_encoder_2", second)):
        module.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0", **SD_BETAS, "interpolation_type":
        "linear", "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "use_karras_sigmas": False}))
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    from transformers import CLIPTokenizer
    CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77, pad_token="!").save_pretrained(
        folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers",
                                                                             "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    return folder


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules
    parser = argparse.ArgumentParser(description="Write a tiny random Stable Diffusion to a folder.")
    parser.add_argument("folder")
    parser.add_argument("--text_dim", type=int, default=32)
    parser.add_argument("--prediction_type", default="epsilon", choices=("epsilon", "v_prediction"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl", action="store_true", help="a tiny SDXL (two text encoders) instead")
    args = parser.parse_args()
    if args.sdxl:
        print(build_tiny_sdxl(args.folder, args.seed))
    else:
        print(build_tiny_sd(args.folder, args.text_dim, args.prediction_type, args.seed))
