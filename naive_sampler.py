"""The naive method: layout-guided sampling (docs/METHOD.md B) written the way the reference runs it.

    state = install_naive(sd.unet)
    image = naive_sample(sd, state, SamplerInputs(cond, uncond, weight_map), settings, seed, (height, width))

A hand-written attention in float32 replaces the fused kernel in every layer, self-attention included; the
conditional and unconditional branches are two UNet calls; the Euler update and the self-recurrence are
written out step by step (B4), one image at a time with one generator. benchmark.py times it as the
baseline of the project's sampler; the tests use it as an independent implementation to check that sampler.
Nothing it is given is changed: it returns new tensors. It takes raw tensors, not a config, so that equality
with it checks the project's sampler and not a shared reading of the config; a setting it does not compute is
refused.
"""
import math

import torch
import torch.nn.functional as F
from diffusers import LMSDiscreteScheduler

from config_keys import KEYS
from layout_guidance import decode_latents, guidance_sigmas


class NaiveAttnProcessor:
    """softmax(Q K^T * scale) V by hand in float32 for every layer; on guided conditional calls the
    cross-attention adds gamma * W * log(1 + sigma^2) * std(S) to the scores (B3)."""

    def __init__(self, state):
        self.state = state  # {"guided": bool, "strength": float, "weight_map": [L, H, W] or None}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states)).float()  # [B*heads, N, hd]
        key = attn.head_to_batch_dim(attn.to_k(context)).float()  # [B*heads, L, hd]
        value = attn.head_to_batch_dim(attn.to_v(context)).float()
        scores = torch.bmm(query, key.transpose(1, 2))  # [B*heads, N, L]
        if is_cross and self.state["guided"]:
            weights = self.state["weight_map"]  # [L, H, W]
            height, width = weights.shape[1:]
            ratio = math.sqrt(height * width / query.shape[1])
            size = (round(height / ratio), round(width / ratio))
            layer_map = F.interpolate(weights[None], size=size, mode="bilinear", align_corners=True)[0]
            layer_map = layer_map.reshape(weights.shape[0], -1).T.to(scores.device)  # [N, L]
            scores = scores + self.state["strength"] * layer_map * scores.std()
        probs = torch.softmax(scores * attn.scale, dim=-1)
        out = attn.batch_to_head_dim(torch.bmm(probs, value).to(hidden_states.dtype))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_naive(unet):
    """Put one NaiveAttnProcessor on every attention layer; returns the state naive_sample sets per UNet call."""
    state = {"guided": False, "strength": 0.0, "weight_map": None}
    unet.set_attn_processor(NaiveAttnProcessor(state))
    return state


# What the naive sampler is given that it does not compute: refused, not silently ignored
NOT_COMPUTED_INPUTS = {"masks": "text_length", "region_labels": "region_self_attention", "plain": "residual_guidance"}


def check_computable(inputs, settings):
    """A ValueError naming each key the naive sampler does not compute (config_keys: naive=False) that is set."""
    keys = [key.name for key in KEYS if key.sampling and not key.naive and getattr(settings, key.name) != key.default]
    keys += [key for field, key in NOT_COMPUTED_INPUTS.items() if getattr(inputs, field) is not None]
    if keys:
        raise ValueError(f"the naive sampler does not compute {', '.join(sorted(set(keys)))}")


@torch.no_grad()
def naive_sample(sd, state, inputs, settings, seed, size):
    """One image, B4 step by step: two UNet calls per pass, the Euler update written out, one generator.

    sd: the model's parts (pipeline_utils.StableDiffusion); state: from install_naive; inputs: SamplerInputs of
    raw tensors, cond and uncond [L, d], weight_map [L, H, W], SDXL's pooled (cond [p], uncond [p]) or None;
    settings: SamplingSettings; size (height, width). Returns uint8 [H, W, 3]. Keys it does not compute are
    refused (check_computable).
    """
    check_computable(inputs, settings)
    unet, height, width = sd.unet, *size
    added = (None, None) if inputs.pooled is None else (
        sd.added_cond(p[None].to(unet.device, unet.dtype), height, width) for p in inputs.pooled)
    cond_extra, uncond_extra = ({} if a is None else {"added_cond_kwargs": a} for a in added)
    cond, uncond = inputs.cond[None], inputs.uncond[None]  # [1, L, d]
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = LMSDiscreteScheduler.from_config(sd.scheduler_config)
    scheduler.set_timesteps(settings.num_inference_steps)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    shape = (1, unet.config.in_channels, height // 8, width // 8)
    device = unet.device
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    guidance_steps = min(settings.guidance_steps, settings.num_inference_steps)  # as the references clamp it (B3)
    guidance_steps = guidance_steps if inputs.weight_map is not None else 0
    guide_sigmas = guidance_sigmas(guidance_steps) if guidance_steps else None
    state["weight_map"] = inputs.weight_map
    v_prediction = sd.scheduler_config.get("prediction_type") == "v_prediction"
    cfg_scale = settings.cfg_scale
    for i in range(settings.num_inference_steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        passes = 2 if i < guidance_steps else 1
        for k in range(passes):
            x_in = (x / math.sqrt(sigma ** 2 + 1)).to(unet.dtype)
            state["guided"] = i < guidance_steps
            if state["guided"]:
                state["strength"] = settings.guidance_weight * math.log(1 + float(guide_sigmas[i]) ** 2)
            e_c = unet(x_in, timesteps[i], encoder_hidden_states=cond.to(unet.dtype), **cond_extra).sample.float()
            state["guided"] = False
            e_u = unet(x_in, timesteps[i], encoder_hidden_states=uncond.to(unet.dtype), **uncond_extra).sample.float()
            scale = cfg_scale if settings.cfg_schedule == "constant" else cfg_scale * (1 + sigma / float(sigmas[0]))
            e = e_u + scale * (e_c - e_u)
            if v_prediction:
                x0 = e * (-sigma / math.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
            else:
                x0 = x - sigma * e
            x = x + (sigma_next - sigma) * (x - x0) / sigma
            if k == 0 and passes == 2:
                x = x + math.sqrt(sigma ** 2 - sigma_next ** 2) * torch.randn(shape, generator=generator).to(device)
    return decode_latents(sd.vae, x)[0]
