"""The variants of the method (docs/METHOD.md E) against computations by hand, and the faithful default untouched."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from config import prepare_job
from config_keys import SamplingSettings
from layout_guidance import (SamplerInputs, StepPlan, generate, guidance_sigmas, guidance_strengths, install_guidance,
                             layout_weight_map, make_cfg_denoiser, region_labels_on_grid)
from pipeline_utils import load_model
from test_inference import expect_error, run, write_config
from text_utils import encode_ids, token_ids


def attn1_layers(unet):
    return [m for n, m in unet.named_modules() if n.endswith(".attn1")]


def test_guidance_strengths_by_hand():
    sigmas = [float(s) for s in guidance_sigmas(4)]
    by_hand = [0.08 * math.log(1 + s ** 2) for s in sigmas]
    assert guidance_strengths(0.08, 4).tolist() == pytest.approx(by_hand, rel=1e-6)
    assert guidance_strengths(0.08, 4, "constant").tolist() == pytest.approx([by_hand[0]] * 4, rel=1e-6)
    assert by_hand[-1] < by_hand[0] / 4  # the faithful strength fades; the constant one does not


def test_region_labels_on_each_unet_grid():
    labels = np.full((64, 64), -1)
    labels[:, :32] = 0
    labels[:16, 48:] = 1
    assert region_labels_on_grid(labels, 4, 4).tolist() == [[0, 0, -1, 1], [0, 0, -1, -1], [0, 0, -1, -1],
                                                            [0, 0, -1, -1]]
    assert region_labels_on_grid(labels, 1, 1).tolist() == [[-1]]  # the centre cell


def test_region_self_attention_by_hand(tiny_model):
    """E4: during guided steps a query of one subject region gets no attention from the keys of another subject
    region (pixels of no subject attend and are attended everywhere); off, or unguided, it is diffusers' own."""
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    guidance = install_guidance(sd.unet)
    attn = attn1_layers(sd.unet)[0]
    labels = np.full((64, 64), -1)
    labels[:, :24] = 0
    labels[:, 40:] = 1
    guidance.set_layout(torch.zeros(5, 64, 64), (8, 8), "cpu")
    guidance.set_self_attention(labels, (8, 8), "cpu")
    x = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    plain = attn.processor.fused(attn, x)

    def by_hand(hidden):
        heads = attn.heads
        q, k, v = (f(hidden).view(2, 64, heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        grid = region_labels_on_grid(labels, 8, 8).flatten()
        for i in range(64):
            for j in range(64):
                if grid[i] >= 0 and grid[j] >= 0 and grid[i] != grid[j]:
                    scores[:, :, i, j] = -float("inf")
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 64, -1)
        return attn.to_out[0](out)

    guidance.set_step(False)
    assert torch.equal(attn(x), plain)
    guidance.set_step(True, strength=1.0, num_uncond=1)
    masked = attn(x)
    torch.testing.assert_close(masked, by_hand(x), rtol=1e-4, atol=1e-5)
    assert (masked - plain).abs().max() > 1e-3
    guidance.set_self_attention(None, (8, 8), "cpu")
    assert torch.equal(attn(x), plain)


def test_residual_guidance_is_a_third_branch_by_hand(tiny_model):
    """E3: e = e_u + s (e_c - e_u) + r (e_c - e_plain), the three predictions taken from separate UNet calls."""
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    ids = token_ids(sd.tokenizer, "a cat and a dog")
    cond, uncond = encode_ids(sd.text_encoder, [ids, token_ids(sd.tokenizer, "", len(ids))])
    plain = cond.clone()
    plain[2] -= torch.randn(cond.shape[-1], generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3
    sigma, t, s, r = 3.0, torch.tensor(700), 5.0, 2.0
    denoise = make_cfg_denoiser(sd.unet, SamplerInputs(cond[None], uncond[None], plain=plain[None]),
                                StepPlan([sigma, 0.0], [t], [s]), SamplingSettings(residual_guidance=r), "epsilon")
    x_in = x / math.sqrt(sigma ** 2 + 1)
    e = {name: sd.unet(x_in, t, encoder_hidden_states=states[None]).sample
         for name, states in (("u", uncond), ("c", cond), ("p", plain))}
    by_hand = x - sigma * (e["u"] + s * (e["c"] - e["u"]) + r * (e["c"] - e["p"]))
    torch.testing.assert_close(denoise(x, 0), by_hand, rtol=1e-4, atol=1e-4)


def test_residual_guidance_in_region_pushes_only_inside_the_subjects_regions(tiny_model):
    """The variant residual_guidance_in_region: on guided steps, r (e_c - e_plain) times each latent cell's share of
    the subjects' regions (the rows where cond and plain differ, positive in W), by hand on an 8 x 8 latent; none
    on unguided steps."""
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    ids = token_ids(sd.tokenizer, "a cat and a dog")
    cond, uncond = encode_ids(sd.text_encoder, [ids, token_ids(sd.tokenizer, "", len(ids))])
    plain = cond.clone()
    plain[2] -= torch.randn(cond.shape[-1], generator=torch.Generator().manual_seed(1))  # the residual's row: 2
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :20] = (255, 0, 0)  # the subject's region: columns 0-19, so latent column 2 is half inside
    layout[:, 40:] = (0, 255, 0)  # another phrase's (row 5), no residual: not the subject's region
    weight_map = layout_weight_map(layout, [((255, 0, 0), [2], 2.5), ((0, 255, 0), [5], 2.5)], len(ids), -1e8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3
    sigma, t, s, r = 3.0, torch.tensor(700), 5.0, 2.0
    inputs = SamplerInputs(cond[None], uncond[None], weight_map, plain=plain[None])
    settings = SamplingSettings(residual_guidance=r, residual_guidance_in_region=True)
    denoise = make_cfg_denoiser(sd.unet, inputs, StepPlan([sigma, 0.0], [t], [s], guided_steps=1), settings,
                                "epsilon")
    x_in = x / math.sqrt(sigma ** 2 + 1)
    e = {name: sd.unet(x_in, t, encoder_hidden_states=states[None]).sample
         for name, states in (("u", uncond), ("c", cond), ("p", plain))}
    share = torch.zeros(8, 8)
    share[:, :2], share[:, 2] = 1.0, 0.5  # 20 of 64 pixel columns: cells 0, 1 whole, cell 2 half
    by_hand = x - sigma * (e["u"] + s * (e["c"] - e["u"]) + r * share * (e["c"] - e["p"]))
    torch.testing.assert_close(denoise(x, 0), by_hand, rtol=1e-4, atol=1e-4)
    everywhere = make_cfg_denoiser(sd.unet, inputs, StepPlan([sigma, 0.0], [t], [s]),
                                   SamplingSettings(residual_guidance=r), "epsilon")
    assert (everywhere(x, 0) - denoise(x, 0))[..., 4:].abs().max() > 1e-3  # outside, only the variant differs
    # a step the layout does not guide gets no push: a lone unguided subject samples as without the variant
    unguided = make_cfg_denoiser(sd.unet, inputs, StepPlan([sigma, 0.0], [t], [s]), settings, "epsilon")
    torch.testing.assert_close(unguided(x, 0), x - sigma * (e["u"] + s * (e["c"] - e["u"])), rtol=1e-4, atol=1e-4)


def test_residual_scale_and_subject_regions(tiny_model, tmp_path):
    """E2: the residual is added times residual_scale; E4's regions are the colours that guide a subject."""
    from pipeline_utils import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32, tokenizer=tokenizer)
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :32] = (255, 0, 0)
    layout[:, 32:48] = (0, 255, 0)
    layout[:, 48:] = (0, 0, 255)
    config = write_config(tmp_path / "cfg", residual_scale=2.5, region_self_attention=True,
                          color_context={"255,0,0": ["dog", 2.5], "0,255,0": ["cat", 2.5], "0,0,255": ["right", 1]})
    Image.fromarray(layout).save(tmp_path / "cfg" / "layout.png")
    job = prepare_job(config, tokenizer, 32, 64, 64, {})
    inputs = inference.job_inputs(sd, job)
    assert inputs.plain is None  # no residual guidance asked for: no third branch
    states = encode_ids(sd.text_encoder, [job.prompt_ids])[0]
    expected = states.clone()
    for s in job.subjects:
        expected[s.position] += 2.5 * s.residual.tensor[0]
    torch.testing.assert_close(inputs.cond, expected)
    labels = inference.subject_regions(job)
    assert (labels[:, :32] == 0).all() and (labels[:, 32:48] == 1).all() and (labels[:, 48:] == -1).all()


