"""benchmark.py runs both modes end to end on the tiny preset, so it cannot rot."""
import json

import benchmark


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
