"""Does the method work? Concept fidelity, composition and layout in the toy world, through the project's code.

    python toy/measure.py --quick                           # 8 seeds, the main cells only, into toy/runs/
    python toy/measure.py --quick --only_many               # 8 seeds, the many-subjects cells only (toy/many.py)
    python toy/measure.py --seeds 32 --out toy/results       # the committed figures: faithful and best setting
    python toy/measure.py --seeds 32 --sweep --out toy/results --results_md toy/RESULTS.md   # + the sweep, the report
    python toy/measure.py --base toy/base_flux --seeds 32 --out toy/results   # the toy FLUX (toy/build_flux.py)
    python toy/measure.py --base toy/base_flux --quick                          # 8 seeds, for trying a change

With toy/base_model (toy/build_base.py):
1. `train.py` learns a residual for four concepts named by generic nouns ("circle" = a blue circle,
   "square" = a yellow square, "triangle" = a blue triangle, and "circle" = a yellow circle), five images each;
2. inference.py's own main() samples the cells below (one call per cell, all its configs on one model load,
   each config's seeds in one batch), and toy/analyze.py reads the images back:
   - concept fidelity: how often "a {shape}" comes out in the concept's colour, with the residual and without
     it (a zero residual; chance is 1/6), and whether the shape is still the class;
   - composition: "a {shape1} and a {shape2}" with two residuals and a left/right layout, with layout guidance
     and without: both colours present, each object in its half, leakage (an object with one concept's
     shape and the other's colour, split by where it is: by shape in the half of the concept whose colour it
     wears, by colour in the other), why each failed sample failed (FAILURES), and from the attention maps (save_attention)
     the share of each concept's attention inside its half;
   - ablations: sigma vs constant CFG, text length "adaptive" and "max", the residual on the wrong token (a
     negative control), and as an upper bound the specific noun's embedding put in the generic noun's place.
   Every figure is measured twice: with the faithful method (today's keys of results.json) and with BEST, the
   best setting the sweep found (results.json "best", with its "setting"; the many-subjects cells use
   BEST_MANY and record it beside their figures). The residuals are trained once: BEST changes only sampling.
3. --sweep: composition under each setting of SWEEP (the method's knobs, residual training and the variants of
   docs/METHOD.md E), and with the specific nouns in the prompt (no residual) as the base model's upper bound.
4. --base MODEL: a model of the richer world instead, the toy FLUX (toy/base_flux) or toy/base_many, measured in
   that world alone (toy/many.py): per concept of toy/many.py "a {noun}" with its residual, without it and on the
   wrong token (faithful and BEST_MANY), the groups of N = 2, 3, 4 and the look-alike pairs (faithful, BEST_MANY,
   the model's own nouns, and unguided), and with --sweep BASE_SWEEP on every group. The figures keep the keys
   above (the two-subject ones from the N = 2 group) under results.json[model folder name]; the rest of results.json
   stays. A toy FLUX is sampled without CFG (it has no unconditional branch) at text length "max".
Writes results.json, examples.png and the runs behind them to --out (default toy/runs/, untracked: the committed
figures in toy/results/ change only when --out names that folder), nothing elsewhere. A run without --sweep into a
folder whose results.json holds a sweep of as many seeds keeps that sweep, with the date it was measured. With
--results_md, also the tables of a report such as toy/RESULTS.md (its hand-written analysis below the tables is
kept). A progress bar shows the training and the sampling. Residuals trained by an earlier run into the same --out
are reused when the settings recorded beside them match (model weights, the concept's images, the training flags);
--retrain trains them again.
"""
import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

TOY = Path(__file__).resolve().parent
ROOT = TOY.parent
sys.path.insert(0, str(ROOT))  # the project's modules; toy/ itself is on the path as the script's folder
from analyze import objects  # noqa: E402
from evaluate import fmt  # noqa: E402
from region_utils import ATTENTION_FOLDER, mass_inside, read_attention  # noqa: E402
from residual_utils import load_residual  # noqa: E402
from world import NOUNS, Shape, render  # noqa: E402
from many import (goal_lines as many_goal_lines, measure_many, report_lines as many_report_lines,  # noqa: E402
                  sweep_lines as many_sweep_lines, write_examples as write_many_examples)

BASE_MODEL = TOY / "base_model"
DEFAULT_OUT = TOY / "runs"  # untracked: a default run never touches the committed figures in toy/results
# Colours the base model draws reliably from their specific nouns ("berry", "butter", "ocean", "lemon": 8 of 8),
# and that the generic nouns rarely take by themselves (those lean to red and green).
CONCEPTS = {  # name: (generic noun, shape, colour)
    "blue_circle": ("circle", "circle", "blue"),
    "yellow_square": ("square", "square", "yellow"),
    "blue_triangle": ("triangle", "triangle", "blue"),
    "yellow_circle": ("circle", "circle", "yellow"),
}
PAIRS = [("blue_circle", "yellow_square"), ("yellow_square", "blue_triangle"),
         ("blue_triangle", "yellow_circle"), ("yellow_circle", "blue_circle")]
# Sampling that suits the toy: CFG 3 (7.5, doubled early by the sigma schedule, over-saturates it).
SAMPLING = {"cfg_scale": 3.0, "cfg_schedule": "constant", "text_length": "words", "num_inference_steps": 30}
GUIDANCE = {"guidance_weight": 0.08, "weight_negative": -1e8}  # guidance_steps: all steps, or 0 unguided
TRAINING = ["--resolution", "64", "--max_train_steps", "300", "--learning_rate", "1e-3", "--text_length", "words",
            "--num_validation_images", "0", "--checkpointing_steps", "0", "--seed", "0"]
