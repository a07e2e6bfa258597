"""The toy world: its scenes read back exactly, and a residual learned on the committed base model carries its
concept (a broken training loop or a residual at the wrong position fails the margin)."""
import importlib.util
import sys

import numpy as np
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "toy"))


def load(name):
    spec = importlib.util.spec_from_file_location(f"toy_{name}", ROOT / "toy" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scenes_are_deterministic_and_read_back():
    world, analyze = load("world"), load("analyze")
    image, caption, truth = world.scene(7)
    again, caption_again, _ = world.scene(7)
    assert np.array_equal(image, again) and caption == caption_again
    assert analyze.check(300) >= 0.98
    found = analyze.objects(world.render([world.Shape("triangle", "blue", 20, 30, 12)]))
    assert [(o["colour"], o["shape"]) for o in found] == [("blue", "triangle")]
    assert abs(found[0]["cx"] - 20) < 1.5


def test_residual_learned_on_the_toy_model_carries_its_concept(tmp_path):
    bench = load("benchmark")
    residual = bench.train_concept(tmp_path, "blue_circle")
    zero = bench.fixed_residual(tmp_path / "zero.safetensors", torch.zeros(1, 64), "circle")
    seeds = 8
    with_residual = bench.fidelity_cell(tmp_path, "with", "blue_circle", residual, seeds)
    without = bench.fidelity_cell(tmp_path, "without", "blue_circle", zero, seeds)
    assert with_residual["fidelity"] >= without["fidelity"] + 0.5, (with_residual["fidelity"], without["fidelity"])
    assert with_residual["class_kept"] >= 0.75
