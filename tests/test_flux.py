"""FLUX.1 (docs/METHOD.md F) on a tiny random FLUX saved with save_pretrained: the tokenizer path, the sampler
against FluxPipeline and against the naive implementation, the joint-attention bias by hand, the template
residual by hand on the tiny T5, and train -> compose -> rerun end to end through the scripts."""
import json
import math

import numpy as np
import pytest
import torch

import inference
import train
from config_keys import SamplingSettings
from flux import GuidedJointAttnProcessor, add_lora, block_std, joint_bias
from layout_guidance import SamplerInputs, generate, install_guidance, layout_weight_map
from naive_sampler import NaiveJointAttnProcessor, install_naive_flux, naive_flux_sample
from pipeline_utils import load_model, load_tokenizer, model_family, model_sizes
from residual_utils import load_residual, save_residual
from text_utils import conditioning, leading_specials, token_ids
from test_train import make_images, reset_accelerate
from tiny_model import build_tiny_flux

PROMPT = "a photo of a dog and a cat"


@pytest.fixture(scope="module")
def flux_sd(tiny_flux):
    sd = load_model(str(tiny_flux), torch.device("cpu"), torch.float32)
    return sd, install_guidance(sd.unet)


def test_the_t5_tokenizer_gives_the_positions(tiny_flux):
    from transformers import T5TokenizerFast

    tokenizer = load_tokenizer(str(tiny_flux))
    assert isinstance(tokenizer, T5TokenizerFast)  # FluxPipeline's class, from tokenizer_2/
    assert model_family(str(tiny_flux)) == "flux" and model_sizes(str(tiny_flux)) == (32, 1024)
    ids = token_ids(tokenizer, PROMPT)
    assert leading_specials(tokenizer) == 0 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[:7]) == ["▁a", "▁photo", "▁of", "▁a", "▁dog", "▁and", "▁a"]
    assert len(token_ids(tokenizer, PROMPT, tokenizer.model_max_length)) == 512


def flux_inputs(sd, prompt=PROMPT, weight_map=None):
    ids = token_ids(sd.tokenizer, prompt, sd.tokenizer.model_max_length)
    cond, uncond, pooled = conditioning(sd, ids, None, True, prompt)
    assert uncond is None and pooled[1] is None
    return SamplerInputs(cond, None, weight_map, pooled=pooled)


