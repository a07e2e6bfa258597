"""A config read, checked and resolved into a job: one home for the config format (README: the config file),
used by every script that reads one (inference.py, app.py, make_layout.py, benchmark.py, toy/).

    config = ConfigReader("configs/guidance_config_prompt0.json").read()     # checked JSON
    job = prepare_job(path, tokenizer, embedding_dim, height, width, overrides, family=family)   # resolved

Every complaint is one UserError naming the file and the key. The keys, their kinds and defaults are
config_keys.py's table; a `Job` holds what the sampler needs of one config (token ids, subjects, regions, the
layout at the output size, the sampling settings) and the settings a run record keeps (record.py).
"""
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cli_utils import UserError, is_finite32
from config_keys import (DEFAULTS, FAMILY_DEFAULTS, FAMILY_REFUSED_CHOICES, KEY, KEYS, PRESETS, SamplingSettings,
                         sampling_settings)
from file_utils import file_sha256, read_json, resolve_relative
from layouts import colour_mask, read_regions, regions_color_context, render_regions
from region_utils import read_layout
from residual_utils import FAMILY_NAMES, find_sequence, load_residual
from text_utils import leading_specials, specials_note, token_count, token_ids, token_texts, word_ids, words_mask

PAINTED_KEYS = tuple(key.name for key in KEYS if key.painted)  # a painted layout; `regions` (boxes) replace them
MAX_TEXT_CHARACTERS = 10_000  # a prompt's characters: 77 tokens never take more


# ------------------------------------------------------------------------------------------------
# Reading and checking a config

@dataclass(frozen=True)
class Config:
    """One config as read and checked: its JSON object and what the checks made of it."""
    path: Path
    data: dict
    subjects: tuple  # ((name, position or None), ...) of subject_list, each name once
    regions: list | None  # the boxes (layouts.read_regions), or None for a painted layout
    colours: dict  # painted: {color_context key: (r, g, b)}; boxes: {} (their colours come when rendered)

    def fail(self, key, message):
        raise UserError(f"{self.path}: {key}: {message}")

    def resolve_path(self, key, value):
        """A relative path is looked up beside the config first, then in the working directory."""
        found = resolve_relative(value, self.path.parent)
        if found is None:
            self.fail(key, f"file not found: '{value}' (looked in {self.path.parent} and {Path.cwd()})")
        return found


