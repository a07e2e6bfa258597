"""The toy world: its scenes read back exactly, and a residual learned on the committed base model carries its
concept (a broken training loop or a residual at the wrong position fails the margin)."""
import json

import numpy as np
import torch

import analyze
import measure
import world


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
    seeds = 8
    with_residual = measure.fidelity_cell(tmp_path, "with", "blue_circle", residual, seeds)
    without = measure.fidelity_cell(tmp_path, "without", "blue_circle", zero, seeds)
    assert with_residual["fidelity"] >= without["fidelity"] + 0.5, (with_residual["fidelity"], without["fidelity"])
    assert with_residual["class_kept"] >= 0.75


def test_results_are_written_under_out_only(tmp_path, monkeypatch):
    """results.json goes to --out; a report only where --results_md asks, keeping its analysis section.
    Training and sampling are replaced by fixed cells: this checks where the results go, in a second."""
    cell = {"fidelity": 1.0, "class_kept": 1.0, "both_colours": 1.0, "layout_accuracy": 1.0, "leakage": 0.0,
            "examples": np.zeros((4, 64, 64, 3), dtype=np.uint8),
            "attention_in_region": dict.fromkeys(measure.CONCEPTS, 0.75),
            "attention_in_region_failed": dict.fromkeys(measure.CONCEPTS)}

    def train_concept(out, name):  # where train.py would have written it
        (out / "residuals").mkdir(exist_ok=True)
        return out / "residuals" / f"{name}.safetensors"

    monkeypatch.setattr(measure, "train_concept", train_concept)
    monkeypatch.setattr(measure, "fixed_residual", lambda path, tensor, noun: path)
    monkeypatch.setattr(measure, "noun_swap_residual", lambda out, name: out / f"{name}_swap.safetensors")
    monkeypatch.setattr(measure, "load_residual", lambda path: type("R", (), {"tensor": torch.zeros(1, 64)}))
    monkeypatch.setattr(measure, "fidelity_cell", lambda *a, **k: cell)
    monkeypatch.setattr(measure, "composition_cell", lambda *a, **k: cell)
    tracked_report = measure.TOY / "RESULTS.md"
    before = tracked_report.read_text()

    out = tmp_path / "out"
    measure.run(measure.parse_args(["--seeds", "2", "--out", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert results["concept_fidelity_with"] == 1.0 and results["attention_in_region_with_guidance"] == 0.75
    assert (out / "examples.png").is_file() and not list(tmp_path.glob("*.md"))

    report = tmp_path / "report.md"
    report.write_text("old tables\n## Analysis\nkept by hand\n")
    measure.run(measure.parse_args(["--seeds", "2", "--out", str(out), "--results_md", str(report)]))
    text = report.read_text()
    assert text.startswith("# Toy world results") and "old tables" not in text
    assert text.endswith("## Analysis\nkept by hand\n")
    assert tracked_report.read_text() == before


def test_layout_guidance_puts_each_concepts_attention_in_its_region(tmp_path):
    """On the committed base model, with the specific nouns' residuals (no training): with guidance each concept's
    attention lies more inside its half than without."""
    pair = ("blue_circle", "yellow_square")
    residuals = {name: measure.noun_swap_residual(tmp_path, name) for name in pair}
    guided = measure.composition_cell(tmp_path, "guided", pair, residuals, 4, guided=True)
    unguided = measure.composition_cell(tmp_path, "unguided", pair, residuals, 4, guided=False)
    print("attention_in_region guided", guided["attention_in_region"], "unguided", unguided["attention_in_region"])
    for name in pair:
        assert guided["attention_in_region"][name] > unguided["attention_in_region"][name] + 0.1
