"""inference.py, layout_guidance.py and residual_utils.py on tiny random models and the real tokenizer."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from cli_utils import run_cli
from config_keys import SamplingSettings
from conftest import ROOT, clip_tokenizer
from config import prepare_job
from layout_guidance import (AttentionRecorder, SamplerInputs, cfg_scales, generate, guidance_sigmas, guided_probs,
                             install_guidance, layout_weight_map)
from naive_sampler import install_naive, naive_sample
from pipeline_utils import load_model
from residual_utils import apply_residuals, find_sequence, load_residual, save_residual
from text_utils import encode_ids, token_ids

PROMPT2 = "A dog, a pet cat and a dog near a forest."


def write_layout(path, size=(64, 64), mode="RGB"):
    """Left half red, right half green."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, : size[0] // 2] = (255, 0, 0)
    array[:, size[0] // 2:] = (0, 255, 0)
    image = Image.fromarray(array)
    if mode == "P":
        image = image.quantize(colors=4)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_residual(path, dim, phrase="dog", rows=1, scale=1.0, seed=0):
    tensor = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * scale
    save_residual(path, tensor, {"class_phrase": phrase, "base_model": "tiny"})
    return path


def write_config(folder, dim=32, **changes):
    """A two-subject config in `folder` (residuals and layout beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_residual(folder / "cat.safetensors", dim, "cat", seed=1)
    write_residual(folder / "dog.safetensors", dim, "dog", seed=2)
    write_layout(folder / "layout.png")
    config = {
        "prompt": "A cat on the right and a dog on the left.",
        "residual_dict": {"<cat>": "cat.safetensors", "<dog>": "dog.safetensors"},
        "color_context": {"255,0,0": ["dog", 2.5], "0,255,0": ["cat", 2.5]},
        "guidance_steps": 50, "guidance_weight": 0.08, "weight_negative": -1e8,
        "layout": "layout.png", "subject_list": [["<cat>", 2], ["<dog>", 8]],
    }
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path = folder / "config.json"
    path.write_text(json.dumps([config]))
    return path


def run(model, config, out, *extra):
    argv = ["--pretrained_model_name_or_path", str(model), "--inference_config", str(config),
            "--output_dir", str(out), "--num_images", "1", "--num_inference_steps", "2", *extra]
    return run_cli(inference.main, inference.parse_args(argv))[0]  # the first config's output folder


def expect_error(capsys, model, config, out, *fragments, extra=()):
    with pytest.raises(SystemExit) as exit_info:
        run(model, config, out, *extra)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not list(out.rglob("*.png")), "no image may be written on bad input"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Tokens and positions

def test_token_positions_of_the_seed_prompt():
    tokenizer = clip_tokenizer()
    ids = token_ids(tokenizer, PROMPT2)
    assert len(ids) == 15  # BOS, 13 tokens (the comma and the full stop are tokens), EOS
    assert find_sequence(ids, token_ids(tokenizer, "dog")[1:-1]) == [2, 9]
    assert find_sequence(ids, token_ids(tokenizer, "pet cat")[1:-1]) == [5]
    assert find_sequence(ids, token_ids(tokenizer, "dog,")[1:-1]) == [2]
    assert find_sequence(ids, token_ids(tokenizer, "forest .")[1:-1]) == [12]
    # the adaptive length is the real count, not words + 2 = 12, which would cut "forest ."
    padded = token_ids(tokenizer, PROMPT2, 77)
    assert padded[:15] == ids and len(padded) == 77


def test_subject_positions_found_from_class_phrase(tmp_path, capsys):
    tokenizer = clip_tokenizer()
    config = write_config(tmp_path, subject_list=["<cat>", ["<dog>"]])
    job = prepare_job(config, tokenizer, 32, 64, 64, {})
    assert [(s.name, s.position) for s in job.subjects] == [("<cat>", 2), ("<dog>", 8)]
    assert job.settings["subject_tokens"] == {"<cat>": "cat", "<dog>": "dog"}


def test_ambiguous_position_names_candidates(tmp_path):
    tokenizer = clip_tokenizer()
    config = write_config(tmp_path, prompt=PROMPT2, color_context={"255,0,0": ["pet cat", 2.5]},
                          subject_list=["<dog>"])
    with pytest.raises(inference.UserError, match=r"positions found: 2 'dog', 9 'dog'"):
        prepare_job(config, tokenizer, 32, 64, 64, {})


def test_class_phrase_must_match_given_position(tmp_path):
    config = write_config(tmp_path, subject_list=[["<cat>", 2], ["<dog>", 4]])
    with pytest.raises(inference.UserError, match=r"'<dog>' at position 4 is 'the', but its residual was "
                                                   r"learned for 'dog' \(found at positions \[8\]\)"):
        prepare_job(config, clip_tokenizer(), 32, 64, 64, {})


def test_legacy_residual_on_foreign_token_warns(tmp_path, capsys):
    config = write_config(tmp_path, subject_list=[["<cat>", 2], ["<dog>", 4]])
    torch.save(torch.randn(1, 32), tmp_path / "dog.pt")
    data = json.loads(config.read_text())
    data[0]["residual_dict"]["<dog>"] = "dog.pt"
    config.write_text(json.dumps(data))
    job = prepare_job(config, clip_tokenizer(), 32, 64, 64, {})
    assert job.subjects[1].position == 4
    assert "'<dog>' sits on 'the'" in capsys.readouterr().err


def test_subject_name_in_color_context_selects_its_rows(tmp_path):
    folder = tmp_path
    write_residual(folder / "dog6.safetensors", 32, "dog", seed=3)
    config = write_config(folder, prompt=PROMPT2,
                          residual_dict={"<dog>": "dog.safetensors", "<dog6>": "dog6.safetensors",
                                         "<cat>": "cat.safetensors"},
                          color_context={"255,0,0": ["<dog>", 2.5], "0,255,0": ["<dog6>", 1.5]},
                          subject_list=[["<dog>", 2], ["<cat>", 6], ["<dog6>", 9]])
    job = prepare_job(config, clip_tokenizer(), 32, 64, 64, {})
    assert [rows for _, rows, _ in job.regions] == [[2], [9]]
    # the phrase "dog" would have matched both
    job_phrase = prepare_job(write_config(folder / "b", prompt=PROMPT2,
                                                    color_context={"255,0,0": ["dog", 2.5]},
                                                    subject_list=[["<dog>", 2], ["<cat>", 6]]),
                                       clip_tokenizer(), 32, 64, 64, {})
    assert job_phrase.regions[0][1] == [2, 9]


# ------------------------------------------------------------------------------------------------
# B2, B3: the weight map and the guided attention

def test_layout_weight_map_by_hand():
    layout = np.array([[[255, 0, 0], [0, 255, 0], [9, 9, 9]],
                       [[255, 0, 0], [255, 0, 0], [0, 255, 0]]], dtype=np.uint8)  # [2, 3, 3]
    regions = [((255, 0, 0), [1, 2], 2.5), ((0, 255, 0), [2, 2, 4], 1.0)]
    weights = layout_weight_map(layout, regions, 6, -100.0)
    assert weights.shape == (6, 2, 3)
    red = torch.tensor([[2.5, -100, -100], [2.5, 2.5, -100]])
    green = torch.tensor([[-100, 1.0, -100], [-100, -100, 1.0]])
    assert torch.equal(weights[0], torch.zeros(2, 3))
    assert torch.equal(weights[1], red)
    assert torch.equal(weights[2], red + 2 * green)  # listed by both regions, twice by the second
    assert torch.equal(weights[3], torch.zeros(2, 3))
    assert torch.equal(weights[4], green)
    assert torch.equal(weights[5], torch.zeros(2, 3))


def test_guided_attention_bias_by_hand():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)
    layout_map = torch.randn(4, 5)
    strength, scale = 0.08 * math.log(1 + 14.6 ** 2), 3 ** -0.5
    uncond_q = torch.randn(1, 2, 4, 3)
    probs = guided_probs(torch.cat([uncond_q, q]), k.expand(2, -1, -1, -1), layout_map, strength, scale, num_uncond=1)
    out = probs @ v.expand(2, -1, -1, -1)  # as the guided processor applies them

    def by_hand(qn, bias):
        kn, vn, wn = (t.double().numpy() for t in (k[0], v[0], layout_map))
        scores = np.einsum("hnd,hld->hnl", qn, kn)
        logits = (scores + bias * wn[None] * scores.std(ddof=1)) * scale
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.einsum("hnl,hld->hnd", probs, vn)

    np.testing.assert_allclose(out[1].numpy(), by_hand(q[0].double().numpy(), strength), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0].numpy(), by_hand(uncond_q[0].double().numpy(), 0.0), rtol=1e-5, atol=1e-6)


def test_guidance_sigmas_are_the_sampler_sigmas_when_steps_match(tiny_model):
    from diffusers import LMSDiscreteScheduler
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    scheduler = LMSDiscreteScheduler.from_config(sd.scheduler_config)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(guidance_sigmas(10), scheduler.sigmas[:10].float())
    assert float(guidance_sigmas(50)[0]) == pytest.approx(14.6146, abs=1e-3)
    scales = cfg_scales(7.5, "sigma", scheduler.sigmas.tolist())
    assert scales[0] == pytest.approx(15.0) and len(scales) == 10
    assert scales[-1] == pytest.approx(7.5 * (1 + float(scheduler.sigmas[9] / scheduler.sigmas[0])))
    assert cfg_scales(3.0, "constant", scheduler.sigmas.tolist()) == [3.0] * 10


def test_guidance_strength_follows_a_schedule_of_min_guided_and_sampling_steps(tiny_model):
    """B3: with 3 sampling steps and guidance_steps 50, step i's strength is gamma * log(1 + sigma_i^2) with
    sigma_i from a 3-step schedule (here the sampler's own sigmas), not from a 50-step one."""
    from diffusers import LMSDiscreteScheduler
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    ids = token_ids(sd.tokenizer, "a cat and a dog")
    embeddings = encode_ids(sd.text_encoder, [ids, token_ids(sd.tokenizer, "", len(ids))])
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :32] = (255, 0, 0)
    weight_map = layout_weight_map(layout, [((255, 0, 0), [2], 2.5)], len(ids), -1e8)
    guidance = install_guidance(sd.unet)
    seen = []
    set_step = guidance.set_step
    guidance.set_step = lambda active, strength=None, **kw: (seen.append(float(strength)) if active else None,
                                                             set_step(active, strength, **kw))
    inputs = SamplerInputs(embeddings[0], embeddings[1], weight_map)
    images = {g: generate(sd, inputs, SamplingSettings(num_inference_steps=3, guidance_steps=g, guidance_weight=0.08),
                          [3], (64, 64), guidance) for g in (50, 3)}
    scheduler = LMSDiscreteScheduler.from_config(sd.scheduler_config)
    scheduler.set_timesteps(3)
    by_hand = [0.08 * math.log(1 + float(sigma) ** 2) for sigma in scheduler.sigmas[:3] for _ in range(2)]  # 2 passes
    assert seen[:6] == pytest.approx(by_hand, rel=1e-6) and seen[6:] == pytest.approx(by_hand, rel=1e-6)
    assert abs(float(guidance_sigmas(50)[1]) - float(scheduler.sigmas[1])) > 1  # a 50-step schedule would differ
    assert np.array_equal(images[50], images[3])


def test_guided_processor_off_or_zero_map_equals_default(tiny_model):
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    states = torch.randn(2, 7, 32)
    reference = sd.unet(x, 500, encoder_hidden_states=states).sample
    guidance = install_guidance(sd.unet)
    names = {type(p).__name__ for n, p in sd.unet.attn_processors.items() if ".attn1." in n}
    assert names == {"RegionSelfAttnProcessor"}  # diffusers' fused processor unless its variant is on
    off = sd.unet(x, 500, encoder_hidden_states=states).sample
    assert torch.equal(off, reference)
    guidance.set_layout(torch.zeros(7, 64, 64), (8, 8), "cpu")
    guidance.set_step(True, strength=5.0, num_uncond=1)
    zero_map = sd.unet(x, 500, encoder_hidden_states=states).sample
    torch.testing.assert_close(zero_map, reference, rtol=1e-4, atol=1e-5)
    guidance.set_layout(torch.randn(7, 64, 64), (8, 8), "cpu")
    guided = sd.unet(x, 500, encoder_hidden_states=states).sample
    torch.testing.assert_close(guided[0], reference[0], rtol=1e-4, atol=1e-5)  # the unconditional half is untouched
    assert (guided[1] - reference[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# B4: the batched sampler against the plain step-by-step implementation

@pytest.mark.parametrize("fixture,settings", [
    ("tiny_model", dict(cfg_schedule="sigma", guidance_steps=3)),  # the seed's defaults
    ("tiny_model", dict(cfg_schedule="sigma", guidance_steps=50)),  # fewer steps than guided: min(G, N) schedule
    ("tiny_model", dict(cfg_schedule="constant", guidance_steps=5)),  # Cones 2: constant CFG, longer schedule
    ("tiny_model_v", dict(cfg_schedule="sigma", guidance_steps=2)),  # v-prediction, last step unguided
])
@pytest.mark.model  # its models come through request.getfixturevalue
def test_batched_sampler_equals_plain_implementation(request, fixture, settings):
    model = request.getfixturevalue(fixture)
    sd = load_model(str(model), torch.device("cpu"), torch.float32)
    tokenizer = sd.tokenizer
    ids = token_ids(tokenizer, "A cat on the right and a dog on the left.")
    embeddings = encode_ids(sd.text_encoder, [ids, token_ids(tokenizer, "", len(ids))])
    residual = torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    cond = apply_residuals(embeddings[0], [(residual, 2)])
    uncond = embeddings[1]
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :32] = (255, 0, 0)
    weight_map = layout_weight_map(layout, [((255, 0, 0), [8], 2.5), ((0, 0, 0), [2], 2.5)], len(ids), -1e8)
    sampling = SamplingSettings(num_inference_steps=3, cfg_scale=7.5, cfg_schedule=settings["cfg_schedule"],
                                guidance_steps=settings["guidance_steps"], guidance_weight=0.08)
    inputs = SamplerInputs(cond, uncond, weight_map)

    guidance = install_guidance(sd.unet)
    fast = generate(sd, inputs, sampling, [11, 12], (64, 64), guidance)

    state = install_naive(sd.unet)
    plain = [naive_sample(sd, state, inputs, sampling, seed, (64, 64)) for seed in (11, 12)]
    diff = np.abs(fast.astype(int) - np.stack(plain).astype(int))
    assert diff.max() <= 1, diff.max()
    assert diff.mean() < 0.01
    assert not np.array_equal(fast[0], fast[1])


def left_half_setup(model, prompt):
    """(sd, [cond; uncond] embeddings, weight map, guidance) of a two-token prompt whose noun (row 2) is guided
    to the left half of a 64 px image."""
    sd = load_model(str(model), torch.device("cpu"), torch.float32)
    ids = token_ids(sd.tokenizer, prompt)
    embeddings = encode_ids(sd.text_encoder, [ids, token_ids(sd.tokenizer, "", len(ids))])
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :32] = 255
    weight_map = layout_weight_map(layout, [((255, 255, 255), [2], 2.5)], len(ids), -1e8)
    return sd, embeddings, weight_map, install_guidance(sd.unet)


def test_guidance_changes_the_image(tiny_model):
    sd, embeddings, weight_map, guidance = left_half_setup(tiny_model, "a dog")
    inputs = SamplerInputs(embeddings[0], embeddings[1], weight_map)
    plain = generate(sd, inputs, SamplingSettings(num_inference_steps=2), [0], (64, 64), guidance)
    sampling = SamplingSettings(num_inference_steps=2, guidance_steps=2, guidance_weight=0.08)
    guided = generate(sd, inputs, sampling, [0], (64, 64), guidance)
    again = generate(sd, inputs, sampling, [0], (64, 64), guidance)
    assert np.abs(plain.astype(int) - guided.astype(int)).mean() > 1
    assert np.array_equal(guided, again)


# ------------------------------------------------------------------------------------------------
# Attention maps

def attention_by_hand(inputs, rows, size):
    """The conditional half's probability on `rows`, averaged over heads and layer calls, each call's map resized
    by PIL (bilinear) to `size`, normalised to sum 1: float64 numpy from each call's (attn, hidden, encoder)."""
    total = 0
    for attn, hidden, encoder in inputs:
        half = hidden.shape[0] // 2
        q = hidden[half:].double().numpy() @ attn.to_q.weight.double().numpy().T  # [B, N, C]
        k = encoder[half:].double().numpy() @ attn.to_k.weight.double().numpy().T  # [B, L, C]
        heads, (batch, n, c) = attn.heads, q.shape
        q = q.reshape(batch, n, heads, c // heads).transpose(0, 2, 1, 3)
        k = k.reshape(batch, -1, heads, c // heads).transpose(0, 2, 1, 3)
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(c // heads)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)  # [B, heads, N, L]
        side = int(math.isqrt(n))
        grid = probs[..., rows].sum(-1).mean(1).reshape(batch, side, side)
        total = total + np.stack([np.asarray(Image.fromarray(g.astype(np.float32), "F").resize(size, Image.BILINEAR))
                                  for g in grid])
    mean = total / len(inputs)
    return mean / mean.sum(axis=(1, 2), keepdims=True)


def test_attention_maps_equal_a_by_hand_computation(tiny_model):
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    ids = token_ids(sd.tokenizer, "a cat and a dog")
    embeddings = encode_ids(sd.text_encoder, [ids, token_ids(sd.tokenizer, "", len(ids))])
    guidance = install_guidance(sd.unet)
    inputs = []
    layers = [m for n, m in sd.unet.named_modules() if n.endswith(".attn2")]
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(
        (m, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])), with_kwargs=True)
        for m in layers]
    recorder = AttentionRecorder({"cat": [2], "a dog": [4, 5]}, len(ids), (64, 64), "cpu")
    generate(sd, SamplerInputs(embeddings[0], embeddings[1]), SamplingSettings(num_inference_steps=1), [3, 4],
             (64, 64), guidance, recorder)
    for hook in hooks:
        hook.remove()
    assert len(inputs) == len(layers) == 4 and recorder.calls == 4  # one UNet evaluation: each layer once
    maps = recorder.maps()
    for name, rows in (("cat", [2]), ("a dog", [4, 5])):
        assert maps[name].shape == (2, 64, 64) and maps[name].dtype == np.float32 and (maps[name] >= 0).all()
        np.testing.assert_allclose(maps[name].sum(axis=(1, 2)), 1, rtol=1e-5)
        np.testing.assert_allclose(maps[name], attention_by_hand(inputs, rows, (64, 64)), rtol=1e-4, atol=1e-9)


def test_guided_steps_record_the_biased_probabilities(tiny_model):
    sd, embeddings, weight_map, guidance = left_half_setup(tiny_model, "a cat")
    recorder = AttentionRecorder({"cat": [2]}, embeddings.shape[1], (64, 64), "cpu")
    generate(sd, SamplerInputs(embeddings[0], embeddings[1], weight_map),
             SamplingSettings(num_inference_steps=1, guidance_steps=1, guidance_weight=0.08), [0], (64, 64), guidance,
             recorder)
    assert recorder.calls == 4 * 2  # one guided step, run twice (self-recurrence)
    fine = recorder.sums[64][0, 0]  # [8, 8]: the sum over the calls of the three 8x8 layers
    # the -1e8 bias leaves no probability right of the region (cells 4.. of 8 lie right of pixel 32)
    assert fine[:, 4:].max() < 1e-6 and fine[:, :4].min() > 1e-3
    assert guidance.recorder is None  # recording ends with the sampling


# ------------------------------------------------------------------------------------------------
# Residual files

def test_legacy_pt_loads_on_cpu():
    path = ROOT / "configs" / "residuals" / "dog6_colabv6.pt"
    residual = load_residual(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert residual.tensor.shape == (1, 1024) and residual.tensor.dtype == torch.float32
    assert torch.equal(residual.tensor, raw.detach().reshape(1, 1024))
    assert residual.class_phrase is None and not residual.tensor.requires_grad


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.pt"
    torch.save({"residual": Exploit(str(marker))}, path)
    with pytest.raises(inference.UserError, match="refused"):
        load_residual(path)
    assert not marker.exists()


def test_safetensors_roundtrip_and_apply(tmp_path):
    tensor = torch.randn(3, 768)
    save_residual(tmp_path / "r.safetensors", tensor, {"class_phrase": "pet cat", "base_model": "m", "lr": 5e-6})
    residual = load_residual(tmp_path / "r.safetensors")
    assert torch.equal(residual.tensor, tensor)
    assert residual.metadata["token_num"] == "3" and residual.metadata["embedding_dim"] == "768"
    assert residual.class_phrase == "pet cat" and residual.metadata["lr"] == "5e-06"
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]  # no temporary left behind
    embeddings = torch.zeros(2, 10, 768)
    out = apply_residuals(embeddings, [(tensor, 4)])
    assert torch.equal(out[:, 4:7], tensor.expand(2, 3, 768))
    assert out[:, :4].abs().sum() == 0 and out[:, 7:].abs().sum() == 0 and embeddings.abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# The command line, end to end

def test_inference_writes_images_grid_and_config(tiny_model, tmp_path):
    config = write_config(tmp_path / "cfg", cfg_scale=5.0, text_length="max", negative_prompt="blurry")
    out = tmp_path / "out"
    folder = run(tiny_model, config, out, "--num_images", "3", "--seed", "7", "--cfg_scale", "6")
    assert folder == out / "<cat>_<dog>".replace("<", "").replace(">", "") / "A_cat_on_the_right_and_a_dog_on_the_left"
    assert sorted(p.name for p in folder.iterdir()) == ["7.png", "8.png", "9.png", "all_images.png", "config.json"]
    images = [np.array(Image.open(folder / f"{s}.png")) for s in (7, 8, 9)]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert not np.array_equal(images[0], images[1])
    grid = np.array(Image.open(folder / "all_images.png"))
    assert grid.shape == (128, 128, 3) and np.array_equal(grid[:64, 64:], images[1])
    saved = json.loads((folder / "config.json").read_text())
    assert saved["seeds"] == [7, 8, 9] and saved["cfg_scale"] == 6  # the command line wins over the file
    assert saved["text_length"] == "max" and saved["text_tokens"] == 77 and saved["negative_prompt"] == "blurry"
    assert saved["subject_list"] == [["<cat>", 2], ["<dog>", 8]] and saved["cfg_schedule"] == "sigma"
    assert saved["model"] == str(tiny_model) and "torch" in saved["versions"]


def test_save_attention_writes_maps_and_pictures_and_leaves_the_images_alone(tiny_model, tmp_path):
    # two steps, the first guided: both the guided and the fused path record; "right" is a phrase, not a subject
    config = write_config(tmp_path / "cfg", guidance_steps=1, text_length="words",
                          color_context={"255,0,0": ["<dog>", 2.5], "0,255,0": ["right", 2.5]})
    plain = run(tiny_model, config, tmp_path / "plain", "--num_images", "2", "--batch_size", "2")
    folder = run(tiny_model, config, tmp_path / "recorded", "--num_images", "2", "--batch_size", "2",
                 "--save_attention")
    assert not (plain / "attention").exists() and json.loads((plain / "config.json").read_text())["save_attention"] is False
    assert json.loads((folder / "config.json").read_text())["save_attention"] is True
    for seed in (0, 1):
        assert np.array_equal(np.array(Image.open(plain / f"{seed}.png")), np.array(Image.open(folder / f"{seed}.png")))
        with np.load(folder / "attention" / f"{seed}.npz") as maps:
            assert sorted(maps.files) == ["<cat>", "<dog>", "right"]
            for name in maps.files:
                assert maps[name].shape == (64, 64) and maps[name].dtype == np.float32 and maps[name].min() >= 0
                assert maps[name].sum() == pytest.approx(1, abs=1e-4)
        picture = Image.open(folder / "attention" / f"{seed}.png")
        assert picture.size == (4 * 256, 256)  # the image, then three maps, each 64 px panel enlarged 4 times
        image = np.array(Image.open(folder / f"{seed}.png"))
        assert np.array_equal(np.array(picture)[:, :256], image.repeat(4, axis=0).repeat(4, axis=1))
        # <dog>'s panel outlines the red (left) half: its inner border at column 31 (127-124 enlarged) is white
        dog = np.array(picture)[:, 2 * 256:3 * 256]
        assert (dog[80:240, 127] == 255).all() and not (dog[80:240, 123] == 255).all()
        assert not (dog[80:240, 160] == 255).all()
        # the name's label covers its top-left corner only: one 11 px line of the 256 px panel
        label = (dog == 0).all(axis=-1)  # the label's black box
        assert label[:12].any() and not label[16:].any()
    with pytest.raises(inference.UserError, match="save_attention runs the UNet uncompiled; leave out --compile"):
        inference.main(inference.parse_args(["--pretrained_model_name_or_path", str(tiny_model), "--inference_config",
                                              str(config), "--save_attention", "--compile", "--output_dir",
                                              str(tmp_path / "compiled")]))


def test_batch_size_gives_the_same_images(tiny_model, tmp_path):
    config = write_config(tmp_path / "cfg")
    one = run(tiny_model, config, tmp_path / "a", "--num_images", "3")
    three = run(tiny_model, config, tmp_path / "b", "--num_images", "3", "--batch_size", "2")
    for seed in range(3):
        a = np.array(Image.open(one / f"{seed}.png")).astype(int)
        b = np.array(Image.open(three / f"{seed}.png")).astype(int)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_layout_modes_and_non_square_output(tiny_model, tmp_path, mode):
    folder = tmp_path / "cfg"
    config = write_config(folder)
    if mode == "L":  # grey levels: regions 76 (red's luma) and 150 (green's)
        write_layout(folder / "layout.png", size=(300, 150), mode="L")
        data = json.loads(config.read_text())
        data[0]["color_context"] = {"76,76,76": ["dog", 2.5], "#969696": ["cat", 2.5]}
        config.write_text(json.dumps(data))
    else:
        write_layout(folder / "layout.png", size=(300, 150), mode=mode)
    out = run(tiny_model, config, tmp_path / "out", "--height", "64", "--width", "128")
    assert np.array(Image.open(out / "0.png")).shape == (64, 128, 3)


def test_all_seed_configs_run(tiny_model_1024, tmp_path, capsys):
    expected = {0: ["<cat2> -> position 2 'cat'", "<dog6> -> position 8 'dog'"],
                1: ["<flower> -> position 2 'flower'", "<vase> -> position 5 'vase'"],
                2: ["<dog> -> position 2 'dog'", "<pet_cat> -> position 5 'pet'", "<dog6> -> position 9 'dog'"],
                3: ["<cat2> -> position 2 'cat'", "<wearable_glasses> -> position 4 'wearable'",
                    "<watercolor> -> position 8 'watercolor'"]}
    outputs = []
    for i, lines in expected.items():
        folder = run(tiny_model_1024, ROOT / "configs" / f"guidance_config_prompt{i}.json", tmp_path, "--resolution", "64")
        printed = capsys.readouterr()
        for line in lines:
            assert line in printed.out
        assert "warning" not in printed.err
        outputs.append(np.array(Image.open(folder / "0.png")))
        assert json.loads((folder / "config.json").read_text())["guidance_steps"] == 50
    assert len({o.tobytes() for o in outputs}) == 4


def test_cli_runs_as_a_script(tiny_model, tmp_path):
    config = write_config(tmp_path / "cfg")
    done = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--pretrained_model_name_or_path",
                           str(tiny_model), "--inference_config", str(config), "--output_dir", str(tmp_path / "out"),
                           "--num_images", "1", "--num_inference_steps", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "<dog> -> position 8 'dog'" in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--pretrained_model_name_or_path",
                          str(tiny_model), "--inference_config", str(tmp_path / "nope.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"error: {tmp_path / 'nope.json'}: config file not found"


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written

BAD_CONFIGS = [
    ("unknown key", dict(guidance_wieght=0.1), ["guidance_wieght", "did you mean 'guidance_weight'"]),
    ("missing key", dict(layout=None), ["layout: missing"]),
    ("wrong type", dict(guidance_steps="50"), ["guidance_steps: expected an integer"]),
    ("bad colour", dict(color_context={"255,0": ["dog", 2.5]}), ["color_context.255,0", "expected a colour"]),
    ("colour > 255", dict(color_context={"256,0,0": ["dog", 2.5]}), ["expected a colour"]),
    ("colour absent", dict(color_context={"0,0,255": ["dog", 2.5]}), ["(0, 0, 255) does not occur in the layout"]),
    ("empty phrase", dict(color_context={"255,0,0": [" ", 2.5]}), ["phrase is empty"]),
    ("absent phrase", dict(color_context={"255,0,0": ["horse", 2.5]}), ["'horse' does not occur in the prompt"]),
    ("unknown subject", dict(subject_list=[["<cat>", 2], ["<horse>", 8]]), ["'<horse>' has no entry in residual_dict"]),
    ("position outside", dict(subject_list=[["<cat>", 2], ["<dog>", 14]]), ["position 14 is outside"]),
    ("position on BOS", dict(subject_list=[["<cat>", 0]]), ["position 0 is outside"]),
    ("bad cfg schedule", dict(cfg_schedule="linear"), ["cfg_schedule: expected one of sigma, constant"]),
    ("zero steps in file", dict(num_inference_steps=0), ["num_inference_steps: expected an integer from 1 to 1000"]),
    ("residual missing", dict(residual_dict={"<cat>": "cat.safetensors", "<dog>": "nowhere.pt"}),
     ["residual_dict.<dog>", "file not found: 'nowhere.pt'"]),
    ("layout missing", dict(layout="nowhere.png"), ["layout: file not found"]),
]


@pytest.mark.parametrize("name,changes,fragments", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(tiny_model, tmp_path, capsys, name, changes, fragments):
    config = write_config(tmp_path / "cfg", **changes)
    line = expect_error(capsys, tiny_model, config, tmp_path / "out", *fragments)
    assert str(config) in line


def test_bad_files(tiny_model, tmp_path, capsys):
    folder = tmp_path / "cfg"
    config = write_config(folder)
    out = tmp_path / "out"
    (folder / "notjson.json").write_text("[{'prompt': 1}]")
    expect_error(capsys, tiny_model, folder / "notjson.json", out, "not valid JSON")
    (folder / "dog.safetensors").write_bytes(b"garbage" * 10)
    expect_error(capsys, tiny_model, config, out, "dog.safetensors", "not a residual file")
    torch.save([1, 2, 3], folder / "list.pt")
    write_config(folder, residual_dict={"<cat>": "cat.safetensors", "<dog>": "list.pt"})
    expect_error(capsys, tiny_model, config, out, "list.pt", "expected a tensor, found list")
    (folder / "corrupt.pt").write_bytes(b"\x80\x04garbage")
    write_config(folder, residual_dict={"<cat>": "cat.safetensors", "<dog>": "corrupt.pt"})
    expect_error(capsys, tiny_model, config, out, "corrupt.pt")
    write_config(folder)
    write_residual(folder / "dog.safetensors", 768, "dog")
    expect_error(capsys, tiny_model, config, out, "holds 768-d rows, but the model's text encoder is 32-d")
    write_config(folder)
    (folder / "layout.png").write_text("not an image")
    expect_error(capsys, tiny_model, config, out, "layout", "not a readable image")
    write_config(folder, layout="layout.jpg")
    Image.open(folder / "layout.png").save(folder / "layout.jpg", quality=90)  # no colour stays exact
    expect_error(capsys, tiny_model, config, out, "does not occur in the layout", "save the layout as PNG")


@pytest.mark.parametrize("extra,fragment", [
    (["--resolution", "60"], "--resolution 60: expected a positive multiple of 8"),
    (["--width", "100"], "--width 100: expected a positive multiple of 8"),
    (["--num_inference_steps", "0"], "--num_inference_steps 0"),
    (["--num_images", "-1"], "--num_images -1"),
])
def test_bad_arguments(tiny_model, tmp_path, capsys, extra, fragment):
    config = write_config(tmp_path / "cfg")
    expect_error(capsys, tiny_model, config, tmp_path / "out", fragment, extra=extra)


def test_rerun_makes_the_same_images_from_the_run_record_alone(tiny_model, tmp_path, capsys):
    config = write_config(tmp_path / "cfg", guidance_steps=2, subject_list=["<cat>", "<dog>"])
    first = run(tiny_model, config, tmp_path / "first", "--num_images", "2", "--seed", "5", "--height", "64",
                "--width", "72", "--cfg_scale", "6")
    record = first / "config.json"
    config.unlink()  # the record is all a rerun reads

    def rerun(record, *extra):
        [folder] = run_cli(inference.main, inference.parse_args(["--rerun", str(record), *extra]))
        return folder

    again = rerun(record, "--output_dir", str(tmp_path / "again"))
    assert sorted(p.name for p in again.glob("*.png")) == ["5.png", "6.png", "all_images.png"]
    for name in ("5.png", "6.png"):
        a, b = (np.asarray(Image.open(folder / name)) for folder in (first, again))
        assert a.shape == (64, 72, 3) and np.array_equal(a, b)
    before, after = (json.loads((folder / "config.json").read_text()) for folder in (first, again))
    assert before.pop("config_file") == str(config) and after.pop("config_file") == str(record)
    assert before == after and after["cfg_scale"] == 6 and after["subject_list"] == [["<cat>", 2], ["<dog>", 8]]

    def expect_rerun_error(record, fragments, extra=()):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            rerun(record, "--output_dir", str(tmp_path / "bad"), *extra)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and all(fragment in lines[0] for fragment in fragments), lines
        assert not (tmp_path / "bad").exists()

    expect_rerun_error(record, ["--seed: --rerun takes every setting from the run record"], extra=("--seed", "1"))
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**json.loads(record.read_text()), "dtype": "float64"}))
    expect_rerun_error(edited, [f"{edited}: dtype: unexpected value 'float64'"])
    write_residual(tmp_path / "cfg" / "dog.safetensors", 32, "dog", seed=3)
    expect_rerun_error(record, [f"{record}: residual_dict.<dog>: ", "dog.safetensors has changed since the run"])
    write_config(tmp_path / "cfg")  # a config is not a run's record
    expect_rerun_error(config, ["not a run record written by inference.py (missing model, height, width"])
    with pytest.raises(SystemExit):
        run_cli(inference.main, inference.parse_args(["--inference_config", str(config)]))
    assert "expected --pretrained_model_name_or_path and --inference_config" in capsys.readouterr().err


