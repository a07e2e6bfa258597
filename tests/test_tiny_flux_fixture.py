"""The tiny FLUX.1 fixture: loads with diffusers' own FluxPipeline as a real FLUX.1-dev / schnell folder does, runs,
and its small T5 tokenizer behaves as T5's (pieces with "▁", "</s>" appended, "<pad>" 0)."""
import json

import numpy as np
import pytest
import torch

from tiny_model import build_tiny_flux

PROMPT = "a photo of a dog"


def load(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(folder))


def sample(pipe, guidance_scale):
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=guidance_scale,
                max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def flux(tiny_flux):
    return load(tiny_flux)


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_schnell"), guidance_embeds=False)


def test_folder_is_flux_dev_layout(tiny_flux, flux):
    index = json.loads((tiny_flux / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    expected = {"scheduler": "FlowMatchEulerDiscreteScheduler", "text_encoder": "CLIPTextModel",
                "tokenizer": "CLIPTokenizer", "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5TokenizerFast",
                "transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}
    assert {name: entry[1] for name, entry in index.items() if not name.startswith("_")} == expected
    assert all((tiny_flux / name).is_dir() for name in expected)
    from transformers import T5TokenizerFast

    assert isinstance(flux.tokenizer_2, T5TokenizerFast)  # transformers 5: the same class as T5Tokenizer
    assert flux.image_encoder is None and flux.feature_extractor is None
    assert flux.vae_scale_factor == 8 and flux.vae.config.latent_channels == 16
    assert flux.transformer.config.in_channels == 4 * flux.vae.config.latent_channels
    assert flux.transformer.config.joint_attention_dim == flux.text_encoder_2.config.d_model
    assert flux.transformer.config.pooled_projection_dim == flux.text_encoder.config.hidden_size
    assert flux.transformer.config.guidance_embeds
    config = flux.scheduler.config
    assert (config.shift, config.use_dynamic_shifting, config.base_shift, config.max_shift) == (3.0, True, 0.5, 1.15)


def test_pipeline_samples(flux):
    image = sample(flux, 3.5)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, sample(flux, 3.5))  # the generator's seed decides it


def test_t5_tokenizer_round_trip(tiny_flux, flux):
    from transformers import AutoTokenizer, T5TokenizerFast

    loaded = T5TokenizerFast.from_pretrained(str(tiny_flux / "tokenizer_2"))
    auto = AutoTokenizer.from_pretrained(str(tiny_flux), subfolder="tokenizer_2")
    assert len(loaded) == len(auto) == flux.text_encoder_2.config.vocab_size
    assert 300 <= len(loaded) <= 1000
    assert loaded.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    for text in (PROMPT, "A striped teddybear and a cat near the forest, at sunset.", "a zebra's hat? 42"):
        assert loaded(text).input_ids == auto(text).input_ids == flux.tokenizer_2(text).input_ids
        assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    ids = loaded(PROMPT).input_ids
    assert loaded.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁dog", "</s>"]
    for word in ("dog", "cat", "a", "photo", "of", "the", "and", "near", "in", "vase", "teddybear", "glasses",
                 "backpack", "red", "blue", "striped", "forest", "beach"):
        assert loaded.tokenize(word) == ["▁" + word]
    assert loaded.tokenize("dog, cat.") == ["▁dog", ",", "▁cat", "."]
    assert loaded.unk_token_id in loaded("a dog ☂").input_ids  # a character outside the pieces

    # as FluxPipeline tokenizes: padded with 0 to max_length after the eos
    padded = loaded(PROMPT, padding="max_length", max_length=512, truncation=True, return_length=False,
                    return_overflowing_tokens=False, return_tensors="pt").input_ids
    assert padded.shape == (1, 512) and padded[0, :6].tolist() == ids and (padded[0, 6:] == 0).all()
    embeds = flux._get_t5_prompt_embeds(PROMPT, max_sequence_length=32, device=torch.device("cpu"))
    assert embeds.shape == (1, 32, 32) and torch.isfinite(embeds).all()
    truncated = loaded("a photo of a dog " * 20, padding="max_length", max_length=32, truncation=True).input_ids
    assert len(truncated) == 32 and truncated[-1] == 1


def test_schnell_loads_and_samples(tiny_schnell, tiny_flux):
    pipe = load(tiny_schnell)
    assert not pipe.transformer.config.guidance_embeds
    assert (pipe.scheduler.config.shift, pipe.scheduler.config.use_dynamic_shifting) == (1.0, False)
    image = sample(pipe, 0.0)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # the same seed builds the same tokenizer and text encoders
    for path in ("tokenizer_2/tokenizer.json", "text_encoder_2/model.safetensors", "text_encoder/model.safetensors"):
        assert (tiny_schnell / path).read_bytes() == (tiny_flux / path).read_bytes()
