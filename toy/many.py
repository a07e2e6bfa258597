"""The many-subjects cells of toy/measure.py: two, three and four subjects, and look-alike pairs, composed in the
richer world (world.many_scene, 96 px) on its own base model, toy/base_many (toy/build_base.py --world many).

Six concepts, each learned by train.py on its generic noun from five photos of one object: a striped blue circle,
a dotted yellow square, a hollow red triangle, a plain green circle, and two look-alikes of the first two that
differ only in their pattern (a dotted blue circle, a hollow yellow square). A group of N subjects is composed in
"a circle, a square and a triangle" with one place each (halves, thirds, quadrants: world.cells); analyze.py
reads every place back, and per sample:
- layout accuracy: every place's largest object has its subject's identity (shape, colour and pattern);
- swap: a place's largest object has another subject's identity, which that subject's own place lacks;
- collapse: one subject's identity is the largest object of two places or more (its own among them or not);
- missing: a place holds no object;
- attention in region: the share of each subject's attention map inside its place (save_attention);
- and, to classify the failures, per attribute the share of the objects drawn in a place that have it wrong.
Each figure is a share of samples with its standard error, for the faithful method, the best setting, and the
base model composing its own specific nouns with their patterns ("a striped berry and a dotted butter"; the
noun rows guided, no residual): the ceiling.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analyze import by_place, identity, objects
from world import LAYOUTS, MANY_SIZE, NOUNS, Shape, cells, render

TOY = Path(__file__).resolve().parent
BASE_MANY = TOY / "base_many"
CONCEPTS = {  # name: (generic noun, shape, colour, pattern)
    "striped_blue_circle": ("circle", "circle", "blue", "striped"),
    "dotted_yellow_square": ("square", "square", "yellow", "dotted"),
    "hollow_red_triangle": ("triangle", "triangle", "red", "hollow"),
    "plain_green_circle": ("circle", "circle", "green", "plain"),
    "dotted_blue_circle": ("circle", "circle", "blue", "dotted"),
    "hollow_yellow_square": ("square", "square", "yellow", "hollow"),
}
GROUPS = {  # cell: its subjects, in place order
    "2": ("striped_blue_circle", "dotted_yellow_square"),
    "3": ("striped_blue_circle", "dotted_yellow_square", "hollow_red_triangle"),
    "4": ("striped_blue_circle", "dotted_yellow_square", "hollow_red_triangle", "plain_green_circle"),
}
LOOKALIKES = (("striped_blue_circle", "dotted_blue_circle"), ("dotted_yellow_square", "hollow_yellow_square"))
PLACE_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))
TRAINING = ["--resolution", str(MANY_SIZE), "--max_train_steps", "300", "--learning_rate", "1e-3",
            "--text_length", "words", "--num_validation_images", "0", "--checkpointing_steps", "0", "--seed", "0"]
# The toy FLUX (toy/build_flux.py) is sampled with true CFG at the toy UNet's scale (its last run dropped 10% of
# captions; toy/check_base.py: two objects right in 0.12 of samples against 0.08 without, one in 1.00 against
# 0.98), and its transformer takes no text mask: T5's rows padded to the tokenizer's 40 ("max"), in sampling as
# in training, as FluxPipeline passes them.
FLUX_SAMPLING = {"text_length": "max", "num_inference_steps": 30, "true_cfg_scale": 3.0}
FLUX_TRAINING = [("max" if flag == "words" else flag) for flag in TRAINING]
FIGURES = ("layout_accuracy", "swap_rate", "collapse", "missing", "attention_in_region")
ATTRIBUTES = ("shape", "colour", "pattern")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a toy base model is sampled and its residuals are trained, by its family."""
    model: Path
    family: str  # "sd" (toy/base_many) or "flux" (toy/base_flux)
    sampling: dict  # config keys
    training: list  # train.py flags
    width: int  # the text conditioning's width: a zero residual's

    @property
    def name(self):
        return Path(self.model).name


def recipe(model=BASE_MANY):
    """The Recipe of a toy base model: measure.SAMPLING and TRAINING for a toy UNet, FLUX's own for a toy FLUX."""
    from measure import SAMPLING
    from pipeline_utils import model_family, model_sizes

    family = model_family(str(model))
    sampling, training = (FLUX_SAMPLING, FLUX_TRAINING) if family == "flux" else (SAMPLING, TRAINING)
    return Recipe(Path(model), family, sampling, training, model_sizes(str(model))[0])