def test_two_configs_writing_to_one_folder_are_refused(tiny_model, tmp_path, capsys):
    config = write_config(tmp_path / "cfg")
    twin = tmp_path / "cfg" / "twin.json"
    twin.write_text(config.read_text())
    expect_error(capsys, tiny_model, config, tmp_path / "out", f"{config} and {twin}: both would write to",
                 extra=("--inference_config", str(config), str(twin)))


def test_missing_or_incomplete_model(tiny_model, tmp_path, capsys):
    config = write_config(tmp_path / "cfg")
    out = tmp_path / "out"
    # a path that does not exist fails at once, without asking the hub
    expect_error(capsys, tmp_path / "no_model", config, out, "no_model': folder not found")
    # a folder without the parts of a diffusers Stable Diffusion
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial, ignore=shutil.ignore_patterns("vae", "scheduler"))
    expect_error(capsys, partial, config, out, "not a diffusers Stable Diffusion or FLUX folder (no vae/, scheduler/;")
    # transformers quietly builds a 2-token vocabulary when the tokenizer's files are missing
    shutil.copytree(tiny_model / "vae", partial / "vae")
    shutil.copytree(tiny_model / "scheduler", partial / "scheduler")
    for file in (partial / "tokenizer").iterdir():
        if file.name != "tokenizer_config.json":
            file.unlink()
    expect_error(capsys, partial, config, out, "tokenizer/ holds no vocabulary")