class ConfigReader:
    """Checks the raw JSON of one config against config_keys.KEYS; every complaint names the file and the key."""

    def __init__(self, path):
        self.path = Path(path)

    def fail(self, key, message):
        raise UserError(f"{self.path}: {key}: {message}")

    def read(self, data=None, with_layout=True):
        """The Config of the file, or of `data` (a config already read: a run record's) named by the file.

        with_layout=False: the layout's keys (layout and color_context, or regions) are left aside, neither
        required nor checked (the editor places the subjects of a page whose layout is still being drawn)."""
        data = data if data is not None else read_json(self.path, "config file")
        if isinstance(data, list):
            if len(data) != 1:
                raise UserError(f"{self.path}: expected a list holding one config object, got {len(data)} items")
            data = data[0]
        if not isinstance(data, dict):
            raise UserError(f"{self.path}: expected a JSON object (or a list holding one)")
        for name in data:
            if name not in KEY:
                close = difflib.get_close_matches(name, list(KEY), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(KEY)}"
                self.fail(name, f"unknown key{hint}")
        if not with_layout:
            data = {key: value for key, value in data.items() if key not in PAINTED_KEYS + ("regions",)}
        boxes = "regions" in data
        if boxes and any(name in data for name in PAINTED_KEYS):
            self.fail("regions", "give either regions (boxes) or layout and color_context (a painted layout), "
                                 "not both")
        for key in KEYS:
            if key.required and key.name not in data and not ((boxes or not with_layout) and key.painted):
                self.fail(key.name, "missing (required)")
        for key in KEYS:
            if key.name in data and key.kind != "structure":
                self.check_value(key, data[key.name])
        if not isinstance(data["residual_dict"], dict) or not data["residual_dict"]:
            empty = " (it is empty)" if data["residual_dict"] in ({}, []) else ""
            self.fail("residual_dict", f"expected an object {{subject name: residual file}}{empty}")
        for name, file in data["residual_dict"].items():
            if not isinstance(file, str) or not file:
                self.fail(f"residual_dict.{name}", f"expected a file path, got {file!r}")
        regions = read_regions(data["regions"], self.fail) if boxes else None
        colours = self.painted_colours(data) if with_layout and not boxes else {}
        if not isinstance(data["subject_list"], list) or not data["subject_list"]:
            self.fail("subject_list", 'expected a list of [name, position], [name] or "name"')
        return Config(self.path, data, self.subject_entries(data), regions, colours)

    def check_value(self, key, value):
        """A key of a plain kind (text, integer, number, bool, choice) against the table."""
        if key.kind == "text":
            if not isinstance(value, str):
                self.fail(key.name, f"expected a string, got {value!r}")
            if not value.strip() and key.default != "":
                self.fail(key.name, f"expected a non-empty string, got {value!r}")
        elif key.kind == "integer":
            if (isinstance(value, bool) or not isinstance(value, int) or value < key.minimum
                    or (key.maximum is not None and value > key.maximum)):
                bound = f">= {key.minimum}" if key.maximum is None else f"from {key.minimum} to {key.maximum}"
                self.fail(key.name, f"expected an integer {bound}, got {value!r}")
        elif key.kind == "number":
            if not is_finite32(value):
                self.fail(key.name, f"expected a finite number (as a float32), got {value!r}")
            if key.minimum is not None and not key.minimum <= value <= key.maximum:
                self.fail(key.name, f"expected a number from {key.minimum} to {key.maximum}, got {value!r}")
        elif key.kind == "bool":
            if not isinstance(value, bool):
                self.fail(key.name, f"expected true or false, got {value!r}")
        elif key.kind == "choice" and value not in key.choices:
            self.fail(key.name, f"expected one of {', '.join(key.choices)}, got {value!r}")

    def painted_colours(self, data):
        """{color_context key: (r, g, b)} of a painted config, each entry [phrase, weight] checked."""
        if not isinstance(data["color_context"], dict) or not data["color_context"]:
            empty = " (it is empty)" if data["color_context"] in ({}, []) else ""
            self.fail("color_context", f'expected an object {{"r,g,b": [phrase, weight]}}{empty}')
        colours = {}
        for colour, entry in data["color_context"].items():
            colours[colour] = parse_colour(colour, lambda m: self.fail(f"color_context.{colour}", m))
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not is_finite32(entry[1])):
                self.fail(f"color_context.{colour}", f"expected [phrase, weight] with a finite weight, got {entry!r}")
            if not entry[0].strip():
                self.fail(f"color_context.{colour}", "the phrase is empty")
        return colours

    def subject_entries(self, data):
        """subject_list as ((name, position or None), ...); each subject once."""
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
        return tuple(entries)


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

@dataclass(frozen=True)
class Subject:
    name: str
    residual: object  # residual_utils.Residual
    position: int

    @property
    def rows(self):
        return list(range(self.position, self.position + self.residual.token_num))


@dataclass(frozen=True)
class Job:
    """One config resolved: what the sampler needs and the settings a run record keeps."""
    settings: dict  # every setting after defaults, as the run record keeps them
    prompt_ids: list  # [L]
    uncond_ids: list  # [L]
    masks: tuple | None  # (prompt, uncond) [L] each: 1 where the UNet may attend; None unless text_length "words"
    subjects: list  # [Subject]
    regions: list  # [(rgb, rows, w_active)], one per color_context entry, in its order
    layout: np.ndarray  # [H, W, 3] uint8 at the output size
    sampling: SamplingSettings


@dataclass(frozen=True)
class Text:
    """The prompt and the unconditional text as token ids at the config's text length L (B1)."""
    prompt: str
    ids: list  # [L]
    uncond_ids: list  # [L]
    num_tokens: int  # the prompt's tokens with BOS and EOS (its words are lead .. num_tokens - 2)
    num_uncond_tokens: int
    tokens: list  # [L] readable tokens of ids
    lead: int = 1  # the position of the first word: after CLIP's BOS; 0 for T5, which has none

    @property
    def length(self):
        return len(self.ids)

    @property
    def num_words(self):
        return self.num_tokens - self.lead - 1

    def find(self, seq):
        """Positions where the word ids `seq` occur among the prompt's BOS and words."""
        return find_sequence(self.ids[:self.num_tokens - 1], seq)

    def words(self):
        return " ".join(f"{i}:{t}" for i, t in enumerate(self.tokens[self.lead:self.lead + self.num_words], self.lead))


class Layout(NamedTuple):
    """A config's layout at the output size."""
    array: np.ndarray  # [H, W, 3] uint8
    color_context: dict  # {colour key: [phrase, weight]}
    path: Path | None  # the painted layout's file; None for boxes
    colours: dict  # {colour key: (r, g, b)}
    keys: dict | None  # boxes: the config key that names each colour in messages (regions[i]); None: painted


