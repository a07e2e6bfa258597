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
FIGURES = ("layout_accuracy", "swap_rate", "collapse", "missing", "attention_in_region")
ATTRIBUTES = ("shape", "colour", "pattern")


def concept_photos(folder, name, count=5, seed=0):
    """Five photos of one concept: the object alone, varied in place and size, as the world's one-object scenes."""
    _, shape, colour, pattern = CONCEPTS[name]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        obj = Shape(shape, colour, rng.uniform(40, 56), rng.uniform(40, 56), rng.uniform(25, 33), pattern)
        Image.fromarray(render([obj], MANY_SIZE)).save(folder / f"{i}.png")
    return folder


def train_all(out, names, retrain=False, model=BASE_MANY):
    """{concept: residual path}, each trained by train.py (or reused: measure.trained_residual)."""
    from measure import trained_residual

    return {name: trained_residual(out / "residuals_many" / name, concept_photos(out / "concepts_many" / name, name),
                                   CONCEPTS[name][0], model, TRAINING, retrain) for name in names}


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


def group_config(out, tokenizer, group, residuals, ceiling=False, **keys):
    """The config of one group: its subjects' generic nouns (or, for the ceiling, "{pattern} {specific noun}"
    with zero residuals) each guided into its place."""
    from measure import GUIDANCE, SAMPLING, subject

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
            "guidance_steps": SAMPLING["num_inference_steps"], **GUIDANCE, "layout": str(layout_file(out, len(group))),
            "subject_list": [[n, p] for n, p in zip(names, positions)], "save_attention": True, **SAMPLING, **keys}


def score_group(group, images, maps):
    """{figure: share, figure_se: its standard error} of one group's samples."""
    truth = [CONCEPTS[name][1:] for name in group]  # (shape, colour, pattern) per place
    layout = LAYOUTS[len(group)]
    boxes = cells(layout)
    rows = {k: [] for k in FIGURES}
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


def pooled(scores):
    """The mean of several groups' figures (look-alike pairs), standard errors combined as of a mean."""
    result = {}
    for figure in FIGURES:
        result[figure] = float(np.mean([s[figure] for s in scores]))
        errors = [s[f"{figure}_se"] for s in scores]
        result[f"{figure}_se"] = None if None in errors else float(np.sqrt(np.sum(np.square(errors))) / len(errors))
    shares = {k: [s["wrong_attribute"][k] for s in scores if s["wrong_attribute"][k] is not None] for k in ATTRIBUTES}
    result["wrong_attribute"] = {k: float(np.mean(v)) if v else None for k, v in shares.items()}
    return result


def measure_many(measurement, best, retrain=False, model=BASE_MANY):
    """results.json's "many" ({"2", "3", "4"}) and "lookalike": per group the faithful method, the best setting
    and the ceiling, with the best setting's keys. measurement: measure.Measurement (its out, seeds, progress)."""
    from measure import log, sample, unlabelled_residual
    from pipeline_utils import load_tokenizer

    out, seeds = measurement.out, measurement.seeds
    names = sorted({n for g in GROUPS.values() for n in g} | {n for p in LOOKALIKES for n in p})
    residuals = train_all(out, names, retrain, model)
    zero = {n: unlabelled_residual(out / "residuals_many" / "zero" / f"{n}.pt", torch.zeros(1, 64)) for n in names}
    tokenizer = load_tokenizer(str(model))
    groups = {**GROUPS, **{f"lookalike_{i}": pair for i, pair in enumerate(LOOKALIKES)}}
    settings = {"faithful": (residuals, False, {}), "best": (residuals, False, best["config"]),
                "ceiling": (zero, True, {})}
    scores = {}
    for label, (files, ceiling, keys) in settings.items():
        configs = {g: group_config(out, tokenizer, members, files, ceiling, **keys) for g, members in groups.items()}
        if measurement.progress is not None:
            measurement.progress.set_postfix_str(f"many-{label}")
        results = sample(out, f"many-{label}", configs, seeds, model, MANY_SIZE)
        if measurement.progress is not None:
            measurement.progress.update()
        for g, (images, maps) in results.items():
            scores.setdefault(g, {})[label] = score_group(groups[g], images, maps)
        log(f"many {label}: " + ", ".join(f"{g} {scores[g][label]['layout_accuracy']:.2f}" for g in groups))
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


def goal_lines(results):
    """The report's goal table (goal_rows) in markdown."""
    lines = ["", f"## Goals of the many-subjects cells ({results['seeds']} seeds; single-subject rows from the "
             "two-subject world)", "",
             "| goal | faithful | best setting | goal (best) | |", "| --- | ---: | ---: | --- | --- |"]
    for label, f, b, goal, met in goal_rows(results):
        lines.append(f"| {label} | {f:.2f} | {b:.2f} | {goal} | {'met' if met else 'missed'} |")
    return lines


def report_lines(many, lookalike):
    """The report's table of the many-subjects figures: mean (standard error) per group and setting."""
    lines = ["", "## Three and four subjects, and look-alikes (the richer world, toy/base_many)", "",
             "Share of samples (standard error): layout accuracy, swap, collapse, missing; attention in region is "
             "the mean share of the subjects' attention inside their places. Ceiling: the base model's own "
             "specific nouns with their patterns, no residual.", "",
             "| cell | setting | " + " | ".join(FIGURES) + " |", "| --- | --- |" + " ---: |" * len(FIGURES)]
    for cell, group in [(f"N = {k}", v) for k, v in many.items()] + [("look-alike pairs", lookalike)]:
        for label in ("faithful", "best", "ceiling"):
            lines.append(f"| {cell} | {label} | " + " | ".join(
                f"{group[label][f]:.2f} ({group[label][f + '_se']:.2f})" if group[label][f + "_se"] is not None
                else f"{group[label][f]:.2f}" for f in FIGURES) + " |")
    lines += ["", "Why places fail: of the objects drawn in the places, the share whose shape, colour or pattern is not "
              "its subject's.", "", "| cell | setting | " + " | ".join(ATTRIBUTES) + " |",
              "| --- | --- |" + " ---: |" * len(ATTRIBUTES)]
    for cell, group in [(f"N = {k}", v) for k, v in many.items()] + [("look-alike pairs", lookalike)]:
        for label in ("faithful", "best", "ceiling"):
            lines.append(f"| {cell} | {label} | " + " | ".join(
                "-" if group[label]["wrong_attribute"][a] is None else f"{group[label]['wrong_attribute'][a]:.2f}"
                for a in ATTRIBUTES) + " |")
    return lines