def config_folder(configs):
    """A folder for inference_all.sh with the seed's layouts and residuals and a.json (the flower in a vase)."""
    configs.mkdir()
    for name in ("layouts", "residuals"):
        (configs / name).symlink_to(ROOT / "configs" / name)
    (configs / "a.json").write_text((ROOT / "configs" / "guidance_config_prompt1.json").read_text())
    return configs


def test_inference_all_checks_every_config_before_any_image_then_runs_them_all(tiny_model_1024, tmp_path):
    configs = config_folder(tmp_path / "configs")
    data = json.loads((ROOT / "configs" / "guidance_config_prompt0.json").read_text())
    data[0]["guidance_wieght"] = data[0].pop("guidance_weight")
    (configs / "b.json").write_text(json.dumps(data))
    (configs / "c.json").write_text((ROOT / "configs" / "guidance_config_prompt3.json").read_text())
    env = {**__import__("os").environ, "MODEL_NAME": str(tiny_model_1024), "CONFIG_DIR": str(configs),
           "OUTPUT_DIR": str(tmp_path / "out"), "PYTHON": sys.executable}

    def inference_all():
        return subprocess.run(["bash", str(ROOT / "inference_all.sh"), "--num_images", "1",
                               "--num_inference_steps", "1"], capture_output=True, text=True, env=env)

    done = inference_all()
    assert done.returncode == 2
    assert f"error: {configs / 'b.json'}: guidance_wieght: unknown key" in done.stderr
    assert not (tmp_path / "out").exists()  # a.json comes first, but nothing ran
    data[0]["guidance_weight"] = data[0].pop("guidance_wieght")
    (configs / "b.json").write_text(json.dumps(data))
    done = inference_all()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("Loading weights") <= 2  # the text encoder's load bar (0% and 100%): one load
    assert done.stdout.count("== ") == 3 and "done: 3 configs" in done.stdout
    written = sorted(p.parent.name for p in (tmp_path / "out").rglob("0.png"))
    assert written == ["A_cat_on_the_right_and_a_dog_on_the_left",
                       "A_cat_wearing_wearable_glasses_in_a_watercolor_style", "A_flower_in_a_vase"]


