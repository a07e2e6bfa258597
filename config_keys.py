"""Every key of the JSON config in one table: its kind, default, allowed values and one line of meaning.

    python config_keys.py        # prints the README's table of keys

From this table come the config's checks (config.py), the defaults every run record holds, the README's table
(tests/test_config.py checks that it is this script's output), the editor's controls for the optional keys
(app.py) and the sampler's settings: `SamplingSettings` has one field per key marked `sampling`, so a new key
of the sampler is added here and where the sampler uses it, nowhere else. `naive` says whether the naive
reference sampler (naive_sampler.py) computes the key; it refuses any other key at a value other than its
default. No torch here: the table is read by the numpy-only modules too.
"""
import dataclasses

REQUIRED = object()  # the default of a key every config must give


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    kind: str  # text, integer, number, bool, choice, or structure (checked by config.py's own functions)
    meaning: str
    default: object = REQUIRED
    choices: tuple = ()
    minimum: float = None  # integers: the smallest and largest allowed
    maximum: float = None
    sampling: bool = False  # a field of SamplingSettings
    naive: bool = True  # the naive reference sampler computes it
    off: object = None  # a required sampling key's value that does nothing (the sampler's default)
    painted: bool = False  # part of a painted layout (layout + color_context), which regions (boxes) replace
    editor: bool = False  # the editor shows a control for it among its further settings
    families: tuple = ("sd", "sdxl", "flux")  # the model families it applies to; giving it for another is an error

    @property
    def required(self):
        return self.default is REQUIRED


MAX_STEPS = 1000  # sampling steps: Stable Diffusion's schedule has 1000 timesteps
def _json(value):
    import json

    return json.dumps(value)


# The key `preset` switches several variants at once: the values it gives are the defaults of those keys, and a
# key given in the config or on the command line still wins. `separated` is the setting the toy world measured
# best for two subjects (toy/RESULTS.md); for three and four it is not yet established.
PRESETS = {
    "faithful": {},
    "separated": {"region_self_attention": True, "residual_guidance": 3.0, "residual_guidance_in_region": True},
}