def test_variants_at_their_defaults_leave_the_images_alone(tiny_model, tmp_path):
    """The faithful method is the default: the variants' keys at their default values give the same bytes, and
    each variant switched on changes the image."""
    base = run(tiny_model, write_config(tmp_path / "a"), tmp_path / "out_a")
    same = run(tiny_model, write_config(tmp_path / "b", region_self_attention=False, residual_scale=1.0,
                                        residual_guidance=0.0, guidance_schedule="sigma"), tmp_path / "out_b")
    assert (base / "0.png").read_bytes() == (same / "0.png").read_bytes()
    image = np.array(Image.open(base / "0.png")).astype(int)
    for i, change in enumerate([dict(region_self_attention=True), dict(residual_scale=2.0),
                                dict(residual_guidance=2.0), dict(guidance_schedule="constant")]):
        folder = run(tiny_model, write_config(tmp_path / f"v{i}", **change), tmp_path / f"out_v{i}")
        assert np.abs(np.array(Image.open(folder / "0.png")).astype(int) - image).max() > 0, change
        assert json.loads((folder / "config.json").read_text())[next(iter(change))] == next(iter(change.values()))


@pytest.mark.parametrize("changes,fragment", [
    (dict(region_self_attention="yes"), "region_self_attention: expected true or false"),
    (dict(residual_scale="2"), "residual_scale: expected a finite number"),
    (dict(residual_guidance=float("inf")), "residual_guidance: expected a finite number"),
    (dict(guidance_schedule="linear"), "guidance_schedule: expected one of sigma, constant"),
])
def test_bad_variant_keys(tiny_model, tmp_path, capsys, changes, fragment):
    config = write_config(tmp_path / "cfg", **changes)
    expect_error(capsys, tiny_model, config, tmp_path / "out", fragment)


