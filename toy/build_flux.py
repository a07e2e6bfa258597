"""Train the toy FLUX: a small FLUX.1 (a diffusion transformer) on the richer world's scenes, on the CPU, from a seed.

    python toy/build_flux.py --steps 3600 --output toy/base_flux          # about 60 minutes on 2 cores
    python toy/build_flux.py --init toy/base_flux --steps 3000 --seed 1 --sigmas logit_normal \
        --output toy/base_flux                                            # trained further
    bash toy/build_flux.sh                                                # toy/base_flux as committed: 3 runs

Laid out as a FLUX.1-schnell folder (FluxPipeline, no distilled guidance input), so inference.py and train.py load
it like any FLUX model:
- vae: toy/base_many's VAE as it is (96 px -> 12 x 12 x 4 latents, packed 2 x 2 into 36 tokens of 16 values), with
  shift_factor 0: the transformer is compared with the toy UNet on the same latents;
- text_encoder_2 / tokenizer_2: a small T5 encoder (d_model 64) with a Unigram tokenizer of the world's words
  (text_utils.unigram_t5_tokenizer; every caption word one piece), captions padded to 40 tokens with "<pad>" and
  no mask, as FluxPipeline passes them; trained jointly with the transformer;
- text_encoder / tokenizer: a one-layer CLIP whose pooled embedding is zero for every text (its final layer norm's
  weight and bias are zero). The caption reaches the transformer only through T5's rows, where the residuals live:
  a pooled embedding that names the objects would hold appearance that a residual on one row cannot move (the
  toy UNet hides CLIP's EOS for the same reason);
- transformer: FluxTransformer2DModel with double-stream and single-stream blocks, trained by flow matching
  (x_sigma = (1 - sigma) x0 + sigma eps, velocity eps - x0; sigma uniform as in flux.flux_training_loss, or with
  --sigmas logit_normal mostly mid-way);
- scheduler: FlowMatchEulerDiscreteScheduler without shift (schnell's settings).
With --drop_captions a share of the captions is "" (T5's EOS and padding), so that the model also learns the
unconditional branch that true_cfg_scale samples with (toy/base_flux's last run: 10%, as the toy UNet).
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TOY = Path(__file__).resolve().parent
sys.path.insert(0, str(TOY.parent))  # the project's modules
from build_base import TOKENIZER_DIR, after_step, batch_of_scenes, make_optimizer, training_step  # noqa: E402
from world import COLOURS, NOUNS, PATTERNS, PLACES, SHAPES, many_scene  # noqa: E402

TEXT_LENGTH = 40  # the longest caption of the richer world is 33 T5 tokens with EOS
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
             "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": False}
MODEL_INDEX = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
               "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def vocabulary_lines(count=4000):
    """Text the T5 tokenizer's pieces are counted from: the world's captions, every colour, noun, shape, pattern
    and place, and the training prompts (train.TEMPLATES) around the generic nouns."""
    from train import TEMPLATES

    words = list(SHAPES) + list(COLOURS) + list(PATTERNS) + [n for c in NOUNS.values() for n in c.values()]
    words += [p for places in PLACES.values() for p in places]
    return ([many_scene(seed)[1] for seed in range(count)] + words
            + [t.format(shape) for t in TEMPLATES for shape in SHAPES])


def make_t5(vocab_size, width=64, layers=4):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=16, num_heads=width // 16,
                                   d_ff=4 * width, num_layers=layers, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                   dropout_rate=0.0))


def make_clip():
    """A one-layer CLIP whose pooled embedding is zero for every text (see the module's docstring)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    with torch.no_grad():
        clip.final_layer_norm.weight.zero_()
        clip.final_layer_norm.bias.zero_()
    return clip


def make_transformer(width=128, double=3, single=6, text_width=64):
    from diffusers import FluxTransformer2DModel

    head = 32  # attention_head_dim = the rotary axes' sum: (frame, row, column)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                  attention_head_dim=head, num_attention_heads=width // head,
                                  joint_attention_dim=text_width, pooled_projection_dim=32, guidance_embeds=False,
                                  axes_dims_rope=(8, 12, 12))


