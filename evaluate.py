"""CLIP-T, CLIP-I and DINO scores of generated images, per image, per concept and per config.

    python evaluate.py --images inference_results/cat2_dog6/A_cat_on_the_right_and_a_dog_on_the_left \
        --prompt "A cat on the right and a dog on the left." \
        --concept_images "<cat2>=Data/concept_image/cat2" "<dog6>=Data/concept_image/dog6"
    python evaluate.py --results inference_results --concepts concepts.json     # every config of a run

- CLIP-T: 100 * cos(CLIP image embedding, CLIP text embedding of the prompt), clamped at 0, mean over images.
- CLIP-I: 100 * cos between the CLIP image embeddings of each generated image and each reference photo of a
  concept, mean over all pairs; per concept, and `clip_i` = the mean over concepts.
- DINO: as CLIP-I with the DINO ViT's CLS token (last hidden state, position 0).
Embeddings go through each model's own saved processor and are L2-normalised. Batch mode reads each image
folder's config.json (written by inference.py) for the prompt and the subjects, writes metrics.json beside
the images and a summary table (summary.md, summary.csv) in --results.

Region-aware scores (batch mode, from the run record's layout, colours and subjects; region_utils.py says how
a subject's region is found). Per image and subject, the region's bounding box is cut out, centred on a square
of grey 127 and scored against the subject's photos:
- region_clip_i, region_dino: as CLIP-I and DINO, on the crop;
- identity_ok: the subject's own photos are the closest (mean DINO) to the crop among all the config's
  subjects; swap_rate = the share of (image, subject) where they are not (0 with one subject);
- attention_in_region: where inference.py saved attention maps (--save_attention), the share of the
  subject's attention mass inside its region.
Each folder also gets regions.png: per image, the image with the regions outlined, then each subject's crop
with its scores.
"""
import csv
import io
import sys
from pathlib import Path

import torch

import numpy as np
from PIL import Image

from cli_utils import ArgumentParser, UserError, first_line, library_versions, run_cli
from config import parse_colour
from file_utils import (check_output_file, check_writable_folder, file_sha256, image_files, read_image, read_json,
                        regular_file, resolve_relative, write_json, write_png, write_text)
from layouts import RENDERED_LAYOUT
from pipeline_utils import model_source, resolve_device
from record import SCORING_KEYS, read_scoring_record
from region_utils import (ATTENTION_FOLDER, bounding_box, labelled, mass_inside, read_attention, read_layout,
                          region_colours, region_mask, side_by_side)

GRID_NAME = "all_images.png"  # inference.py's grid of the folder's images, not an image of its own
REGIONS_NAME = "regions.png"  # this script's picture of the regions and their scores
PAD_FILL = (127, 127, 127)  # around a region's crop, to make it square before the scorers' processors


def images_in(folder, what):
    return image_files(folder, what, exclude=(GRID_NAME, REGIONS_NAME, RENDERED_LAYOUT))


def read_images(files):
    return [read_image(path) for path in files]


# ------------------------------------------------------------------------------------------------
# Embeddings

