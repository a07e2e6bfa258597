"""benchmark.py runs both modes end to end on the tiny preset, so it cannot rot."""
import json

import pytest
import torch

import benchmark
from pipeline_utils import run_cli


def test_inference_mode_reports_every_figure(capsys):
    summary = benchmark.main(benchmark.parse_args(
        ["inference", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--images", "1", "--profile"]))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    assert summary["unet_evaluations_per_image"] == 2
    for method in ("guided", "naive", "stock"):
        figures = summary[method]
        assert figures["s_per_image"] > 0 and figures["peak_gb"] > 0
        assert abs(figures["s_per_eval"] * 2 - figures["s_per_image"]) < 1e-9
    assert summary["overhead_vs_stock"] == summary["guided"]["s_per_eval"] / summary["stock"]["s_per_eval"]
    assert summary["speedup_vs_naive"] == summary["naive"]["s_per_image"] / summary["guided"]["s_per_image"]


def test_naive_can_be_left_out_of_a_rerun_of_inference(capsys):
    summary = benchmark.main(benchmark.parse_args(
        ["inference", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--images", "1", "--naive_images", "0"]))
    assert "naive" not in summary and summary["guided"]["s_per_image"] > 0
    assert summary["speedup_vs_naive"] is None and summary["memory_guided_over_naive"] is None
    assert "speedup_vs_naive" not in capsys.readouterr().out.strip().splitlines()[-2]


def test_training_mode_reports_every_figure(capsys):
    summary = benchmark.main(benchmark.parse_args(
        ["training", "--device", "cpu", "--preset", "tiny", "--photos", "2", "--warmup_steps", "2",
         "--train_steps", "1", "--profile"]))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "training"
    for method in ("project", "naive"):
        figures = summary[method]
        assert figures["s_per_step"] > 0 and figures["peak_gb"] > 0
        assert abs(figures["minutes_for_4000"] - figures["s_per_step"] * 4000 / 60) < 1e-9
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
    (["training", "--resolution", "100"], "--resolution 100: expected a positive multiple of 8"),
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