def test_residual_guidance_on_sdxl_keeps_its_added_conditioning(tiny_sdxl, tmp_path):
    """The third branch carries SDXL's pooled embedding and micro-conditioning like the conditional one."""
    from pipeline_utils import load_tokenizer
    from text_utils import conditioning

    tokenizer = load_tokenizer(str(tiny_sdxl))
    sd = load_model(str(tiny_sdxl), torch.device("cpu"), torch.float32, tokenizer=tokenizer)
    ids = token_ids(tokenizer, "a cat and a dog")
    cond, uncond, pooled = conditioning(sd, ids, token_ids(tokenizer, "", len(ids)), True)
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :32] = (255, 0, 0)
    weight_map = layout_weight_map(layout, [((255, 0, 0), [2], 2.5)], len(ids), -1e8)
    guidance = install_guidance(sd.unet)
    sampling = SamplingSettings(num_inference_steps=2, cfg_scale=5.0, guidance_steps=2, guidance_weight=0.08)
    zero = generate(sd, SamplerInputs(cond, uncond, weight_map, pooled=pooled), sampling, [4], (64, 64), guidance)
    same = generate(sd, SamplerInputs(cond, uncond, weight_map, pooled=pooled, plain=cond),
                    dataclasses.replace(sampling, residual_guidance=3.0), [4], (64, 64), guidance)
    assert np.abs(zero.astype(int) - same.astype(int)).max() <= 1  # e_c - e_plain = 0 when nothing differs