class Scorer:
    """CLIP (image and text) and DINO embedding models, loaded once, by hub id or local folder."""

    def __init__(self, clip_model, dino_model, device):
        from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, ViTModel

        self.device = device
        self.clip_model_name, self.dino_model_name = clip_model, dino_model
        for flag, name in (("--clip_model", clip_model), ("--dino_model", dino_model)):
            check_scoring_model(flag, name)
        self.clip = self._load(CLIPModel, clip_model)
        self.clip_processor = self._load(AutoProcessor, clip_model)
        self.dino = self._load(ViTModel, dino_model, add_pooling_layer=False)
        self.dino_processor = self._load(AutoImageProcessor, dino_model)
        self.check_models()

    def _load(self, cls, name, **kwargs):
        try:
            loaded = cls.from_pretrained(name, **model_source(name, "config.json"), **kwargs)
        except Exception as e:
            raise UserError(f"cannot load {cls.__name__} from '{name}': {first_line(e)}") from None
        if isinstance(loaded, torch.nn.Module):
            loaded = loaded.to(self.device).eval()
        return loaded

    @torch.no_grad()
    def clip_images(self, images, batch_size=32):
        """[N, D] unit vectors."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.clip_processor(images=images[start:start + batch_size], return_tensors="pt")["pixel_values"]
            features = self.clip.get_image_features(pixel_values=pixels.to(self.device))
            out.append(_projected(features))
        return _unit(torch.cat(out))

    def check_models(self):
        """Both models embed an image: a model of the wrong kind (a DINO folder as --clip_model, say) fails here,
        in one line, before any image is scored."""
        from PIL import Image

        for flag, name, embed in (("--clip_model", self.clip_model_name, self.clip_images),
                                  ("--dino_model", self.dino_model_name, self.dino_images)):
            try:
                embed([Image.new("RGB", (32, 32))])
            except Exception as e:
                raise UserError(f"{flag} {name}: cannot embed an image with it ({first_line(e)})") from None

    @torch.no_grad()
    def clip_text(self, text):
        """[D] unit vector. A text longer than CLIP's context is an error, not a silently cut score."""
        tokenizer = self.clip_processor.tokenizer
        count = len(tokenizer(text, verbose=False).input_ids)
        if count > tokenizer.model_max_length:
            raise UserError(f"prompt '{text[:60]}...': {count} tokens, more than CLIP's {tokenizer.model_max_length}")
        tokens = self.clip_processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        features = self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                               attention_mask=tokens["attention_mask"].to(self.device))
        return _unit(_projected(features))[0]

    @torch.no_grad()
    def dino_images(self, images, batch_size=32):
        """[N, D] unit vectors: the CLS token of the last hidden state."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.dino_processor(images=images[start:start + batch_size], return_tensors="pt")["pixel_values"]
            out.append(self.dino(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0])
        return _unit(torch.cat(out))


def check_scoring_model(flag, name):
    """A local folder must exist; a hub id is checked with one request (pipeline_utils.model_source), so one
    that can be neither reached nor found in the cache fails at once instead of after the hub's retries."""
    if not Path(name).expanduser().exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        raise UserError(f"{flag} {name}: folder not found (and not a hub id, which is 'owner/name')")
    try:
        model_source(name, "config.json")
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


def _projected(features):
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _unit(x):
    return torch.nn.functional.normalize(x.float(), dim=-1)


# ------------------------------------------------------------------------------------------------
# Scores

def score_folder(scorer, image_paths, prompt, concepts, reference_cache):
    """Scores of generated images against a prompt and {name: reference image files}."""
    images = read_images(image_paths)
    clip = scorer.clip_images(images)  # [N, D]
    dino = scorer.dino_images(images)
    clip_t = (100 * clip @ scorer.clip_text(prompt)).clamp(min=0)  # [N]
    per_concept, per_image_concept = {}, {}
    for name, files in concepts.items():
        ref_clip, ref_dino = reference_embeddings(scorer, files, reference_cache)
        clip_i = 100 * clip @ ref_clip.T  # [N, R]
        dino_i = 100 * dino @ ref_dino.T
        per_concept[name] = {"clip_i": clip_i.mean().item(), "dino": dino_i.mean().item()}
        per_image_concept[name] = (clip_i.mean(1), dino_i.mean(1))
    per_image = [{"image": path.name, "clip_t": clip_t[i].item(),
                  "clip_i": {n: v[0][i].item() for n, v in per_image_concept.items()},
                  "dino": {n: v[1][i].item() for n, v in per_image_concept.items()}}
                 for i, path in enumerate(image_paths)]
    return {
        "prompt": prompt,
        "clip_t": clip_t.mean().item(),
        "clip_i": sum(c["clip_i"] for c in per_concept.values()) / len(per_concept) if per_concept else None,
        "dino": sum(c["dino"] for c in per_concept.values()) / len(per_concept) if per_concept else None,
        "per_concept": per_concept,
        "per_image": per_image,
        "n_images": len(image_paths),
        "clip_model": scorer.clip_model_name,
        "dino_model": scorer.dino_model_name,
        "versions": library_versions(("torch", "transformers")),
    }


def reference_embeddings(scorer, files, cache):
    """(CLIP [R, D], DINO [R, D]) of a concept's photos, computed once per set of files."""
    key = tuple(str(f) for f in files)
    if key not in cache:
        refs = read_images(files)
        cache[key] = (scorer.clip_images(refs), scorer.dino_images(refs))
    return cache[key]


