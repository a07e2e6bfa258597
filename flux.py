"""FLUX.1 (a diffusion transformer with joint attention): its text conditioning, the layout guidance as a bias
on its joint attention, and its flow-matching sampler with self-recurrence (docs/METHOD.md F).

    FluxTextEncoders        T5's per-token states (where residuals live) and CLIP's pooled embedding
    FluxGuidance            LayoutGuidance on the transformer's one token grid (H/16 x W/16)
    GuidedJointAttnProcessor  every joint attention (double- and single-stream blocks): the layout bias on the
                            image-query -> text-key block while guided, diffusers' own processor otherwise
    sample_flow_recurrent   the Euler loop of flow matching with self-recurrence
    generate_flux           all of the above for a list of seeds (layout_guidance.generate calls it for FLUX)

The layout weight map (B2), the guidance strengths (B3) and the AttentionRecorder are layout_guidance.py's.
"""
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from layout_guidance import LayoutGuidance, NonFiniteError, guidance_strengths, subject_region

PATCH = 2  # FLUX packs 2 x 2 latent cells into one token: a token covers 16 x 16 pixels
NATIVE_SIZE = 1024  # FLUX.1's pipeline default (its transformer's config records no sample size)


def token_grid(height, width):
    """(h, w) of the transformer's image tokens for an image of height x width pixels (multiples of 16)."""
    return height // 16, width // 16


# ------------------------------------------------------------------------------------------------
# The text conditioning