def prepare_job(config_path, tokenizer, embedding_dim, height, width, overrides, data=None, family="sd"):
    """Read, check and resolve one config; raises UserError before anything is generated.

    data: the config itself, when it does not come from the file `config_path` (a run record's).
    family: the model's ('sd' or 'sdxl'), which every residual must come from.
    """
    config = ConfigReader(config_path).read(data)
    data = config.data
    settings = job_settings(data, overrides, family)
    check_family_keys(config, data, overrides, family)
    text, residuals, subjects = placed_subjects(config, tokenizer, embedding_dim, family, settings)
    layout = job_layout(config, height, width)
    color_context = layout.color_context
    regions = layout_regions(config, tokenizer, text, subjects, layout)
    check_regions(config, regions, layout, data["weight_negative"])

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
    if layout.keys is None:  # a painted layout: its file; boxes: the regions, the layout is recorded when written
        settings.update(layout=str(layout.path))
        settings["file_sha256"]["layout"] = file_sha256(layout.path)
    else:
        settings.update(regions=config.regions)
    masks = None
    if settings["text_length"] == "words":
        masks = tuple(words_mask(n - 1, text.length) for n in (text.num_tokens, text.num_uncond_tokens))
    return Job(settings, text.ids, text.uncond_ids, masks, subjects, regions, layout.array,
               sampling_settings(settings))


def job_settings(data, overrides=None, family="sd"):
    """Every optional key's value: the command line's overrides (None: not given), else the config's, else the
    table's default (the family's own where it has one)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = overrides.get("preset", data.get("preset", KEY["preset"].default))
    if preset not in PRESETS:
        raise UserError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    preset = PRESETS[preset]
    defaults = {**{k: v for k, v in DEFAULTS.items() if family in KEY[k].families}, **FAMILY_DEFAULTS.get(family, {}),
                **preset}
    return {**defaults, **{k: data[k] for k in defaults if k in data}, **overrides}


def check_family_keys(config, data, overrides, family):
    """A key given for a model family it does not apply to (cfg_scale for FLUX, which has no unconditional
    branch; flux_guidance for SD) is an error, as is a choice the family cannot take."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    given.update({k: data[k] for k in DEFAULTS if k in data})
    for name, value in given.items():
        key = KEY[name]
        if family not in key.families and value != key.default:
            config.fail(name, f"applies to {' and '.join(FAMILY_NAMES[f] for f in key.families)} models only, and "
                              f"the model is {FAMILY_NAMES[family]}; leave it out")
        if value in FAMILY_REFUSED_CHOICES.get(family, {}).get(name, ()):
            config.fail(name, f"{value!r} is not for {FAMILY_NAMES[family]} models (its transformer takes no "
                              f"text mask); use one of {', '.join(c for c in key.choices if c != value)}")
    if family == "flux" and given.get("negative_prompt") and given.get("true_cfg_scale", 1.0) == 1.0:
        config.fail("negative_prompt", "a FLUX model has an unconditional branch only with true_cfg_scale above 1; "
                                       "set true_cfg_scale or leave negative_prompt out")


def placed_subjects(config, tokenizer, embedding_dim, family, settings):
    """(Text, {name: Residual}, [Subject]): the prompt tokenized at the settings' text length, the residuals
    read and checked against the model, each subject placed on its tokens (no two on one row)."""
    text = tokenize_text(config, tokenizer, config.data["prompt"], settings)
    residuals = load_residuals(config, config.data["residual_dict"], embedding_dim, family)
    for name, residual in residuals.items():
        check_text_length(config, name, residual, settings["text_length"])
    subjects = [place_subject(config, tokenizer, text, name, residuals, position)
                for name, position in config.subjects]
    taken = [row for s in subjects for row in s.rows]
    if len(taken) != len(set(taken)):
        config.fail("subject_list", f"two subjects share token rows: {[(s.name, s.rows) for s in subjects]}")
    return text, residuals, subjects


def check_text_length(config, name, residual, text_length):
    """A warning where the residual was trained with the UNet seeing other rows than this config gives it.

    The project's position, the seed's: residuals are trained at "max" (the UNet sees BOS, the words, EOS and
    padding) and sampled at "adaptive" (the prompt's own tokens): both show the UNet the words and an EOS, and
    the residual lives on the word rows, so the pair is meant. "words" (no EOS or padding at all) is its own
    regime, for models trained that way: a residual trained in one regime and sampled in the other is warned of.
    """
    trained = residual.text_length
    if trained is None or (trained == "words") == (text_length == "words"):
        return
    print(f"warning: {config.path}: residual_dict.{name}: trained with text_length '{trained}', sampled with "
          f"'{text_length}': the UNet sees other rows than in training (\"words\" goes with \"words\")",
          file=sys.stderr)