# ------------------------------------------------------------------------------------------------
# Region-aware scores

def record_regions(config_path, record, size):
    """{subject: bool [H, W]} from a run record, at the images' size (W, H); or (None, why not)."""
    if not all(key in record for key in SCORING_KEYS):  # checked by read_scoring_record where all are there
        return None, "the record has no layout (written before region scores, or not by inference.py)"
    layout_path = Path(record["layout"])
    if not layout_path.is_file():
        return None, f"its layout {layout_path} is not found"
    if file_sha256(layout_path) != record["file_sha256"].get("layout"):
        return None, f"its layout {layout_path} has changed since the run (its sha256 differs)"
    layout = read_layout(layout_path, *size)
    rgb_of = {colour: parse_colour(colour, None) for colour in record["color_context"]}  # checked above
    return {name: region_mask(layout, [rgb_of[c] for c in region_colours(record["token_rows"], position)])
            for name, position in record["subject_list"]}, None


def region_crop(image, box):
    """The box cut from a PIL image, centred on a square of PAD_FILL."""
    crop = image.crop(box)
    side = max(crop.size)
    square = Image.new("RGB", (side, side), PAD_FILL)
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square


def run_attention(folder, image_paths, size):
    """Per image its attention maps {name: [H, W]} (attention/{stem}.npz), None where it has none."""
    files = [folder / ATTENTION_FOLDER / f"{p.stem}.npz" for p in image_paths]
    return [read_attention(regular_file(file, "attention file"), size) if file.exists() or file.is_symlink()
            else None for file in files]


def score_regions(scorer, images, masks, attention, references):
    """({subject: {box, and per image: region_clip_i, region_dino, identity_ok, attention_in_region}},
    {subject: [square crops]}) for each subject with a region (see the module's docstring).

    masks {subject: bool [H, W]}; attention: per image {name: [H, W]} or None (run_attention); references
    {subject: (CLIP [R, D], DINO [R, D])} of every subject, in the record's order (on a tie in closeness the
    subject listed first is the closest)."""
    names = list(references)
    per_subject, crops = {}, {}
    for name, mask in masks.items():
        box = bounding_box(mask)
        if box is None:
            continue
        crops[name] = [region_crop(image, box) for image in images]
        clip, dino = scorer.clip_images(crops[name]), scorer.dino_images(crops[name])  # [N, D]
        closeness = torch.stack([(dino @ references[other][1].T).mean(1) for other in names])  # [S, N]
        inside = [mass_inside(maps[name], mask) if maps is not None and name in maps else None for maps in attention]
        per_subject[name] = {
            "box": list(box),
            "region_clip_i": (100 * clip @ references[name][0].T).mean(1).tolist(),
            "region_dino": (100 * dino @ references[name][1].T).mean(1).tolist(),
            "identity_ok": (closeness.argmax(0) == names.index(name)).tolist(),
            "attention_in_region": inside}
    return per_subject, crops


def region_summary(per_subject):
    """Means over images and subjects: region_clip_i, region_dino, swap_rate, attention_in_region (None if none)."""
    def mean(key):
        values = [v for s in per_subject.values() for v in s[key] if v is not None]
        return float(np.mean(values)) if values else None
    ok = mean("identity_ok")
    return {"region_clip_i": mean("region_clip_i"), "region_dino": mean("region_dino"),
            "swap_rate": None if ok is None else 1 - ok, "attention_in_region": mean("attention_in_region")}


def regions_picture(images, masks, per_subject, crops):
    """Per image a row: the image with every region outlined and named, then each subject's crop and scores."""
    panels = []
    for i, image in enumerate(images):
        array = np.asarray(image)
        union = np.zeros(array.shape[:2], dtype=bool)
        for name in per_subject:
            union |= masks[name]
        panels.append(labelled(array, union, list(per_subject)))
        for name, scores in per_subject.items():
            crop = np.asarray(crops[name][i].resize(image.size))
            inside = scores["attention_in_region"][i]
            panels.append(labelled(crop, None, [
                name, f"CLIP-I {scores['region_clip_i'][i]:.1f}", f"DINO {scores['region_dino'][i]:.1f}",
                "identity ok" if scores["identity_ok"][i] else "swapped",
                *([f"attn in {inside:.2f}"] if inside is not None else [])]))
    return side_by_side(panels, rows=len(images))


