"""Train the toy world's base model: a tiny Stable Diffusion in diffusers format, on the CPU, from a seed.

    python toy/build_base.py --output toy/base_model          # about 30 minutes on 2 cores
    python toy/build_base.py --world many --steps 1400 --output toy/base_many   # world.many_scene, 96 px: 49 min
    python toy/build_base.py --world many --init toy/base_many --steps 2400 --seed 1 --min_snr 5 \
        --output toy/base_many        # trained further: --init keeps the VAE, build.json keeps the earlier build
    bash toy/build_many.sh            # toy/base_many as committed: three such runs

1. An AutoencoderKL (~0.3 M parameters, 64 px -> 8x8x4 latents), trained on scenes of toy/world.py;
   its scaling_factor is set from the latents' spread.
2. A CLIP text model (hidden size 64, the real CLIP tokenizer) trained jointly with a UNet (~4 M parameters)
   on (scene, caption) pairs, 10% of captions empty for classifier-free guidance. The UNet's cross-attention
   sees only BOS and the words (`encoder_attention_mask` hides EOS and padding): a UNet that can read the
   EOS token takes appearance from the sentence as a whole, and a residual on a noun then does nothing.
Written as fp16 safetensors with the tokenizer and an SD scheduler config, so inference.py and train.py load it
like any Stable Diffusion (with text length "words").
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules
from layout_guidance import SD_BETAS  # noqa: E402
from text_utils import words_mask  # noqa: E402
from world import many_scene, scene  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "clip_tokenizer"
TEXT_LENGTH = 20  # the longest caption is 15 tokens with BOS and EOS
# The richer world: 96 px scenes of up to four objects with patterns, captions of up to 33 tokens; a UNet of three
# levels (12, 6 and 3 latent cells a side), each with cross-attention. WORLDS[name]: (scene function, text length,
# image side, UNet block widths).
WORLDS = {"two": (scene, TEXT_LENGTH, 64, (64, 128)), "many": (many_scene, 40, 96, (64, 128, 128))}
SCHEDULER = {"_class_name": "DDIMScheduler", **SD_BETAS, "steps_offset": 1, "clip_sample": False,
             "set_alpha_to_one": False, "prediction_type": "epsilon"}


def make_vae(size=64):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=size)


def make_unet(size=64, widths=(64, 128)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=widths, down_block_types=("CrossAttnDownBlock2D",) * len(widths),
                                up_block_types=("CrossAttnUpBlock2D",) * len(widths), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32)


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))


def batch_of_scenes(first_seed, size, world=scene):
    """Images [B, 3, S, S] in [-1, 1] and captions of scenes first_seed .. first_seed + size - 1 of `world`."""
    images, captions = [], []
    for seed in range(first_seed, first_seed + size):
        image, caption, _ = world(seed)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        captions.append(caption)
    return torch.stack(images).float() / 127.5 - 1, captions


def caption_masks(ids, tokenizer):
    """The "words" mask of each caption, up to its first EOS: [B, L] of 1 and 0."""
    return torch.tensor([words_mask(row.index(tokenizer.eos_token_id), len(row)) for row in ids.tolist()])


def train_vae(vae, steps, seed, world=scene, log_every=100):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        pixels, _ = batch_of_scenes(10_000_000 + step * 16, 16, world)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = F.mse_loss(recon, pixels) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step}: mse {F.mse_loss(recon, pixels).item():.5f} kl {kl.item():.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)


@torch.no_grad()
def latent_scale(vae, world=scene):
    pixels, _ = batch_of_scenes(20_000_000, 256, world)
    return float(1.0 / vae.encode(pixels).latent_dist.mean.std())


def min_snr_weights(alphas_cumprod, timesteps, gamma):
    """Per sample min(SNR, gamma) / SNR of its timestep, SNR = alpha_bar / (1 - alpha_bar) (epsilon prediction)."""
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return torch.clamp(snr, max=gamma) / snr


def train_diffusion(unet, text_encoder, vae, tokenizer, steps, batch_size, seed, world=scene,
                    text_length=TEXT_LENGTH, first_scene=0, lr=5e-4, min_snr=0.0, checkpoint=None,
                    log_every=100):
    """checkpoint: (every, save(step)) to write the model every `every` steps, or None. min_snr: gamma > 0 weights
    each sample's loss by min(SNR, gamma) / SNR (Min-SNR weighting: the nearly clean timesteps, which say little
    about what is drawn where, count less); 0 is the plain mean squared error."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(SCHEDULER)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer, schedule = make_optimizer(params, lr, steps)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    scale = vae.config.scaling_factor
    start = time.time()
    for step in range(steps):
        pixels, captions = batch_of_scenes(first_scene + step * batch_size, batch_size, world)
        captions = ["" if rng.random() < 0.1 else c for c in captions]  # for classifier-free guidance
        ids = torch.tensor(tokenizer(captions, padding="max_length", max_length=text_length,
                                     truncation=True).input_ids)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, encoder_hidden_states=states,
                    encoder_attention_mask=caption_masks(ids, tokenizer)).sample
        if min_snr > 0:
            per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(noise_scheduler.alphas_cumprod, timesteps, min_snr)).mean()
        else:
            loss = F.mse_loss(pred, noise)
        training_step(loss, params, optimizer, schedule)
        after_step("diffusion", step, steps, loss, start, checkpoint, log_every)


