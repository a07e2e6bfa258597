"""Layout-guided sampling (docs/METHOD.md B): the layout weight map, the guided cross-attention, the sampler.

    weight map W [L, H, W]      built once per config from the colour layout (B2)
    LayoutGuidance              what the guided processors read: W resized per attention grid, the step's
                                guidance strength, whether this UNet call is guided (B3)
    GuidedCrossAttnProcessor    installed on the cross-attention layers (`attn2`); the self-attention layers
                                get RegionSelfAttnProcessor, diffusers' fused kernel unless the variant
                                region_self_attention masks it
    AttentionRecorder           optional: where each phrase's tokens are attended, averaged over the sampling
    sample_euler_recurrent      the Euler loop with self-recurrence (B4), over a denoiser function
    make_cfg_denoiser           the UNet with batched classifier-free guidance, as that function
    generate                    all of the above for a list of seeds: SamplerInputs (the tensors) and
                                SamplingSettings (config_keys.py) passed whole
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import LMSDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from cli_utils import UserError

class NonFiniteError(UserError):
    """Sampling ended in NaN or infinite latents."""


# Stable Diffusion's training noise schedule; the guidance strength follows its sigmas (B3).
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# ------------------------------------------------------------------------------------------------
# B2. The layout weight map

def layout_weight_map(layout, regions, length, weight_negative):
    """W [L, H, W] float32 from an RGB layout [H, W, 3] uint8.

    regions: [(rgb, token_rows, w_active), ...]; every row listed gets w_active on the pixels of exactly that
    colour and weight_negative everywhere else. A row listed twice (or by two regions) gets both: they add.
    """
    layout = torch.as_tensor(np.asarray(layout))
    weights = torch.zeros(length, layout.shape[0], layout.shape[1])  # [L, H, W]
    for rgb, rows, w_active in regions:
        inside = (layout == torch.tensor(rgb, dtype=layout.dtype)).all(dim=-1)  # [H, W]
        value = torch.where(inside, torch.tensor(float(w_active)), torch.tensor(float(weight_negative)))
        for row in rows:
            weights[row] += value
    return weights


def guidance_sigmas(guidance_steps):
    """Sigma of each guided step: a separate Euler/LMS schedule of `guidance_steps` steps on SD's betas."""
    scheduler = LMSDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(guidance_steps)
    return scheduler.sigmas[:guidance_steps].float()


def guidance_strengths(guidance_weight, guided_steps, schedule="sigma"):
    """[G] float32: gamma * log(1 + sigma_i^2) of each guided step (B3); schedule "constant" (variant E1) repeats
    step 0's strength, so the bias does not fade as the noise falls."""
    strengths = guidance_weight * torch.log1p(guidance_sigmas(guided_steps) ** 2)
    if schedule == "constant":
        strengths = strengths[:1].repeat(guided_steps)
    return strengths.float()


# ------------------------------------------------------------------------------------------------
# B3. The guided cross-attention