def test_two_processes_share_the_seeds_and_make_the_same_images(tiny_model, tmp_path):
    """torchrun (or accelerate launch) with 2 processes: seeds 0 and 2 on one, 1 on the other; one grid."""
    config = write_config(tmp_path / "cfg")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}  # the same float rounding in every process

    def launch(launcher, out):
        done = subprocess.run([sys.executable, *launcher, str(ROOT / "inference.py"), "--pretrained_model_name_or_path",
                               str(tiny_model), "--inference_config", str(config), "--output_dir", str(out),
                               "--device", "cpu", "--num_inference_steps", "2", "--num_images", "3"],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("<cat> -> position") == 1  # printed by the main process only
        return next(out.rglob("config.json")).parent

    alone = launch([], tmp_path / "alone")
    shared = launch(["-m", "torch.distributed.run", "--nproc_per_node", "2"], tmp_path / "shared")
    assert json.loads((alone / "config.json").read_text())["processes"] == 1
    settings = json.loads((shared / "config.json").read_text())
    assert settings["processes"] == 2 and settings["seeds"] == [0, 1, 2]
    for name in ("0.png", "1.png", "2.png", "all_images.png"):
        assert np.array_equal(np.asarray(Image.open(alone / name)), np.asarray(Image.open(shared / name))), name


def test_inference_all_with_a_launcher_and_an_output_dir(tiny_model_1024, tmp_path):
    configs = config_folder(tmp_path / "configs")
    env = {**__import__("os").environ, "MODEL_NAME": str(tiny_model_1024), "CONFIG_DIR": str(configs),
           "LAUNCHER": f"{sys.executable} -m torch.distributed.run --nproc_per_node 2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "inference_all.sh"), "--num_images", "2", "--num_inference_steps", "1",
                           "--device", "cpu", "--output_dir", str(tmp_path / "mine")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"done: 1 configs, results in {tmp_path / 'mine'}" in done.stdout
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*.png")) == ["0.png", "1.png", "all_images.png"]
    assert json.loads(next((tmp_path / "mine").rglob("config.json")).read_text())["processes"] == 2


def test_words_text_length_drops_eos_and_masks_the_unconditional(tmp_path):
    tokenizer = clip_tokenizer()
    config = write_config(tmp_path, text_length="words")
    job = prepare_job(config, tokenizer, 32, 64, 64, {})
    full = token_ids(tokenizer, "A cat on the right and a dog on the left.")
    assert job.prompt_ids == full[:-1] and len(job.prompt_ids) == 13  # the last token '.' is kept, EOS is not
    assert job.masks[0] == [1] * 13
    assert job.masks[1] == [1] + [0] * 12  # "": BOS only
    assert job.settings["text_tokens"] == 13


def test_guided_processor_honours_the_encoder_attention_mask(tiny_model):
    from diffusers.models.attention_processor import AttnProcessor2_0
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]])
    reference = sd.unet(x, 500, encoder_hidden_states=states, encoder_attention_mask=mask).sample
    unmasked = sd.unet(x, 500, encoder_hidden_states=states).sample
    assert (reference - unmasked).abs().max() > 1e-3
    guidance = install_guidance(sd.unet)
    guidance.set_layout(torch.zeros(7, 64, 64), (8, 8), "cpu")
    guidance.set_step(True, strength=5.0, num_uncond=1)
    guided = sd.unet(x, 500, encoder_hidden_states=states, encoder_attention_mask=mask).sample
    torch.testing.assert_close(guided, reference, rtol=1e-4, atol=1e-5)
    sd.unet.set_attn_processor(AttnProcessor2_0())


