"""The toy FLUX (toy/build_flux.py, toy/base_flux): it builds from its script, loads as a FLUX.1 model, its text
reaches the transformer through T5's rows only, and a few guided steps put each subject's attention in its place."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import build_flux
import many
import measure
import world
from pipeline_utils import load_model
from text_utils import word_ids

BASE_FLUX = Path(build_flux.__file__).resolve().parent / "base_flux"


def test_the_toy_flux_builds_and_is_trained_further(tmp_path):
    """A small build and a run on top of it: the VAE is toy/base_many's with a zero shift, the second run moves the
    transformer and T5 and goes on with the scenes after the first's, and the folder loads as a FLUX.1 whose every
    world word is one T5 token and whose CLIP gives the same pooled embedding (zeros) for every text."""
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    small = ["--width", "32", "--double", "1", "--single", "1", "--batch_size", "2"]
    build_flux.main(build_flux.parse_args([*small, "--steps", "2", "--output", str(first)]))
    build_flux.main(build_flux.parse_args(["--init", str(first), "--steps", "2", "--batch_size", "2", "--seed", "1",
                                           "--save_every", "1", "--drop_captions", "0.5", "--output", str(second)]))
    built = json.loads((second / "build.json").read_text())
    assert built["continued_from"] == json.loads((first / "build.json").read_text())
    assert built["scenes_seen"] == 2 * 2 + 2 * 2 and "planned_steps" not in built

    def weights(folder, part):
        return load_file(next((folder / part).glob("*.safetensors")))

    source = weights(build_flux.TOY / "base_many", "vae")
    for folder in (first, second):
        vae = weights(folder, "vae")
        assert all(torch.equal(vae[k], source[k].float()) for k in source)
        assert json.loads((folder / "vae" / "config.json").read_text())["shift_factor"] == 0.0
    for part in ("transformer", "text_encoder_2"):
        a, b = weights(first, part), weights(second, part)
        assert any(not torch.equal(a[k], b[k]) for k in a), part

    sd = load_model(str(second), torch.device("cpu"), torch.float32)
    assert sd.family == "flux" and sd.tokenizer.model_max_length == build_flux.TEXT_LENGTH
    words = (list(world.SHAPES) + list(world.COLOURS) + list(world.PATTERNS)
             + [n for nouns in world.NOUNS.values() for n in nouns.values()])
    assert all(len(word_ids(sd.tokenizer, w)) == 1 for w in words)
    longest = max(len(sd.tokenizer(world.many_scene(s)[1]).input_ids) for s in range(300))
    assert longest <= build_flux.TEXT_LENGTH
    pooled = sd.text_encoder.pooled(["a striped berry on the left and a lime on the right", "a square"])
    assert pooled.shape == (2, 32) and torch.count_nonzero(pooled) == 0


@pytest.mark.skipif(not (BASE_FLUX / "model_index.json").is_file(), reason="toy/base_flux is not built")
def test_guided_steps_on_the_toy_flux_put_each_subjects_attention_in_its_place(tmp_path):
    """The committed toy FLUX, its own specific nouns in a two-subject layout (zero residuals, no training), a few
    steps: with layout guidance each subject's attention lies more inside its place than without, and the images
    are the model's size."""
    model = many.recipe(BASE_FLUX)
    assert model.family == "flux" and model.width == 64
    group = many.GROUPS["2"]
    from pipeline_utils import load_tokenizer

    tokenizer = load_tokenizer(str(BASE_FLUX))
    zero = {n: measure.unlabelled_residual(tmp_path / f"{n}.pt", torch.zeros(1, 64), "flux") for n in group}
    sampling = dict(model.sampling, num_inference_steps=6)
    configs = {"guided": many.group_config(tmp_path, tokenizer, group, zero, True, sampling),
               "unguided": many.group_config(tmp_path, tokenizer, group, zero, True, sampling, guidance_steps=0)}
    results = {k: measure.sample(tmp_path, k, {k: c}, 3, BASE_FLUX, world.MANY_SIZE)[k] for k, c in configs.items()}
    scores = {k: many.score_group(group, images, maps) for k, (images, maps) in results.items()}
    print({k: round(s["attention_in_region"], 3) for k, s in scores.items()})
    assert results["guided"][0].shape == (3, 96, 96, 3)
    assert scores["guided"]["attention_in_region"] > scores["unguided"]["attention_in_region"] + 0.1
    assert not np.array_equal(results["guided"][0], results["unguided"][0])