def tokenize_text(config, tokenizer, prompt, settings):
    """Token ids of the prompt and the negative prompt at the text length L of settings["text_length"]:
    the prompt's real token count ("adaptive"), the tokenizer's maximum ("max"), or BOS and the words ("words")."""
    num_tokens = checked_length(config, tokenizer, {"prompt": prompt}, "prompt")
    num_uncond = checked_length(config, tokenizer, {"negative_prompt": settings.get("negative_prompt", "")},
                                "negative_prompt")  # FLUX: used with true_cfg_scale above 1 only
    if settings["text_length"] == "max":
        length = tokenizer.model_max_length
    elif settings["text_length"] == "words":  # BOS and the words: no EOS
        length = max(num_tokens, num_uncond) - 1
    else:
        length = max(num_tokens, num_uncond)
    # padded to at least the full length, then cut: "words" drops EOS (the tokenizer's own cut would drop a word)
    ids = token_ids(tokenizer, prompt, max(length, num_tokens))[:length]
    uncond_ids = token_ids(tokenizer, settings.get("negative_prompt", ""), max(length, num_uncond))[:length]
    return Text(prompt, ids, uncond_ids, num_tokens, num_uncond, token_texts(tokenizer, ids),
                leading_specials(tokenizer))


def load_residuals(config, residual_dict, embedding_dim, family):
    """{name: Residual} of residual_dict; each must come from the model's family and have its text width."""
    residuals = {}
    for name, file in residual_dict.items():
        try:
            residual = load_residual(config.resolve_path(f"residual_dict.{name}", file))
        except UserError as e:
            if str(e).startswith(str(config.path)):  # already names the config and the key
                raise
            config.fail(f"residual_dict.{name}", str(e))
        if residual.family != family:
            config.fail(f"residual_dict.{name}", f"{residual.path} was trained on {FAMILY_NAMES[residual.family]}, but "
                        f"the model is {FAMILY_NAMES[family]} (a residual is tied to its base model's family)")
        if residual.embedding_dim != embedding_dim:
            config.fail(f"residual_dict.{name}", f"{residual.path} holds {residual.embedding_dim}-d rows, but the "
                        f"model's text encoder is {embedding_dim}-d (a residual is tied to its base model)")
        residuals[name] = residual
    return residuals


def place_subject(config, tokenizer, text, name, residuals, position):
    """The Subject `name` at `position`, or (None) where its residual's class phrase occurs once in the prompt;
    a position that is not on the phrase the residual was learned for is an error."""
    if name not in residuals:
        config.fail("subject_list", f"subject '{name}' has no entry in residual_dict (it has: {', '.join(residuals)})")
    residual = residuals[name]
    phrase = residual.class_phrase
    seq = word_ids(tokenizer, phrase) if phrase else None
    if position is None:
        if not phrase:
            config.fail("subject_list", f"'{name}': {residual.path} records no class_phrase, so its position "
                        f"cannot be found; write it as [\"{name}\", position]")
        found = text.find(seq)
        if len(found) != 1:
            where = ", ".join(f"{p} '{text.tokens[p]}'" for p in found) or "none"
            config.fail("subject_list", f"'{name}': its class phrase '{phrase}' must occur once in the prompt "
                        f"to place it; positions found: {where}. Write it as [\"{name}\", position]")
        position = found[0]
    first, last = text.lead, text.lead + text.num_words - 1
    if not first <= position <= last or position + residual.token_num > text.length:
        config.fail("subject_list", f"'{name}': position {position} is outside the prompt's words "
                    f"({first}..{last}: {text.words()})")
    if phrase and text.ids[position:position + len(seq)] != seq:
        config.fail("subject_list", f"'{name}' at position {position} is '{text.tokens[position]}', but its "
                    f"residual was learned for '{phrase}' (found at positions {text.find(seq) or 'none'})")
    if not phrase and text.tokens[position].lower() not in name.lower():
        print(f"warning: {config.path}: subject_list: '{name}' sits on '{text.tokens[position]}' (position "
              f"{position}), which is not part of its name; check the position", file=sys.stderr)
    return Subject(name, residual, position)


