"""A tiny random Stable Diffusion in diffusers format, for tests and CPU smoke runs.

    python tests/tiny_model.py tiny_sd              # 32-d text encoder, 64 px
    python tests/tiny_model.py tiny_sd_1024 --text_dim 1024 --prediction_type v_prediction   # fits SD 2.1 residuals
    python tests/tiny_model.py tiny_flux --flux     # a tiny FLUX.1-dev (--schnell: without guidance embedding)

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


# Words for the tiny T5 tokenizer's vocabulary: the subjects, attributes and scenes prompts of this project name,
# and the words that join them.
T5_NOUNS = """dog cat vase teddybear glasses backpack bear bird horse cow sheep rabbit duck fox owl lion tiger panda
monkey elephant giraffe puppy kitten car bicycle bus train boat airplane chair table sofa bed lamp clock cup mug
bowl bottle teapot kettle plate spoon book candle toy robot doll ball hat shoe boot sneaker sunglasses bag suitcase
umbrella guitar piano flower rose tulip sunflower tree plant cactus apple banana cake pizza sandwich cookie donut
house castle tower barn tent fence bench statue sculpture painting mirror pillow blanket basket box jar toaster
phone laptop camera watch necklace ring shirt jacket dress sweater scarf man woman boy girl child person face
truck motorcycle pot can sloth monster""".split()
T5_ADJECTIVES = """red blue green yellow orange purple pink black white gray brown golden silver wooden metal plastic
glass ceramic striped spotted fluffy furry shiny old new tiny big cute happy sleepy colorful vintage modern wet dry
soft sunny cloudy snowy rainy tall round square painted""".split()
T5_SCENES = """forest beach mountain lake river ocean sea desert field garden park street city kitchen bedroom room
floor grass snow sand sky road window wall shelf desk meadow jungle village background sunset night morning moon
space water""".split()
T5_PHRASES = [
    "a {a} {n} near the {s}", "a {n} and a {m} in the {s}", "the {n} on the left, a {a} {m} on the right.",
    "a {n} next to a {m} on a {s}", "two {n} under the {s}, highly detailed",
    "an {a} {n} with a {m} in front of the {s}", "a painting of a {n} and the {m} by the {s}, oil on canvas.",
    "a {n} sitting beside the {m} at {s}, 4k photo",
    "{a} {n} behind a {m}, digital art, high quality.", "the {m} is above the {n} and below the {s}."]


def t5_corpus(templates):
    """The text the tiny T5 tokenizer's pieces are counted from: each template with each subject (plain and with
    an attribute), and each joining phrase with subjects, attributes and scenes in turn. Always the same text."""
    lines = []
    for i, noun in enumerate(T5_NOUNS):
        for j, template in enumerate(templates):
            lines.append(template.format(noun))
            lines.append(template.format(f"{T5_ADJECTIVES[(i + j) % len(T5_ADJECTIVES)]} {noun}"))
        for j, phrase in enumerate(T5_PHRASES):
            lines.append(phrase.format(n=noun, m=T5_NOUNS[(7 * i + j + 1) % len(T5_NOUNS)],
                                       a=T5_ADJECTIVES[(3 * i + j) % len(T5_ADJECTIVES)],
                                       s=T5_SCENES[(5 * i + j) % len(T5_SCENES)]))
    return lines


def tiny_t5_tokenizer(templates):
    """A small SentencePiece-style Unigram tokenizer laid out as T5's (text_utils.unigram_t5_tokenizer), its pieces
    counted from t5_corpus."""
    from text_utils import unigram_t5_tokenizer

    return unigram_t5_tokenizer(t5_corpus(templates))


def build_tiny_flux(folder, seed=0, guidance_embeds=True):
    """A tiny random FLUX.1 laid out as FLUX.1-dev's folder (guidance_embeds=False: as FLUX.1-schnell's): the real
    CLIP tokenizer with a 1-layer 32-d CLIP text model (its pooled output the transformer's pooled projection), a
    small Unigram T5 tokenizer (tiny_t5_tokenizer) with a 2-layer 32-d gated-GELU T5 encoder, a transformer of one
    double-stream and one single-stream block (2 heads of 16), a VAE of 16 latent channels with four down blocks
    (latents 1/8, packed 2x2 into 64 channels) and FLUX's scaling and shift, and FLUX's scheduler settings."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from train import TEMPLATES

    torch.manual_seed(seed)
    tokenizer_2 = tiny_t5_tokenizer(TEMPLATES)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    # attention_head_dim = sum(axes_dims_rope), each even: the rotary embedding of (frame, row, column) positions
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    folder = Path(folder)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder),
                         ("text_encoder_2", text_encoder_2)):
        module.save_pretrained(folder / name)
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    tokenizer_2.save_pretrained(folder / "tokenizer_2")
    # FLUX.1-dev's scheduler shifts its sigmas by the image's token count; schnell's by a fixed 1.0 (none)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0 if guidance_embeds else 1.0,
        "use_dynamic_shifting": guidance_embeds}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules
    parser = argparse.ArgumentParser(description="Write a tiny random Stable Diffusion (or SDXL, FLUX.1) to a folder.")
    parser.add_argument("folder")
    parser.add_argument("--text_dim", type=int, default=32)
    parser.add_argument("--prediction_type", default="epsilon", choices=("epsilon", "v_prediction"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl", action="store_true", help="a tiny SDXL (two text encoders) instead")
    parser.add_argument("--flux", action="store_true", help="a tiny FLUX.1-dev (CLIP and T5, a transformer) instead")
    parser.add_argument("--schnell", action="store_true", help="a tiny FLUX.1-schnell (no guidance embedding) instead")
    args = parser.parse_args()
    if args.flux or args.schnell:
        print(build_tiny_flux(args.folder, args.seed, guidance_embeds=not args.schnell))
    elif args.sdxl:
        print(build_tiny_sdxl(args.folder, args.seed))
    else:
        print(build_tiny_sd(args.folder, args.text_dim, args.prediction_type, args.seed))