def make_optimizer(params, lr, steps, warmup=100):
    """AdamW (weight decay 0.01) with a linear warm-up over `warmup` steps and a cosine decay to 0 at `steps`."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    return optimizer, schedule


def training_step(loss, params, optimizer, schedule):
    """Back-propagate, clip the gradient norm to 1, step the optimizer and the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()


def after_step(label, step, steps, loss, start, checkpoint, log_every):
    """Log every log_every steps and the last; checkpoint: (every, save(step)) writes the model mid-way, or None."""
    if step % log_every == 0 or step == steps - 1:
        print(f"{label} step {step}: loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    if checkpoint is not None and (step + 1) % checkpoint[0] == 0 and step + 1 < steps:
        checkpoint[1](step + 1)


@torch.no_grad()
def reconstruction_check(vae, count=128):
    """Share of richer-world scenes whose VAE reconstruction the analyser reads back exactly (every object's shape,
    colour and pattern in its place): the ceiling of any sample of the base model."""
    from analyze import by_place, identity, objects
    from world import LAYOUTS

    pixels, _ = batch_of_scenes(30_000_000, count, many_scene)
    images = ((vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1) + 1) * 127.5).round()
    right = 0
    for seed, image in zip(range(30_000_000, 30_000_000 + count), images.permute(0, 2, 3, 1).byte().numpy()):
        truth = many_scene(seed)[2]
        places = by_place(objects(image, patterns=True), LAYOUTS[len(truth)])
        right += all(len(p) == 1 and identity(p[0]) == (t.shape, t.colour, t.pattern) for p, t in zip(places, truth))
    return right / count


def load_built(folder):
    """(vae, unet, text_encoder, build settings) of a model this script wrote, in float32 to train further."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).requires_grad_(False).eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
    return vae, unet, text_encoder, json.loads((folder / "build.json").read_text())


def save(folder, vae, unet, text_encoder, tokenizer, settings):
    folder = Path(folder)
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(folder / name)
        config = folder / name / "config.json"  # a model trained further names the folder it came from: not kept
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                      if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=2))
    (folder / "build.json").write_text(json.dumps(settings, indent=2) + "\n")


def main(args):
    from transformers import CLIPTokenizer

    torch.manual_seed(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    world, text_length, size, widths = WORLDS[args.world]
    start, checks, first_scene = time.time(), {}, 0
    if args.init:  # train a built model further: its VAE as it is, scenes after the ones it has seen
        vae, unet, text_encoder, earlier = load_built(args.init)
        first_scene = earlier.get("scenes_seen", earlier["steps"] * earlier["batch_size"])
        checks = {"continued_from": earlier}
    else:
        vae, unet, text_encoder = make_vae(size), make_unet(size, widths), make_text_encoder()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}
    print("parameters:", counts, flush=True)
    if not args.init:
        train_vae(vae, args.vae_steps, args.seed, world)
        vae.requires_grad_(False).eval()
        vae.register_to_config(scaling_factor=latent_scale(vae, world))
        print(f"scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
        if args.world == "many":  # a sample can be no better than a reconstruction: recorded with the build
            checks["vae_reconstructions_exact"] = round(reconstruction_check(vae), 3)
            print(f"VAE reconstructions read back exactly: {checks['vae_reconstructions_exact']:.3f}", flush=True)

    def settings(steps):
        return dict(vars(args), steps=steps, parameters=counts, minutes=round((time.time() - start) / 60, 1),
                    scaling_factor=vae.config.scaling_factor, torch=torch.__version__,
                    scenes_seen=first_scene + steps * args.batch_size, **checks)

    def checkpoint(steps):  # a model to look at while the build goes on, and what a stopped build leaves
        save(args.output, copy.deepcopy(vae), copy.deepcopy(unet), copy.deepcopy(text_encoder), tokenizer,
             dict(settings(steps), planned_steps=args.steps))
        print(f"wrote {args.output} at step {steps}", flush=True)

    train_diffusion(unet, text_encoder, vae, tokenizer, args.steps, args.batch_size, args.seed, world, text_length,
                    first_scene, args.lr, args.min_snr, (args.save_every, checkpoint) if args.save_every else None)
    built = settings(args.steps)
    save(args.output, vae, unet, text_encoder, tokenizer, built)
    print(f"wrote {args.output} in {built['minutes']} min", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "base_model"))
    p.add_argument("--world", default="two", choices=tuple(WORLDS),
                   help="two: world.scene (toy/base_model); many: world.many_scene, 96 px (toy/base_many)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=2000, help="UNet + text encoder steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="the diffusion training's peak learning rate")
    p.add_argument("--min_snr", type=float, default=0.0,
                   help="Min-SNR loss weighting with this gamma (5 is usual); 0: the plain mean squared error")
    p.add_argument("--save_every", type=int, default=0, help="also write the model every this many steps")
    p.add_argument("--init", default=None,
                   help="a model this script built: train its UNet and text encoder further (its VAE is kept)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