@pytest.mark.parametrize("schnell", [False, True])
def test_unguided_sampling_equals_flux_pipeline(tiny_flux, tmp_path, schnell):
    from diffusers import FluxPipeline

    folder = build_tiny_flux(tmp_path / "schnell", guidance_embeds=False) if schnell else tiny_flux
    sd = load_model(str(folder), torch.device("cpu"), torch.float32)
    guidance = install_guidance(sd.unet)
    pipe = FluxPipeline.from_pretrained(str(folder))
    stock_states, stock_pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=512)
    inputs = flux_inputs(sd)
    torch.testing.assert_close(inputs.cond, stock_states[0], rtol=1e-4, atol=1e-5)  # T5 itself, loaded twice
    torch.testing.assert_close(inputs.pooled[0], stock_pooled[0], rtol=0, atol=0)
    settings = SamplingSettings(num_inference_steps=4, guidance_steps=0, flux_guidance=3.5)
    ours = generate(sd, inputs, settings, [3, 4], (64, 64), guidance)
    for k, seed in enumerate([3, 4]):
        stock = pipe(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=512,
                     generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
        stock = (stock * 255).round().astype(np.uint8)
        assert np.abs(ours[k].astype(int) - stock.astype(int)).max() <= 1
    assert np.abs(ours[0].astype(int) - ours[1].astype(int)).max() > 10  # the seeds differ: the check can fail


def test_true_cfg_equals_flux_pipeline(tiny_flux, tmp_path):
    """true_cfg_scale (an unconditional branch of the negative prompt) against FluxPipeline's own true CFG, on a
    schnell-like FLUX; at 1 it is no branch at all, bit for bit."""
    from diffusers import FluxPipeline

    folder = build_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    sd = load_model(str(folder), torch.device("cpu"), torch.float32)
    guidance = install_guidance(sd.unet)
    pipe = FluxPipeline.from_pretrained(str(folder))
    negative = "a blurry photo"
    length = sd.tokenizer.model_max_length
    cond, uncond, pooled = conditioning(sd, token_ids(sd.tokenizer, PROMPT, length),
                                        token_ids(sd.tokenizer, negative, length), False, PROMPT, negative)
    stock_states, stock_pooled, _ = pipe.encode_prompt(negative, None, max_sequence_length=512)
    torch.testing.assert_close(uncond, stock_states[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled[1], stock_pooled[0], rtol=0, atol=0)
    inputs = SamplerInputs(cond, uncond, pooled=pooled)
    settings = SamplingSettings(num_inference_steps=4, guidance_steps=0, true_cfg_scale=4.0)
    ours = generate(sd, inputs, settings, [3], (64, 64), guidance)
    stock = pipe(PROMPT, negative_prompt=negative, true_cfg_scale=4.0, height=64, width=64, num_inference_steps=4,
                 max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    assert np.abs(ours[0].astype(int) - (stock * 255).round().astype(int)).max() <= 1
    plain = generate(sd, SamplerInputs(cond, None, pooled=(pooled[0], None)), SamplingSettings(
        num_inference_steps=4, guidance_steps=0), [3], (64, 64), guidance)
    at_one = generate(sd, inputs, SamplingSettings(num_inference_steps=4, guidance_steps=0), [3], (64, 64), guidance)
    assert np.array_equal(plain, at_one) and np.abs(plain.astype(int) - ours.astype(int)).max() > 10


def two_boxes(length, rows, size=64):
    layout = np.zeros((size, size, 3), np.uint8)
    layout[:, :size // 2] = (255, 0, 0)
    layout[:, size // 2:] = (0, 255, 0)
    regions = [((255, 0, 0), [rows[0]], 2.5), ((0, 255, 0), [rows[1]], 2.5)]
    return layout_weight_map(layout, regions, length, -1e8)


def test_guided_sampling_equals_the_naive_method(flux_sd):
    sd, guidance = flux_sd
    inputs = flux_inputs(sd, weight_map=two_boxes(512, (4, 7)))
    settings = SamplingSettings(num_inference_steps=4, guidance_steps=3, guidance_weight=0.5)
    ours = generate(sd, inputs, settings, [0], (64, 64), guidance)[0]
    unguided = generate(sd, inputs, SamplingSettings(num_inference_steps=4), [0], (64, 64), guidance)[0]
    naive_state = install_naive_flux(sd.unet)
    try:
        naive = naive_flux_sample(sd, naive_state, inputs, settings, 0, (64, 64))
    finally:  # the module's model goes back to the project's processors
        sd.unet.set_attn_processor(GuidedJointAttnProcessor(guidance))
    assert np.abs(ours.astype(int) - naive.astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - unguided.astype(int)).max() > 10  # guidance and recurrence change the image


def test_the_joint_attention_bias_by_hand(flux_sd):
    """One double-stream attention, guided, against the naive processor and a hand computation of the bias."""
    sd, guidance = flux_sd
    block = sd.unet.transformer_blocks[0]
    torch.manual_seed(0)
    text_length, grid = 6, (4, 4)
    image = torch.randn(1, 16, block.attn.query_dim)
    text = torch.randn(1, text_length, block.attn.query_dim)
    ids = torch.cat([torch.zeros(text_length, 3), torch.stack(torch.meshgrid(
        torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)])
    rotary = sd.unet.pos_embed(ids)
    weight_map = torch.zeros(text_length, 64, 64)
    weight_map[2, :, :32], weight_map[2, :, 32:] = 2.5, -3.0
    guidance.set_layout(weight_map, grid, "cpu")
    guidance.text_length = text_length
    guidance.set_step(True, 0.4)
    ours = GuidedJointAttnProcessor(guidance)(block.attn, image, text, None, rotary)
    state = {"guided": True, "strength": 0.4, "weight_map": weight_map, "text_length": text_length}
    naive = NaiveJointAttnProcessor(state)(block.attn, image, text, None, rotary)
    guidance.set_step(False)
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the bias alone: image queries x text keys only, strength * W * std * scale
    query = torch.randn(1, 2, text_length + 16, 16)
    key = torch.randn(1, 2, text_length + 16, 16)
    layer_map = torch.randn(16, text_length)
    mask = joint_bias(query, key, text_length, layer_map, 0.4, 0.25)
    block_scores = torch.einsum("bhnd,bhld->bhnl", query[:, :, text_length:], key[:, :, :text_length])
    expected = 0.4 * layer_map * block_scores.std().item() * 0.25
    torch.testing.assert_close(mask[0, 0, text_length:, :text_length], expected, rtol=1e-5, atol=1e-6)
    assert mask[0, 0, :text_length].abs().sum() == 0 and mask[0, 0, :, text_length:].abs().sum() == 0
    # with an unconditional branch ahead (true_cfg_scale): its rows get no bias, the conditional ones the same
    both = joint_bias(torch.cat([query.flip(2), query]), torch.cat([key, key]), text_length, layer_map, 0.4, 0.25,
                      num_uncond=1)
    assert both[0].abs().sum() == 0 and torch.equal(both[1], mask[0])


def test_the_template_residual_by_hand_on_the_tiny_t5(tiny_flux):
    """A.7 on FLUX: the mean over the 27 templates of T5*(s)[p] - T5(s)[p], T5* being T5 with its LoRA merged by
    hand (W + B A alpha / r) into a plain copy."""
    from transformers import T5EncoderModel

    sd = load_model(str(tiny_flux), torch.device("cpu"), torch.float32)
    tokenizer = sd.tokenizer
    prompts = train.read_prompts(tokenizer, "dog", None, 1)
    frozen_rows = train.concept_rows(sd.text_encoder, prompts.template_ids, prompts.template_positions, 1)
    trainable = add_lora(sd.text_encoder, 2)
    assert trainable and all("lora_" in n for n, p in sd.text_encoder.t5.named_parameters() if p.requires_grad)
    torch.manual_seed(1)
    for p in trainable:
        p.data.normal_(0, 0.5)
    sd.text_encoder.eval()
    residual = train.compute_residual(sd.text_encoder, prompts.template_ids, prompts.template_positions, 1,
                                      frozen_rows)

    frozen = T5EncoderModel.from_pretrained(str(tiny_flux), subfolder="text_encoder_2").eval()
    merged = T5EncoderModel.from_pretrained(str(tiny_flux), subfolder="text_encoder_2").eval()
    lora = dict(sd.text_encoder.t5.named_parameters())
    with torch.no_grad():
        for name, module in merged.named_modules():
            if f"{name}.lora_A.default.weight" in lora:
                a, b = lora[f"{name}.lora_A.default.weight"], lora[f"{name}.lora_B.default.weight"]
                module.weight += b @ a  # lora_alpha = r: the scale is 1
    dog = tokenizer.convert_tokens_to_ids("▁dog")
    shifts = []
    for template in train.TEMPLATES:
        ids = tokenizer(template.format("dog"), padding="max_length", max_length=512).input_ids
        p = ids.index(dog)
        with torch.no_grad():
            batch = torch.tensor([ids])
            shifts.append(merged(batch).last_hidden_state[0, p] - frozen(batch).last_hidden_state[0, p])
    expected = torch.stack(shifts).mean(dim=0)
    assert residual.shape == (1, 32) and expected.norm() > 1e-3
    torch.testing.assert_close(residual[0], expected, rtol=1e-4, atol=1e-6)


def test_train_then_compose_then_rerun(tiny_flux, tiny_model, tmp_path, capsys):
    reset_accelerate()
    residual = train.main(train.parse_args([
        "--pretrained_model_name_or_path", str(tiny_flux), "--instance_data_dir", str(make_images(tmp_path / "photos")),
        "--instance_prompt", "dog", "--output_dir", str(tmp_path / "dog"), "--resolution", "64",
        "--max_train_steps", "3", "--learning_rate", "1e-3", "--num_validation_images", "1",
        "--validation_inference_steps", "2", "--lora_rank", "4", "--checkpointing_steps", "0"]))
    learned = load_residual(residual)
    assert learned.family == "flux" and learned.tensor.shape == (1, 32) and learned.tensor.norm() > 0
    assert (tmp_path / "dog" / "validation" / "step-3" / "0.png").is_file()
    save_residual(tmp_path / "cat.safetensors", torch.randn(1, 32) * 0.1,
                  {"class_phrase": "cat", "base_model": "tiny", "family": "flux"})
    config = {"prompt": PROMPT, "residual_dict": {"<dog>": str(residual), "<cat>": str(tmp_path / "cat.safetensors")},
              "regions": [{"phrase": "<dog>", "box": [0, 0, 0.5, 1], "weight": 2.5},
                          {"phrase": "<cat>", "box": [0.5, 0, 1, 1], "weight": 2.5}],
              "guidance_steps": 2, "guidance_weight": 0.08, "weight_negative": -1e8,
              "subject_list": ["<dog>", "<cat>"], "num_inference_steps": 3, "save_attention": True}
    (tmp_path / "c.json").write_text(json.dumps(config))
    args = ["--pretrained_model_name_or_path", str(tiny_flux), "--inference_config", str(tmp_path / "c.json"),
            "--num_images", "1", "--height", "64", "--width", "64"]
    [folder] = inference.main(inference.parse_args(args + ["--output_dir", str(tmp_path / "out")]))
    record = json.loads((folder / "config.json").read_text())
    assert record["prediction_type"] == "flow_matching" and record["text_tokens"] == 512
    assert record["subject_list"] == [["<dog>", 4], ["<cat>", 7]] and "cfg_scale" not in record
    maps = np.load(folder / "attention" / "0.npz")
    assert set(maps.files) >= {"<dog>", "<cat>"} and abs(float(maps["<dog>"].sum()) - 1) < 1e-4
    [again] = inference.main(inference.parse_args(["--rerun", str(folder / "config.json"),
                                                   "--output_dir", str(tmp_path / "again")]))
    assert (again / "0.png").read_bytes() == (folder / "0.png").read_bytes()
    (tmp_path / "quiet.json").write_text(json.dumps({**config, "save_attention": False}))
    [quiet] = inference.main(inference.parse_args(["--pretrained_model_name_or_path", str(tiny_flux),
                                                   "--inference_config", str(tmp_path / "quiet.json"),
                                                   "--output_dir", str(tmp_path / "quiet"), "--num_images", "1",
                                                   "--resolution", "64"]))
    assert (quiet / "0.png").read_bytes() == (folder / "0.png").read_bytes()  # recording changes no image

    # the one clear error of another family's residual, and the keys FLUX has no use for
    capsys.readouterr()
    sd_residual = tmp_path / "sd.safetensors"
    save_residual(sd_residual, torch.zeros(1, 32), {"class_phrase": "dog", "base_model": "x", "family": "sd"})
    for change, fragment in ((dict(residual_dict={"<dog>": str(sd_residual), "<cat>": str(tmp_path / "cat.safetensors")}),
                              "was trained on Stable Diffusion 1.x/2.x, but the model is FLUX.1"),
                             (dict(cfg_scale=5.0), "cfg_scale: applies to Stable Diffusion 1.x/2.x and SDXL models only"),
                             (dict(text_length="words"), "text_length: 'words' is not for FLUX.1 models"),
                             (dict(negative_prompt="blurry"), "negative_prompt: a FLUX model has an unconditional "
                                                              "branch only with true_cfg_scale above 1")):
        (tmp_path / "bad.json").write_text(json.dumps({**config, **change}))
        bad = ["--pretrained_model_name_or_path", str(tiny_flux), "--inference_config", str(tmp_path / "bad.json"),
               "--output_dir", str(tmp_path / "bad")]
        with pytest.raises(SystemExit) as exit_info:
            inference.run_cli(inference.main, inference.parse_args(bad))
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines
    # a FLUX residual is refused by an SD model the same way
    (tmp_path / "sd.json").write_text(json.dumps({**config, "residual_dict": {"<dog>": str(residual)},
                                                  "subject_list": ["<dog>"], "regions": config["regions"][:1]}))
    with pytest.raises(SystemExit):
        inference.run_cli(inference.main, inference.parse_args(
            ["--pretrained_model_name_or_path", str(tiny_model), "--inference_config", str(tmp_path / "sd.json"),
             "--output_dir", str(tmp_path / "bad")]))
    assert "was trained on FLUX.1" in capsys.readouterr().err
    assert math.isfinite(float(learned.tensor.sum()))


def test_the_block_std_equals_torch_std_of_the_scores():
    """std of Q K^T from sums and Gram matrices equals torch's std of the formed scores, also where the scores'
    mean is far from 0 (keys sharing a large direction, as text states can)."""
    torch.manual_seed(5)
    query = torch.randn(2, 3, 40, 16)
    key = torch.randn(2, 3, 9, 16) + 6.0 * torch.randn(16)  # a common direction: mean / std of S about 5
    scores = query @ key.transpose(-1, -2)
    torch.testing.assert_close(block_std(query, key), scores.flatten(1).std(dim=1), rtol=1e-5, atol=0)
    assert block_std(query, key)[0] != block_std(query, key)[1]


def test_flux_inputs_that_are_wrong_get_one_line(tiny_flux, tmp_path, capsys):
    """A FLUX folder without its transformer, a T5 tokenizer without vocabulary, a prompt over T5's 512 tokens,
    an odd size, and train.py's --resolution: each one line that says what, before any weights load."""
    import shutil

    save_residual(tmp_path / "dog.safetensors", torch.zeros(1, 32), {"class_phrase": "dog", "base_model": "tiny",
                                                                     "family": "flux"})
    config = {"prompt": PROMPT, "residual_dict": {"<dog>": str(tmp_path / "dog.safetensors")},
              "regions": [{"phrase": "<dog>", "box": [0, 0, 0.5, 1]}], "subject_list": ["<dog>"],
              "guidance_steps": 2, "guidance_weight": 0.08, "weight_negative": -1e8}
    (tmp_path / "c.json").write_text(json.dumps(config))
    (tmp_path / "long.json").write_text(json.dumps({**config, "prompt": PROMPT + " near the forest" * 200}))
    no_transformer = shutil.copytree(tiny_flux, tmp_path / "no_transformer", ignore=shutil.ignore_patterns("transformer"))
    no_vocabulary = shutil.copytree(tiny_flux, tmp_path / "no_vocabulary")
    (no_vocabulary / "tokenizer_2" / "tokenizer.json").unlink()
    cases = [(no_transformer, "c.json", [], "not a diffusers Stable Diffusion or FLUX folder (no transformer/;"),
             (no_vocabulary, "c.json", [], "tokenizer_2/ holds no T5 vocabulary"),
             (tiny_flux, "long.json", [], "prompt: 609 tokens (EOS included), more than the text encoder's 512"),
             (tiny_flux, "c.json", ["--height", "72", "--width", "64"],
              "--height/--width 72x64: a FLUX image's sides are multiples of 16 (e.g. 64x64)")]
    for model, name, extra, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            inference.run_cli(inference.main, inference.parse_args(
                ["--pretrained_model_name_or_path", str(model), "--inference_config", str(tmp_path / name),
                 "--output_dir", str(tmp_path / "out"), *extra]))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and fragment in lines[0], lines
    with pytest.raises(SystemExit):
        train.run_cli(train.main, train.parse_args([
            "--pretrained_model_name_or_path", str(tiny_flux), "--instance_data_dir", str(tmp_path),
            "--instance_prompt", "dog", "--output_dir", str(tmp_path / "t"), "--resolution", "72"]))
    assert "--resolution 72: a FLUX image's sides are multiples of 16 (e.g. 64)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "t" / "residual.safetensors").exists()
