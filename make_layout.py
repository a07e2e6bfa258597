"""Render a boxes config into a painted layout and its color_context config, and draw a preview of any layout.

    python make_layout.py configs/boxes_prompt0.json --resolution 768 --out_dir my_layout
    python make_layout.py configs/guidance_config_prompt0.json --preview_on photo.png --out_dir my_layout

A config with `regions` (boxes) gives, in --out_dir, {name}_layout.png (the layout at the output size, exactly
as inference.py renders it) and {name}_painted.json (the same config with `layout` and `color_context`
instead of `regions`; inference.py at that size makes the same images from either), to refine by hand in a
paint program. Every config also gives {name}_preview.png: the regions outlined and labelled with their
phrases over a white canvas or over --preview_on.
"""
import os
from pathlib import Path

from cli_utils import ArgumentParser, UserError, check_multiple_of_8, run_cli
from file_utils import check_output_file, check_writable_folder, read_image, write_json, write_png
from config import PAINTED_KEYS, ConfigReader, job_layout
from layouts import draw_preview


def painted_config(config, layout_file, color_context, out_dir):
    """The boxes config as a painted one written in out_dir: residual paths made relative to it."""
    painted = {key: value for key, value in config.data.items() if key != "regions"}
    painted["residual_dict"] = {name: os.path.relpath(config.resolve_path(f"residual_dict.{name}", file), out_dir)
                                for name, file in config.data["residual_dict"].items()}
    painted.update(layout=layout_file.name, color_context=color_context)
    return painted


def main(args):
    """Returns the files written: all of them, or (on any mistake) none."""
    check_multiple_of_8(args, "resolution", "height", "width")
    height, width = args.height or args.resolution, args.width or args.resolution
    config = ConfigReader(args.config).read()
    layout = job_layout(config, height, width)
    if not args.out_dir.strip():
        raise UserError("--out_dir: expected a folder, got an empty name")
    out_dir = Path(args.out_dir)
    check_writable_folder(out_dir, "--out_dir")
    name = Path(args.config).stem
    outputs = {}  # file -> what to write, all made before the first is written
    if config.regions is not None:
        layout_file = out_dir / f"{name}_layout.png"
        outputs[layout_file] = layout.array
        outputs[out_dir / f"{name}_painted.json"] = painted_config(config, layout_file, layout.color_context,
                                                                   out_dir.resolve())
    background = read_image(args.preview_on, "--preview_on image") if args.preview_on else None
    entries = [(phrase, layout.colours[colour]) for colour, (phrase, _) in layout.color_context.items()]
    outputs[out_dir / f"{name}_preview.png"] = draw_preview(layout.array, entries, background)
    for file in outputs:
        check_output_file(file, "cannot write")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir {out_dir}: cannot create the folder ({e.strerror or e})") from None
    written = []
    try:
        for file, content in outputs.items():
            (write_json if file.suffix == ".json" else write_png)(file, content)
            written.append(file)
    except BaseException:
        for file in written:
            file.unlink(missing_ok=True)
        raise
    for file in written:
        print(f"wrote {file}")
    return written


def parse_args(argv=None):
    p = ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("config", help="a config with regions (boxes) or with " + " and ".join(PAINTED_KEYS))
    p.add_argument("--resolution", type=int, default=768,
                   help="square output size the layout is rendered at (use the size inference.py will sample at)")
    p.add_argument("--height", type=int, default=None, help="output height, a multiple of 8; default: --resolution")
    p.add_argument("--width", type=int, default=None, help="output width, a multiple of 8; default: --resolution")
    p.add_argument("--out_dir", default="layouts_out", help="where the layout, the config and the preview go")
    p.add_argument("--preview_on", metavar="IMAGE", help="draw the preview over this image instead of white")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