def test_a_base_run_writes_under_its_models_name_and_keeps_the_rest(tmp_path, monkeypatch):
    """--base: the figures go to results.json[model folder name] under measure.py's keys (the two-subject ones from
    the N = 2 group), the rest of results.json stays, and the report's section of that model is replaced, not
    repeated, with the hand-written analysis kept. Training and sampling are replaced by fixed cells."""
    folder = tmp_path / "base_toy"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    examples = np.zeros((4, 96, 96, 3), np.uint8)

    def figures(value):
        return {**{f: value for f in many.FIGURES + ("leakage",)}, **{f"{f}_se": 0.01 for f in many.FIGURES},
                "wrong_attribute": dict.fromkeys(many.ATTRIBUTES, 0.1)}

    def single(measurement, best, model, retrain=False):
        measurement.progress.update(5)
        cell = {n: {"fidelity": 0.5, "colour": 0.75, "class_kept": 1.0, "examples": examples} for n in many.CONCEPTS}
        return {"faithful": {"with": cell, "without": cell, "wrong_token": cell},
                "best": {"with": cell, "wrong_token": cell}}

    def groups(measurement, best, retrain=False, model=None, unguided=False):
        assert unguided and model.name == "base_toy"
        labels = {"faithful": 0.25, "best": 0.5, "ceiling": 0.75, "unguided": 0.125}
        cells = {g: {label: figures(v) for label, v in labels.items()} for g in many.GROUPS}
        return cells, {label: figures(v) for label, v in labels.items()}, {
            g: {label: examples for label in labels} for g in many.GROUPS}

    monkeypatch.setattr(many, "recipe", lambda m: many.Recipe(Path(m), "flux", many.FLUX_SAMPLING,
                                                              many.FLUX_TRAINING, 64))
    monkeypatch.setattr(many, "measure_single", single)
    monkeypatch.setattr(measure, "measure_many", groups)
    out, report = tmp_path / "out", tmp_path / "report.md"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"class_kept": 0.9, "seeds": 32}))
    report.write_text("# Toy world results\n\ntables\n\n## Analysis\nkept by hand\n")
    for _ in range(2):
        measure.run(measure.parse_args(["--base", str(folder), "--seeds", "2", "--out", str(out),
                                        "--results_md", str(report)]))
    results = json.loads((out / "results.json").read_text())
    assert results["class_kept"] == 0.9 and results["seeds"] == 32  # the toy UNet's figures stay
    block = results["base_toy"]
    assert block["family"] == "flux" and block["seeds"] == 2 and block["sampling"] == many.FLUX_SAMPLING
    assert block["layout_accuracy_with_guidance"] == 0.25 and block["best"]["layout_accuracy_with_guidance"] == 0.5
    assert block["layout_accuracy_without_guidance"] == 0.125 and block["leakage"] == 0.25
    assert block["concept_fidelity_with"] == 0.5 and block["negative_control"] == 0.5
    assert block["concept_colour_with"] == 0.75 and block["best"]["setting"] == measure.BEST_MANY
    assert set(block["many"]) == {"2", "3", "4"} and "unguided" in block["lookalike"]
    text = report.read_text()
    assert text.count("## base_toy (flux) in the richer world") == 1 and text.endswith("## Analysis\nkept by hand\n")
    assert text.index("tables") < text.index("## base_toy") < text.index("## Analysis")
    assert (out / "examples_base_toy.png").is_file()


def test_t5_puts_a_noun_on_every_row_and_the_toy_clip_on_its_own():
    """toy/noun_rows.py's rows: from "a circle" to "a berry", the toy UNet's visible rows (CLIP is causal, the
    mask hides EOS) change on the noun's row alone; the toy FLUX's T5 (bidirectional, no mask) changes every one
    of its 40 rows by a large part of a row's norm, which is why a residual on one row moves it little."""
    import noun_rows

    unet = load_model(str(many.BASE_MANY), torch.device("cpu"), torch.float32)
    for noun, r in noun_rows.row_changes(unet, "sd").items():
        change, row = np.array(r["change"]), r["row"]
        assert len(change) == row + 1 and change[:row].max() < 1e-5 and change[row] > 0.5 * r["norm"][row], noun
    flux = load_model(str(BASE_FLUX), torch.device("cpu"), torch.float32)
    for noun, r in noun_rows.row_changes(flux, "flux").items():
        change = np.array(r["change"])
        assert r["row"] == 1 and len(change) == 40 and change.min() > 0.3 * np.mean(r["norm"]), noun
