"""Does the method work? Concept fidelity, composition and layout in the toy world, through the project's CLIs.

    python toy/measure.py --seeds 32 --out toy/results --results_md toy/RESULTS.md     # about 10 minutes, 2 cores

With toy/base_model (toy/build_base.py), exactly as users run the project:
1. `train.py` learns a residual for four concepts named by generic nouns ("circle" = a blue circle,
   "square" = a yellow square, "triangle" = a blue triangle, and "circle" = a yellow circle), five images each;
2. `inference.py` samples every cell below for --seeds seeds, and toy/analyze.py reads the images back:
   - concept fidelity: how often "a {shape}" comes out in the concept's colour, with the residual and without
     it (a zero residual; chance is 1/6), and whether the shape is still the class;
   - composition: "a {shape1} and a {shape2}" with two residuals and a left/right layout, with layout guidance
     and without: both colours present, each object's centroid in its region, leakage (an object wearing the
     other concept's colour), and from the attention maps (inference.py's save_attention) the share of each
     concept's attention inside its half, over all samples and over the samples whose layout failed;
   - ablations: sigma vs constant CFG, text length "adaptive" (the UNet sees one EOS it never saw in
     training) and "max", the residual on the wrong token (a negative control), and as an upper bound the
     specific noun's embedding put in the generic noun's place ("plum" for "circle").
Writes results.json and examples.png to --out, nothing elsewhere; with --results_md, also the tables of a
report such as toy/RESULTS.md (its hand-written analysis below the tables is kept).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOY = Path(__file__).resolve().parent
ROOT = TOY.parent
sys.path.insert(0, str(ROOT))  # the project's modules; toy/ itself is on the path as the script's folder
from analyze import objects  # noqa: E402
from evaluate import fmt  # noqa: E402
from region_utils import ATTENTION_FOLDER, mass_inside, read_attention  # noqa: E402
from residual_utils import load_residual  # noqa: E402
from world import NOUNS, Shape, render  # noqa: E402

BASE_MODEL = TOY / "base_model"
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
TRAINING = ["--resolution", "64", "--max_train_steps", "300", "--learning_rate", "1e-3", "--text_length", "words",
            "--num_validation_images", "0", "--checkpointing_steps", "0", "--seed", "0"]
LEFT, RIGHT = "255,0,0", "0,255,0"


def python(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:2]))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


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


def train_concept(out, name, model=BASE_MODEL, steps=None):
    noun, shape, colour = CONCEPTS[name]
    data = concept_images(out / "concepts" / name, shape, colour)
    args = list(TRAINING)
    if steps:
        args[args.index("--max_train_steps") + 1] = str(steps)
    python("train.py", "--pretrained_model_name_or_path", model, "--instance_data_dir", data,
           "--instance_prompt", noun, "--output_dir", out / "residuals" / name, *args)
    return out / "residuals" / name / "residual.safetensors"


def fixed_residual(path, tensor, noun):
    from residual_utils import save_residual

    save_residual(path, tensor, {"class_phrase": noun, "base_model": str(BASE_MODEL)})
    return path


def noun_swap_residual(out, name, model=BASE_MODEL):
    """E0("a {specific noun}") - E0("a {generic noun}") at the noun: the residual of a perfect swap."""
    from pipeline_utils import encode_ids, load_model, token_ids

    noun, shape, colour = CONCEPTS[name]
    sd = load_model(str(model), torch.device("cpu"), torch.float32)
    specific = encode_ids(sd.text_encoder, token_ids(sd.tokenizer, f"a {NOUNS[shape][colour]}"))[0, 2]
    generic = encode_ids(sd.text_encoder, token_ids(sd.tokenizer, f"a {noun}"))[0, 2]
    return fixed_residual(out / "residuals" / f"{name}_swap.safetensors", (specific - generic)[None], noun)


# ------------------------------------------------------------------------------------------------
# Cells

def full_layout(out):
    path = out / "layouts" / "full.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (255, 0, 0)).save(path)
    return path


def halves_layout(out):
    path = out / "layouts" / "halves.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.zeros((64, 64, 3), dtype=np.uint8)
        array[:, :32] = (255, 0, 0)
        array[:, 32:] = (0, 255, 0)
        Image.fromarray(array).save(path)
    return path


def sample(out, cell, config, seeds, model=BASE_MODEL):
    """Run inference.py on one config; returns the images [S, 64, 64, 3] (and with the config's save_attention,
    also each image's attention maps {name: [64, 64]})."""
    path = out / "configs" / f"{cell}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([config]))
    folder = out / "images" / cell
    python("inference.py", "--pretrained_model_name_or_path", model, "--inference_config", path,
           "--output_dir", folder, "--num_images", seeds, "--batch_size", seeds, "--seed", 1000, "--resolution", 64,
           "--overwrite")  # a measurement run again replaces its images
    run_folder = next(folder.rglob("config.json")).parent
    images = np.stack([np.array(Image.open(run_folder / f"{1000 + j}.png")) for j in range(seeds)])
    if not config.get("save_attention"):
        return images
    return images, [read_attention(run_folder / ATTENTION_FOLDER / f"{1000 + j}.npz") for j in range(seeds)]


def fidelity_cell(out, cell, name, residual, seeds, position=2, **overrides):
    noun, shape, colour = CONCEPTS[name]
    config = {"prompt": f"a {noun}", "residual_dict": {"<c>": str(residual)},
              "color_context": {LEFT: [noun, 2.5]}, "guidance_steps": 0, "guidance_weight": 0.08,
              "weight_negative": -1e8, "layout": str(full_layout(out)), "subject_list": [["<c>", position]],
              **SAMPLING, **overrides}
    images = sample(out, cell, config, seeds)
    found = [objects(image) for image in images]
    return {"fidelity": float(np.mean([bool(f) and f[0]["colour"] == colour for f in found])),
            "class_kept": float(np.mean([bool(f) and f[0]["shape"] == shape for f in found])),
            "examples": images[:4]}


def composition_cell(out, cell, pair, residuals, seeds, guided, **overrides):
    (noun1, shape1, colour1), (noun2, shape2, colour2) = CONCEPTS[pair[0]], CONCEPTS[pair[1]]
    config = {"prompt": f"a {noun1} and a {noun2}",
              "residual_dict": {"<c1>": str(residuals[pair[0]]), "<c2>": str(residuals[pair[1]])},
              "color_context": {LEFT: ["<c1>", 2.5], RIGHT: ["<c2>", 2.5]},
              "guidance_steps": SAMPLING["num_inference_steps"] if guided else 0, "guidance_weight": 0.08,
              "weight_negative": -1e8, "layout": str(halves_layout(out)), "subject_list": [["<c1>", 2], ["<c2>", 5]],
              "save_attention": True, **SAMPLING, **overrides}
    images, maps = sample(out, cell, config, seeds)
    both, placed, leaked = [], [], []
    for image in images:
        found = objects(image)
        colours = {o["colour"] for o in found}
        both.append(colour1 in colours and colour2 in colours)
        first = [o for o in found if o["colour"] == colour1]
        second = [o for o in found if o["colour"] == colour2]
        placed.append(bool(first) and bool(second) and first[0]["cx"] < 32 <= second[0]["cx"])
        # the other concept's colour on this concept's shape (when the two shapes differ)
        leaked.append(shape1 != shape2 and any((o["shape"] == shape1 and o["colour"] == colour2) or
                                               (o["shape"] == shape2 and o["colour"] == colour1) for o in found))
    inside = attention_in_halves(maps, pair)  # {concept: [S]}
    failed = [not p for p in placed]
    return {"both_colours": float(np.mean(both)), "layout_accuracy": float(np.mean(placed)),
            "leakage": float(np.mean(leaked)), "examples": images[:4],
            "attention_in_region": {n: float(np.mean(v)) for n, v in inside.items()},
            "attention_in_region_failed": {n: float(np.mean(np.array(v)[failed])) if any(failed) else None
                                           for n, v in inside.items()}}


def attention_in_halves(maps, pair):
    """{concept: [S]}: the share of each sample's attention on <c1> in the left half and on <c2> in the right."""
    left = np.zeros((64, 64), dtype=bool)
    left[:, :32] = True
    return {pair[0]: [mass_inside(m["<c1>"], left) for m in maps],
            pair[1]: [mass_inside(m["<c2>"], ~left) for m in maps]}


def mean_of(cells, key):
    return float(np.mean([c[key] for c in cells]))


def mean_attention(cells):
    """The mean over pairs and their two concepts of attention_in_region."""
    return float(np.mean([v for c in cells.values() for v in c["attention_in_region"].values()]))


# ------------------------------------------------------------------------------------------------

def run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    residuals = {name: train_concept(out, name) for name in CONCEPTS}
    print(f"trained {len(residuals)} residuals ({time.time() - start:.0f}s)", flush=True)
    zero = {name: fixed_residual(out / "residuals" / f"{name}_zero.safetensors", torch.zeros(1, 64), CONCEPTS[name][0])
            for name in CONCEPTS}
    swap = {name: noun_swap_residual(out, name) for name in CONCEPTS}
    # the negative control puts the residual on "a": a file without a class phrase, which inference allows
    unlabelled = {}
    for name, path in residuals.items():
        unlabelled[name] = out / "residuals" / f"{name}_unlabelled.pt"
        torch.save(load_residual(path).tensor, unlabelled[name])

    fidelity = {}
    variants = {
        "with": lambda n: fidelity_cell(out, f"{n}_with", n, residuals[n], args.seeds),
        "without": lambda n: fidelity_cell(out, f"{n}_without", n, zero[n], args.seeds),
        "sigma_cfg": lambda n: fidelity_cell(out, f"{n}_sigma", n, residuals[n], args.seeds, cfg_schedule="sigma"),
        "text_adaptive": lambda n: fidelity_cell(out, f"{n}_adaptive", n, residuals[n], args.seeds,
                                                 text_length="adaptive"),
        "text_max": lambda n: fidelity_cell(out, f"{n}_max", n, residuals[n], args.seeds, text_length="max"),
        "wrong_token": lambda n: fidelity_cell(out, f"{n}_wrong", n, unlabelled[n], args.seeds, position=1),
        "noun_swap": lambda n: fidelity_cell(out, f"{n}_swap", n, swap[n], args.seeds),
    }
    for variant, cell in variants.items():
        fidelity[variant] = {name: cell(name) for name in CONCEPTS}
        print(f"fidelity {variant}: " + ", ".join(f"{n} {c['fidelity']:.2f}" for n, c in fidelity[variant].items())
              + f" ({time.time() - start:.0f}s)", flush=True)

    composition = {}
    comp_variants = {
        "guided": dict(guided=True),
        "unguided": dict(guided=False),
        "guided_sigma_cfg": dict(guided=True, cfg_schedule="sigma"),
        "guided_text_adaptive": dict(guided=True, text_length="adaptive"),
    }
    for variant, kwargs in comp_variants.items():
        composition[variant] = {f"{a}+{b}": composition_cell(out, f"{a}_{b}_{variant}", (a, b), residuals,
                                                             args.seeds, **kwargs) for a, b in PAIRS}
        print(f"composition {variant}: layout "
              f"{mean_of(composition[variant].values(), 'layout_accuracy'):.2f} ({time.time() - start:.0f}s)",
              flush=True)

    summary = {
        "concept_fidelity_with": mean_of(fidelity["with"].values(), "fidelity"),
        "concept_fidelity_without": mean_of(fidelity["without"].values(), "fidelity"),
        "class_kept": mean_of(fidelity["with"].values(), "class_kept"),
        "layout_accuracy_with_guidance": mean_of(composition["guided"].values(), "layout_accuracy"),
        "layout_accuracy_without_guidance": mean_of(composition["unguided"].values(), "layout_accuracy"),
        "leakage": mean_of(composition["guided"].values(), "leakage"),
        "negative_control": mean_of(fidelity["wrong_token"].values(), "fidelity"),
        "both_colours_with_guidance": mean_of(composition["guided"].values(), "both_colours"),
        "both_colours_without_guidance": mean_of(composition["unguided"].values(), "both_colours"),
        "leakage_without_guidance": mean_of(composition["unguided"].values(), "leakage"),
        "upper_bound_noun_swap": mean_of(fidelity["noun_swap"].values(), "fidelity"),
        "attention_in_region_with_guidance": mean_attention(composition["guided"]),
        "attention_in_region_without_guidance": mean_attention(composition["unguided"]),
    }
    cells = {
        "fidelity": {v: {n: {k: c[k] for k in ("fidelity", "class_kept")} for n, c in cs.items()}
                     for v, cs in fidelity.items()},
        "composition": {v: {p: {k: c[k] for k in ("both_colours", "layout_accuracy", "leakage", "attention_in_region",
                                                  "attention_in_region_failed")} for p, c in cs.items()}
                        for v, cs in composition.items()},
    }
    minutes = (time.time() - start) / 60
    results = {**summary, "cells": cells, "seeds": args.seeds, "sampling": SAMPLING, "training": TRAINING,
               "minutes": round(minutes, 1), "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_examples(out / "examples.png", fidelity, composition)
    if args.results_md:
        write_report(Path(args.results_md), results, args)
    print(json.dumps(summary))
    return results


def write_examples(path, fidelity, composition):
    """Rows of four samples: each concept without and with its residual, then each pair without and with layout."""
    rows = []
    for name in CONCEPTS:
        rows.append(np.concatenate([*fidelity["without"][name]["examples"], *fidelity["with"][name]["examples"]], 1))
    for pair in composition["guided"]:
        rows.append(np.concatenate([*composition["unguided"][pair]["examples"],
                                    *composition["guided"][pair]["examples"]], 1))
    Image.fromarray(np.concatenate(rows, 0)).resize((8 * 128, len(rows) * 128), Image.NEAREST).save(path)


def write_report(path, results, args):
    c = results["cells"]
    lines = [
        "# Toy world results",
        "",
        f"`python toy/measure.py --seeds {args.seeds} --out {args.out} --results_md {args.results_md}`, "
        f"{results['date']}, {results['minutes']} minutes on {os.cpu_count()} CPU cores. "
        f"Sampling: {json.dumps(results['sampling'])}; training: `{' '.join(results['training'])}`.",
        "",
        "| figure | value |",
        "| --- | ---: |",
    ]
    for key in ("concept_fidelity_with", "concept_fidelity_without", "class_kept", "layout_accuracy_with_guidance",
                "layout_accuracy_without_guidance", "leakage", "leakage_without_guidance", "both_colours_with_guidance",
                "both_colours_without_guidance", "negative_control", "upper_bound_noun_swap",
                "attention_in_region_with_guidance", "attention_in_region_without_guidance"):
        lines.append(f"| {key} | {results[key]:.3f} |")
    lines += ["", "## Concept fidelity per cell (colour of 'a {noun}' is the concept's)", "",
              "| concept | " + " | ".join(c["fidelity"]) + " |", "| --- |" + " ---: |" * len(c["fidelity"])]
    for name in CONCEPTS:
        lines.append(f"| {name} | " + " | ".join(f"{c['fidelity'][v][name]['fidelity']:.2f}" for v in c["fidelity"])
                     + " |")
    lines += ["", "## Composition per pair (layout accuracy / both colours / leakage)", "",
              "| pair | " + " | ".join(c["composition"]) + " |", "| --- |" + " ---: |" * len(c["composition"])]
    for pair in next(iter(c["composition"].values())):
        lines.append(f"| {pair} | " + " | ".join(
            "{layout_accuracy:.2f} / {both_colours:.2f} / {leakage:.2f}".format(**c["composition"][v][pair])
            for v in c["composition"]) + " |")
    lines += ["", "## Attention in each concept's region (all samples / samples whose layout failed)", "",
              "The share of the concept's cross-attention (inference.py's save_attention) inside its half. A failed "
              "sample with a high share had its attention in the right place, and the object came out in the wrong "
              "colour; a low share means the attention itself went to the wrong place.", "",
              "| pair | concept | " + " | ".join(c["composition"]) + " |",
              "| --- | --- |" + " ---: |" * len(c["composition"])]
    for pair in next(iter(c["composition"].values())):
        for name in pair.split("+"):
            lines.append(f"| {pair} | {name} | " + " | ".join(
                f"{c['composition'][v][pair]['attention_in_region'][name]:.2f} / "
                f"{fmt(c['composition'][v][pair]['attention_in_region_failed'][name])}" for v in c["composition"]) + " |")
    lines += ["", "Examples (`examples.png` in the output folder): per concept, four samples without and four "
              "with its residual; per pair, four without and four with layout guidance.", ""]
    # a hand-written analysis below the tables is kept when the tables are rewritten
    analysis = path.read_text().partition("\n## Analysis")[2] if path.exists() else ""
    path.write_text("\n".join(lines) + (f"\n## Analysis{analysis}" if analysis else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=32, help="samples per cell (default 32)")
    p.add_argument("--out", default=str(TOY / "results"),
                   help="folder for results.json, examples.png and the runs behind them (default toy/results)")
    p.add_argument("--results_md", default=None, metavar="PATH",
                   help="also write the report's tables to PATH, e.g. toy/RESULTS.md (default: no report)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