def add_overrides(parser):
    """The scripts' --set KEY=VALUE: config keys on top of a toy model's sampling settings (values as JSON)."""
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config keys on top of the model's sampling settings, values as JSON (cfg_scale=1)")


def overrides(parser, items):
    """{key: value} of --set's items; a malformed one is the parser's error (one line, exit status 2)."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            result[key] = json.loads(value)
        except json.JSONDecodeError:
            result[key] = value
    return result


def concept_photos(folder, name, count=5, seed=0):
    """Five photos of one concept: the object alone, varied in place and size, as the world's one-object scenes."""
    _, shape, colour, pattern = CONCEPTS[name]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        obj = Shape(shape, colour, rng.uniform(40, 56), rng.uniform(40, 56), rng.uniform(25, 33), pattern)
        Image.fromarray(render([obj], MANY_SIZE)).save(folder / f"{i}.png")
    return folder


def train_all(out, names, retrain=False, model=None):
    """{concept: residual path}, each trained by train.py (or reused: measure.trained_residual). model: a Recipe
    (default toy/base_many's); a toy FLUX's residuals go to a folder of their own."""
    from measure import trained_residual

    model = model or recipe()
    folder = out / ("residuals_many" if model.family == "sd" else f"residuals_{model.name}")
    return {name: trained_residual(folder / name, concept_photos(out / "concepts_many" / name, name),
                                   CONCEPTS[name][0], model.model, model.training, retrain) for name in names}


def layout_file(out, count):
    """The painted layout of `count` places, one colour each (PLACE_COLOURS), 96 px."""
    path = out / "layouts" / f"many_{count}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.zeros((MANY_SIZE, MANY_SIZE, 3), dtype=np.uint8)
        for colour, (left, top, right, bottom) in zip(PLACE_COLOURS, cells(LAYOUTS[count])):
            array[round(top):round(bottom), round(left):round(right)] = colour
        Image.fromarray(array).save(path)
    return path


def joined(names):
    """"a x", "a x and a y", "a x, a y and a z", ..."""
    parts = [f"a {n}" for n in names]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def noun_positions(tokenizer, words, prompt):
    """The token position of each word of `words` in `prompt`, in order (a word may occur more than once)."""
    from text_utils import token_ids, word_ids

    ids, positions, start = token_ids(tokenizer, prompt), [], 0
    for word in words:
        target = word_ids(tokenizer, word)[-1]  # the noun itself: the last token of "striped berry"
        start = ids.index(target, start)
        positions.append(start)
        start += 1
    return positions


def group_config(out, tokenizer, group, residuals, ceiling=False, sampling=None, **keys):
    """The config of one group: its subjects' generic nouns (or, for the ceiling, "{pattern} {specific noun}"
    with zero residuals) each guided into its place. sampling: the model's sampling keys (default measure.SAMPLING)."""
    from measure import GUIDANCE, SAMPLING, subject

    sampling = sampling or SAMPLING
    words = []
    for name in group:
        noun, shape, colour, pattern = CONCEPTS[name]
        words.append((noun if not ceiling else
                      (NOUNS[shape][colour] if pattern == "plain" else f"{pattern} {NOUNS[shape][colour]}")))
    prompt = joined(words)
    positions = noun_positions(tokenizer, words, prompt)
    names = [subject(name) for name in group]
    return {"prompt": prompt, "residual_dict": {n: str(residuals[name]) for n, name in zip(names, group)},
            "color_context": {",".join(map(str, c)): [n, 2.5] for c, n in zip(PLACE_COLOURS, names)},
            "guidance_steps": sampling["num_inference_steps"], **GUIDANCE, "layout": str(layout_file(out, len(group))),
            "subject_list": [[n, p] for n, p in zip(names, positions)], "save_attention": True, **sampling, **keys}


