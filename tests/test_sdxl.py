"""SDXL on a tiny random model: its conditioning by hand, the guided sampler against the plain one, training then
composing with the same scripts and configs, and residuals of the other family refused."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import inference
import train
from config_keys import SamplingSettings
from conftest import clip_tokenizer
from layout_guidance import SamplerInputs, generate, install_guidance, layout_weight_map
from naive_sampler import install_naive, naive_sample
from pipeline_utils import load_model
from residual_utils import apply_residuals, load_residual
from test_inference import expect_error, run, write_config, write_residual
from test_train import make_images, run_train, train_args
from text_utils import conditioning, token_ids


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_model(str(tiny_sdxl), torch.device("cpu"), torch.float32)


def by_hand(sd, text, length):
    """SDXL's pipeline conditioning from the two CLIP models directly: each tokenizer pads its own way, both
    penultimate hidden states side by side, the second encoder's projected embedding as the pooled one."""
    from transformers import CLIPTokenizer

    tokenizer_2 = CLIPTokenizer.from_pretrained(sd.name, subfolder="tokenizer_2")
    ids_1 = torch.tensor([token_ids(sd.tokenizer, text, length)])
    ids_2 = torch.tensor([token_ids(tokenizer_2, text, length)])
    with torch.no_grad():
        out_1 = sd.text_encoder.first(ids_1, output_hidden_states=True)
        out_2 = sd.text_encoder.second(ids_2, output_hidden_states=True)
    assert tokenizer_2.pad_token == "!" and ids_2[0, -1] != ids_1[0, -1]  # the padding differs
    return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], -1)[0], out_2.text_embeds[0]


def test_conditioning_is_sdxl_pipelines(sdxl):
    assert sdxl.family == "sdxl" and sdxl.embedding_dim == 64 and sdxl.vae.dtype == torch.float32
    ids = token_ids(sdxl.tokenizer, "a dog on the left", 12)
    cond, uncond, (pooled, uncond_pooled) = conditioning(sdxl, ids, token_ids(sdxl.tokenizer, "", 12), True)
    states, expected_pooled = by_hand(sdxl, "a dog on the left", 12)
    torch.testing.assert_close(cond, states)
    torch.testing.assert_close(pooled, expected_pooled)
    assert cond.shape == (12, 64) and pooled.shape == (32,)
    assert torch.count_nonzero(uncond) == 0 and torch.count_nonzero(uncond_pooled) == 0  # empty negative: zeros
    negative = token_ids(sdxl.tokenizer, "blurry", 12)
    _, uncond, (_, uncond_pooled) = conditioning(sdxl, ids, negative, False)
    torch.testing.assert_close(uncond, by_hand(sdxl, "blurry", 12)[0])
    torch.testing.assert_close(uncond_pooled, by_hand(sdxl, "blurry", 12)[1])


def test_micro_conditioning_is_size_crop_size(sdxl):
    added = sdxl.added_cond(torch.ones(3, 32), 64, 48)
    assert added["time_ids"].tolist() == [[64, 48, 0, 0, 64, 48]] * 3 and added["text_embeds"].shape == (3, 32)


@pytest.mark.parametrize("guidance_steps,cfg_schedule", [(3, "sigma"), (2, "constant")])
def test_guided_sdxl_sampler_equals_plain_implementation(sdxl, guidance_steps, cfg_schedule):
    ids = token_ids(sdxl.tokenizer, "A cat on the right and a dog on the left.")
    cond, uncond, pooled = conditioning(sdxl, ids, token_ids(sdxl.tokenizer, "", len(ids)), True)
    cond = apply_residuals(cond, [(torch.randn(1, 64, generator=torch.Generator().manual_seed(5)), 2)])
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :32] = (255, 0, 0)
    weight_map = layout_weight_map(layout, [((255, 0, 0), [8], 2.5), ((0, 0, 0), [2], 2.5)], len(ids), -1e8)
    sampling = SamplingSettings(num_inference_steps=3, cfg_scale=7.5, cfg_schedule=cfg_schedule,
                                guidance_steps=guidance_steps, guidance_weight=0.08)
    inputs = SamplerInputs(cond, uncond, weight_map, pooled=pooled)

    guidance = install_guidance(sdxl.unet)
    guided = [name for name, p in sdxl.unet.attn_processors.items() if type(p).__name__ == "GuidedCrossAttnProcessor"]
    assert guided and all(".attn2." in name for name in guided)
    assert len(guided) == sum(".attn2." in name for name in sdxl.unet.attn_processors)
    fast = generate(sdxl, inputs, sampling, [11, 12], (64, 64), guidance)

    state = install_naive(sdxl.unet)
    plain = [naive_sample(sdxl, state, inputs, sampling, seed, (64, 64)) for seed in (11, 12)]
    diff = np.abs(fast.astype(int) - np.stack(plain).astype(int))
    assert diff.max() <= 1, diff.max()
    unguided = generate(sdxl, SamplerInputs(cond, uncond, pooled=pooled),
                        dataclasses.replace(sampling, guidance_steps=0), [11], (64, 64), guidance)
    assert np.abs(unguided[0].astype(int) - fast[0].astype(int)).max() > 1  # the guidance does something
    install_guidance(sdxl.unet)