def parse_concepts(pairs):
    concepts = {}
    for pair in pairs or []:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--concept_images {pair}: expected NAME=DIR")
        if name in concepts:
            raise UserError(f"--concept_images {pair}: concept '{name}' is given twice")
        concepts[name] = images_in(folder, f"--concept_images {name}:")
    return concepts


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def print_scores(result):
    print(f"{result['n_images']} images  CLIP-T {fmt(result['clip_t'])}  CLIP-I {fmt(result['clip_i'])}  "
          f"DINO {fmt(result['dino'])}")
    for name, scores in result["per_concept"].items():
        print(f"  {name}: CLIP-I {fmt(scores['clip_i'])}  DINO {fmt(scores['dino'])}")


# ------------------------------------------------------------------------------------------------
# Batch mode over an inference output tree

def batch_jobs(results_dir, concepts_file):
    """[(folder, prompt, {subject: reference files}, record)] for every folder under results_dir with a
    config.json (the record: that file's contents)."""
    results_dir, concepts_file = Path(results_dir), Path(concepts_file)
    if not results_dir.is_dir():
        raise UserError(f"--results {results_dir}: folder not found")
    mapping = read_json(concepts_file, "concepts file (--concepts)")
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UserError(f"--concepts {concepts_file}: expected an object {{subject name: reference image folder}}")
    jobs = []
    for config_path in sorted(results_dir.rglob("config.json")):
        prompt, subjects, config = read_scoring_record(config_path)
        unknown = [s for s in subjects if s not in mapping]
        if unknown:
            raise UserError(f"{config_path}: subject {unknown[0]} has no reference folder in {concepts_file} "
                            f"(it maps: {', '.join(mapping) or 'nothing'})")
        base = concepts_file.parent
        concepts = {s: images_in(resolve_relative(mapping[s], base) or mapping[s], f"{concepts_file}: {s}:")
                    for s in subjects}
        jobs.append((config_path.parent, prompt, concepts, config))
    if not jobs:
        raise UserError(f"--results {results_dir}: no config.json below it (is it an inference.py output folder?)")
    return jobs


def run_regions(folder, image_paths, record):
    """(masks or None, attention maps, why not) of one run folder, every file it reads checked before anything is
    scored: the record's region keys, the images' one size, the attention maps (run_attention)."""
    images = read_images(image_paths)
    sizes = sorted({image.size for image in images})
    if len(sizes) > 1:
        raise UserError(f"{folder}: images of {len(sizes)} sizes ({', '.join(f'{w}x{h}' for w, h in sizes[:3])}); a "
                        f"run's images share one size, as its layout does")
    masks, why_not = record_regions(folder / "config.json", record, sizes[0])
    if masks is None:
        return None, None, why_not
    attention = run_attention(folder, image_paths, sizes[0])
    for path, maps in zip(image_paths, attention):
        missing = [name for name in masks if maps is not None and name not in maps]
        if missing:  # inference.py writes a map for every subject
            raise UserError(f"{folder / ATTENTION_FOLDER / (path.stem + '.npz')}: no map of {missing[0]!r}")
    return masks, attention, why_not


def score_run_regions(scorer, image_paths, concepts, regions, cache):
    """(metrics.json keys, regions.png picture or None) of one run folder's region-aware scores; regions: its
    run_regions."""
    masks, attention, why_not = regions
    if masks is None:
        return {**dict.fromkeys(SCORE_COLUMNS[3:]), "regions": None, "regions_skipped": why_not}, None
    images = read_images(image_paths)
    references = {name: reference_embeddings(scorer, files, cache) for name, files in concepts.items()}
    per_subject, crops = score_regions(scorer, images, masks, attention, references)
    picture = regions_picture(images, masks, per_subject, crops) if per_subject else None
    return {**region_summary(per_subject), "regions": {"images": [p.name for p in image_paths],
                                                       "pad_fill": list(PAD_FILL), "per_subject": per_subject}}, picture


SCORE_COLUMNS = ("clip_t", "clip_i", "dino", "region_clip_i", "region_dino", "swap_rate", "attention_in_region")