def job_layout(config, height, width):
    """The config's Layout at the output size.

    Boxes are rendered at the output size (exact there) into the layout and color_context a painted config
    would give, so the sampler sees the same weight map; the layout file is then None and each colour's
    mistakes are reported under the `regions[i]` of its phrase's first box.
    """
    if config.regions is None:
        path = config.resolve_path("layout", config.data["layout"])
        try:
            array = read_layout(path, width, height)  # nearest: a label map must keep its exact colours
        except UserError as e:
            config.fail("layout", str(e))
        return Layout(array, dict(config.data["color_context"]), path, config.colours, None)
    array = render_regions(config.regions, height, width, config.fail)
    color_context = regions_color_context(config.regions)
    colours = {colour: parse_colour(colour, config.fail) for colour in color_context}
    first_box = {}
    for i, region in enumerate(config.regions):
        first_box.setdefault(region["phrase"], f"regions[{i}]")
    keys = {colour: first_box[phrase] for colour, (phrase, _) in color_context.items()}
    return Layout(array, color_context, None, colours, keys)


def layout_regions(config, tokenizer, text, subjects, layout):
    """[(rgb, token rows, w_active)] of the layout's color_context (B2): a subject name guides exactly that
    subject's rows, any other phrase every occurrence of its tokens in the prompt. Each colour must occur in the
    layout."""
    by_name = {s.name: s for s in subjects}
    regions = []
    for colour, (phrase, w_active) in layout.color_context.items():
        key = layout.keys[colour] if layout.keys else f"color_context.{colour}"
        rgb = layout.colours[colour]
        if phrase in by_name:
            rows = by_name[phrase].rows
        else:
            seq = word_ids(tokenizer, phrase)
            matches = text.find(seq)
            if not seq or not matches:
                config.fail(key, f"phrase '{phrase}' does not occur in the prompt '{text.prompt}' (nor is it a "
                            f"subject name)")
            rows = [m + j for m in matches for j in range(len(seq))]
        if not colour_mask(layout.array, rgb).any():
            jpeg = Path(layout.path or "").suffix.lower() in (".jpg", ".jpeg")
            hint = "; JPEG changes colours, save the layout as PNG" if jpeg else ""
            config.fail(key, f"colour {rgb} does not occur in the layout {layout.path} at "
                        f"{layout.array.shape[1]}x{layout.array.shape[0]} (its colours: "
                        f"{_layout_colours(layout.array)}){hint}")
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
        layout[colour_mask(layout, rgb)] = into
    return layout, joined


def check_regions(config, regions, layout, weight_negative):
    """Before sampling: the colours that guide the same token rows share one weight (they are one region), and
    no row is pushed to weight_negative on every pixel (listed by regions that do not overlap: the subject
    would be suppressed everywhere). regions: layout_regions' of the Layout `layout`."""
    colours = list(layout.color_context)
    key_of = (lambda colour: layout.keys[colour]) if layout.keys else (lambda colour: f"color_context.{colour}")
    first = {}
    for colour, (rgb, rows, w_active) in zip(colours, regions):
        other, weight = first.setdefault(tuple(rows), (colour, w_active))
        if w_active != weight:
            config.fail(key_of(colour), f"weight {w_active}, but {key_of(other)} guides the same tokens with weight "
                                        f"{weight}: the colours of one subject are one region with one weight")
    if not weight_negative < 0:  # nothing is suppressed
        return
    array, joined = joined_regions(layout.array, regions)
    masks = [colour_mask(array, rgb) for rgb, _, _ in joined]
    for row in sorted({row for _, rows, _ in joined for row in rows}):
        listing = [i for i, (_, rows, _) in enumerate(joined) if row in rows]
        allowed = np.logical_and.reduce([masks[i] for i in listing])
        if not allowed.any():
            names = [key_of(colours[[r[0] for r in regions].index(joined[i][0])]) for i in listing]
            config.fail(names[-1], f"token {row} is also guided by {', '.join(names[:-1])}, and their regions do "
                                   f"not overlap: it would be suppressed (weight_negative) on every pixel")


def checked_length(config, tokenizer, data, key):
    """The token count of text data[key], BOS and EOS included; more than the text encoder takes is an error
    (the tokenizer would cut the end of the prompt silently). A text too long to be that short in tokens is
    refused before it is tokenized (tokenizing megabytes takes seconds)."""
    if len(data[key]) > MAX_TEXT_CHARACTERS:
        config.fail(key, f"{len(data[key])} characters, far more than the text encoder's {tokenizer.model_max_length} "
                         f"tokens; shorten it")
    count = token_count(tokenizer, data[key])
    if count > tokenizer.model_max_length:
        config.fail(key, f"{count} tokens ({specials_note(tokenizer)}), more than the text encoder's "
                         f"{tokenizer.model_max_length}; shorten it")
    return count



def _layout_colours(layout, limit=8):
    colours, counts = np.unique(layout.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts)[:limit]
    return ", ".join(",".join(str(int(c)) for c in colours[i]) for i in order)