def test_template_residual_rows_of_both_encoders_by_hand(sdxl):
    """A.7 on SDXL: the mean over templates of the tuned minus the frozen concept rows of both encoders' states."""
    import copy

    tokenizer = sdxl.tokenizer
    ids, positions = train.template_rows(tokenizer, "dog", 1)
    frozen = train.concept_rows(sdxl.text_encoder, ids, positions, 1)
    tuned = copy.deepcopy(sdxl.text_encoder)
    with torch.no_grad():
        for encoder, seed in ((tuned.first, 1), (tuned.second, 2)):
            table = encoder.get_input_embeddings().weight
            table[1929] += torch.randn(table.shape[1], generator=torch.Generator().manual_seed(seed))  # "dog"
    residual = train.compute_residual(tuned, ids, positions, 1, frozen)
    rows = []
    for template, p in zip(train.TEMPLATES, positions):
        sentence = template.format("dog")
        before = by_hand(sdxl, sentence, 77)[0]
        sdxl_tuned = type(sdxl)(**{**sdxl.__dict__, "text_encoder": tuned})
        after = by_hand(sdxl_tuned, sentence, 77)[0]
        rows.append(after[p] - before[p])
    expected = torch.stack(rows).mean(0)[None]
    torch.testing.assert_close(residual, expected, atol=1e-5, rtol=1e-4)
    assert residual[0, :32].abs().sum() > 0 and residual[0, 32:].abs().sum() > 0  # both encoders moved


def test_preservation_loss_is_taken_per_encoder():
    e0 = torch.zeros(1, 5, 4)
    e = e0.clone()
    e[0, 0] = torch.tensor([3.0, 4.0, 6.0, 8.0])  # BOS row: norm 5 in the first encoder, 10 in the second
    loss = train.preservation_loss(e, e0, 1, 1.0, 0.0, widths=(2, 2))
    assert float(loss) == pytest.approx(15.0)  # 5 + 10, not the norm of the joined row (sqrt(125))
    assert float(train.preservation_loss(e, e0, 1, 1.0, 0.0)) == pytest.approx(125 ** 0.5)


def test_train_then_compose_on_sdxl(tiny_sdxl, tmp_path, capsys):
    data = make_images(tmp_path / "data", count=2, size=(80, 64))
    residuals = {}
    for name, prompt in (("dog", "dog"), ("cat", "cat")):
        argv = train_args(tiny_sdxl, data, tmp_path / name)
        argv[argv.index("dog")] = prompt
        residuals[name] = run_train(*argv)
        residual = load_residual(residuals[name])
        assert residual.tensor.shape == (1, 64) and residual.family == "sdxl"
        assert residual.metadata["class_phrase"] == prompt and residual.tensor.abs().sum() > 0
    record = json.loads((tmp_path / "dog" / "train_config.json").read_text())
    assert record["embedding_dim"] == 64 and record["resolution"] == 64  # the model's own size by default
    config = write_config(tmp_path / "cfg", dim=64, residual_dict={"<cat>": str(residuals["cat"]),
                                                                   "<dog>": str(residuals["dog"])},
                          subject_list=["<cat>", "<dog>"], color_context={"255,0,0": ["<dog>", 2.5],
                                                                          "0,255,0": ["<cat>", 2.5]})
    folder = run(tiny_sdxl, config, tmp_path / "out", "--num_images", "2")
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "all_images.png", "config.json"]
    run_record = json.loads((folder / "config.json").read_text())
    assert run_record["subject_list"] == [["<cat>", 2], ["<dog>", 8]] and run_record["height"] == 64


def test_residual_of_the_other_family_is_refused(tiny_model, tiny_sdxl, tmp_path, capsys):
    folder = tmp_path / "cfg"
    config = write_config(folder, dim=64)
    write_residual(folder / "dog.safetensors", 64, "dog")  # recorded as SD (no family): 64-d rows
    out = tmp_path / "out"
    expect_error(capsys, tiny_sdxl, config, out, "cat.safetensors was trained on Stable Diffusion 1.x/2.x, but "
                 "the model is SDXL")
    config = write_config(folder)
    from residual_utils import save_residual
    save_residual(folder / "dog.safetensors", torch.zeros(1, 32), {"class_phrase": "dog", "base_model": "x",
                                                                  "family": "sdxl"})
    expect_error(capsys, tiny_model, config, out, "dog.safetensors was trained on SDXL, but the model is Stable Diffusion")


def test_tokenizers_agree_on_positions(tiny_sdxl):
    from transformers import CLIPTokenizer

    second = CLIPTokenizer.from_pretrained(str(tiny_sdxl), subfolder="tokenizer_2")
    text = "A dog, a pet cat and a dog near a forest."
    assert clip_tokenizer()(text).input_ids == second(text).input_ids  # positions found once serve both