class LayoutGuidance:
    """State shared by the guided processors of one UNet; the sampler sets it before each UNet call.

    The UNet's batch is [unconditional (num_uncond rows); conditional]: only the conditional rows are guided.
    Every value a UNet call reads is a tensor fixed per layout or a 0-d tensor per step, never a Python
    number that changes, so a compiled UNet (torch.compile) runs all steps on one graph per `active` value.
    """

    def __init__(self):
        self.strength = None  # gamma * log(1 + sigma^2) of the current step: one 0-d tensor, filled in place
        self.active = False
        self.num_uncond = 0
        self.maps = {}  # h * w -> W resized to that attention grid, [h*w, L]
        self.recorder = None  # an AttentionRecorder while a sampling records its attention; None costs nothing
        self.self_masks = {}  # h * w -> [1, 1, N, N] additive self-attention mask (variant); empty: plain

    # torch.compile treats tensors reached through the UNet's modules (these maps and the strength) as static
    # inputs, and CUDA graphs (--compile reduce-overhead) replay them from the address they were captured at:
    # a new tensor would make them record the graph again. So each tensor is allocated once and refilled.

    def set_layout(self, weight_map, latent_size, device):
        """W [L, H, W] resized (bilinear, corners aligned) to every UNet level of an h x w latent, on `device`."""
        device = torch.device(device)
        maps = {}
        for h, w in self.grids(latent_size):
            resized = F.interpolate(weight_map[None].float(), size=(h, w), mode="bilinear", align_corners=True)[0]
            resized = resized.flatten(1).T  # [h*w, L]
            kept = self.maps.get(h * w)
            if kept is not None and kept.shape == resized.shape and kept.device == device:
                maps[h * w] = kept.copy_(resized)
            else:
                maps[h * w] = resized.contiguous().to(device)
        self.maps = maps
        if self.strength is None or self.strength.device != device:
            self.strength = torch.zeros((), device=device)

    def set_self_attention(self, labels, latent_size, device):
        """Variant (region_self_attention): during guided steps a pixel of one subject's region does not attend
        the pixels of another subject's region. labels [H, W] int: the subject region of each pixel, -1 for none;
        None switches the variant off."""
        self.self_masks = {}
        if labels is None:
            return
        for h, w in self.grids(latent_size):
            grid = region_labels_on_grid(labels, h, w).flatten()  # [h*w]
            apart = (grid[:, None] != grid[None, :]) & (grid[:, None] >= 0) & (grid[None, :] >= 0)
            mask = torch.zeros(apart.shape).masked_fill(apart, float("-inf"))
            self.self_masks[h * w] = mask[None, None].to(device)

    def grids(self, latent_size):
        """(h, w) of every attention grid the model has for a latent of latent_size: the UNet's levels."""
        return latent_grids(latent_size)

    def set_step(self, active, strength=None, num_uncond=0):
        """strength: a float or a 0-d tensor (on the UNet's device: no wait) while active; needs set_layout."""
        self.active, self.num_uncond = active, num_uncond
        if active:
            assert self.strength is not None, "set_layout comes before a guided step"
            self.strength.fill_(strength)

    def map_for(self, num_queries):
        assert num_queries in self.maps, f"no UNet level of the layout's latent has {num_queries} cells"
        return self.maps[num_queries]