def draw_sigmas(count, generator, kind="uniform"):
    """Noise levels in (0, 1] of one batch: "uniform" over the 1000 training timesteps, as train.py learns residuals
    (flux.flux_training_loss); "logit_normal": sigmoid of a standard normal (SD3's choice), most of them in the
    middle, where what is drawn where is decided, few nearly clean or nearly pure noise."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(count, generator=generator)).clamp(1e-3, 1.0)
    return (torch.randint(0, 1000, (count,), generator=generator).float() + 1) / 1000


def train_flow(transformer, t5, vae, tokenizer, steps, batch_size, seed, first_scene=0, lr=5e-4, checkpoint=None,
               sigmas="uniform", drop_captions=0.0, log_every=50):
    """Flow matching on (scene, caption) pairs of world.many_scene. checkpoint: (every, save(step)) or None;
    sigmas: how noise levels are drawn (draw_sigmas); drop_captions: the share of captions replaced by "" (the
    unconditional branch of classifier-free guidance, true_cfg_scale)."""
    from flux import image_ids, pack

    params = list(transformer.parameters()) + list(t5.parameters())
    optimizer, schedule = make_optimizer(params, lr, steps)
    generator = torch.Generator().manual_seed(seed)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    img_ids = image_ids(6, 6)
    txt_ids = torch.zeros(TEXT_LENGTH, 3)
    pooled = torch.zeros(batch_size, transformer.config.pooled_projection_dim)
    start = time.time()
    for step in range(steps):
        pixels, captions = batch_of_scenes(first_scene + step * batch_size, batch_size, many_scene)
        if drop_captions:
            dropped = torch.rand(batch_size, generator=generator) < drop_captions
            captions = ["" if d else c for d, c in zip(dropped.tolist(), captions)]
        ids = torch.tensor(tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH,
                                     truncation=True).input_ids)
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.mean - shift) * scale
        noise = torch.randn(latents.shape, generator=generator)
        sigma = draw_sigmas(batch_size, generator, sigmas)[:, None, None, None]
        noisy = (1 - sigma) * latents + sigma * noise
        states = t5(ids).last_hidden_state
        pred = transformer(hidden_states=pack(noisy), timestep=sigma.flatten(), encoder_hidden_states=states,
                           pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids).sample
        loss = F.mse_loss(pred, pack(noise - latents))
        training_step(loss, params, optimizer, schedule)
        after_step("flow", step, steps, loss, start, checkpoint, log_every)


def save(folder, parts, settings):
    """parts: vae, transformer, t5, clip, tokenizer (T5's); written in float32 (the model is small, and bf16 would
    round a toy's fine differences away) with the real CLIP tokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2"):
        module = parts["clip" if name == "text_encoder" else "t5" if name == "text_encoder_2" else name]
        module.save_pretrained(folder / name)
        config = folder / name / "config.json"  # a model trained further names the folder it came from: not kept
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                      if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
    CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77).save_pretrained(folder / "tokenizer")
    parts["tokenizer"].save_pretrained(folder / "tokenizer_2")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (folder / "build.json").write_text(json.dumps(settings, indent=2) + "\n")


def load_parts(folder):
    """The parts of a model this script wrote (float32, to train further) and its build settings."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

    folder = Path(folder)
    return ({"vae": AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False).eval(),
             "transformer": FluxTransformer2DModel.from_pretrained(folder / "transformer"),
             "t5": T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
             "clip": CLIPTextModel.from_pretrained(folder / "text_encoder"),
             "tokenizer": T5TokenizerFast.from_pretrained(folder / "tokenizer_2")},
            json.loads((folder / "build.json").read_text()))


def fresh_parts(vae_from, width, double, single):
    from diffusers import AutoencoderKL

    from text_utils import unigram_t5_tokenizer

    vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae", torch_dtype=torch.float32).requires_grad_(False).eval()
    vae.register_to_config(shift_factor=0.0, force_upcast=False)
    tokenizer = unigram_t5_tokenizer(vocabulary_lines(), max_length=TEXT_LENGTH)
    return {"vae": vae, "transformer": make_transformer(width, double, single), "t5": make_t5(len(tokenizer)),
            "clip": make_clip(), "tokenizer": tokenizer}


def shown(path):
    """A path relative to the repository where it lies inside it (build.json is committed with the model)."""
    path = Path(path).resolve()
    return str(path.relative_to(TOY.parent)) if path.is_relative_to(TOY.parent) else str(path)


def main(args):
    torch.manual_seed(args.seed)
    start, first_scene, earlier = time.time(), 0, {}
    if args.init:  # train a built model further: scenes after the ones it has seen
        parts, built = load_parts(args.init)
        first_scene, earlier = built["scenes_seen"], {"continued_from": built}
    else:
        parts = fresh_parts(args.vae_from, args.width, args.double, args.single)
    counts = {name: sum(p.numel() for p in parts[name].parameters()) for name in ("vae", "transformer", "t5")}
    print("parameters:", counts, flush=True)

    def settings(steps):  # the folders as the repository names them, wherever the script runs
        named = {k: shown(v) for k, v in vars(args).items() if k in ("output", "vae_from", "init") and v}
        return dict(vars(args), **named, steps=steps, parameters=counts, minutes=round((time.time() - start) / 60, 1),
                    torch=torch.__version__, scenes_seen=first_scene + steps * args.batch_size, **earlier)

    def checkpoint(steps):
        save(args.output, {k: copy.deepcopy(v) for k, v in parts.items()}, dict(settings(steps), planned_steps=args.steps))
        print(f"wrote {args.output} at step {steps}", flush=True)

    train_flow(parts["transformer"], parts["t5"], parts["vae"], parts["tokenizer"], args.steps, args.batch_size,
               args.seed, first_scene, args.lr, (args.save_every, checkpoint) if args.save_every else None,
               args.sigmas, args.drop_captions)
    built = settings(args.steps)
    save(args.output, parts, built)
    print(f"wrote {args.output} in {built['minutes']} min", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(TOY / "base_flux"))
    p.add_argument("--vae_from", default=str(TOY / "base_many"), help="the toy model whose VAE is taken as it is")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000, help="transformer + T5 steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="the peak learning rate (warm-up, then cosine)")
    p.add_argument("--sigmas", default="uniform", choices=("uniform", "logit_normal"),
                   help="how the noise levels of a batch are drawn (logit_normal: mostly mid-way, as SD3)")
    p.add_argument("--drop_captions", type=float, default=0.0,
                   help="the share of captions replaced by \"\" (for classifier-free guidance: 0.1 as the toy UNet)")
    p.add_argument("--width", type=int, default=128, help="the transformer's width (heads of 32)")
    p.add_argument("--double", type=int, default=3, help="double-stream blocks")
    p.add_argument("--single", type=int, default=6, help="single-stream blocks")
    p.add_argument("--save_every", type=int, default=0, help="also write the model every this many steps")
    p.add_argument("--init", default=None, help="a model this script built: train it further")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
