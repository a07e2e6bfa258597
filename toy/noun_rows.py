"""Where a toy model's text encoder puts a noun, and whether a residual on the noun's row alone can carry it.

    python toy/noun_rows.py toy/base_flux          # the toy FLUX (T5, bidirectional): about 3 minutes
    python toy/noun_rows.py toy/base_many          # the toy UNet (CLIP, causal)
    python toy/noun_rows.py toy/base_flux --set true_cfg_scale=1   # config keys on top of the sampling settings

Cones 2's residual lives on one row of the text states, the subject's noun. For four (shape, colour) pairs the
generic caption "a {shape}" is set against the specific one "a {noun}" (world.NOUNS: the noun the base model
learnt for that colour of that shape):
1. rows: the norm of each text row's change from the generic caption to the specific one, beside the rows' own
   norms. A causal CLIP changes only the noun's row and those after it; a bidirectional T5 changes every row.
2. samples: the generic caption; the generic caption with the perfect noun-row residual (the specific caption's
   state minus the generic one's, on the noun's row: the most any residual on that row can do); the specific
   caption. Read back by analyze.py: the share of samples whose largest object has the noun's colour, and its
   shape. Where the perfect residual stays near the generic caption while the specific caption is right, the
   model reads the noun from rows a residual does not touch.
Writes {out}/noun_rows.json and prints both tables.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules
from analyze import objects  # noqa: E402
from world import MANY_SIZE, NOUNS  # noqa: E402

PAIRS = (("circle", "blue"), ("square", "yellow"), ("triangle", "red"), ("circle", "green"))
KINDS = ("generic", "noun_row_residual", "specific")


def noun_row(tokenizer):
    """The noun's row in "a {word}": after the tokenizer's leading specials (CLIP's BOS) and "a"."""
    from text_utils import leading_specials

    return leading_specials(tokenizer) + 1


def text_states(sd, family, text):
    """The text rows [L, d] the transformer or UNet sees for `text`: a toy FLUX's padded to its tokenizer's
    length (its sampling text length "max"), a toy UNet's BOS and words (text length "words": its mask hides EOS)."""
    from text_utils import encode_ids, token_ids

    if family == "flux":
        return encode_ids(sd.text_encoder, token_ids(sd.tokenizer, text, sd.tokenizer.model_max_length))[0].float()
    return encode_ids(sd.text_encoder, token_ids(sd.tokenizer, text))[0, :-1].float()


def row_changes(sd, family):
    """{noun: {"change": [per row |specific - generic|], "norm": [per row |generic|], "row": the noun's row}};
    the captions' common rows."""
    result = {}
    for shape, colour in PAIRS:
        generic, specific = (text_states(sd, family, f"a {w}") for w in (shape, NOUNS[shape][colour]))
        rows = min(len(generic), len(specific))
        result[NOUNS[shape][colour]] = {
            "change": (specific[:rows] - generic[:rows]).norm(dim=-1).tolist(),
            "norm": generic[:rows].norm(dim=-1).tolist(), "row": noun_row(sd.tokenizer)}
    return result


def sample_kinds(sd, model, out, seeds, overrides=None):
    """{noun: {kind: {"colour": share, "shape": share}}} of the three kinds of KINDS, `seeds` samples each;
    overrides: config keys on top of the model's sampling settings."""
    import measure
    from many import layout_file, recipe

    recipe = recipe(model)
    row = noun_row(sd.tokenizer)
    zero = measure.unlabelled_residual(out / "residuals" / "zero.pt", torch.zeros(1, recipe.width), recipe.family)
    configs, truth = {}, {}
    for shape, colour in PAIRS:
        noun = NOUNS[shape][colour]
        generic, specific = (text_states(sd, recipe.family, f"a {w}") for w in (shape, noun))
        perfect = measure.unlabelled_residual(out / "residuals" / f"{noun}.pt", (specific[row] - generic[row])[None],
                                              recipe.family)
        for kind, prompt, residual in (("generic", f"a {shape}", zero), ("noun_row_residual", f"a {shape}", perfect),
                                       ("specific", f"a {noun}", zero)):
            name = f"<{noun}_{kind}>"
            configs[f"{noun}_{kind}"] = {"prompt": prompt, "residual_dict": {name: str(residual)},
                                         "subject_list": [[name, row]], "color_context": {"255,0,0": [name, 2.5]},
                                         "layout": str(layout_file(out, 1)), **measure.GUIDANCE, **recipe.sampling,
                                         **(overrides or {}), "guidance_steps": 0}
            truth[f"{noun}_{kind}"] = (noun, kind, shape, colour)
    results = measure.sample(out, "noun_rows", configs, seeds, recipe.model, MANY_SIZE)
    report = {}
    for key, (images, _) in results.items():
        noun, kind, shape, colour = truth[key]
        largest = [found[0] if found else None for found in (objects(image, patterns=True) for image in images)]
        report.setdefault(noun, {})[kind] = {
            "colour": float(np.mean([o is not None and o["colour"] == colour for o in largest])),
            "shape": float(np.mean([o is not None and o["shape"] == shape for o in largest]))}
    return report


def tables(rows, samples):
    lines = ["| noun | its row | change of its row | largest change of a row before it | smallest change of a row "
             "after it | rows' norm |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for noun, r in rows.items():
        i, change = r["row"], r["change"]
        after = f"{min(change[i + 1:]):.1f}" if change[i + 1:] else "none"
        lines.append(f"| {noun} | {i} | {change[i]:.1f} | {max(change[:i]):.1f} | {after} | {np.mean(r['norm']):.1f} |")
    if samples:
        lines += ["", "| noun | " + " | ".join(f"{k}: colour, shape" for k in KINDS) + " |",
                  "| --- | " + " | ".join("---:" for _ in KINDS) + " |"]
        for noun, kinds in samples.items():
            lines.append(f"| {noun} | " + " | ".join(f"{kinds[k]['colour']:.2f}, {kinds[k]['shape']:.2f}"
                                                     for k in KINDS) + " |")
    return "\n".join(lines)


def main(argv=None):
    import many
    from pipeline_utils import load_model, model_family

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a toy base model of the richer world (toy/base_many, toy/base_flux)")
    p.add_argument("--seeds", type=int, default=16, help="samples per caption (0: the rows only)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "runs" / "noun_rows"))
    many.add_overrides(p)
    args = p.parse_args(argv)
    settings = many.overrides(p, args.overrides)
    out = Path(args.out)
    sd = load_model(args.model, torch.device("cpu"), torch.float32)
    rows = row_changes(sd, model_family(args.model))
    samples = sample_kinds(sd, Path(args.model), out, args.seeds, settings) if args.seeds else None
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "seeds": args.seeds, "overrides": settings, "rows": rows, "samples": samples}
    (out / "noun_rows.json").write_text(json.dumps(report, indent=2) + "\n")
    print(tables(rows, samples))
    return report


if __name__ == "__main__":
    main()