def latent_grids(latent_size):
    """(h, w) of every UNet level of an h x w latent, finest first: each level halves it (stride-2 conv: ceil)."""
    h, w = latent_size
    if h < 1 or w < 1:  # halving never reaches 1 x 1 from an empty grid
        raise UserError(f"an image of under 8 pixels a side has no latent ({h} x {w}); sizes are multiples of 8")
    grids = [(h, w)]
    while (h, w) != (1, 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        grids.append((h, w))
    return grids


def region_labels_on_grid(labels, h, w):
    """labels [H, W] (-1: no subject) sampled at the centres of an h x w grid's cells."""
    labels = torch.as_tensor(labels)
    rows = ((torch.arange(h) + 0.5) * labels.shape[0] / h).long()
    cols = ((torch.arange(w) + 0.5) * labels.shape[1] / w).long()
    return labels[rows][:, cols]


def guided_probs(query, key, layout_map, strength, scale, num_uncond=0, mask=None):
    """softmax((S + bias) * scale) in float32, with S = Q K^T and bias = strength * W * std(S) (B3).

    query [B, heads, N, hd], key [B, heads, L, hd], layout_map [N, L]. Rows num_uncond.. of the batch
    (the conditional branch) get the bias, std taken over all of that image's S; the first num_uncond rows
    get plain attention. One path for the whole batch keeps the number of kernels per layer low.
    mask: an additive [B, heads or 1, 1, L] bias for keys the UNet must not see (encoder_attention_mask).
    """
    scores = query.float() @ key.float().transpose(-1, -2)  # [B, heads, N, L]
    cond = scores[num_uncond:]
    std = cond.flatten(1).std(dim=1)  # [B - num_uncond]
    cond += strength * layout_map * std[:, None, None, None]  # in place: a view of scores
    logits = scores * scale if mask is None else scores * scale + mask.float()
    return torch.softmax(logits, dim=-1)  # [B, heads, N, L]


def plain_probs(query, key, scale, mask=None):
    """softmax(Q K^T * scale [+ mask]) in float32 [B, heads, N, L]: what the fused kernel computes inside."""
    logits = (query.float() @ key.float().transpose(-1, -2)) * scale
    return torch.softmax(logits if mask is None else logits + mask.float(), dim=-1)


def project(attn, hidden_states, encoder_hidden_states, attention_mask):
    """query [B, heads, N, hd], key and value [B, heads, L, hd], mask [B, heads, 1, L] or None of one layer."""
    batch = hidden_states.shape[0]
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attention_mask is not None:  # [B, 1, L] from encoder_attention_mask -> [B, heads, 1, L]
        attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    return query, key, value, attention_mask


class GuidedCrossAttnProcessor:
    """Cross-attention with the layout bias on the conditional rows during guided steps, fused SDPA otherwise."""

    def __init__(self, guidance):
        self.guidance = guidance
        self.fused = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        g = self.guidance
        if not g.active or encoder_hidden_states is None:
            if g.recorder is not None and encoder_hidden_states is not None:
                self.record_plain(attn, hidden_states, encoder_hidden_states, attention_mask)
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None, (
            "guided cross-attention expects a Transformer2D attention block")
        residual = hidden_states
        batch, num_queries, _ = hidden_states.shape
        query, key, value, attention_mask = project(attn, hidden_states, encoder_hidden_states, attention_mask)
        probs = guided_probs(query, key, g.map_for(num_queries), g.strength, attn.scale, g.num_uncond, attention_mask)
        if g.recorder is not None:
            g.recorder.add(probs[g.num_uncond:2 * g.num_uncond])  # the conditional rows, not the plain ones
        out = (probs @ value.float()).to(value.dtype)  # [B, heads, N, hd]
        out = out.transpose(1, 2).reshape(batch, num_queries, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def record_plain(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        """Record an unguided call's conditional probabilities, computed apart from the fused kernel that still
        makes the output, so recording leaves the images exactly as they are without it."""
        n = self.guidance.num_uncond
        mask = None if attention_mask is None else attention_mask[n:2 * n]
        query, key, _, mask = project(attn, hidden_states[n:2 * n], encoder_hidden_states[n:2 * n], mask)
        self.guidance.recorder.add(plain_probs(query, key, attn.scale, mask))


class AttentionRecorder:
    """Where the conditional branch attends each tracked phrase's tokens, over a whole sampling.

    phrases {name: token rows}. Each cross-attention layer call adds, per image, the probability on the
    phrase's rows (summed over its rows), averaged over heads, as a map on the layer's grid. maps() averages
    these over every call: every cross-attention layer of every UNet evaluation, guided or not, the two passes
    of a self-recurrent step counting as two evaluations; each call's map resized (bilinear) to the image.
    """

    def __init__(self, phrases, length, image_size, device, grids=None):
        self.names = list(phrases)
        self.image_size = tuple(image_size)  # (H, W)
        grids = grids or latent_grids((image_size[0] // 8, image_size[1] // 8))  # the UNet's levels by default
        self.grids = {h * w: (h, w) for h, w in grids}
        selector = torch.zeros(length, len(self.names))  # [L, P]: 1 on each phrase's rows
        for j, rows in enumerate(phrases.values()):
            selector[list(rows), j] = 1
        self.selector = selector.to(device)
        self.sums = {}  # h * w -> [B, P, h, w]: the sum of the calls' maps on that grid
        self.calls = 0

    def add(self, probs):
        """probs [B, heads, N, L]: one layer call's conditional probabilities, N = h * w of a UNet level."""
        maps = (probs.float().mean(dim=1) @ self.selector).transpose(1, 2)  # [B, P, N]
        num_queries = maps.shape[-1]
        maps = maps.reshape(*maps.shape[:2], *self.grids[num_queries])  # [B, P, h, w]
        kept = self.sums.get(num_queries)
        self.sums[num_queries] = maps if kept is None else kept + maps
        self.calls += 1

    def maps(self):
        """{name: [B, H, W] float32 array}, each image's map summing to 1."""
        assert self.calls, "no cross-attention call was recorded"
        # bilinear resizing is linear: resizing each grid's sum once equals summing every call's resized map
        total = sum(F.interpolate(s, size=self.image_size, mode="bilinear", align_corners=False)
                    for s in self.sums.values())  # [B, P, H, W]
        mean = total / self.calls
        mean = mean / mean.sum(dim=(2, 3), keepdim=True)
        return {name: mean[:, j].cpu().numpy().astype(np.float32) for j, name in enumerate(self.names)}


class RegionSelfAttnProcessor:
    """Self-attention with the region mask of LayoutGuidance.self_masks during guided steps (variant
    region_self_attention), diffusers' fused AttnProcessor2_0 otherwise (and always without the variant)."""

    def __init__(self, guidance):
        self.guidance = guidance
        self.fused = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        g = self.guidance
        if not g.active or not g.self_masks or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        assert attn.spatial_norm is None and attn.group_norm is None and attention_mask is None, (
            "region self-attention expects a Transformer2D attention block")
        residual = hidden_states
        batch, num_queries, _ = hidden_states.shape
        query, key, value, _ = project(attn, hidden_states, hidden_states, None)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=g.self_masks[num_queries].to(query.dtype))
        out = out.transpose(1, 2).reshape(batch, num_queries, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_guidance(unet):
    """Put one GuidedCrossAttnProcessor on every cross-attention layer (`attn2`) and one
    RegionSelfAttnProcessor (fused SDPA unless its variant is on) on every self-attention layer (`attn1`).
    A FLUX transformer gets flux.py's guided joint attention instead."""
    from flux import install_flux_guidance, is_flux_transformer

    if is_flux_transformer(unet):
        return install_flux_guidance(unet)
    guidance = LayoutGuidance()
    guided = GuidedCrossAttnProcessor(guidance)
    region = RegionSelfAttnProcessor(guidance)
    unet.set_attn_processor({name: guided if ".attn2." in name else region if ".attn1." in name
                             else AttnProcessor2_0() for name in unet.attn_processors})
    return guidance


# ------------------------------------------------------------------------------------------------
# B4. The sampler

def sample_euler_recurrent(denoise, x, sigmas, recurrent_steps, noise, callback=None):
    """Euler sampler with self-recurrence (Cones 2): step i < recurrent_steps runs twice, re-noised between.

    denoise(x, i) -> x0 estimate at sigmas[i] (a list of floats); noise() -> the next standard normal draw;
    callback(i), if given, after each step (a progress bar).
    """
    for i in range(len(sigmas) - 1):
        passes = 2 if i < recurrent_steps else 1
        for k in range(passes):
            x0 = denoise(x, i)
            x = x + (sigmas[i + 1] - sigmas[i]) / sigmas[i] * (x - x0)
            if k == 0 and passes == 2:  # back from sigma_{i+1} to sigma_i
                x = x + math.sqrt(sigmas[i] ** 2 - sigmas[i + 1] ** 2) * noise()
        if callback is not None:
            callback(i)
    return x


def cfg_scales(cfg_scale, schedule, sigmas):
    """Classifier-free guidance scale per step: 'constant' (Cones 2) or 'sigma' s * (1 + sigma_i / sigma_max)."""
    if schedule == "constant":
        return [cfg_scale] * (len(sigmas) - 1)
    return [cfg_scale * (1 + sigma / sigmas[0]) for sigma in sigmas[:-1]]


@dataclass(frozen=True)
class SamplerInputs:
    """The tensors one sampling is conditioned on (what k-diffusion passes as extra_args); built once per job.

    cond, uncond [L, d] float32 (residuals already applied); weight_map W [L, H, W] (B2), None: unguided;
    masks: (cond, uncond) lists [L] of 1 and 0 for the UNet's encoder_attention_mask (text length "words"), or
    None; pooled: SDXL's pooled text embeddings (cond [p], uncond [p]), None for SD; plain [L, d]: cond without
    the residuals, for the variant residual_guidance; region_labels [H, W]: each pixel's subject region (-1 for
    none), for the variant region_self_attention.
    """
    cond: torch.Tensor
    uncond: torch.Tensor
    weight_map: torch.Tensor = None
    masks: tuple = None
    pooled: tuple = None
    plain: torch.Tensor = None
    region_labels: np.ndarray = None


class StepPlan(NamedTuple):
    """Per-step values of one sampling: the sampler's sigmas [N + 1] (ends with 0) and the UNet's timesteps [N],
    the CFG scale of each step, how many steps are guided and their bias strengths ([G] on the UNet's device)."""
    sigmas: list
    timesteps: torch.Tensor
    scales: list
    guided_steps: int = 0
    strengths: torch.Tensor = None


def make_cfg_denoiser(unet, inputs, plan, settings, prediction_type, guidance=None, added_cond=None):
    """denoise(x, i): one UNet call on [uncond; cond], CFG with plan.scales[i], x0 from eps or v.

    inputs: SamplerInputs whose cond, uncond (and plain) are batched [B, L, d]; settings: SamplingSettings. The
    layout guidance (if any) is switched on for steps i < plan.guided_steps. added_cond: SDXL's extra
    conditioning of the [uncond; cond] batch. Variant residual_guidance (docs/METHOD.md E): inputs.plain is cond
    without the residuals, run as a third branch (guided as the conditional one) and
    e = e_u + s_i (e_c - e_u) + residual_guidance (e_c - e_plain).
    """
    cond, uncond, plain = inputs.cond, inputs.uncond, inputs.plain
    sigmas, timesteps, scales, guided_steps, strengths = plan
    residual_guidance = settings.residual_guidance
    branches = [uncond, cond] if plain is None else [uncond, cond, plain]
    encoder_states = torch.cat(branches).to(unet.dtype)  # [2B or 3B, L, d]
    batch = cond.shape[0]
    extra = {} if added_cond is None else {"added_cond_kwargs": added_cond}
    if inputs.masks is not None:
        cond_mask, uncond_mask = (torch.tensor(m, device=cond.device)[None].expand(batch, -1) for m in inputs.masks)
        extra["encoder_attention_mask"] = torch.cat([uncond_mask] + [cond_mask] * (len(branches) - 1))
    if plain is not None and added_cond is not None:
        extra["added_cond_kwargs"] = {k: torch.cat([v, v[batch:]]) for k, v in added_cond.items()}

    region = None  # residual_guidance_in_region: [1, 1, h, w], made at the first call (it needs the latent's size)

    def denoise(x, i):
        nonlocal region
        sigma = sigmas[i]
        if region is None and plain is not None and settings.residual_guidance_in_region:
            region = subject_region(inputs.weight_map, cond[0], plain[0], x.shape[-2:]).to(x.device)
        if guidance is not None:
            active = i < guided_steps
            guidance.set_step(active, strengths[i] if active else None, num_uncond=batch)
        x_in = (x / math.sqrt(sigma ** 2 + 1)).to(unet.dtype)
        raw = unet(torch.cat([x_in] * len(branches)), timesteps[i], encoder_hidden_states=encoder_states,
                   **extra).sample.float()
        out_uncond, out_cond = raw[:batch], raw[batch:2 * batch]
        out = out_uncond + scales[i] * (out_cond - out_uncond)
        if plain is not None:
            push = residual_guidance * (out_cond - raw[2 * batch:])
            if region is None:
                out = out + push
            elif i < guided_steps:  # in region: where and while the layout guides
                out = out + region * push
        if prediction_type == "v_prediction":
            return out * (-sigma / math.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
        return x - sigma * out

    return denoise


def subject_region(weight_map, cond, plain, latent_size):
    """[1, 1, h, w] float32: each latent cell's share of the subjects' regions, for residual_guidance_in_region.

    The subjects' rows are those where cond and plain [L, d] differ (the residuals' rows); their region is where
    the weight map W [L, H, W] (B2) gives any of them a positive weight; no weight map: no region.
    """
    if weight_map is None:
        return torch.zeros(1, 1, *latent_size)
    rows = (cond != plain).any(dim=-1).cpu()  # [L]
    inside = (weight_map[rows] > 0).any(dim=0).float()  # [H, W]
    return F.interpolate(inside[None, None], size=tuple(latent_size), mode="area")


@torch.no_grad()
def generate(sd, inputs, settings, seeds, size, guidance=None, recorder=None, callback=None):
    """Sample one image per seed in one batch; returns images as uint8 [B, H, W, 3].

    inputs: SamplerInputs; settings: SamplingSettings (config_keys.py); size: (height, width). With `guidance`
    (from install_guidance) and a weight map, steps i < guidance_steps are layout-guided and self-recurrent.
    recorder: an AttentionRecorder (needs `guidance`) that this sampling's cross-attention is added to.
    callback(i): called after each step i (a progress bar).
    Variants (docs/METHOD.md E), off by default: inputs.region_labels masks self-attention between regions during
    guided steps; guidance_schedule "constant" keeps the first step's strength gamma * log(1 + sigma_0^2) for
    every guided step instead of letting it fall with sigma; inputs.plain with residual_guidance (make_cfg_denoiser).
    """
    if sd.family == "flux":
        from flux import generate_flux
        return generate_flux(sd, inputs, settings, seeds, size, guidance, recorder, callback)
    height, width = size
    device = sd.unet.device
    scheduler = LMSDiscreteScheduler.from_config(sd.scheduler_config)
    scheduler.set_timesteps(settings.num_inference_steps)
    sigmas = scheduler.sigmas.tolist()  # [N + 1], ends with 0

    guided_steps, strengths = 0, None
    if guidance is not None:
        if inputs.weight_map is not None and settings.guidance_steps > 0:
            guidance.set_layout(inputs.weight_map, (height // 8, width // 8), device)
            guided_steps = min(settings.guidance_steps, settings.num_inference_steps)  # the strength's schedule
            # has as many steps; [G] on the device: set_step copies one from there, no wait
            strengths = guidance_strengths(settings.guidance_weight, guided_steps, settings.guidance_schedule)
            strengths = strengths.to(device)
        guidance.set_self_attention(inputs.region_labels if guided_steps else None, (height // 8, width // 8), device)
        guidance.set_step(False)
    scales = cfg_scales(settings.cfg_scale, settings.cfg_schedule, sigmas)
    plan = StepPlan(sigmas, scheduler.timesteps.to(device), scales, guided_steps, strengths)

    # One CPU generator per image: its initial latents first, then each recurrence noise in order. All are
    # drawn up front and moved to the device at once, so the loop never waits on a host-to-device copy.
    shape = (1, sd.unet.config.in_channels, height // 8, width // 8)
    draws = []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        draws.append(torch.stack([torch.randn(shape, generator=generator) for _ in range(1 + guided_steps)]))
    draws = torch.cat(draws, dim=1).to(device)  # [1 + recurrences, B, C, h, w]
    x = draws[0] * float(scheduler.init_noise_sigma)
    recurrence_noise = iter(draws[1:])

    batch = len(seeds)
    added_cond = None
    if inputs.pooled is not None:  # [uncond; cond] as the UNet's batch is laid out
        both = torch.stack([inputs.pooled[1], inputs.pooled[0]]).repeat_interleave(batch, dim=0)
        added_cond = sd.added_cond(both.to(device, sd.unet.dtype), height, width)
    batched = dataclasses.replace(inputs, **{name: None if value is None else value[None].expand(batch, -1, -1)
                                             for name, value in (("cond", inputs.cond), ("uncond", inputs.uncond),
                                                                 ("plain", inputs.plain))})
    denoise = make_cfg_denoiser(sd.unet, batched, plan, settings, sd.prediction_type, guidance, added_cond)
    if recorder is not None:
        guidance.recorder = recorder
    try:
        x = sample_euler_recurrent(denoise, x, sigmas, guided_steps, lambda: next(recurrence_noise), callback)
    finally:
        if guidance is not None:
            guidance.recorder = None
            guidance.set_step(False)
    bad = [seed for seed, finite in zip(seeds, torch.isfinite(x).flatten(1).all(dim=1).tolist()) if not finite]
    if bad:  # checked once, at the end: NaN latents decode to a black image that looks like a result
        raise NonFiniteError(f"sampling diverged (NaN or infinite latents) for seed{'s' if len(bad) > 1 else ''} "
                             f"{', '.join(map(str, bad))}: lower cfg_scale or the guidance weights, or check "
                             f"the residuals; no image was written")
    return decode_latents(sd.vae, x)


def decode_latents(vae, latents):
    """Latents [B, 4, h, w] -> uint8 images [B, H, W, 3] (as diffusers rounds them)."""
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (images * 255).round().astype(np.uint8)