class FluxTextEncoders(torch.nn.Module):
    """FLUX's two text encoders: ids [B, L] of the T5 tokenizer -> (states [B, L, d], None).

    The states are T5's last hidden states, one row per token, as FluxPipeline passes them (no attention mask);
    the residuals live on these rows. CLIP gives only the pooled embedding of the prompt's own CLIP tokens
    (`pooled(texts)`), which is not per token and is left frozen.
    """

    def __init__(self, t5, clip, clip_tokenizer):
        super().__init__()
        self.t5, self.clip, self.clip_tokenizer = t5, clip, clip_tokenizer
        self.config = t5.config  # .hidden_size is T5's d_model

    @property
    def device(self):
        return self.t5.device

    def forward(self, ids, attention_mask=None):
        return self.t5(ids).last_hidden_state, None

    @torch.no_grad()
    def pooled(self, texts):
        """CLIP's pooled embedding [B, p] float32 of each text, tokenized as FluxPipeline does (padded to 77)."""
        ids = self.clip_tokenizer(list(texts), padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        return self.clip(ids.to(self.clip.device)).pooler_output.float()

    def set_attn_implementation(self, name):
        self.t5.set_attn_implementation(name)

    def activation_checkpointing_enable(self):
        enable = getattr(self.t5, "activation_checkpointing_enable", None)
        (enable or self.t5.gradient_checkpointing_enable)()


def flux_conditioning(sd, prompt_ids, prompt):
    """(states [L, d], pooled [p]) float32 of a prompt: T5 on its ids, CLIP's pooled embedding of its text."""
    with torch.no_grad():
        ids = torch.as_tensor(prompt_ids, device=sd.text_encoder.device)[None]
        states = sd.text_encoder(ids)[0][0].float()
    return states, sd.text_encoder.pooled([prompt])[0]


# ------------------------------------------------------------------------------------------------
# The guided joint attention

class FluxGuidance(LayoutGuidance):
    """LayoutGuidance of a FLUX transformer: its image tokens form one grid, so one map; text_length is the
    number of text tokens that lead every joint sequence, batch the number of images (set per sampling). The
    batch is [unconditional (num_uncond rows, true_cfg_scale only); conditional; plain]: the first rows are not
    guided, and the conditional ones are recorded."""

    def __init__(self):
        super().__init__()
        self.text_length = 0
        self.batch = 0

    def grids(self, token_size):
        return [tuple(token_size)]


def joint_projections(attn, hidden_states, encoder_hidden_states, rotary):
    """query, key, value [B, heads, S, hd] of a FLUX joint attention, text tokens first, rotary embedding applied:
    what diffusers' FluxAttnProcessor feeds its attention kernel."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(t):
        return t.unflatten(-1, (-1, attn.head_dim))

    query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        text_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        text_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        text_value = heads(attn.add_v_proj(encoder_hidden_states))
        query, key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return (t.transpose(1, 2) for t in (query, key, value))


def block_std(query, key):
    """std (unbiased) of every score q . k, over all heads, image queries and text keys, per image: [B] float32.

    From the sums and the Gram matrices of Q [B, h, N, hd] and K [B, h, L, hd] in float64,
    sum (q . k) = (sum q) . (sum k) and sum (q . k)^2 = sum_ij (Q^T Q)_ij (K^T K)_ij, so the N x L scores are never
    formed: (N + L) hd^2 work instead of N L hd (a 1024 px FLUX image has N = 4096 and L = 512).
    """
    q, k = query.double(), key.double()
    count = q.shape[1] * q.shape[2] * k.shape[2]
    total = (q.sum(dim=2) * k.sum(dim=2)).sum(dim=(1, 2))  # [B]
    squares = ((q.transpose(-1, -2) @ q) * (k.transpose(-1, -2) @ k)).sum(dim=(1, 2, 3))  # [B]
    return ((squares - total ** 2 / count) / (count - 1)).clamp(min=0).sqrt().float()


def joint_bias(query, key, text_length, layout_map, strength, scale, self_mask=None, num_uncond=0):
    """The additive attention mask [B, 1, S, S] float32 of a guided joint attention (docs/METHOD.md F2).

    The image-query -> text-key block gets bias * scale, bias = strength * W * std(S) with S = Q_img K_txt^T
    (unscaled, every head) and std over all of that block of each image (block_std); the image -> image block gets
    the region self-attention mask (variant E4) if given; text queries and image keys are untouched; the first
    num_uncond rows of the batch (the unconditional branch) get no layout bias, as in the UNet.
    """
    batch, _, length, _ = query.shape
    std = block_std(query[:, :, text_length:], key[:, :, :text_length])  # [B]
    mask = torch.zeros(batch, 1, length, length, device=query.device)
    mask[:, :, text_length:, :text_length] = (strength * layout_map * std[:, None, None, None]) * scale
    if self_mask is not None:
        mask[:, :, text_length:, text_length:] = self_mask
    if num_uncond:
        mask[:num_uncond, :, text_length:, :text_length] = 0
    return mask


class GuidedJointAttnProcessor:
    """A FLUX joint attention (double-stream: image and text apart, joined here; single-stream: already joined)
    with the layout bias while guided, and diffusers' own FluxAttnProcessor otherwise, so that unguided steps are
    exactly FluxPipeline's."""

    def __init__(self, guidance):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.guidance = guidance
        self.stock = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        g = self.guidance
        scale = attn.head_dim ** -0.5
        if not g.active or not g.maps:
            if g.recorder is not None:  # recorded apart: the stock processor still makes the output, unchanged
                query, key, _ = joint_projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
                self.record(query, key, None, scale, g.text_length)
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = joint_projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        text_length = g.text_length
        num_image = query.shape[2] - text_length
        mask = joint_bias(query, key, text_length, g.map_for(num_image), g.strength, scale,
                          g.self_masks.get(num_image), g.num_uncond)
        if g.recorder is not None:
            self.record(query, key, mask, scale, text_length)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # [B, S, heads * hd]
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out[:, :encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1]:]
        return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text_out.contiguous())

    def record(self, query, key, mask, scale, text_length):
        """Add the conditional rows' image-query probabilities on the text keys [B, heads, N, L] (of a softmax over
        every key)."""
        rows = slice(self.guidance.num_uncond, self.guidance.num_uncond + self.guidance.batch)
        query, key = query[rows], key[rows]
        logits = (query[:, :, text_length:].float() @ key.float().transpose(-1, -2)) * scale  # [B, h, N, S]
        if mask is not None:
            logits = logits + mask[rows, :, text_length:]
        self.guidance.recorder.add(torch.softmax(logits, dim=-1)[..., :text_length])


