"""The naive method: layout-guided sampling (docs/METHOD.md B) written the way the reference runs it.

    state = install_naive(sd.unet)
    image = naive_sample(sd.unet, sd.vae, sd.scheduler_config, state, cond, uncond, weight_map, seed, ...)

A hand-written attention in float32 replaces the fused kernel in every layer, self-attention included; the
conditional and unconditional branches are two UNet calls; the Euler update and the self-recurrence are
written out step by step (B4), one image at a time with one generator. benchmark.py times it as the
baseline of the project's sampler; the tests use it as an independent implementation to check that sampler.
Nothing it is given is changed: it returns new tensors.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from diffusers import LMSDiscreteScheduler

from inference import job_inputs
from layout_guidance import decode_latents, guidance_sigmas
from residual_utils import load_residual


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


@torch.no_grad()
def naive_sample(unet, vae, scheduler_config, state, cond, uncond, weight_map, seed, height, width,
                 num_inference_steps, cfg_scale, cfg_schedule, guidance_steps, guidance_weight, added_cond=(None, None)):
    """One image, B4 step by step: two UNet calls per pass, the Euler update written out, one generator.

    cond, uncond [1, L, d]; weight_map [L, H, W]; state from install_naive. Returns uint8 [H, W, 3].
    added_cond: SDXL's added_cond_kwargs of the conditional and of the unconditional call.
    """
    cond_extra, uncond_extra = ({} if a is None else {"added_cond_kwargs": a} for a in added_cond)
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = LMSDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    shape = (1, unet.config.in_channels, height // 8, width // 8)
    device = unet.device
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    guidance_steps = min(guidance_steps, num_inference_steps)  # as the references clamp it (B3)
    guide_sigmas = guidance_sigmas(guidance_steps) if guidance_steps else None
    state["weight_map"] = weight_map
    v_prediction = scheduler_config.get("prediction_type") == "v_prediction"
    for i in range(num_inference_steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        passes = 2 if i < guidance_steps else 1
        for k in range(passes):
            x_in = (x / math.sqrt(sigma ** 2 + 1)).to(unet.dtype)
            state["guided"] = i < guidance_steps
            if state["guided"]:
                state["strength"] = guidance_weight * math.log(1 + float(guide_sigmas[i]) ** 2)
            e_c = unet(x_in, timesteps[i], encoder_hidden_states=cond.to(unet.dtype), **cond_extra).sample.float()
            state["guided"] = False
            e_u = unet(x_in, timesteps[i], encoder_hidden_states=uncond.to(unet.dtype), **uncond_extra).sample.float()
            scale = cfg_scale if cfg_schedule == "constant" else cfg_scale * (1 + sigma / float(sigmas[0]))
            e = e_u + scale * (e_c - e_u)
            if v_prediction:
                x0 = e * (-sigma / math.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
            else:
                x0 = x - sigma * e
            x = x + (sigma_next - sigma) * (x - x0) / sigma
            if k == 0 and passes == 2:
                x = x + math.sqrt(sigma ** 2 - sigma_next ** 2) * torch.randn(shape, generator=generator).to(device)
    return decode_latents(vae, x)[0]


def naive_image(sd32, state, job, residual_paths, seed, height, width):
    """One image of an inference.py job the reference's way: the residual files re-read and the prompt encoded
    again for this image. residual_paths: one file per subject of the job, in order; the job is left as it is."""
    subjects = [dataclasses.replace(subject, residual=load_residual(path))
                for subject, path in zip(job.subjects, residual_paths)]
    cond, uncond, weight_map, pooled, _ = job_inputs(sd32, dataclasses.replace(job, subjects=subjects))
    added_cond = (None, None)
    if pooled is not None:
        added_cond = tuple(sd32.added_cond(p[None].to(sd32.unet.device, sd32.unet.dtype), height, width)
                           for p in pooled)
    s = job.settings
    return naive_sample(sd32.unet, sd32.vae, sd32.scheduler_config, state, cond[None], uncond[None], weight_map,
                        seed, height, width, s["num_inference_steps"], s["cfg_scale"], s["cfg_schedule"],
                        s["guidance_steps"], s["guidance_weight"], added_cond)