# The best setting (toy/RESULTS.md): config keys on top of the faithful ones, training flags. The preset
# "separated" (config_keys.PRESETS): of the sweep's settings that reach the layout goal (>= 0.85) the one with the
# least leakage, E4 + E3 3, with E3's push confined to the subjects' regions on guided steps (E5), so that a lone
# subject sampled without a layout and the wrong-token control are sampled as by the faithful method.
BEST = {"config": {"preset": "separated"}, "training": {}}
# The many-subjects cells' best setting: the preset with a weaker push. On toy/base_many residual guidance 3 empties
# places of four subjects (0.62 of samples) and bends the shapes of three; at 1 it keeps most of the look-alike gain
# (toy/RESULTS.md). A lone subject is sampled as under BEST (E5), so the single-subject goals hold for both.
BEST_MANY = {"config": {"preset": "separated", "residual_guidance": 1.0}, "training": {}}
E4_E3 = {"region_self_attention": True, "residual_guidance": 3.0}
# The sweep of a --base run (toy/many.py sweep_groups): the method's knobs and variants on every group.
BASE_SWEEP = [
    ("faithful", {}),
    ("guidance_weight 0 (self-recurrence only)", {"guidance_weight": 0.0}),
    ("guidance_weight 0.04", {"guidance_weight": 0.04}),
    ("guidance_weight 0.2", {"guidance_weight": 0.2}),
    ("guidance_weight 0.5", {"guidance_weight": 0.5}),
    ("weight_negative -1 (a soft negative)", {"weight_negative": -1.0}),
    ("guidance_steps 10", {"guidance_steps": 10}),
    ("E1 guidance_schedule constant", {"guidance_schedule": "constant"}),
    ("E2 residual_scale 2", {"residual_scale": 2.0}),
    ("E4 region_self_attention", {"region_self_attention": True}),
    ("E4 + E3 residual_guidance 1", {"region_self_attention": True, "residual_guidance": 1.0}),
    ("E4 + E3 residual_guidance 3", E4_E3),
    ("E4 + E3 1 + E5 (BEST_MANY)", BEST_MANY["config"]),
    ("E4 + E3 3 + E5 (preset separated)", BEST["config"]),
]
# The sweep: (label, config keys, training flags); all cells guided unless the keys say otherwise.
SWEEP = [
    ("faithful", {}, {}),
    ("guidance_weight 0 (self-recurrence only)", {"guidance_weight": 0.0}, {}),
    ("guidance_weight 0.04", {"guidance_weight": 0.04}, {}),
    ("guidance_weight 0.2", {"guidance_weight": 0.2}, {}),
    ("weight_negative -1", {"weight_negative": -1.0}, {}),
    ("weight_negative -5", {"weight_negative": -5.0}, {}),
    ("guidance_steps 10", {"guidance_steps": 10}, {}),
    ("guidance_steps 15", {"guidance_steps": 15}, {}),
    ("cfg_scale 5", {"cfg_scale": 5.0}, {}),
    ("cfg_scale 7.5", {"cfg_scale": 7.5}, {}),
    ("cfg_schedule sigma", {"cfg_schedule": "sigma"}, {}),
    ("50 steps, all guided", {"num_inference_steps": 50, "guidance_steps": 50}, {}),
    ("text_length adaptive", {"text_length": "adaptive"}, {}),
    ("training 150 steps", {}, {"--max_train_steps": "150"}),
    ("training lr 3e-3", {}, {"--learning_rate": "3e-3"}),
    ("E1 guidance_schedule constant", {"guidance_schedule": "constant"}, {}),
    ("E2 residual_scale 1.5", {"residual_scale": 1.5}, {}),
    ("E2 residual_scale 2", {"residual_scale": 2.0}, {}),
    ("E3 residual_guidance 2", {"residual_guidance": 2.0}, {}),
    ("E4 region_self_attention", {"region_self_attention": True}, {}),
    ("E4 + E2 residual_scale 1.75", {"region_self_attention": True, "residual_scale": 1.75}, {}),
    ("E4 + E3 residual_guidance 1", {"region_self_attention": True, "residual_guidance": 1.0}, {}),
    ("E4 + E3 residual_guidance 2", {"region_self_attention": True, "residual_guidance": 2.0}, {}),
    ("E4 + E3 residual_guidance 3", E4_E3, {}),
    ("E4 + E3 3 + E5 (best: preset separated)", BEST["config"], BEST["training"]),
    ("E4 + E3 residual_guidance 4", {"region_self_attention": True, "residual_guidance": 4.0}, {}),
    ("E4 + E3 2 + E2 residual_scale 1.25", {"region_self_attention": True, "residual_guidance": 2.0,
                                            "residual_scale": 1.25}, {}),
    ("E4 + E3 2, cfg_scale 2", {"region_self_attention": True, "residual_guidance": 2.0, "cfg_scale": 2.0}, {}),
    ("E4 + E3 3, cfg_scale 2", {"region_self_attention": True, "residual_guidance": 3.0, "cfg_scale": 2.0}, {}),
    ("E4 + E3 3, training lr 3e-3", E4_E3, {"--learning_rate": "3e-3"}),
]
# The base model's own ceiling: the specific nouns ("a berry and a butter") in the prompt, no residual.
NOUN_SWEEP = [("nouns, unguided", {"guidance_steps": 0}), ("nouns, faithful", {}),
              ("nouns, weight_negative -1", {"weight_negative": -1.0}),
              ("nouns, E4 region_self_attention", {"region_self_attention": True})]
# Why a composed sample failed, in this order: the first that applies.
FAILURES = ("ok", "missing", "misplaced", "wrong_colour")
LEFT, RIGHT = "255,0,0", "0,255,0"


# ------------------------------------------------------------------------------------------------
# Concepts and residuals

def concept_images(folder, shape, colour, count=5, seed=0):
    """Five photos of one concept: one object, varied in place and size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        obj = Shape(shape, colour, rng.uniform(24, 40), rng.uniform(24, 40), rng.uniform(10, 15))
        Image.fromarray(render([obj])).save(folder / f"{i}.png")
    return folder


def training_flags(changes):
    """TRAINING with the flags of `changes` ({flag: value}) replaced."""
    args = list(TRAINING)
    for flag, value in changes.items():
        args[args.index(flag) + 1] = str(value)
    return args


def train_concept(out, name, model=BASE_MODEL, changes=None, retrain=False):
    """train.py on the concept's five images, in a process of its own, as users run it; the residual's path.
    A residual whose recorded settings (SETTINGS_FILE beside it) equal this call's is reused unless `retrain`."""
    noun, shape, colour = CONCEPTS[name]
    data = concept_images(out / "concepts" / name, shape, colour)
    folder = out / "residuals" / training_label(changes) / name
    return trained_residual(folder, data, noun, model, training_flags(changes or {}), retrain)


def trained_residual(folder, data, noun, model, flags, retrain=False):
    """train.py on the photos in `data` for the instance prompt `noun` into `folder`, unless a residual trained
    there from the same model, photos and flags is reused; the residual's path."""
    name = folder.name
    settings = {"model_sha256": folder_sha256(model), "images_sha256": folder_sha256(data),
                "instance_prompt": noun, "flags": flags}
    residual, record = folder / "residual.safetensors", folder / SETTINGS_FILE
    if not retrain and residual.is_file() and record.is_file() and json.loads(record.read_text()) == settings:
        return residual
    record.unlink(missing_ok=True)  # a run stopped mid-training leaves no record that matches
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "train.py", "--pretrained_model_name_or_path", str(model),
                           "--instance_data_dir", str(data), "--instance_prompt", noun, "--output_dir", str(folder),
                           *flags], cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed for {name}:\n{done.stderr[-3000:]}")
    record.write_text(json.dumps(settings, indent=2) + "\n")
    return residual