def score_group(group, images, maps):
    """{figure: share, figure_se: its standard error} of one group's samples."""
    truth = [CONCEPTS[name][1:] for name in group]  # (shape, colour, pattern) per place
    layout = LAYOUTS[len(group)]
    boxes = cells(layout)
    rows = {k: [] for k in FIGURES + ("leakage",)}
    wrong = {k: [] for k in ATTRIBUTES}  # per object drawn in a place: which of its attributes is not its subject's
    for j, image in enumerate(images):
        places = by_place(objects(image, patterns=True), layout)
        drawn = [identity(p[0]) if p else None for p in places]
        for d, t in zip(drawn, truth):
            for attribute, got, want in zip(ATTRIBUTES, d or (), t):
                wrong[attribute].append(got != want)
        rows["layout_accuracy"].append(all(d == t for d, t in zip(drawn, truth)))
        # a swap: another subject's identity in a place while that subject's own place lacks it (its look went
        # elsewhere); the same identity in its own place and another's is a collapse instead
        rows["swap_rate"].append(any(d is not None and d != t and d in truth and drawn[truth.index(d)] != d
                                     for d, t in zip(drawn, truth)))
        rows["collapse"].append(any(sum(d == t for d in drawn) >= 2 for t in set(truth)))
        rows["missing"].append(any(d is None for d in drawn))
        # leakage: a place's object wears a colour or pattern that its own subject lacks and another subject has
        rows["leakage"].append(any(d is not None and any(
            (d[k] != t[k] and any(o[k] == d[k] for o in truth if o != t)) for k in (1, 2)) for d, t in zip(drawn, truth)))
        inside = []
        for name, (left, top, right, bottom) in zip(group, boxes):
            mask = np.zeros((MANY_SIZE, MANY_SIZE), dtype=bool)
            mask[round(top):round(bottom), round(left):round(right)] = True
            attention = maps[j][f"<{name}>"]
            inside.append(float(attention[mask].sum() / attention.sum()))
        rows["attention_in_region"].append(float(np.mean(inside)))
    result = {}
    for figure, values in rows.items():
        values = np.asarray(values, dtype=float)
        result[figure] = float(values.mean())
        result[f"{figure}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    result["wrong_attribute"] = {k: float(np.mean(v)) if v else None for k, v in wrong.items()}
    return {**result, "examples": images[:4]}


def single_config(out, tokenizer, name, residual, wrong_token=False, sampling=None, **keys):
    """"a {generic noun}" with one residual, unguided, on the whole image: on the noun, or (wrong_token) on "a"."""
    from measure import GUIDANCE, SAMPLING, subject

    noun = CONCEPTS[name][0]
    prompt = f"a {noun}"
    position = noun_positions(tokenizer, [noun], prompt)[0] - wrong_token
    return {"prompt": prompt, "residual_dict": {subject(name): str(residual)},
            "color_context": {",".join(map(str, PLACE_COLOURS[0])): [subject(name), 2.5]}, **GUIDANCE,
            "layout": str(layout_file(out, 1)), "subject_list": [[subject(name), position]],
            **(sampling or SAMPLING), "guidance_steps": 0, **keys}


def score_single(name, images):
    """fidelity: the largest object wears the concept's colour and pattern; colour: its colour alone; class_kept:
    it has the concept's shape (the generic noun's class)."""
    _, shape, colour, pattern = CONCEPTS[name]
    largest = [found[0] if found else None for found in (objects(image, patterns=True) for image in images)]
    return {"fidelity": float(np.mean([o is not None and (o["colour"], o["pattern"]) == (colour, pattern)
                                       for o in largest])),
            "colour": float(np.mean([o is not None and o["colour"] == colour for o in largest])),
            "class_kept": float(np.mean([o is not None and o["shape"] == shape for o in largest])),
            "examples": images[:4]}


def measure_single(measurement, best, model, retrain=False):
    """The single-subject cells in the richer world, per concept: "a {noun}" with its residual ("with"), with a
    zero residual ("without"), and with its residual on "a" ("wrong_token", the negative control), under the
    faithful method, and with and wrong_token under the best setting. {"faithful": {variant: {concept: score}},
    "best": ...}."""
    from measure import log, sample, unlabelled_residual
    from pipeline_utils import load_tokenizer
    from residual_utils import load_residual

    out, names = measurement.out, tuple(CONCEPTS)
    residuals = train_all(out, names, retrain, model)
    folder = out / "residuals_many"
    zero = {n: unlabelled_residual(folder / f"zero_{model.family}_{model.width}" / f"{n}.pt",
                                   torch.zeros(1, model.width), model.family) for n in names}
    unlabelled = {n: unlabelled_residual(folder / f"unlabelled_{model.name}" / f"{n}.pt", load_residual(p).tensor,
                                         model.family) for n, p in residuals.items()}
    tokenizer = load_tokenizer(str(model.model))
    cells = {"faithful": {"with": (residuals, False, {}), "without": (zero, False, {}),
                          "wrong_token": (unlabelled, True, {})},
             "best": {"with": (residuals, False, best["config"]), "wrong_token": (unlabelled, True, best["config"])}}
    scores = {}
    for setting, variants in cells.items():
        for variant, (files, wrong, keys) in variants.items():
            label = f"{model.name}-single-{setting}-{variant}"
            configs = {n: single_config(out, tokenizer, n, files[n], wrong, model.sampling, **keys) for n in names}
            if measurement.progress is not None:
                measurement.progress.set_postfix_str(label)
            results = sample(out, label, configs, measurement.seeds, model.model, MANY_SIZE)
            if measurement.progress is not None:
                measurement.progress.update()
            scores.setdefault(setting, {})[variant] = {n: score_single(n, images) for n, (images, _) in results.items()}
            log(f"{label}: " + ", ".join(f"{n} {c['fidelity']:.2f}" for n, c in scores[setting][variant].items()))
    return scores


def single_summary(cells):
    """results.json's single-subject figures of one setting's cells (measure.py's keys)."""
    def mean(variant, key):
        return float(np.mean([c[key] for c in cells[variant].values()]))

    return {"concept_fidelity_with": mean("with", "fidelity"),
            **({"concept_fidelity_without": mean("without", "fidelity")} if "without" in cells else {}),
            "class_kept": mean("with", "class_kept"), "negative_control": mean("wrong_token", "fidelity"),
            "concept_fidelity_min": min(c["fidelity"] for c in cells["with"].values()),
            "concept_colour_with": mean("with", "colour")}


def pooled(scores):
    """The mean of several groups' figures (look-alike pairs), standard errors combined as of a mean."""
    result = {}
    for figure in [f for f in FIGURES + ("leakage",) if all(f in s for s in scores)]:
        result[figure] = float(np.mean([s[figure] for s in scores]))
        errors = [s[f"{figure}_se"] for s in scores]
        result[f"{figure}_se"] = None if None in errors else float(np.sqrt(np.sum(np.square(errors))) / len(errors))
    shares = {k: [s["wrong_attribute"][k] for s in scores if s["wrong_attribute"][k] is not None] for k in ATTRIBUTES}
    result["wrong_attribute"] = {k: float(np.mean(v)) if v else None for k, v in shares.items()}
    return result


def measure_many(measurement, best, retrain=False, model=None, unguided=False):
    """results.json's "many" ({"2", "3", "4"}) and "lookalike": per group the faithful method, the best setting
    and the ceiling, with the best setting's keys (and, with unguided, the faithful residuals without layout
    guidance). measurement: measure.Measurement (its out, seeds, progress); model: a Recipe (default toy/base_many's)."""
    from measure import log, sample, unlabelled_residual
    from pipeline_utils import load_tokenizer

    model = model or recipe()
    out, seeds = measurement.out, measurement.seeds
    names = sorted({n for g in GROUPS.values() for n in g} | {n for p in LOOKALIKES for n in p})
    residuals = train_all(out, names, retrain, model)
    zero = {n: unlabelled_residual(out / "residuals_many" / f"zero_{model.family}_{model.width}" / f"{n}.pt",
                                   torch.zeros(1, model.width), model.family) for n in names}
    tokenizer = load_tokenizer(str(model.model))
    groups = {**GROUPS, **{f"lookalike_{i}": pair for i, pair in enumerate(LOOKALIKES)}}
    settings = {"faithful": (residuals, False, {}), "best": (residuals, False, best["config"]),
                "ceiling": (zero, True, {})}
    if unguided:
        settings["unguided"] = (residuals, False, {"guidance_steps": 0})
    scores = {}
    prefix = "many" if model.family == "sd" else f"{model.name}-many"
    for label, (files, ceiling, keys) in settings.items():
        configs = {g: group_config(out, tokenizer, members, files, ceiling, model.sampling, **keys)
                   for g, members in groups.items()}
        if measurement.progress is not None:
            measurement.progress.set_postfix_str(f"{prefix}-{label}")
        results = sample(out, f"{prefix}-{label}", configs, seeds, model.model, MANY_SIZE)
        if measurement.progress is not None:
            measurement.progress.update()
        for g, (images, maps) in results.items():
            scores.setdefault(g, {})[label] = score_group(groups[g], images, maps)
        log(f"{prefix} {label}: " + ", ".join(f"{g} {scores[g][label]['layout_accuracy']:.2f}" for g in groups))
    many = {g: {label: strip(s) for label, s in scores[g].items()} for g in GROUPS}
    lookalike = {label: pooled([scores[f"lookalike_{i}"][label] for i in range(len(LOOKALIKES))])
                 for label in settings}
    lookalike["pairs"] = {"+".join(p): {label: strip(scores[f"lookalike_{i}"][label]) for label in settings}
                          for i, p in enumerate(LOOKALIKES)}
    for group in many.values():
        group["setting"] = best["config"]
    lookalike["setting"] = best["config"]
    examples = {g: {label: scores[g][label]["examples"] for label in settings} for g in groups}
    return many, lookalike, examples


def sweep_groups(measurement, model, rows, retrain=False):
    """[row]: every group (N = 2, 3, 4 and the look-alike pairs) with the trained residuals under each (label,
    config keys) of `rows`: layout accuracy per group, swap, collapse, missing and leakage at their highest over
    the groups, attention in region at its mean."""
    from measure import log, sample
    from pipeline_utils import load_tokenizer

    names = sorted({n for g in GROUPS.values() for n in g} | {n for p in LOOKALIKES for n in p})
    residuals = train_all(measurement.out, names, retrain, model)
    tokenizer = load_tokenizer(str(model.model))
    groups = {**GROUPS, **{f"lookalike_{i}": pair for i, pair in enumerate(LOOKALIKES)}}
    result = []
    for i, (label, keys) in enumerate(rows):
        configs = {g: group_config(measurement.out, tokenizer, members, residuals, False, model.sampling, **keys)
                   for g, members in groups.items()}
        if measurement.progress is not None:
            measurement.progress.set_postfix_str(f"{model.name}-sweep-{i}")
        sampled = sample(measurement.out, f"{model.name}-sweep-{i}", configs, measurement.seeds, model.model,
                         MANY_SIZE)
        if measurement.progress is not None:
            measurement.progress.update()
        scores = {g: score_group(groups[g], images, maps) for g, (images, maps) in sampled.items()}
        lookalike = pooled([scores[f"lookalike_{j}"] for j in range(len(LOOKALIKES))])
        cells = [scores[g] for g in GROUPS] + [lookalike]
        row = {"setting": label, "config": keys,
               "layout_accuracy": {**{g: scores[g]["layout_accuracy"] for g in GROUPS},
                                   "lookalike": lookalike["layout_accuracy"]},
               **{f: max(c[f] for c in cells) for f in ("swap_rate", "collapse", "missing", "leakage")},
               "attention_in_region": float(np.mean([c["attention_in_region"] for c in cells]))}
        result.append(row)
        log(f"{model.name} sweep {label}: " + ", ".join(f"{g} {v:.2f}" for g, v in row["layout_accuracy"].items()))
    return result


def sweep_lines(rows, model):
    lines = ["", f"## Sweep on {model} (the faithful residuals; each row changes the faithful setting as it says)", "",
             "| setting | N = 2 | N = 3 | N = 4 | look-alikes | swap | collapse | missing | leakage | attention |",
             "| --- |" + " ---: |" * 9]
    for row in rows:
        a = row["layout_accuracy"]
        lines.append(f"| {row['setting']} | {a['2']:.2f} | {a['3']:.2f} | {a['4']:.2f} | {a['lookalike']:.2f} | "
                     + " | ".join(f"{row[f]:.2f}" for f in ("swap_rate", "collapse", "missing", "leakage",
                                                            "attention_in_region")) + " |")
    return lines


def strip(score):
    return {k: v for k, v in score.items() if k != "examples"}


def write_examples(path, examples, scale=2):
    """Per group a row of four samples for each setting (faithful, best, ceiling)."""
    tile = MANY_SIZE * scale
    rows = list(examples.items())
    labels = list(next(iter(examples.values())))
    canvas = Image.new("RGB", (len(labels) * (4 * tile + 12), len(rows) * (tile + 4)), (255, 255, 255))
    for r, (_, by_label) in enumerate(rows):
        for g, label in enumerate(labels):
            for j, image in enumerate(by_label[label]):
                canvas.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST),
                             (g * (4 * tile + 12) + j * tile, r * (tile + 4)))
    canvas.save(path)


