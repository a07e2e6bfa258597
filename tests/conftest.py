"""Test fixtures: tiny random Stable Diffusion models saved with save_pretrained, the real CLIP tokenizer.

Every test loads these folders through the same code path users use for a real model.
"""
from pathlib import Path

import pytest
import torch

from tiny_model import build_tiny_flux, build_tiny_sd, build_tiny_sdxl, clip_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
# Tests that build or load a model (the tiny random ones, the scorers, the editor's server) run end to end and
# take seconds each; the rest are pure functions. `python -m pytest -m "not model"` is the inner loop.
MODEL_FIXTURES = {"tiny_model", "tiny_sdxl", "tiny_model_v", "tiny_model_1024", "tiny_flux", "tiny_scorers", "app",
                  "sdxl"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("readme"):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny epsilon-prediction SD with a 32-d text encoder."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL: two text encoders (conditioning 32 + 32 = 64-d), pooled embedding and micro-conditioning."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny FLUX.1-dev: CLIP (pooled, 32-d) and T5 (a small Unigram tokenizer, 32-d) text encoders, a transformer
    with guidance embedding, a 16-channel VAE and the flow-matching scheduler with dynamic shifting."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    """The same architecture as a v-prediction model."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_model_1024(tmp_path_factory):
    """A tiny SD whose text encoder is 1024-d, so the seed's SD 2.1 residual files fit."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_1024"), text_dim=1024, prediction_type="v_prediction")


@pytest.fixture()
def counted_compile(monkeypatch):
    """(patch, graphs): patch(module) makes module.compile_unet capture the UNet's graphs with torch.compile
    and run each as captured (so results are exact); graphs lists every graph compiled."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def patch(module):
        compile_unet = module.compile_unet
        monkeypatch.setattr(module, "compile_unet", lambda unet, mode: compile_unet(unet, mode, backend=backend))

    torch._dynamo.reset()
    yield patch, graphs
    torch._dynamo.reset()