def install_flux_guidance(transformer):
    """One GuidedJointAttnProcessor on every attention of the transformer (all are joint attentions)."""
    guidance = FluxGuidance()
    processor = GuidedJointAttnProcessor(guidance)
    transformer.set_attn_processor({name: processor for name in transformer.attn_processors})
    return guidance


def is_flux_transformer(model):
    return hasattr(model, "single_transformer_blocks") and hasattr(model, "context_embedder")


# ------------------------------------------------------------------------------------------------
# The sampler

def pack(latents):
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: FLUX's 2 x 2 patches as tokens (FluxPipeline's layout)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h, w):
    """The inverse of pack: [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, channels = tokens.shape
    latents = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def image_ids(h, w):
    """[h * w, 3] positions of a token grid (0, row, column), as FluxPipeline makes them."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flow_schedule(scheduler_config, num_steps, num_tokens):
    """(sigmas [N + 1] ending with 0, timesteps [N]) of FluxPipeline for an image of num_tokens tokens: linear
    sigmas from 1 to 1/N, shifted by the scheduler (with the resolution-dependent mu where it shifts dynamically)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = scheduler_config
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    slope = (config.get("max_shift", 1.15) - config.get("base_shift", 0.5)) / (
        config.get("max_image_seq_len", 4096) - config.get("base_image_seq_len", 256))
    mu = num_tokens * slope + config.get("base_shift", 0.5) - slope * config.get("base_image_seq_len", 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.tolist(), scheduler.timesteps


def sample_flow_recurrent(velocity, x, sigmas, recurrent_steps, noise, callback=None):
    """Flow matching's Euler sampler with self-recurrence: step i < recurrent_steps runs twice, re-noised between.

    x_sigma = (1 - sigma) x0 + sigma eps. The Euler step is x += (sigma_{i+1} - sigma_i) v. Going back from
    sigma_{i+1} to sigma_i: x = a x + sqrt(sigma_i^2 - (a sigma_{i+1})^2) z with a = (1 - sigma_i) / (1 - sigma_{i+1}),
    which keeps x0's share and tops the noise up to sigma_i (docs/METHOD.md F3).
    velocity(x, i) -> v at sigmas[i]; noise() -> the next standard normal draw; callback(i) after each step.
    """
    for i in range(len(sigmas) - 1):
        passes = 2 if i < recurrent_steps else 1
        for k in range(passes):
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, i)
            if k == 0 and passes == 2:
                a = (1 - sigmas[i]) / (1 - sigmas[i + 1])
                x = a * x + math.sqrt(max(sigmas[i] ** 2 - (a * sigmas[i + 1]) ** 2, 0.0)) * noise()
        if callback is not None:
            callback(i)
    return x


def make_flux_velocity(transformer, inputs, settings, timesteps, guided, guidance=None, token_size=None):
    """velocity(x, i): one transformer call on the batch [uncond (true_cfg_scale); cond; plain (variant
    residual_guidance)].

    inputs: SamplerInputs with cond (and uncond, plain) batched [B, L, d] and pooled (cond [p], uncond [p] or
    None); guided: the steps' (active, strength) pairs. FLUX has no unconditional branch by default: dev's
    distilled guidance value (settings.flux_guidance) is an input of the transformer, schnell has none. With
    settings.true_cfg_scale s above 1 (and inputs.uncond) v = v_u + s (v_c - v_u), as FluxPipeline's true CFG;
    residual_guidance adds its push to that, as make_cfg_denoiser does.
    """
    cond, plain = inputs.cond, inputs.plain
    uncond = inputs.uncond if settings.true_cfg_scale != 1.0 else None
    branches = ([] if uncond is None else [uncond]) + [cond] + ([] if plain is None else [plain])
    batch = cond.shape[0]
    num_uncond = 0 if uncond is None else batch
    device, dtype = transformer.device, transformer.dtype
    states = torch.cat(branches).to(device, dtype)
    pooled = [inputs.pooled[0]] * len(branches) if uncond is None else \
        [inputs.pooled[1]] + [inputs.pooled[0]] * (len(branches) - 1)
    pooled = torch.cat([p.to(device, dtype)[None].expand(batch, -1) for p in pooled])
    text_ids = torch.zeros(states.shape[1], 3, device=device, dtype=dtype)
    h, w = token_size
    img_ids = image_ids(h, w).to(device, dtype)
    extra = {}
    if transformer.config.guidance_embeds:
        extra["guidance"] = torch.full([states.shape[0]], float(settings.flux_guidance), device=device)
    region = None
    if plain is not None and settings.residual_guidance_in_region:
        cells = subject_region(inputs.weight_map, cond[0], plain[0], (h, w))  # [1, 1, h, w]
        region = cells.flatten(2).transpose(1, 2).to(device)  # [1, h*w, 1]: a weight per token

    def velocity(x, i):
        if guidance is not None:
            active, strength = guided[i]
            guidance.set_step(active, strength, num_uncond=num_uncond)
        t = timesteps[i].expand(states.shape[0]).to(device, dtype) / 1000
        out = transformer(hidden_states=torch.cat([x] * len(branches)).to(dtype), timestep=t,
                          encoder_hidden_states=states, pooled_projections=pooled, txt_ids=text_ids,
                          img_ids=img_ids, **extra).sample.float()
        v_cond = out[num_uncond:num_uncond + batch]
        v = v_cond if uncond is None else out[:batch] + settings.true_cfg_scale * (v_cond - out[:batch])
        if plain is not None:
            push = settings.residual_guidance * (v_cond - out[num_uncond + batch:])
            if region is None:
                v = v + push
            elif guided[i][0]:  # in region: where and while the layout guides
                v = v + region * push
        return v

    return velocity


@torch.no_grad()
def generate_flux(sd, inputs, settings, seeds, size, guidance=None, recorder=None, callback=None):
    """layout_guidance.generate for a FLUX model: uint8 images [B, H, W, 3], one per seed.

    As B4, with flow matching: the noise of each seed is the first draw of its own CPU generator (FluxPipeline's
    latents for that seed), steps i < guidance_steps are layout-guided and self-recurrent, the recurrence noise is
    drawn in order from the same generator.
    """
    height, width = size
    transformer = sd.unet
    device = transformer.device
    h, w = token_grid(height, width)
    sigmas, timesteps = flow_schedule(sd.scheduler_config, settings.num_inference_steps, h * w)

    guided_steps, strengths = 0, None
    if guidance is not None:
        if inputs.weight_map is not None and settings.guidance_steps > 0:
            guidance.set_layout(inputs.weight_map, (h, w), device)
            guided_steps = min(settings.guidance_steps, settings.num_inference_steps)
            strengths = guidance_strengths(settings.guidance_weight, guided_steps, settings.guidance_schedule)
        guidance.set_self_attention(inputs.region_labels if guided_steps else None, (h, w), device)
        guidance.text_length, guidance.batch = inputs.cond.shape[0], len(seeds)
        guidance.set_step(False)
    guided = [(i < guided_steps, float(strengths[i]) if i < guided_steps else None)
              for i in range(settings.num_inference_steps)]

    channels = transformer.config.in_channels // 4
    shape = (1, channels, 2 * h, 2 * w)
    draws = []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        draws.append(torch.stack([torch.randn(shape, generator=generator) for _ in range(1 + guided_steps)]))
    draws = torch.cat(draws, dim=1)  # [1 + recurrences, B, C, 2h, 2w]
    tokens = torch.stack([pack(d) for d in draws]).to(device)  # [1 + recurrences, B, h*w, 4C]
    recurrence_noise = iter(tokens[1:])

    batch = len(seeds)
    batched = dataclasses.replace(inputs, **{name: None if value is None else value[None].expand(batch, -1, -1)
                                             for name, value in (("cond", inputs.cond), ("uncond", inputs.uncond),
                                                                 ("plain", inputs.plain))})
    velocity = make_flux_velocity(transformer, batched, settings, timesteps, guided, guidance, (h, w))
    if recorder is not None:
        guidance.recorder = recorder
    try:
        x = sample_flow_recurrent(velocity, tokens[0], sigmas, guided_steps, lambda: next(recurrence_noise), callback)
    finally:
        if guidance is not None:
            guidance.recorder = None
            guidance.set_step(False)
    bad = [seed for seed, finite in zip(seeds, torch.isfinite(x).flatten(1).all(dim=1).tolist()) if not finite]
    if bad:
        raise NonFiniteError(f"sampling diverged (NaN or infinite latents) for seed{'s' if len(bad) > 1 else ''} "
                             f"{', '.join(map(str, bad))}: lower the guidance weights or check the residuals; "
                             f"no image was written")
    return decode_flux_latents(sd.vae, unpack(x, 2 * h, 2 * w))


def decode_flux_latents(vae, latents):
    """Latents [B, 16, h, w] -> uint8 images [B, H, W, 3]: FLUX's VAE has a shift as well as a scale."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype)).sample.float()
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (images * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Training (docs/METHOD.md F4)

TRAINING_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance value while a residual is learned (its pipeline's default)


def flux_training_loss(trained, targets, batch, settings):
    """train.training_loss for FLUX: the flow-matching loss of the photos plus the preservation loss on T5's rows.

    sigma = (t + 1) / T for the drawn timestep t (uniform over the T training timesteps), x_sigma = (1 - sigma) z +
    sigma eps, and the transformer's velocity is learned against eps - z; the gradient reaches T5 through the frozen
    transformer. Returns (total, diffusion, preservation).
    """
    from train import preservation_loss

    text_encoder, transformer, noise_scheduler = trained
    latents, noise, timesteps = batch.latents, batch.noise, batch.timesteps
    sigma = ((timesteps.float() + 1) / noise_scheduler.config.num_train_timesteps)[:, None, None, None]
    noisy = (1 - sigma) * latents + sigma * noise
    e = text_encoder(targets.instance_ids)[0].float()  # [B, L, d]
    dtype, device = transformer.dtype, transformer.device
    h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
    extra = {}
    if transformer.config.guidance_embeds:
        extra["guidance"] = torch.full([latents.shape[0]], TRAINING_GUIDANCE, device=device)
    pred = transformer(hidden_states=pack(noisy).to(dtype), timestep=sigma.flatten().to(dtype),
                       encoder_hidden_states=e.to(dtype), pooled_projections=targets.pooled.to(dtype),
                       txt_ids=torch.zeros(e.shape[1], 3, device=device, dtype=dtype),
                       img_ids=image_ids(h, w).to(device, dtype), **extra).sample
    diffusion = F.mse_loss(pred.float(), pack(noise - latents).float())
    preserve = preservation_loss(e, targets.e0, settings.token_num, settings.loss_rate_first,
                                 settings.loss_rate_second, lead=targets.lead)
    return diffusion + preserve, diffusion, preserve


def add_lora(text_encoders, rank):
    """Make T5 trainable (docs/METHOD.md F4): LoRA of rank `rank` on the query, key, value and output projections
    of every attention (peft; zero-initialised, so the tuned encoder starts as the frozen one), or, with rank 0,
    every parameter. CLIP stays frozen. Returns the trainable parameters."""
    t5 = text_encoders.t5
    if rank == 0:
        t5.requires_grad_(True)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q", "k", "v", "o"],
                                           init_lora_weights=True), t5)
        for name, parameter in t5.named_parameters():
            parameter.requires_grad_("lora_" in name)
            if "lora_" in name:  # the adapter trains in float32 even where T5 sits in half precision
                parameter.data = parameter.data.float()
    t5.train()
    return [p for p in t5.parameters() if p.requires_grad]