def goal_rows(results):
    """(goal, faithful, best, goal text, met) of the many-subjects issue's table, from a results.json with "many"
    and the two-subject world's single-subject figures (concept_fidelity_min, class_kept, negative_control)."""
    many, lookalike, best = results["many"], results["lookalike"], results["best"]
    groups = [*many.values(), lookalike]
    rows = [(f"layout accuracy, N = {n}", many[n]["faithful"]["layout_accuracy"], many[n]["best"]["layout_accuracy"],
             ">=", goal) for n, goal in (("2", 0.90), ("3", 0.80), ("4", 0.70)) if n in many]
    rows.append(("layout accuracy, look-alike pairs", lookalike["faithful"]["layout_accuracy"],
                 lookalike["best"]["layout_accuracy"], ">=", 0.80))
    for figure in ("swap_rate", "collapse"):
        rows.append((f"{figure.replace('_rate', '')}, all N (the highest)", max(g["faithful"][figure] for g in groups),
                     max(g["best"][figure] for g in groups), "<=", 0.05))
    rows.append(("lowest single-concept fidelity", results["concept_fidelity_min"], best["concept_fidelity_min"],
                 ">=", 0.90))
    rows.append(("class kept, single subject", results["class_kept"], best["class_kept"], ">=",
                 results["class_kept"]))
    rows.append(("wrong-token control", results["negative_control"], best["negative_control"], "<=",
                 round(results["negative_control"] + 0.05, 3)))
    return [(label, f, b, f"{op} {goal:.2f}", b >= goal - 1e-9 if op == ">=" else b <= goal + 1e-9)
            for label, f, b, op, goal in rows]