def test_compiled_unet_gives_the_same_images_with_one_graph_per_kind_of_step(tiny_model, tmp_path, counted_compile):
    """--compile: the guidance state is tensors, so 4 steps (2 guided, 2 not) over 3 images compile 2 graphs."""
    patch, graphs = counted_compile
    patch(inference)
    config = write_config(tmp_path / "cfg", guidance_steps=2)
    steps = ("--num_inference_steps", "4", "--num_images", "3", "--batch_size", "2")
    eager = run(tiny_model, config, tmp_path / "eager", *steps)
    compiled = run(tiny_model, config, tmp_path / "compiled", *steps, "--compile")
    assert len(graphs) == 2  # the last batch of one image is padded to two: no graph for a new shape
    assert json.loads((compiled / "config.json").read_text())["compile"] == "default"
    assert sorted(p.name for p in compiled.glob("*.png")) == ["0.png", "1.png", "2.png", "all_images.png"]
    for seed in (0, 1, 2):
        a, b = (np.asarray(Image.open(folder / f"{seed}.png")).astype(int) for folder in (eager, compiled))
        if seed < 2:
            assert np.array_equal(a, b)
        else:  # computed in a batch of two here and alone in the eager run: float rounding at most
            assert np.abs(a - b).max() <= 1


def test_compiled_unet_reads_the_guidance_from_fixed_addresses(tiny_model, tmp_path, monkeypatch):
    """CUDA graphs (--compile reduce-overhead) replay static inputs from the address they were captured at, and
    torch.compile makes the layout maps and the step's strength static inputs: every call of a graph must find
    them where the first call did, over steps and images, while the strength's value changes per step."""
    calls = []  # per call of any graph: (graph index, {input index: data pointer}, strengths seen)

    def backend(graph_module, example_inputs):
        index = len({c[0] for c in calls}) if calls else 0
        static = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)
                  and getattr(t, "_dynamo_static_input_type", None) and not isinstance(t, torch.nn.Parameter)]
        scalars = [i for i in static if example_inputs[i].ndim == 0]

        def call(*args):
            calls.append((index, {i: args[i].data_ptr() for i in static}, [float(args[i]) for i in scalars]))
            return graph_module.forward(*args)
        return call

    compile_unet = inference.compile_unet
    monkeypatch.setattr(inference, "compile_unet", lambda unet, mode: compile_unet(unet, mode, backend=backend))
    torch._dynamo.reset()
    config = write_config(tmp_path / "cfg", guidance_steps=3)
    run(tiny_model, config, tmp_path / "out", "--num_inference_steps", "4", "--num_images", "2", "--batch_size", "1",
        "--compile")
    guided = [c for c in calls if c[2]]  # the guided graph has the strength among its static inputs
    assert len(guided) == 2 * 3 * 2  # 2 images x 3 guided steps x 2 passes (self-recurrence)
    assert all(c[1] == guided[0][1] for c in guided)  # maps and strength never moved
    strengths = [c[2][0] for c in guided[:6]]
    assert strengths[0] == strengths[1] > strengths[2] == strengths[3] > strengths[4] == strengths[5] > 0