SETTINGS_FILE = "measure_settings.json"  # beside each residual: what it was trained from, to reuse it


def folder_sha256(folder):
    """One sha256 over the names and contents of every file under `folder` (a model's weights, a concept's images)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def training_label(changes):
    return "default" if not changes else "_".join(f"{k.strip('-')}{v}" for k, v in sorted(changes.items()))


def fixed_residual(path, tensor, noun):
    from residual_utils import save_residual

    path.parent.mkdir(parents=True, exist_ok=True)
    save_residual(path, tensor, {"class_phrase": noun, "base_model": str(BASE_MODEL)})
    return path


def unlabelled_residual(path, tensor, family="sd"):
    """A residual file without a class phrase, which inference lets sit on any token: a plain tensor (.pt) for
    Stable Diffusion; for another family safetensors recording only the family (a plain tensor reads as SD's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if family == "sd":
        torch.save(tensor, path)
        return path
    from safetensors.torch import save_file

    path = path.with_suffix(".safetensors")
    save_file({"residual": tensor.float().contiguous()}, str(path), metadata={"family": family})
    return path


def noun_swap_residual(out, name, model=BASE_MODEL):
    """E0("a {specific noun}") - E0("a {generic noun}") at the noun: the residual of a perfect swap."""
    from pipeline_utils import load_model
    from text_utils import encode_ids, token_ids

    noun, shape, colour = CONCEPTS[name]
    sd = load_model(str(model), torch.device("cpu"), torch.float32)
    specific = encode_ids(sd.text_encoder, token_ids(sd.tokenizer, f"a {NOUNS[shape][colour]}"))[0, 2]
    generic = encode_ids(sd.text_encoder, token_ids(sd.tokenizer, f"a {noun}"))[0, 2]
    return fixed_residual(out / "residuals" / "swap" / f"{name}.safetensors", (specific - generic)[None], noun)


# ------------------------------------------------------------------------------------------------
# Sampling: inference.py's main() on every config of a cell

def full_layout(out):
    return solid_layout(out / "layouts" / "full.png", 64)


def halves_layout(out):
    return solid_layout(out / "layouts" / "halves.png", 32)


def solid_layout(path, split):
    """A 64 x 64 layout: red left of column `split`, green from it on (all red for split 64)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.zeros((64, 64, 3), dtype=np.uint8)
        array[:, :split] = (255, 0, 0)
        array[:, split:] = (0, 255, 0)
        Image.fromarray(array).save(path)
    return path


def sample(out, cell, configs, seeds, model=BASE_MODEL, resolution=64):
    """Run inference.py's main() once on `configs` ({key: config}); returns {key: (images [S, 64, 64, 3], attention
    maps [{name: [64, 64]}] or None)}. Its messages go to out/logs/{cell}.log."""
    import inference

    paths = []
    for key, config in configs.items():
        paths.append(out / "configs" / cell / f"{key}.json")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_text(json.dumps([config]))
    args = ["--pretrained_model_name_or_path", str(model), "--inference_config", *map(str, paths),
            "--output_dir", str(out / "images" / cell), "--num_images", str(seeds), "--batch_size", str(seeds),
            "--seed", "1000", "--resolution", str(resolution), "--device", "cpu", "--overwrite"]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{cell}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        folders = inference.main(inference.parse_args(args))
    results = {}
    for key, folder in zip(configs, folders):
        images = np.stack([np.array(Image.open(folder / f"{1000 + j}.png")) for j in range(seeds)])
        maps = None
        if configs[key].get("save_attention"):
            maps = [read_attention(folder / ATTENTION_FOLDER / f"{1000 + j}.npz") for j in range(seeds)]
        results[key] = (images, maps)
    return results


def subject(name):
    return f"<{name}>"


def fidelity_config(out, name, residual, position=2, **keys):
    noun = CONCEPTS[name][0]
    return {"prompt": f"a {noun}", "residual_dict": {subject(name): str(residual)},
            "color_context": {LEFT: [noun, 2.5]}, "guidance_steps": 0, **GUIDANCE, "layout": str(full_layout(out)),
            "subject_list": [[subject(name), position]], **SAMPLING, **keys}


def composition_config(out, pair, residuals, guided=True, nouns=None, **keys):
    """nouns: the two words of the prompt (default the concepts' generic nouns)."""
    first, second = nouns or (CONCEPTS[pair[0]][0], CONCEPTS[pair[1]][0])
    a, b = subject(pair[0]), subject(pair[1])
    return {"prompt": f"a {first} and a {second}", "residual_dict": {a: str(residuals[pair[0]]), b: str(residuals[pair[1]])},
            "color_context": {LEFT: [a, 2.5], RIGHT: [b, 2.5]},
            "guidance_steps": SAMPLING["num_inference_steps"] if guided else 0, **GUIDANCE,
            "layout": str(halves_layout(out)), "subject_list": [[a, 2], [b, 5]], "save_attention": True,
            **SAMPLING, **keys}


def fidelity_cells(out, cell, residuals, seeds, position=2, names=tuple(CONCEPTS), **keys):
    """{concept: {fidelity, class_kept, examples}} of one cell: each concept's "a {noun}" with its residual."""
    configs = {name: fidelity_config(out, name, residuals[name], position, **keys) for name in names}
    return {name: score_fidelity(name, images) for name, (images, _) in sample(out, cell, configs, seeds).items()}


def score_fidelity(name, images):
    _, shape, colour = CONCEPTS[name]
    found = [objects(image) for image in images]
    return {"fidelity": float(np.mean([bool(f) and f[0]["colour"] == colour for f in found])),
            "class_kept": float(np.mean([bool(f) and f[0]["shape"] == shape for f in found])),
            "examples": images[:4]}


def composition_cells(out, cell, residuals, seeds, guided=True, nouns=False, pairs=tuple(PAIRS), **keys):
    """{"a+b": scores} of one cell: every pair composed with its two residuals on the halves layout.
    nouns: the specific nouns in the prompt instead of the generic ones (residuals then are zeros)."""
    configs = {}
    for pair in pairs:
        words = (specific_noun(pair[0]), specific_noun(pair[1])) if nouns else None
        configs["+".join(pair)] = composition_config(out, pair, residuals, guided, words, **keys)
    results = sample(out, cell, configs, seeds)
    return {key: score_composition(tuple(key.split("+")), *results[key]) for key in configs}


def specific_noun(name):
    _, shape, colour = CONCEPTS[name]
    return NOUNS[shape][colour]


def failure_kind(found, pair):
    """FAILURES: why one composed image (its objects) is not right; "ok" when each concept's colour is in its half."""
    (_, _, colour1), (_, _, colour2) = CONCEPTS[pair[0]], CONCEPTS[pair[1]]
    first = [o for o in found if o["colour"] == colour1]
    second = [o for o in found if o["colour"] == colour2]
    if first and second and first[0]["cx"] < 32 <= second[0]["cx"]:
        return "ok"
    if not any(o["cx"] < 32 for o in found) or not any(o["cx"] >= 32 for o in found):
        return "missing"  # a half holds no object
    if first and second:
        return "misplaced"  # both colours drawn, not each in its own half
    return "wrong_colour"  # an object in each half, but a concept's colour is nowhere


def leaks(found, pair):
    """(by shape, by colour): whether an object wears one concept's shape and the other's colour (the two
    concepts' shapes differ), told apart by where it is. In the half of the concept whose colour it wears, that
    concept took the other's shape; in the half of the concept whose shape it has, that concept took the other's
    colour (appearance crossing the regions)."""
    (_, shape1, colour1), (_, shape2, colour2) = CONCEPTS[pair[0]], CONCEPTS[pair[1]]
    by_shape = by_colour = False
    if shape1 != shape2:
        for o in found:
            left = o["cx"] < 32
            if o["shape"] == shape1 and o["colour"] == colour2:  # concept 1's shape, concept 2's colour
                by_colour, by_shape = by_colour or left, by_shape or not left
            elif o["shape"] == shape2 and o["colour"] == colour1:
                by_colour, by_shape = by_colour or not left, by_shape or left
    return by_shape, by_colour


def score_composition(pair, images, maps):
    (_, _, colour1), (_, _, colour2) = CONCEPTS[pair[0]], CONCEPTS[pair[1]]
    kinds, both, leaked = [], [], []
    for image in images:
        found = objects(image)
        kinds.append(failure_kind(found, pair))
        colours = {o["colour"] for o in found}
        both.append(colour1 in colours and colour2 in colours)
        leaked.append(leaks(found, pair))
    leaked = np.array(leaked, dtype=bool).reshape(len(images), 2)  # [S, (by shape, by colour)]
    inside = attention_in_halves(maps, pair)  # {concept: [S]}
    per_sample = np.mean(list(inside.values()), axis=0)  # [S]: the mean of the two concepts
    failed = np.array([k != "ok" for k in kinds])
    return {"both_colours": float(np.mean(both)), "layout_accuracy": float(np.mean(failed == 0)),
            "leakage": float(np.mean(leaked.any(1))), "leakage_by_shape": float(np.mean(leaked[:, 0])),
            "leakage_by_colour": float(np.mean(leaked[:, 1])), "examples": images[:4],
            "failures": {k: kinds.count(k) / len(kinds) for k in FAILURES},
            "attention_by_failure": {k: float(per_sample[[x == k for x in kinds]].mean()) if k in kinds else None
                                     for k in FAILURES},
            "attention_in_region": {n: float(np.mean(v)) for n, v in inside.items()},
            "attention_in_region_failed": {n: float(np.mean(np.array(v)[failed])) if failed.any() else None
                                           for n, v in inside.items()}}


def attention_in_halves(maps, pair):
    """{concept: [S]}: the share of each sample's attention on the first subject in the left half and on the
    second in the right."""
    left = np.zeros((64, 64), dtype=bool)
    left[:, :32] = True
    return {pair[0]: [mass_inside(m[subject(pair[0])], left) for m in maps],
            pair[1]: [mass_inside(m[subject(pair[1])], ~left) for m in maps]}


def mean_of(cells, key):
    return float(np.mean([c[key] for c in cells.values()]))


def mean_attention(cells):
    """The mean over pairs and their two concepts of attention_in_region."""
    return float(np.mean([v for c in cells.values() for v in c["attention_in_region"].values()]))


def pooled_failures(cells):
    """FAILURES shares over all pairs of a cell."""
    return {k: float(np.mean([c["failures"][k] for c in cells.values()])) for k in FAILURES}


# ------------------------------------------------------------------------------------------------
# The measurement

class Measurement:
    """The residuals of one --out folder, trained once per training setting, and the cells sampled with them."""

    def __init__(self, out, seeds, retrain=False):
        self.out, self.seeds, self.retrain = out, seeds, retrain
        self.trained = {}  # training label -> {concept: residual path}
        self.progress = None  # the sampling's progress bar, from start_sampling
        zeros = torch.zeros(1, 64)
        self.zero = {n: fixed_residual(out / "residuals" / "zero" / f"{n}.safetensors", zeros, CONCEPTS[n][0])
                     for n in CONCEPTS}
        self.unlabelled_zero = {n: unlabelled_residual(out / "residuals" / "zero" / f"{n}.pt", zeros)
                                for n in CONCEPTS}

    def train(self, trainings):
        """Every concept under each training setting of `trainings` ([{flag: value}]), behind one progress bar
        (a residual reused from an earlier run counts as done at once)."""
        todo = {training_label(c): c for c in trainings if training_label(c) not in self.trained}
        jobs = [(changes, name) for changes in todo.values() for name in CONCEPTS]
        if not jobs:
            return
        with tqdm(jobs, desc="training concepts", unit="concept", file=sys.stdout, dynamic_ncols=True) as bar:
            for changes, name in bar:
                flags = training_flags(changes)
                bar.set_postfix_str(f"{name}, {training_label(changes)}, "
                                    f"{flags[flags.index('--max_train_steps') + 1]} steps")
                path = train_concept(self.out, name, changes=changes, retrain=self.retrain)
                self.trained.setdefault(training_label(changes), {})[name] = path

    def residuals(self, changes=None):
        self.train([changes or {}])
        return self.trained[training_label(changes)]

    def start_sampling(self, cells):
        self.progress = tqdm(total=cells, desc="sampling cells", unit="cell", file=sys.stdout, dynamic_ncols=True)

    def sampled(self, cells, label, *args, **keys):
        """cells(out, label, ...) (fidelity_cells or composition_cells), counted on the progress bar."""
        if self.progress is not None:
            self.progress.set_postfix_str(label)
        result = cells(self.out, label, *args, **keys)
        if self.progress is not None:
            self.progress.update()
        return result

    def swap(self):
        if not hasattr(self, "swapped"):
            self.swapped = {n: noun_swap_residual(self.out, n) for n in CONCEPTS}
        return self.swapped

    def fidelity(self, setting, ablations):
        """{variant: {concept: cell}} of one setting: with, without, the negative control, the noun swap and
        (ablations) sigma CFG and the two other text lengths."""
        keys, residuals = setting["config"], self.residuals(setting["training"])
        tag = setting_tag(setting)
        unlabelled = {n: unlabelled_residual(self.out / "residuals" / "unlabelled" / tag / f"{n}.pt",
                                             load_residual(p).tensor) for n, p in residuals.items()}
        swap = self.swap()
        variants = {"with": (residuals, {}), "without": (self.zero, {}), "wrong_token": (unlabelled, {"position": 1}),
                    "noun_swap": (swap, {})}
        if ablations:
            variants.update(sigma_cfg=(residuals, {"cfg_schedule": "sigma"}),
                            text_adaptive=(residuals, {"text_length": "adaptive"}),
                            text_max=(residuals, {"text_length": "max"}))
        cells = {}
        for variant, (files, extra) in variants.items():
            position = extra.pop("position", 2)
            cells[variant] = self.sampled(fidelity_cells, f"{tag}-fidelity-{variant}", files, self.seeds, position,
                                          **{**keys, **extra})
            log(f"{tag} fidelity {variant}: " + ", ".join(f"{n} {c['fidelity']:.2f}" for n, c in cells[variant].items()))
        return cells

    def composition(self, setting, ablations):
        keys, residuals = setting["config"], self.residuals(setting["training"])
        tag = setting_tag(setting)
        variants = {"guided": dict(guided=True), "unguided": dict(guided=False)}
        if ablations:
            variants.update(guided_sigma_cfg=dict(guided=True, cfg_schedule="sigma"),
                            guided_text_adaptive=dict(guided=True, text_length="adaptive"))
        cells = {}
        for variant, extra in variants.items():
            cells[variant] = self.sampled(composition_cells, f"{tag}-composition-{variant}", residuals, self.seeds,
                                          **{**keys, **extra})
            log(f"{tag} composition {variant}: layout {mean_of(cells[variant], 'layout_accuracy'):.2f}")
        return cells

    def sweep(self, faithful_guided):
        """[row]: composition (guided, all pairs) under each SWEEP and NOUN_SWEEP setting."""
        rows = []
        for label, keys, training in SWEEP:
            cells = faithful_guided if not keys and not training else self.sampled(
                composition_cells, f"sweep-{len(rows)}", self.residuals(training), self.seeds, **keys)
            rows.append(sweep_row(label, keys, training, cells))
        for label, keys in NOUN_SWEEP:
            guided = keys.get("guidance_steps", 1) != 0
            keys = {k: v for k, v in keys.items() if k != "guidance_steps"}
            cells = self.sampled(composition_cells, f"sweep-{len(rows)}", self.unlabelled_zero, self.seeds, guided,
                                 nouns=True, **keys)
            rows.append(sweep_row(label, keys, {}, cells))
        return rows


def sweep_row(label, keys, training, cells):
    row = {"setting": label, "config": keys, "training": training,
           "layout_accuracy": mean_of(cells, "layout_accuracy"), "both_colours": mean_of(cells, "both_colours"),
           "leakage": mean_of(cells, "leakage"), "leakage_by_shape": mean_of(cells, "leakage_by_shape"),
           "leakage_by_colour": mean_of(cells, "leakage_by_colour"), "attention_in_region": mean_attention(cells),
           "failures": pooled_failures(cells),
           "per_pair": {p: c["layout_accuracy"] for p, c in cells.items()}}
    log(f"sweep {label}: layout {row['layout_accuracy']:.2f} leakage {row['leakage']:.2f}")
    return row


def setting_tag(setting):
    """The name of a setting's cells in --out: its own "tag", else best or faithful."""
    return setting.get("tag") or ("best" if setting is BEST else "faithful")


START = time.time()


def log(message):
    tqdm.write(f"{message} ({time.time() - START:.0f}s)", file=sys.stdout)


def planned_cells(ablations, sweep):
    """How many cells run() samples: per setting 4 fidelity variants (with, without, wrong_token, noun_swap) and
    2 composition variants (guided, unguided); the faithful setting's ablations add 3 and 2; the sweep adds a
    cell per row but its faithful row, which is the faithful guided cell."""
    return 2 * (4 + 2) + (3 + 2) * ablations + (len(SWEEP) - 1 + len(NOUN_SWEEP)) * sweep


# results.json's mean figures of one setting: key, the cells (fidelity or composition), variant, score
MEANS = [line.split() for line in """
    concept_fidelity_with                fidelity     with         fidelity
    concept_fidelity_without             fidelity     without      fidelity
    class_kept                           fidelity     with         class_kept
    layout_accuracy_with_guidance        composition  guided       layout_accuracy
    layout_accuracy_without_guidance     composition  unguided     layout_accuracy
    leakage                              composition  guided       leakage
    leakage_by_shape                     composition  guided       leakage_by_shape
    leakage_by_colour                    composition  guided       leakage_by_colour
    negative_control                     fidelity     wrong_token  fidelity
    both_colours_with_guidance           composition  guided       both_colours
    both_colours_without_guidance        composition  unguided     both_colours
    leakage_without_guidance             composition  unguided     leakage
    upper_bound_noun_swap                fidelity     noun_swap    fidelity
""".strip().splitlines()]


def summary(fidelity, composition):
    """results.json's figures of one setting."""
    cells = {"fidelity": fidelity, "composition": composition}
    return {
        **{key: mean_of(cells[kind][variant], score) for key, kind, variant, score in MEANS},
        "attention_in_region_with_guidance": mean_attention(composition["guided"]),
        "attention_in_region_without_guidance": mean_attention(composition["unguided"]),
        "concept_fidelity_min": min(c["fidelity"] for c in fidelity["with"].values()),
        "attention_in_region_min": min(v for c in composition["guided"].values()
                                       for v in c["attention_in_region"].values()),
        "failures_with_guidance": pooled_failures(composition["guided"]),
    }


def cell_table(fidelity, composition):
    """The per-cell figures for results.json (the examples left out)."""
    return {"fidelity": {v: {n: {k: c[k] for k in ("fidelity", "class_kept")} for n, c in cs.items()}
                         for v, cs in fidelity.items()},
            "composition": {v: {p: {k: v2 for k, v2 in c.items() if k != "examples"} for p, c in cs.items()}
                            for v, cs in composition.items()}}


def run(args):
    global START
    START = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = 8 if args.quick and args.seeds is None else (args.seeds or 32)
    if args.base:
        return run_base(args, out, seeds)
    ablations = not args.quick
    measurement = Measurement(out, seeds, args.retrain)
    base_many = Path(args.base_many)
    many_built = (base_many / "model_index.json").is_file()
    if args.quick and not args.only_many:
        many_built = False  # --quick: the two-subject world's main cells; --quick --only_many: the many-subjects ones
    elif not many_built:
        message = f"{base_many}: no base model of the richer world; build it with bash toy/build_many.sh {base_many}"
        if args.only_many:
            raise SystemExit(f"error: {message}")
        log(f"{message}; the many-subjects cells are left out")
    if args.only_many:  # the many-subjects cells alone, for trying a change to them
        measurement.start_sampling(3)
        many, lookalike, examples = measure_many(measurement, BEST_MANY, args.retrain, base_many)
        measurement.progress.close()
        results = {"many": many, "lookalike": lookalike, "seeds": seeds, "minutes": round((time.time() - START) / 60, 1)}
        (out / "results_many.json").write_text(json.dumps(results, indent=2) + "\n")
        write_many_examples(out / "examples_many.png", examples)
        print("\n".join(many_report_lines(many, lookalike)))
        return results
    faithful = {"config": {}, "training": {}}
    # every residual first, so the sampling's bar times sampling only
    measurement.train([faithful["training"], BEST["training"]] + [t for _, _, t in SWEEP if args.sweep])
    measurement.swap()
    measurement.start_sampling(planned_cells(ablations, args.sweep) + 3 * many_built)
    fidelity = measurement.fidelity(faithful, ablations)
    composition = measurement.composition(faithful, ablations)
    best_fidelity = measurement.fidelity(BEST, False)
    best_composition = measurement.composition(BEST, False)
    results = {**summary(fidelity, composition),
               "best": {**summary(best_fidelity, best_composition), "setting": BEST,
                        "cells": cell_table(best_fidelity, best_composition)},
               "cells": cell_table(fidelity, composition)}
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    if args.sweep:
        results.update(sweep=measurement.sweep(composition["guided"]), sweep_date=time.strftime("%Y-%m-%d"),
                       sweep_seeds=seeds)
    elif "sweep" in earlier and earlier.get("sweep_seeds", earlier.get("seeds")) == seeds:
        # the sweep of an earlier run into this folder with as many seeds is kept, with its date, until re-measured
        results.update(sweep=earlier["sweep"], sweep_date=earlier.get("sweep_date", earlier.get("date")),
                       sweep_seeds=seeds)
    if many_built:
        results["many"], results["lookalike"], many_examples = measure_many(measurement, BEST_MANY, args.retrain, base_many)
    measurement.progress.close()
    minutes = (time.time() - START) / 60
    results.update(seeds=seeds, quick=args.quick, sampling=SAMPLING, guidance=GUIDANCE, training=TRAINING,
                   minutes=round(minutes, 1), date=time.strftime("%Y-%m-%d"))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_examples(out / "examples.png", fidelity, composition, best_fidelity, best_composition)
    if many_built:
        write_many_examples(out / "examples_many.png", many_examples)
    if args.results_md:
        write_report(Path(args.results_md), results, args)
    print(json.dumps({k: results[k] for k in HEADLINE} | {"best": {k: results["best"][k] for k in HEADLINE}}))
    return results


def run_base(args, out, seeds):
    """--base MODEL (a model of the richer world: toy/base_flux, toy/base_many): its single-subject and
    many-subjects cells in the richer world, under measure.py's keys, into results.json under the model's folder
    name (the rest of an earlier results.json in --out kept)."""
    from many import measure_single, recipe, single_summary, sweep_groups

    model = recipe(args.base)
    measurement = Measurement(out, seeds, args.retrain)
    # the single-subject cells (3 faithful, 2 best), the four group settings, the sweep's rows
    measurement.start_sampling(5 + 4 + len(BASE_SWEEP) * args.sweep)
    single = measure_single(measurement, BEST_MANY, model, args.retrain)
    many, lookalike, examples = measure_many(measurement, BEST_MANY, args.retrain, model, unguided=True)
    sweep = sweep_groups(measurement, model, BASE_SWEEP, args.retrain) if args.sweep else None
    measurement.progress.close()
    pair = many["2"]

    def two(label):  # the two-subject figures of measure.py's keys, from the N = 2 group
        return {"layout_accuracy_with_guidance": pair[label]["layout_accuracy"], "leakage": pair[label]["leakage"],
                "attention_in_region_with_guidance": pair[label]["attention_in_region"]}

    block = {**single_summary(single["faithful"]), **two("faithful"),
             "layout_accuracy_without_guidance": pair["unguided"]["layout_accuracy"],
             "attention_in_region_without_guidance": pair["unguided"]["attention_in_region"],
             "best": {**single_summary(single["best"]), **two("best"), "setting": BEST_MANY},
             "cells": {"fidelity": {setting: {v: {n: {k: c[k] for k in ("fidelity", "colour", "class_kept")}
                                                   for n, c in cs.items()} for v, cs in variants.items()}
                                    for setting, variants in single.items()}},
             "many": many, "lookalike": lookalike, "model": str(args.base), "family": model.family, "seeds": seeds,
             "quick": args.quick, "sampling": model.sampling, "guidance": GUIDANCE, "training": model.training,
             "minutes": round((time.time() - START) / 60, 1), "date": time.strftime("%Y-%m-%d")}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    earlier = results.get(model.name, {})
    if sweep is not None:
        block.update(sweep=sweep, sweep_date=block["date"], sweep_seeds=seeds)
    elif "sweep" in earlier and earlier.get("sweep_seeds") == seeds:  # kept until measured again, as run() does
        block.update({k: earlier[k] for k in ("sweep", "sweep_date", "sweep_seeds")})
    results[model.name] = block
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_many_examples(out / f"examples_{model.name}.png", examples)
    if args.results_md:
        write_base_report(Path(args.results_md), model.name, block, args)
    print("\n".join(base_lines(model.name, block, results)))
    return results


# ------------------------------------------------------------------------------------------------
# Examples and report# ------------------------------------------------------------------------------------------------
# Examples and report

def write_examples(path, fidelity, composition, best_fidelity, best_composition, scale=2):
    """A labelled grid: per concept four samples without its residual, with it, and with it under BEST; per pair
    four samples unguided, guided (faithful) and guided under BEST."""
    rows = [("concept", ("without its residual", "with it (faithful)", "with it (best setting)"))]
    rows += [(name, [fidelity["without"][name], fidelity["with"][name], best_fidelity["with"][name]])
             for name in CONCEPTS]
    rows.append(("pair", ("unguided", "guided (faithful)", "guided (best setting)")))
    rows += [(pair, [composition["unguided"][pair], composition["guided"][pair], best_composition["guided"][pair]])
             for pair in composition["guided"]]
    tile, label_width, header, gap = 64 * scale, 150, 22, 12
    heights = [header if isinstance(cells, tuple) else tile + 4 for _, cells in rows]
    canvas = Image.new("RGB", (label_width + 3 * (4 * tile + gap), sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (label, cells), height in zip(rows, heights):
        for g, cell in enumerate(cells):
            x = label_width + g * (4 * tile + gap)
            if isinstance(cells, tuple):  # a header: the three groups' titles
                draw.text((x + 4, y + 6), cell, fill=(0, 0, 0))
                continue
            for j, image in enumerate(cell["examples"]):
                canvas.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (x + j * tile, y))
        draw.text((6, y + (6 if isinstance(cells, tuple) else tile // 2 - 12)), label.replace("+", " +\n"),
                  fill=(0, 0, 0))
        y += height
    canvas.save(path)


HEADLINE = ("concept_fidelity_with", "concept_fidelity_without", "class_kept", "layout_accuracy_with_guidance",
            "layout_accuracy_without_guidance", "leakage", "leakage_by_shape", "leakage_by_colour",
            "leakage_without_guidance", "both_colours_with_guidance",
            "both_colours_without_guidance", "negative_control", "upper_bound_noun_swap",
            "attention_in_region_with_guidance", "attention_in_region_without_guidance", "concept_fidelity_min",
            "attention_in_region_min")
GOALS = {"concept_fidelity_min": ">= 0.9", "layout_accuracy_with_guidance": ">= 0.85", "leakage": "<= 0.10",
         "attention_in_region_min": ">= 0.7"}


def write_report(path, results, args):
    c, b = results["cells"], results["best"]["cells"]
    command = (f"python toy/measure.py --seeds {results['seeds']}" + (" --sweep" if args.sweep else "")
               + (f" --out {args.out}" if Path(args.out) != DEFAULT_OUT else ""))
    lines = [
        "# Toy world results",
        "",
        f"`{command} --results_md {args.results_md}`, {results['date']}, {results['minutes']} minutes on "
        f"{os.cpu_count()} CPU cores. Sampling: {json.dumps(results['sampling'])}, guidance "
        f"{json.dumps(results['guidance'])}; training: `{' '.join(results['training'])}`. Best setting: config "
        f"`{json.dumps(results['best']['setting']['config'])}`, the same residuals.",
        "",
        "| figure | faithful | best setting | goal (best) |",
        "| --- | ---: | ---: | --- |",
    ]
    for key in HEADLINE:
        lines.append(f"| {key} | {results[key]:.3f} | {results['best'][key]:.3f} | {GOALS.get(key, '')} |")
    lines += ["", "## Concept fidelity per cell (colour of 'a {noun}' is the concept's; class kept in brackets)", "",
              "| concept | " + " | ".join(c["fidelity"]) + " | best: with | best: wrong_token |",
              "| --- |" + " ---: |" * (len(c["fidelity"]) + 2)]
    for name in CONCEPTS:
        cells = [c["fidelity"][v][name] for v in c["fidelity"]] + [b["fidelity"][v][name] for v in ("with", "wrong_token")]
        lines.append(f"| {name} | " + " | ".join(f"{x['fidelity']:.2f} ({x['class_kept']:.2f})" for x in cells) + " |")
    composed = {**c["composition"], **{f"best: {v}": cs for v, cs in b["composition"].items()}}
    lines += ["", "## Composition per pair (layout accuracy / both colours / leakage)", "",
              "| pair | " + " | ".join(composed) + " |", "| --- |" + " ---: |" * len(composed)]
    for pair in c["composition"]["guided"]:
        lines.append(f"| {pair} | " + " | ".join(
            "{layout_accuracy:.2f} / {both_colours:.2f} / {leakage:.2f}".format(**composed[v][pair]) for v in composed)
            + " |")
    lines += ["", "## Why compositions fail (share of samples; attention in region for that kind in brackets)", "",
              "ok: each concept's colour in its half; missing: a half holds no object; misplaced: both colours drawn, "
              "not each in its half; wrong_colour: an object in each half, a concept's colour nowhere. Attention: the "
              "mean share of the two concepts' attention inside their halves, over the samples of that kind.", "",
              "| pair | setting | " + " | ".join(FAILURES) + " |", "| --- | --- |" + " ---: |" * len(FAILURES)]
    for pair in c["composition"]["guided"]:
        for label, cell in (("faithful, guided", c["composition"]["guided"][pair]),
                            ("faithful, unguided", c["composition"]["unguided"][pair]),
                            ("best setting", b["composition"]["guided"][pair])):
            lines.append(f"| {pair} | {label} | " + " | ".join(
                f"{cell['failures'][k]:.2f} ({fmt(cell['attention_by_failure'][k])})" for k in FAILURES) + " |")
    lines += ["", "## Attention in each concept's region (all samples / samples whose layout failed)", "",
              "| pair | concept | " + " | ".join(composed) + " |", "| --- | --- |" + " ---: |" * len(composed)]
    for pair in c["composition"]["guided"]:
        for name in pair.split("+"):
            lines.append(f"| {pair} | {name} | " + " | ".join(
                f"{composed[v][pair]['attention_in_region'][name]:.2f} / "
                f"{fmt(composed[v][pair]['attention_in_region_failed'][name])}" for v in composed) + " |")
    if "sweep" in results:
        lines += ["", f"## Sweep (composition with guidance, all four pairs; measured {results['sweep_date']})", "",
                  "Each row changes the faithful setting as its label says (E1-E4: the variants of docs/METHOD.md E). "
                  "Rows starting \"nouns\" put the specific nouns in the prompt (\"a berry and a butter\") with no "
                  "residual: what the base model itself can compose.", "",
                  "| setting | layout | both colours | leakage (by shape / by colour) | attention "
                  "| ok / missing / misplaced / wrong colour | per pair |", "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for row in results["sweep"]:
            lines.append(f"| {row['setting']} | {row['layout_accuracy']:.2f} | {row['both_colours']:.2f} | "
                         f"{row['leakage']:.2f} ({row['leakage_by_shape']:.2f} / {row['leakage_by_colour']:.2f}) | "
                         f"{row['attention_in_region']:.2f} | "
                         + " / ".join(f"{row['failures'][k]:.2f}" for k in FAILURES) + " | "
                         + " ".join(f"{v:.2f}" for v in row["per_pair"].values()) + " |")
    if "many" in results:
        lines += many_goal_lines(results) + many_report_lines(results["many"], results["lookalike"])
    for name, block in base_blocks(results).items():  # the --base runs' sections, as they were measured
        lines += base_lines(name, block, results)
    lines += ["", "Examples (`examples.png` in the output folder): per concept, four samples without its residual, "
              "four with it and four with it under the best setting; per pair, four unguided, four guided and four "
              "under the best setting.", ""]
    # a hand-written analysis below the tables is kept when the tables are rewritten
    analysis = path.read_text().partition("\n## Analysis")[2] if path.exists() else ""
    path.write_text("\n".join(lines) + (f"\n## Analysis{analysis}" if analysis else ""))


BASE_FIGURES = ("concept_fidelity_with", "concept_fidelity_without", "concept_colour_with", "class_kept",
                "negative_control", "concept_fidelity_min", "layout_accuracy_with_guidance",
                "layout_accuracy_without_guidance", "leakage", "attention_in_region_with_guidance")


def base_blocks(results):
    """{name: block} of the --base runs in a results.json (blocks with a "family")."""
    return {k: v for k, v in results.items() if isinstance(v, dict) and "family" in v}


def base_lines(name, block, results):
    """The report's section of one --base run, beside the other --base runs of the same results.json."""
    blocks = base_blocks(results) | {name: block}
    names = [n for n in sorted(blocks, key=lambda n: (n != "base_many", n))]
    lines = ["", f"## {name} ({block['family']}) in the richer world", "",
             f"`python toy/measure.py --base {block['model']} --seeds {block['seeds']}"
             f"{' --sweep' if block.get('sweep_date') == block['date'] else ''}`, {block['date']}, "
             f"{block['minutes']} minutes on {os.cpu_count()} CPU cores. Sampling {json.dumps(block['sampling'])}, "
             f"guidance {json.dumps(block['guidance'])}; training `{' '.join(block['training'])}`; best setting "
             f"`{json.dumps(block['best']['setting']['config'])}`. Single subject: \"a {{generic noun}}\" of the six "
             "concepts of toy/many.py, unguided; fidelity is the concept's colour and pattern, class kept its shape. "
             "Two subjects: the N = 2 group.", "",
             "| figure | " + " | ".join(f"{n} faithful | {n} best" for n in names) + " |",
             "| --- |" + " ---: | ---: |" * len(names)]
    for key in BASE_FIGURES:
        cells = []
        for n in names:
            b = blocks[n]
            cells += [f"{b[key]:.2f}" if key in b else "-", f"{b['best'][key]:.2f}" if key in b["best"] else "-"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for cell in ("2", "3", "4", "lookalike"):
        label = "layout accuracy, look-alikes" if cell == "lookalike" else f"layout accuracy, N = {cell}"
        cells = []
        for n in names:
            group = blocks[n]["lookalike"] if cell == "lookalike" else blocks[n]["many"][cell]
            cells += [f"{group['faithful']['layout_accuracy']:.2f}", f"{group['best']['layout_accuracy']:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sub = many_goal_lines(block, f"{name}, {block['seeds']} seeds") + many_report_lines(block["many"],
                                                                                        block["lookalike"], name)
    if "sweep" in block:
        sub += many_sweep_lines(block["sweep"], f"{name}, {block['sweep_seeds']} seeds, {block['sweep_date']}")
    return lines + [("#" + line if line.startswith("## ") else line) for line in sub]  # its own subsections


def write_base_report(path, name, block, args):
    """Put base_lines into the report at `path`: in place of that model's earlier section (up to the next "## "
    heading), else before the hand-written analysis."""
    results = json.loads((Path(args.out) / "results.json").read_text())
    section = "\n".join(base_lines(name, block, results)).lstrip("\n") + "\n"
    text = path.read_text() if path.exists() else "# Toy world results\n"
    heading = f"\n## {name} ("
    if heading in text:
        start = text.index(heading) + 1
        end = text.find("\n## ", start)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    else:
        at = text.find("\n## Analysis")
        at = len(text) if at < 0 else at + 1
        text = text[:at] + section + "\n" + text[at:]
    path.write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=None, help="samples per cell (default 32; 8 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="8 seeds and the main cells only (no sigma-CFG and text-length ablations, no many-subjects "
                        "cells unless --only_many): for iterating")
    p.add_argument("--sweep", action="store_true",
                   help="also the sweep of knobs and variants (about 24 minutes more; with --base, BASE_SWEEP on "
                        "every group)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="folder for results.json, examples.png and the runs behind them (default toy/runs, untracked; "
                        "the committed figures are in toy/results)")
    p.add_argument("--retrain", action="store_true",
                   help="train the concepts again even where --out holds residuals trained with the same settings")
    p.add_argument("--base_many", default=str(TOY / "base_many"),
                   help="the richer world's base model (toy/build_base.py --world many; default toy/base_many)")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="measure this model of the richer world instead (toy/base_flux, the toy FLUX of "
                        "toy/build_flux.py; or toy/base_many): its single-subject and many-subjects cells, into "
                        "results.json under the model's folder name")
    p.add_argument("--only_many", action="store_true",
                   help="only the many-subjects cells (toy/many.py, on toy/base_many), into results_many.json")
    p.add_argument("--results_md", default=None, metavar="PATH",
                   help="also write the report's tables to PATH, e.g. toy/RESULTS.md (default: no report)")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds: expected an integer >= 1")
    if args.base and not (Path(args.base) / "model_index.json").is_file():
        p.error(f"--base {args.base}: expected a model folder (toy/build_flux.py writes toy/base_flux)")
    if args.base and args.only_many:
        p.error("--base: measures its own cells; --only_many is for the toy UNet")
    return args


if __name__ == "__main__":
    run(parse_args())
