"""benchmark.py runs both modes end to end on the tiny preset, so it cannot rot; its figures are checked
against UNet calls counted and timed by hooks of the test's own."""
import json
import time

import pytest
import torch

import benchmark
from cli_utils import run_cli

pytestmark = pytest.mark.model  # every test here builds or loads a model


@pytest.fixture()
def unet_calls(monkeypatch):
    """Every UNet forward of the models benchmark.py builds, in order: the model's index (in build order), the
    processor class of its cross-attention layers (which method is running), the batch rows and the seconds."""
    calls, built = [], []
    build_model = benchmark.build_model

    def counted_build_model(*args, **kwargs):
        sd = build_model(*args, **kwargs)
        index, starts = len(built), []
        built.append(sd)

        def before(unet, inputs):
            starts.append(time.perf_counter())

        def after(unet, inputs, output):
            seconds = time.perf_counter() - starts.pop()
            processor = next(p for name, p in unet.attn_processors.items() if ".attn2." in name)
            calls.append(dict(model=index, processor=type(processor).__name__, rows=inputs[0].shape[0],
                              seconds=seconds))

        sd.unet.register_forward_pre_hook(before)
        sd.unet.register_forward_hook(after)
        return sd

    monkeypatch.setattr(benchmark, "build_model", counted_build_model)
    return calls