def write_summary(results_dir, rows):
    """summary.csv and summary.md: one row per config, the mean over configs (that have the score) last."""
    columns = ("config", "subjects", "n_images") + SCORE_COLUMNS
    mean = {"config": "mean", "subjects": "", "n_images": sum(r["n_images"] for r in rows)}
    for column in SCORE_COLUMNS:
        scored = [r[column] for r in rows if r[column] is not None]
        mean[column] = sum(scored) / len(scored) if scored else None
    table = rows + [mean]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for r in table:
        writer.writerow([f"{r[c]:.4f}" if isinstance(r[c], float) else "" if r[c] is None else r[c] for c in columns])
    write_text(results_dir / "summary.csv", buffer.getvalue())
    lines = ["| config | subjects | images | CLIP-T | CLIP-I | DINO | region CLIP-I | region DINO | swap rate | "
             "attention in region |", "| --- | --- | ---: |" + " ---: |" * len(SCORE_COLUMNS)]
    lines += [f"| {r['config']} | {r['subjects']} | {r['n_images']} | " + " | ".join(fmt(r[c]) for c in SCORE_COLUMNS)
              + " |" for r in table]
    write_text(results_dir / "summary.md", "\n".join(lines) + "\n")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------

def main(args):
    if bool(args.results) == bool(args.images):
        raise UserError("give either --images DIR --prompt TEXT (one folder) or --results DIR --concepts FILE (batch)")
    if args.images:
        if not args.prompt:
            raise UserError("--images needs --prompt")
        images = images_in(args.images, "--images")
        concepts = parse_concepts(args.concept_images)
        output = Path(args.output or Path(args.images) / "metrics.json")
        check_writable_folder(output.parent, "--output")
        check_output_file(output, "--output")
        scorer = Scorer(args.clip_model, args.dino_model, resolve_device(args.device))
        result = score_folder(scorer, images, args.prompt, concepts, {})
        print_scores(result)
        write_json(output, result)
        print(f"wrote {output}")
        return result
    if not args.concepts:
        raise UserError("--results needs --concepts FILE (a JSON object {subject name: reference image folder})")
    jobs = batch_jobs(args.results, args.concepts)
    jobs = [(*job, images_in(job[0], "images in")) for job in jobs]
    for output in [job[0] / name for job in jobs for name in ("metrics.json", REGIONS_NAME)] + [
            Path(args.results) / f"summary.{kind}" for kind in ("md", "csv")]:
        check_output_file(output, "cannot write")
    # Every file every folder needs is read and checked before the first is scored, and everything is scored
    # before the first file is written: a mistake in the last folder leaves the first untouched.
    regions = [run_regions(folder, images, record) for folder, _, _, record, images in jobs]
    scorer = Scorer(args.clip_model, args.dino_model, resolve_device(args.device))
    cache, rows, outputs = {}, [], []
    for (folder, prompt, concepts, record, images), folder_regions in zip(jobs, regions):
        result = score_folder(scorer, images, prompt, concepts, cache)
        region_scores, picture = score_run_regions(scorer, images, concepts, folder_regions, cache)
        result.update(region_scores)
        if folder_regions[0] is None:
            print(f"warning: {folder}: no region scores: {folder_regions[2]}", file=sys.stderr)
        outputs.append((folder, result, picture))
        rows.append({"config": str(folder.relative_to(args.results)), "subjects": " ".join(concepts),
                     "n_images": result["n_images"], **{c: result[c] for c in SCORE_COLUMNS}})
    for folder, result, picture in outputs:
        write_json(folder / "metrics.json", result)
        if picture is not None:
            write_png(folder / REGIONS_NAME, picture)
    print(write_summary(Path(args.results), rows))
    return rows


def parse_args(argv=None):
    p = ArgumentParser(__doc__.split("\n\n")[0])
    p.add_argument("--images", help="a folder of generated images")
    p.add_argument("--prompt", help="the prompt they were generated from")
    p.add_argument("--concept_images", nargs="*", metavar="NAME=DIR", help="reference photos of each concept")
    p.add_argument("--results", help="batch mode: an inference.py output folder")
    p.add_argument("--concepts", help="batch mode: JSON {subject name: reference image folder}")
    p.add_argument("--clip_model", default="openai/clip-vit-base-patch32")
    p.add_argument("--dino_model", default="facebook/dino-vits16")
    p.add_argument("--output", help="metrics JSON (default: metrics.json in the images folder)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
