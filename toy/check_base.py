"""How well a base model of the richer world draws its own captions: unguided samples, read back.

    python toy/check_base.py toy/base_many                 # 16 seeds per caption, 16 captions: ~2 minutes
    python toy/check_base.py toy/base_flux                 # the toy FLUX (toy/build_flux.py)

For N = 1 .. 4 objects, four scenes of world.many_scene each, captioned with their places and specific nouns
as in its training ("a striped berry on the left and a dotted butter on the right"), sampled with measure.py's
settings (a toy FLUX's: toy/many.py FLUX_SAMPLING) without layout guidance or residual and read back by analyze.py. Per N: the share of samples with every
place's largest object right (shape, colour and pattern), the share with a place empty, and per attribute the
share of the drawn objects that have it wrong, and the share of the wrong attributes that another place's
object has (a binding failure: the model drew the caption's words in the wrong places). Nothing of the method is involved: this is what any composition on
the model is bounded by. Writes {out}/check_base.json and prints a table.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules
import many  # noqa: E402
from analyze import by_place, identity, objects  # noqa: E402
from world import LAYOUTS, MANY_SIZE, PLACES, describe, many_scene  # noqa: E402

SCENES_PER_N = 4
FIRST_SCENE = 50_000_000  # far from the scenes the base model was trained on (build_base: from 0 upwards)
ATTRIBUTES = ("shape", "colour", "pattern")


def captioned_scenes(count, scenes=SCENES_PER_N):
    """[(caption, truth [(shape, colour, pattern)] in place order)] of `scenes` scenes of `count` objects."""
    result = []
    for seed in range(FIRST_SCENE + 100 * count, FIRST_SCENE + 100 * count + scenes):
        _, _, found = many_scene(seed, count)
        parts = [f"{describe(obj, 'noun')} {place}" for obj, place in zip(found, PLACES[LAYOUTS[count]])]
        caption = parts[0] if count == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        result.append((caption, [(o.shape, o.colour, o.pattern) for o in found]))
    return result


def score(images, truth):
    """(every place right, a place empty, [per place: the attributes drawn wrong or None], [per place: the
    attributes drawn wrong that another place's object has, or None]) per image."""
    rows = []
    for image in images:
        places = by_place(objects(image, patterns=True), LAYOUTS[len(truth)])
        drawn = [identity(p[0]) if p else None for p in places]
        wrong = [None if d is None else [a != b for a, b in zip(d, t)] for d, t in zip(drawn, truth)]
        borrowed = [None if d is None else [a != t[i] and any(o[i] == a for o in truth if o is not t)
                                            for i, a in enumerate(d)] for d, t in zip(drawn, truth)]
        rows.append((all(d == t for d, t in zip(drawn, truth)), any(d is None for d in drawn), wrong, borrowed))
    return rows


def share(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def check(model, out, seeds, overrides=None):
    """{"N": {n: {exact, exact_se, missing, missing_se, wrong: {attribute: share}}}} of the model; overrides:
    config keys set on top of the model's sampling settings (cfg_scale 1: no classifier-free guidance)."""
    import measure
    from many import layout_file, recipe

    out, model = Path(out), recipe(model)
    zero = measure.unlabelled_residual(out / f"zero_{model.family}.pt", torch.zeros(1, model.width), model.family)
    scenes = {f"{n}_{i}": (caption, truth) for n in range(1, 5)
              for i, (caption, truth) in enumerate(captioned_scenes(n))}
    configs = {key: {"prompt": caption, "residual_dict": {"<none>": str(zero)},
                     "color_context": {"255,0,0": ["<none>", 2.5]}, "layout": str(layout_file(out, 1)),
                     "subject_list": [["<none>", 1]], **measure.GUIDANCE, **model.sampling, **(overrides or {}), "guidance_steps": 0}
               for key, (caption, _) in scenes.items()}
    results = measure.sample(out, "check_base", configs, seeds, model.model, MANY_SIZE)
    report = {}
    for n in range(1, 5):
        rows = [row for key, (images, _) in results.items() if key.startswith(f"{n}_")
                for row in score(images, scenes[key][1])]
        drawn = [w for _, _, wrong, _ in rows for w in wrong if w is not None]
        borrowed = [b for *_, places in rows for b in places if b is not None]
        wrong_count = sum(map(sum, drawn))
        exact, exact_se = share([r[0] for r in rows])
        missing, missing_se = share([r[1] for r in rows])
        report[str(n)] = {"exact": exact, "exact_se": exact_se, "missing": missing, "missing_se": missing_se,
                          "wrong": {a: float(np.mean([w[i] for w in drawn])) if drawn else None
                                    for i, a in enumerate(ATTRIBUTES)},
                          "wrong_from_another": sum(map(sum, borrowed)) / wrong_count if wrong_count else None,
                          "captions": [scenes[f"{n}_{i}"][0] for i in range(SCENES_PER_N)]}
    return {"model": str(model.model), "seeds": seeds, "sampling": {**model.sampling, **(overrides or {})},
            "N": report}


def table(report):
    lines = ["| N | every place right | a place empty | wrong shape | wrong colour | wrong pattern | wrong ones "
             "another place's |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, r in report["N"].items():
        borrowed = "-" if r["wrong_from_another"] is None else f"{r['wrong_from_another']:.2f}"
        lines.append(f"| {n} | {r['exact']:.2f} ({r['exact_se']:.2f}) | {r['missing']:.2f} | " +
                     " | ".join(f"{r['wrong'][a]:.2f}" for a in ATTRIBUTES) + f" | {borrowed} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a base model folder of the richer world (toy/build_base.py --world many, "
                                 "toy/build_flux.py)")
    p.add_argument("--seeds", type=int, default=16, help="samples per caption")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "runs" / "check_base"))
    many.add_overrides(p)
    args = p.parse_args(argv)
    report = check(args.model, args.out, args.seeds, many.overrides(p, args.overrides))
    (Path(args.out) / "check_base.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.model}, {args.seeds} samples per caption, {SCENES_PER_N} captions per N, {report['sampling']}:")
    print(table(report))
    return report


if __name__ == "__main__":
    main()
