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


# ------------------------------------------------------------------------------------------------
# FLUX (docs/METHOD.md F), written out the same way

class NaiveJointAttnProcessor:
    """A FLUX joint attention by hand in float32: text then image tokens, every score materialised; on guided
    calls the image-query -> text-key scores get gamma * W * log(1 + sigma^2) * std(those scores) (F2)."""

    def __init__(self, state):
        self.state = state  # {"guided", "strength", "weight_map" [L, H, W], "text_length"}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def split(t):  # [B, S, heads * hd] -> [B, S, heads, hd]
            return t.reshape(t.shape[0], t.shape[1], attn.heads, -1)

        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:  # a double-stream block: the text's own projections lead
            tq, tk, tv = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q, k, v = torch.cat([attn.norm_added_q(tq), q], 1), torch.cat([attn.norm_added_k(tk), k], 1), torch.cat([tv, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1).float().permute(0, 2, 1, 3)  # [B, heads, S, hd]
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1).float().permute(0, 2, 1, 3)
        v = v.float().permute(0, 2, 1, 3)
        scores = q @ k.transpose(2, 3)  # [B, heads, S, S], unscaled
        if self.state["guided"]:
            n = self.state["text_length"]
            weights = self.state["weight_map"]  # [L, H, W]
            side = round(math.sqrt(weights.shape[1] * weights.shape[2] / (scores.shape[2] - n)))
            grid = (weights.shape[1] // side, weights.shape[2] // side)
            layer_map = F.interpolate(weights[None], size=grid, mode="bilinear", align_corners=True)[0]
            layer_map = layer_map.reshape(weights.shape[0], -1).T.to(scores.device)  # [N, L]
            block = scores[:, :, n:, :n]
            scores[:, :, n:, :n] = block + self.state["strength"] * layer_map * block.std()
        out = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1) @ v  # [B, heads, S, hd]
        out = out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1).to(hidden_states.dtype)
        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, n_text:]), attn.to_add_out(out[:, :n_text])


def install_naive_flux(transformer):
    state = {"guided": False, "strength": 0.0, "weight_map": None, "text_length": 0}
    transformer.set_attn_processor(NaiveJointAttnProcessor(state))
    return state


def flux_sigmas(scheduler_config, steps, num_tokens):
    """FluxPipeline's sigmas [N + 1] by their formulas: 1 .. 1/N linearly, then shifted (exponentially by
    mu(num_tokens) where the scheduler shifts dynamically, else by its fixed shift), then 0."""
    c = scheduler_config
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if c.get("use_dynamic_shifting"):
        x0, x1 = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        y0, y1 = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        mu = y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    else:
        shift = c.get("shift", 1.0)
        sigmas = shift * t / (1 + (shift - 1) * t)
    return sigmas.float().tolist() + [0.0]


@torch.no_grad()
def naive_flux_sample(sd, state, inputs, settings, seed, size):
    """One FLUX image, step by step: one transformer call per pass, the flow-matching Euler update and the
    self-recurrence written out (F3), one generator. inputs: SamplerInputs with cond [L, d], weight_map and
    pooled (cond [p], None). Returns uint8 [H, W, 3]."""
    check_computable(inputs, settings)
    transformer, (height, width) = sd.unet, size
    device, dtype = transformer.device, transformer.dtype
    h, w = height // 16, width // 16
    generator = torch.Generator("cpu").manual_seed(seed)
    channels = transformer.config.in_channels // 4

    def draw():  # [1, C, 2h, 2w] -> [1, h*w, 4C], each token a 2 x 2 patch
        z = torch.randn((1, channels, 2 * h, 2 * w), generator=generator)
        return z.reshape(1, channels, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w, 4 * channels).to(device)

    sigmas = flux_sigmas(sd.scheduler_config, settings.num_inference_steps, h * w)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros(h * w), rows.flatten().float(), cols.flatten().float()], dim=1).to(device, dtype)
    cond = inputs.cond[None].to(device, dtype)
    call = dict(encoder_hidden_states=cond, pooled_projections=inputs.pooled[0][None].to(device, dtype),
                txt_ids=torch.zeros(cond.shape[1], 3, device=device, dtype=dtype), img_ids=img_ids)
    if transformer.config.guidance_embeds:
        call["guidance"] = torch.tensor([float(settings.flux_guidance)], device=device)
    guidance_steps = min(settings.guidance_steps, settings.num_inference_steps) if inputs.weight_map is not None else 0
    guide_sigmas = guidance_sigmas(guidance_steps) if guidance_steps else None
    state.update(weight_map=inputs.weight_map, text_length=cond.shape[1])
    x = draw()
    for i in range(settings.num_inference_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        passes = 2 if i < guidance_steps else 1
        for k in range(passes):
            state["guided"] = i < guidance_steps
            if state["guided"]:
                state["strength"] = settings.guidance_weight * math.log(1 + float(guide_sigmas[i]) ** 2)
            t = torch.tensor([sigma], device=device, dtype=dtype)
            v = transformer(hidden_states=x.to(dtype), timestep=t, **call).sample.float()
            x = x + (sigma_next - sigma) * v
            if k == 0 and passes == 2:  # back to sigma: keep x0's share, top the noise up
                keep = (1 - sigma) / (1 - sigma_next)
                x = keep * x + math.sqrt(sigma ** 2 - (keep * sigma_next) ** 2) * draw()
    state["guided"] = False
    latents = x.reshape(1, h, w, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, channels, 2 * h, 2 * w)
    latents = latents / sd.vae.config.scaling_factor + sd.vae.config.shift_factor
    image = sd.vae.decode(latents.to(sd.vae.dtype)).sample.float()[0]
    return ((image / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