def test_inference_mode_reports_every_figure(capsys, unet_calls):
    summary = benchmark.main(benchmark.parse_args(
        ["inference", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--images", "1", "--profile"]))
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    # a progress bar (stderr) for each timed method, ended at its count of images
    for method in ("naive", "guided", "stock"):
        assert f"{method}: 100%" in captured.err and "1/1 [" in captured.err, method
    assert summary["unet_evaluations_per_image"] == 2  # one guided step, run twice (self-recurrence)
    # images each method made: a warm-up and a timed one; guided also one profiled
    images = {"naive": 2, "guided": 3, "stock": 2}
    processors = {"naive": "NaiveAttnProcessor", "guided": "GuidedCrossAttnProcessor", "stock": "AttnProcessor2_0"}
    for method, processor in processors.items():
        calls = [c for c in unet_calls if c["processor"] == processor]
        # an evaluation is a conditional and an unconditional row, in one batched call or in two calls
        assert sum(c["rows"] for c in calls) == 2 * summary["unet_evaluations_per_image"] * images[method], method
        per_image = len(calls) // images[method]
        timed_calls = calls[per_image:2 * per_image]  # the timed image comes after the warm-up one
        figures = summary[method]
        assert figures["s_per_image"] >= sum(c["seconds"] for c in timed_calls), method
        assert figures["peak_gb"] > 0
    assert len(unet_calls) == 2 * 4 + 3 * 2 + 2 * 2  # naive: two calls a pass; guided and stock: one


def test_naive_can_be_left_out_and_the_attention_maps_timed(capsys):
    summary = benchmark.main(benchmark.parse_args(
        ["inference", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--images", "1", "--naive_images", "0",
         "--save_attention"]))
    assert "naive" not in summary and summary["guided"]["s_per_image"] > 0
    assert summary["attention_cost"] == summary["guided_recording"]["s_per_image"] / summary["guided"]["s_per_image"]
    assert summary["speedup_vs_naive"] is None and summary["memory_guided_over_naive"] is None
    assert "speedup_vs_naive" not in capsys.readouterr().out.strip().splitlines()[-2]


def test_training_mode_reports_every_figure(capsys, unet_calls):
    summary = benchmark.main(benchmark.parse_args(
        ["training", "--device", "cpu", "--preset", "tiny", "--photos", "2", "--warmup_steps", "2",
         "--train_steps", "1", "--profile"]))
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["mode"] == "training"
    for method in ("project", "naive"):  # progress bars: the warm-up steps, then the timed ones
        assert f"{method}: warm-up: 100%" in captured.err and "2/2 [" in captured.err, method
        assert f"{method}: 100%" in captured.err, method
    # one UNet forward of one sample per step: 2 warm-up steps, 1 timed, and for the project 1 profiled
    steps = {"project": 4, "naive": 3}
    for index, method in enumerate(("project", "naive")):
        calls = [c for c in unet_calls if c["model"] == index]
        assert [c["rows"] for c in calls] == [1] * steps[method], method
        assert calls[0]["processor"] == ("NaiveAttnProcessor" if method == "naive" else "AttnProcessor2_0")
        figures = summary[method]
        assert figures["s_per_step"] >= calls[2]["seconds"] > 0  # the timed step holds its forward, and more
        assert figures["peak_gb"] > 0
    # the project's latents are cached once every photo has been seen; the naive step encodes every time
    assert summary["project"]["vae_encodes_per_step"] == 0 and summary["naive"]["vae_encodes_per_step"] == 1


def test_compile_option_reaches_guided_stock_and_training(capsys, counted_compile):
    patch, graphs = counted_compile
    patch(benchmark)
    summary = benchmark.main(benchmark.parse_args(
        ["inference", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--images", "1", "--compile"]))
    assert summary["compile"] == "default"
    assert len(graphs) == 2  # one for the guided sampler, one for stock diffusers (naive stays eager)
    summary = benchmark.main(benchmark.parse_args(
        ["training", "--device", "cpu", "--preset", "tiny", "--photos", "1", "--warmup_steps", "1",
         "--train_steps", "1", "--compile", "reduce-overhead"]))
    assert summary["compile"] == "reduce-overhead" and summary["naive"]["s_per_step"] > 0
    assert len(graphs) == 3  # the project's training UNet


@pytest.mark.parametrize("argv, message", [
    (["inference", "--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["inference", "--images", "-1"], "--images -1: expected an integer >= 1"),
    (["training", "--resolution", "100"], "--resolution 100: expected a positive multiple of 8, at most 8192"),
    (["training", "--warmup_steps", "-1"], "--warmup_steps -1: expected an integer >= 0"),
    (["training", "--device", "cuda"], "--device cuda: no CUDA device is available"),
])
def test_bad_arguments_are_one_line_before_any_model_is_built(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    built = []
    monkeypatch.setattr(benchmark, "build_model", lambda *a, **k: built.append(a))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(benchmark.main, benchmark.parse_args(argv + ["--preset", "tiny"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert built == []


@pytest.mark.parametrize("preset, naive_training", [("tiny-sdxl", True), ("tiny-flux", False)])
def test_sdxl_and_flux_presets_run_inference_and_training(capsys, preset, naive_training):
    """The SDXL and FLUX presets go through the same paths: the guided sampler, the naive one and the stock
    pipeline (StableDiffusionXLPipeline, FluxPipeline) with as many UNet or transformer evaluations; train.py's
    step with SDXL's added conditioning, or FLUX's LoRA step alone (no naive FLUX step fits a GPU)."""
    summary = benchmark.main(benchmark.parse_args(
        ["inference", "--device", "cpu", "--preset", preset, "--steps", "1", "--images", "1"]))
    assert summary["unet_evaluations_per_image"] == 2
    assert all(summary[method]["s_per_image"] > 0 for method in ("guided", "naive", "stock"))
    summary = benchmark.main(benchmark.parse_args(
        ["training", "--device", "cpu", "--preset", preset, "--photos", "1", "--warmup_steps", "1",
         "--train_steps", "1"]))
    assert summary["project"]["s_per_step"] > 0
    assert ("naive" in summary) == naive_training and (summary["speedup_vs_naive"] is None) != naive_training


def test_sdxl_preset_has_the_real_models_shapes():
    """Built on the meta device (no memory): the parameter counts of stable-diffusion-xl-base-1.0's UNet and two
    text encoders, as their checkpoints hold them."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = benchmark.PRESETS["sdxl-1024"]
    clip = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4, **spec["unet"])
        first = CLIPTextModel(CLIPTextConfig(**clip, **spec["text"]))
        second = CLIPTextModelWithProjection(CLIPTextConfig(**clip, **spec["text_2"]))
    counts = [sum(p.numel() for p in module.parameters()) for module in (unet, first, second)]
    assert counts == [2_567_463_684, 123_060_480, 694_659_840]


def test_flux_preset_has_the_real_models_shapes():
    """FLUX.1-dev's transformer, T5-XXL's encoder, CLIP ViT-L's text model and FLUX's VAE, built on the meta
    device: their parameter counts as the checkpoints hold them."""
    with torch.device("meta"):
        modules = benchmark.flux_modules(benchmark.PRESETS["flux-1024"])
    counts = [sum(p.numel() for p in module.parameters()) for module in modules]
    assert counts == [11_901_408_320, 4_762_310_656, 123_060_480, 83_819_683]
