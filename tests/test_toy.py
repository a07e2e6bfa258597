"""The toy world: its scenes read back exactly, and a residual learned on the committed base model carries its
concept (a broken training loop or a residual at the wrong position fails the margin)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
import measure
import world
from config import job_settings

pytestmark = pytest.mark.model  # every test here builds or loads a model


def test_scenes_are_deterministic_and_read_back():
    image, caption, truth = world.scene(7)
    again, caption_again, _ = world.scene(7)
    assert np.array_equal(image, again) and caption == caption_again
    assert analyze.check(300) >= 0.98
    found = analyze.objects(world.render([world.Shape("triangle", "blue", 20, 30, 12)]))
    assert [(o["colour"], o["shape"]) for o in found] == [("blue", "triangle")]
    assert abs(found[0]["cx"] - 20) < 1.5


def test_residual_learned_on_the_toy_model_carries_its_concept(tmp_path):
    residual = measure.train_concept(tmp_path, "blue_circle")
    zero = measure.fixed_residual(tmp_path / "zero.safetensors", torch.zeros(1, 64), "circle")
    seeds, names = 8, ("blue_circle",)
    with_residual = measure.fidelity_cells(tmp_path, "with", {"blue_circle": residual}, seeds, names=names)
    without = measure.fidelity_cells(tmp_path, "without", {"blue_circle": zero}, seeds, names=names)
    with_residual, without = with_residual["blue_circle"], without["blue_circle"]
    assert with_residual["fidelity"] >= without["fidelity"] + 0.5, (with_residual["fidelity"], without["fidelity"])
    assert with_residual["class_kept"] >= 0.75


def test_trained_residuals_are_reused_only_when_their_settings_match(tmp_path):
    """A second run into the same folder reuses a residual whose recorded settings match (no train.py: the file is
    untouched and it takes well under the seconds a training takes); other settings or --retrain train again."""
    import time

    changes = {"--max_train_steps": "2"}
    residual = measure.train_concept(tmp_path, "yellow_square", changes=changes)
    record = residual.parent / measure.SETTINGS_FILE
    settings = json.loads(record.read_text())
    assert settings["flags"] == measure.training_flags(changes) and settings["instance_prompt"] == "square"
    assert settings["model_sha256"] == measure.folder_sha256(measure.BASE_MODEL)
    first = residual.stat().st_mtime_ns
    start = time.perf_counter()
    assert measure.train_concept(tmp_path, "yellow_square", changes=changes) == residual
    assert residual.stat().st_mtime_ns == first and time.perf_counter() - start < 2

    record.write_text(json.dumps({**settings, "flags": measure.TRAINING}))  # trained with other flags
    measure.train_concept(tmp_path, "yellow_square", changes=changes)
    second = residual.stat().st_mtime_ns
    assert second != first and json.loads(record.read_text()) == settings
    measure.train_concept(tmp_path, "yellow_square", changes=changes, retrain=True)
    assert residual.stat().st_mtime_ns != second


def test_a_default_run_writes_to_an_untracked_folder():
    """The committed figures (toy/results) are not where a run goes unless --out names them; git ignores the default."""
    import subprocess

    out = Path(measure.parse_args([]).out)
    assert out == measure.TOY / "runs" and out != measure.TOY / "results"
    if (measure.ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.json")], cwd=measure.ROOT)
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "toy/results/results.json"], cwd=measure.ROOT,
                                 capture_output=True)
        assert ignored.returncode == 0 and tracked.returncode == 0


def obj(colour, cx, shape="circle"):
    return {"colour": colour, "shape": shape, "cx": cx, "cy": 32.0, "area": 100, "fill": 0.8}


@pytest.mark.parametrize("found,kind", [
    ([obj("blue", 10), obj("yellow", 50, "square")], "ok"),
    ([obj("yellow", 50, "square")], "missing"),
    ([obj("blue", 10), obj("red", 20)], "missing"),
    ([obj("yellow", 10), obj("blue", 50)], "misplaced"),
    ([obj("blue", 10), obj("orange", 50, "square")], "wrong_colour"),
    ([obj("green", 10), obj("orange", 50)], "wrong_colour"),
])
def test_failure_kinds(found, kind):
    assert measure.failure_kind(found, ("blue_circle", "yellow_square")) == kind


@pytest.mark.parametrize("found,by_shape,by_colour", [
    ([obj("blue", 10), obj("yellow", 50, "square")], False, False),
    ([obj("blue", 10), obj("yellow", 50, "circle")], True, False),  # the square took the circle's shape
    ([obj("yellow", 10), obj("yellow", 50, "square")], False, True),  # the circle took the square's colour
    ([obj("blue", 10, "square"), obj("yellow", 50, "circle")], True, False),  # each took the other's shape
    ([obj("yellow", 10), obj("blue", 50, "square")], False, True),  # each took the other's colour
    ([obj("yellow", 10, "triangle"), obj("orange", 50, "square")], False, False),
])
def test_leakage_is_told_apart_by_where_the_object_is(found, by_shape, by_colour):
    """Pair (blue circle left, yellow square right): an object with one's shape and the other's colour is the
    colour's concept with the wrong shape in that concept's half, and the shape's concept with the wrong colour
    in the other half."""
    assert measure.leaks(found, ("blue_circle", "yellow_square")) == (by_shape, by_colour)


def test_results_are_written_under_out_only(tmp_path, monkeypatch):
    """results.json goes to --out, with the faithful figures under today's keys and the best setting's under
    "best"; a report only where --results_md asks, keeping its analysis section. Training and sampling are
    replaced by fixed cells: this checks where the results go, in a second."""
    examples = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    no_many = ["--base_many", str(tmp_path / "no_base_many")]  # the many-subjects cells are toy/many.py's own

    sampled = []

    def fidelity_cells(out, cell, residuals, seeds, position=2, **keys):
        sampled.append(cell)
        value = 1.0 if job_settings(keys)["residual_guidance"] else 0.5  # the keys as a config resolves them
        return {n: {"fidelity": value, "class_kept": 1.0, "examples": examples} for n in measure.CONCEPTS}

    def composition_cells(out, cell, residuals, seeds, guided=True, nouns=False, **keys):
        sampled.append(cell)
        kinds = dict.fromkeys(measure.FAILURES, 0.0) | {"ok": 1.0}
        return {"+".join(p): {"both_colours": 1.0, "layout_accuracy": 0.9 if job_settings(keys)["residual_guidance"] else 0.6,
                              "leakage": 0.0, "leakage_by_shape": 0.0, "leakage_by_colour": 0.0,
                              "examples": examples, "failures": kinds,
                              "attention_by_failure": dict.fromkeys(measure.FAILURES),
                              "attention_in_region": dict.fromkeys(p, 0.75),
                              "attention_in_region_failed": dict.fromkeys(p)} for p in measure.PAIRS}

    def train_concept(out, name, changes=None, retrain=False):  # where train.py would have written it
        path = out / "residuals" / measure.training_label(changes) / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    monkeypatch.setattr(measure, "train_concept", train_concept)
    monkeypatch.setattr(measure, "noun_swap_residual", lambda out, name: out / f"{name}_swap.safetensors")
    monkeypatch.setattr(measure, "load_residual", lambda path: type("R", (), {"tensor": torch.zeros(1, 64)}))
    monkeypatch.setattr(measure, "fidelity_cells", fidelity_cells)
    monkeypatch.setattr(measure, "composition_cells", composition_cells)
    tracked_report = measure.TOY / "RESULTS.md"
    before = tracked_report.read_text()

    out = tmp_path / "out"
    measure.run(measure.parse_args([*no_many, "--quick", "--out", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == 8 and "sweep" not in results
    assert len(sampled) == len(set(sampled)) == measure.planned_cells(ablations=False, sweep=False) == 12
    assert results["concept_fidelity_with"] == 0.5 and results["attention_in_region_with_guidance"] == 0.75
    assert results["layout_accuracy_with_guidance"] == 0.6
    assert results["best"]["layout_accuracy_with_guidance"] == 0.9 and results["best"]["concept_fidelity_with"] == 1.0
    assert results["best"]["setting"] == measure.BEST
    assert (out / "examples.png").is_file() and not list(tmp_path.glob("*.md"))
    assert all(p.is_relative_to(out) for p in tmp_path.rglob("*") if p != out)

    report = tmp_path / "report.md"
    report.write_text("old tables\n## Analysis\nkept by hand\n")
    sampled.clear()
    measure.run(measure.parse_args([*no_many, "--seeds", "2", "--sweep", "--out", str(out), "--results_md", str(report)]))
    assert len(sampled) == len(set(sampled)) == measure.planned_cells(ablations=True, sweep=True)
    text = report.read_text()
    assert text.startswith("# Toy world results") and "old tables" not in text and "## Sweep" in text
    assert f"`python toy/measure.py --seeds 2 --sweep --out {out} --results_md {report}`" in text
    assert text.endswith("## Analysis\nkept by hand\n")
    swept = json.loads((out / "results.json").read_text())
    assert len(swept["sweep"]) == len(measure.SWEEP) + len(measure.NOUN_SWEEP)
    measure.run(measure.parse_args([*no_many, "--seeds", "2", "--out", str(out)]))  # no --sweep: the earlier one is kept
    kept = json.loads((out / "results.json").read_text())
    assert kept["sweep"] == swept["sweep"] and kept["sweep_date"] == swept["sweep_date"] == swept["date"]
    measure.run(measure.parse_args([*no_many, "--seeds", "3", "--out", str(out)]))  # another seed count: not its sweep
    assert "sweep" not in json.loads((out / "results.json").read_text())
    assert tracked_report.read_text() == before


def test_layout_guidance_puts_each_concepts_attention_in_its_region(tmp_path):
    """On the committed base model, with the specific nouns' residuals (no training): with guidance each concept's
    attention lies more inside its half than without."""
    pair = ("blue_circle", "yellow_square")
    residuals = {name: measure.noun_swap_residual(tmp_path, name) for name in pair}
    guided, unguided = (measure.composition_cells(tmp_path, f"guided{g}", residuals, 4, guided=g, pairs=[pair])
                        ["+".join(pair)] for g in (True, False))
    print("attention_in_region guided", guided["attention_in_region"], "unguided", unguided["attention_in_region"])
    for name in pair:
        assert guided["attention_in_region"][name] > unguided["attention_in_region"][name] + 0.1


def test_a_built_base_model_is_trained_further_with_its_vae_kept(tmp_path):
    """build_base --init: the VAE and scaling factor stay, the UNet moves, scenes go on after the ones seen, and the
    earlier build is recorded; a checkpoint is written mid-way. Min-SNR weights against numpy's own schedule."""
    import build_base
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    build_base.main(build_base.parse_args(["--world", "many", "--vae_steps", "1", "--steps", "2", "--batch_size", "2",
                                           "--output", str(first)]))
    build_base.main(build_base.parse_args(["--world", "many", "--init", str(first), "--steps", "2", "--batch_size",
                                           "2", "--min_snr", "5", "--save_every", "1", "--seed", "1",
                                           "--output", str(second)]))
    built = json.loads((second / "build.json").read_text())
    assert built["continued_from"] == json.loads((first / "build.json").read_text())
    assert built["scenes_seen"] == 2 * 2 + 2 * 2 and "planned_steps" not in built
    weights = {m: [load_file(next((folder / m).glob("*.safetensors"))) for folder in (first, second)]
               for m in ("vae", "unet")}
    assert all(torch.equal(weights["vae"][0][k], weights["vae"][1][k]) for k in weights["vae"][0])
    assert any(not torch.equal(weights["unet"][0][k], weights["unet"][1][k]) for k in weights["unet"][0])
    assert json.loads((second / "vae" / "config.json").read_text())["scaling_factor"] == built["scaling_factor"]

    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alpha_bar = np.cumprod(1 - betas)
    snr = alpha_bar / (1 - alpha_bar)
    steps = np.array([0, 100, 400, 999])
    got = build_base.min_snr_weights(torch.tensor(alpha_bar, dtype=torch.float64), torch.tensor(steps), 5.0)
    np.testing.assert_allclose(got.numpy(), np.minimum(snr[steps], 5.0) / snr[steps], rtol=1e-12)
    assert got[-1] == 1.0 and got[0] < 0.01