KEYS = (
    # The seed's keys: all required (layout and color_context unless regions give the layout as boxes)
    Key("prompt", "text", "the text; name each subject by its class word (`dog`, `cat`, `pet cat`)"),
    Key("residual_dict", "structure", "subject name -> residual file (`.safetensors` from `train.py`, or the "
        "seed's `.pt`)"),
    Key("color_context", "structure", "layout colour (`\"r,g,b\"` or `\"#rrggbb\"`) -> `[phrase, weight]`: the "
        "tokens of `phrase` are strengthened by `weight` (2.5) inside that colour and suppressed (`weight_negative`) "
        "outside it. The phrase may also be a subject name from `subject_list` (`[\"<dog6>\", 2.5]`): the guidance "
        "then goes to exactly that subject's tokens, which separates two subjects of one class. Several colours of "
        "one phrase are one region", painted=True),
    Key("guidance_steps", "integer", "how many of the first sampling steps are layout-guided (and self-recurrent)",
        minimum=0, sampling=True, off=0),
    Key("guidance_weight", "number", "strength of the layout guidance (0.08; 0.05-0.10 works)", sampling=True,
        off=0.0),
    Key("weight_negative", "number", "the weight outside a subject's region (-1e8)"),
    Key("layout", "text", "the colour layout image (any size and mode; resized to the output with "
        "nearest-neighbour)", painted=True),
    Key("subject_list", "structure", "`[name, position]`: the residual is added at that token position of the "
        "prompt (BOS is 0). Write just `\"name\"` or `[name]` to place it where its residual's class phrase occurs "
        "in the prompt"),
    Key("regions", "structure", "instead of `layout` and `color_context`: boxes `[{\"phrase\", \"box\": [left, top, "
        "right, bottom], \"weight\"}]` as fractions of the image (see Three ways to give a layout)", default=None),
    # Optional keys; the command line wins over them
    Key("cfg_scale", "number", "classifier-free guidance scale s (SD, SDXL)", 7.5, sampling=True, editor=True,
        families=("sd", "sdxl")),
    Key("cfg_schedule", "choice", "`sigma`: the scale grows with the noise level, `s * (1 + sigma/sigma_max)` (the "
        "seed); `constant`: Cones 2 (SD, SDXL)", "sigma", ("sigma", "constant"), sampling=True, editor=True,
        families=("sd", "sdxl")),
    Key("flux_guidance", "number", "FLUX.1-dev's distilled guidance value, an input of its transformer (FLUX only; "
        "schnell has none)", 3.5, minimum=0.0, maximum=100.0, sampling=True, editor=True,
        families=("flux",)),
    Key("true_cfg_scale", "number", "FLUX only: classifier-free guidance with a real unconditional branch (the "
        "`negative_prompt`, default `\"\"`), as FluxPipeline's `true_cfg_scale`: `v_u + s (v_c - v_u)`; 1: none. "
        "Above 1 it doubles the sampling work; for a FLUX trained with dropped captions (the toy FLUX)", 1.0,
        minimum=1.0, maximum=100.0, sampling=True, naive=False, editor=True, families=("flux",)),
    Key("text_length", "choice", "`adaptive`: the prompt's own tokens (the seed); `max`: padded to 77 (Cones 2), "
        "to 512 for FLUX (its default, as its pipeline); `words`: BOS and the words, EOS and padding hidden from "
        "the UNet (models trained that way: the toy world's; not FLUX)",
        "adaptive", ("adaptive", "max", "words"), naive=False, editor=True),
    Key("num_inference_steps", "integer", "sampling steps", 50, minimum=1, maximum=MAX_STEPS, sampling=True),
    Key("negative_prompt", "text", "replaces `\"\"` in the unconditional branch (SD, SDXL; FLUX with "
        "`true_cfg_scale` above 1)", "", editor=True),
    Key("save_attention", "bool", "also write `attention/{seed}.npz` and `.png`: where each subject's tokens "
        "were attended (as `--save_attention`)", False),
    # Variants of the method (docs/METHOD.md E), off by default: at their defaults the images are the faithful
    # method's, bit for bit; the toy world measures them (toy/RESULTS.md)
    Key("region_self_attention", "bool", "variant: during guided steps no subject's region attends another's in "
        "self-attention", False, naive=False, editor=True),
    Key("residual_scale", "number", "variant: each residual is added times this", 1.0, editor=True),
    Key("guidance_schedule", "choice", "variant: `sigma` (B3); `constant` keeps the first step's bias strength",
        "sigma", ("sigma", "constant"), sampling=True, naive=False, editor=True),
    Key("residual_guidance", "number", "variant: a third branch without the residuals, and each step pushed this "
        "much further along what the residuals change (1.5 times the sampling work)", 0.0, sampling=True,
        naive=False, editor=True),
    Key("residual_guidance_in_region", "bool", "variant: `residual_guidance` only inside the subjects' regions (a "
        "latent cell by its share of them) and on guided steps: the background, other phrases' regions and a lone "
        "unguided subject get no push",
        False, sampling=True, naive=False, editor=True),
    Key("preset", "choice", "one switch for several variants: `faithful` (Cones 2 as published) or `separated` ("
        + ", ".join(f"`{k}` {_json(v)}" for k, v in PRESETS["separated"].items()) + "; each still settable on its "
        "own): subjects kept apart; in the toy world two subjects are placed right in 0.875 of samples against 0.58 "
        "and look-alike pairs in 0.88 against 0.11, at about three times the sampling time; for three or more "
        "subjects set `residual_guidance` 1 beside it (four subjects placed right 0.38 against 0.00 at 3 and "
        "0.41 faithful; toy/RESULTS.md)",
        "faithful", tuple(PRESETS), naive=False, editor=True),
)
KEY = {key.name: key for key in KEYS}
DEFAULTS = {key.name: key.default for key in KEYS if not key.required and key.default is not None}
# Where a family's own pipeline differs: FLUX was trained on T5 states padded to 512 tokens without a mask
FAMILY_DEFAULTS = {"flux": {"text_length": "max"}}
FAMILY_REFUSED_CHOICES = {"flux": {"text_length": ("words",)}}  # its transformer takes no text mask

SamplingSettings = dataclasses.make_dataclass(
    "SamplingSettings",
    [(key.name, type(key.off if key.required else key.default), key.off if key.required else key.default)
     for key in KEYS if key.sampling],
    frozen=True, namespace={"__doc__": "The sampler's settings, one field per `sampling` key of KEYS; built once "
                                       "per job (SamplingSettings.of) and passed whole, as k-diffusion passes "
                                       "extra_args. The defaults sample without layout guidance."})


def sampling_settings(settings):
    """The SamplingSettings of a job's settings {key: value}; a key of another model family keeps its default."""
    return SamplingSettings(**{field.name: settings[field.name] for field in dataclasses.fields(SamplingSettings)
                               if field.name in settings})


def markdown_table():
    """The README's table of keys."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key in KEYS:
        default = "required" if key.required else "-" if key.default is None else f"`{_json(key.default)}`"
        if key.painted:
            default = "required (or `regions`)"
        choices = f" (one of {', '.join(f'`{c}`' for c in key.choices)})" if key.choices else ""
        lines.append(f"| `{key.name}` | {default} | {key.meaning}{choices} |")
    return "\n".join(lines)



if __name__ == "__main__":
    print(markdown_table())