def test_configs_of_three_prompt_lengths_compile_four_graphs_in_one_run(tiny_model, tmp_path, counted_compile):
    """The second text length recompiles the two graphs with the length dynamic; the third reuses them."""
    patch, graphs = counted_compile
    patch(inference)
    prompts = ["A cat on the right and a dog on the left.", "A cat on the right and a big dog on the left.",
               "A cat on the right and a very big dog on the left today."]
    configs = [write_config(tmp_path / f"cfg{i}", prompt=prompt, guidance_steps=1, subject_list=["<cat>", "<dog>"])
               for i, prompt in enumerate(prompts)]
    folder = run(tiny_model, configs[0], tmp_path / "out", "--inference_config", *map(str, configs), "--compile")
    assert len(graphs) == 4
    assert len(list((tmp_path / "out").rglob("0.png"))) == 3
    assert folder.name == "A_cat_on_the_right_and_a_dog_on_the_left"


def test_compile_without_a_cpu_compiler_is_one_clear_line(tiny_model, tmp_path, capsys):
    from torch._inductor import config as inductor_config

    config = write_config(tmp_path / "cfg")
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler++",)}):
        expect_error(capsys, tiny_model, config, tmp_path / "out", "--compile on the CPU needs a C++ compiler",
                     extra=("--compile", "--device", "cpu"))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        inference.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "MODEL hub id or local diffusers folder; required unless --rerun" in text
    assert "HEIGHT image height" in text and "WIDTH image width" in text
    assert "(default: inference_results)" in text