def goal_lines(results, source=None):
    """The report's goal table (goal_rows) in markdown. source: what the figures are of (default: toy/base_many's
    groups with the two-subject world's single-subject rows)."""
    source = source or f"{results['seeds']} seeds; single-subject rows from the two-subject world"
    lines = ["", f"## Goals of the many-subjects cells ({source})", "",
             "| goal | faithful | best setting | goal (best) | |", "| --- | ---: | ---: | --- | --- |"]
    for label, f, b, goal, met in goal_rows(results):
        lines.append(f"| {label} | {f:.2f} | {b:.2f} | {goal} | {'met' if met else 'missed'} |")
    return lines


def report_lines(many, lookalike, model="toy/base_many"):
    """The report's table of the many-subjects figures: mean (standard error) per group and setting."""
    labels = [label for label in ("faithful", "best", "ceiling", "unguided") if label in lookalike]
    lines = ["", f"## Three and four subjects, and look-alikes (the richer world, {model})", "",
             "Share of samples (standard error): layout accuracy, swap, collapse, missing; attention in region is "
             "the mean share of the subjects' attention inside their places. Ceiling: the base model's own "
             "specific nouns with their patterns, no residual.", "",
             "| cell | setting | " + " | ".join(FIGURES) + " |", "| --- | --- |" + " ---: |" * len(FIGURES)]
    for cell, group in [(f"N = {k}", v) for k, v in many.items()] + [("look-alike pairs", lookalike)]:
        for label in labels:
            lines.append(f"| {cell} | {label} | " + " | ".join(
                f"{group[label][f]:.2f} ({group[label][f + '_se']:.2f})" if group[label][f + "_se"] is not None
                else f"{group[label][f]:.2f}" for f in FIGURES) + " |")
    lines += ["", "Why places fail: of the objects drawn in the places, the share whose shape, colour or pattern is not "
              "its subject's.", "", "| cell | setting | " + " | ".join(ATTRIBUTES) + " |",
              "| --- | --- |" + " ---: |" * len(ATTRIBUTES)]
    for cell, group in [(f"N = {k}", v) for k, v in many.items()] + [("look-alike pairs", lookalike)]:
        for label in labels:
            lines.append(f"| {cell} | {label} | " + " | ".join(
                "-" if group[label]["wrong_attribute"][a] is None else f"{group[label]['wrong_attribute'][a]:.2f}"
                for a in ATTRIBUTES) + " |")
    return lines
