"""evaluate.py on tiny random CLIP and DINO (ViT) models saved with their processors."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from cli_utils import run_cli
from conftest import clip_tokenizer


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig,
                              ViTImageProcessor, ViTModel)

    root = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tokenizer()).save_pretrained(root / "clip")
    dino = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64), add_pooling_layer=False)
    dino.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def make_images(folder, count, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def run(*argv):
    return run_cli(evaluate.main, evaluate.parse_args([str(a) for a in argv]))


def test_scores_equal_a_direct_computation(tiny_scorers, tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, ViTModel

    clip_dir, dino_dir = tiny_scorers
    generated = make_images(tmp_path / "gen", 3, seed=1)
    Image.new("RGB", (96, 32)).save(generated / "all_images.png")  # the grid is not scored
    refs = {"<a>": make_images(tmp_path / "a", 2, seed=2), "<b>": make_images(tmp_path / "b", 3, seed=3)}
    prompt = "a photo of a dog and a cat"
    result = run("--images", generated, "--prompt", prompt, "--concept_images", *[f"{n}={d}" for n, d in refs.items()],
                 "--clip_model", clip_dir, "--dino_model", dino_dir, "--device", "cpu")

    clip, processor = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    dino, dino_processor = ViTModel.from_pretrained(dino_dir).eval(), AutoImageProcessor.from_pretrained(dino_dir)

    def images(folder):
        return [Image.open(folder / f"{i}.png").convert("RGB") for i in range(len(list(folder.glob("[0-9].png"))))]

    def clip_embed(imgs):
        with torch.no_grad():
            out = clip.get_image_features(pixel_values=processor(images=imgs, return_tensors="pt")["pixel_values"])
        return torch.nn.functional.normalize(out.pooler_output, dim=-1)

    def dino_embed(imgs):
        with torch.no_grad():
            out = dino(pixel_values=dino_processor(images=imgs, return_tensors="pt")["pixel_values"])
        return torch.nn.functional.normalize(out.last_hidden_state[:, 0], dim=-1)

    gen = images(generated)
    tokens = processor(text=[prompt], return_tensors="pt", padding=True)
    with torch.no_grad():
        text = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    text = torch.nn.functional.normalize(text.pooler_output, dim=-1)[0]
    clip_t = (100 * clip_embed(gen) @ text).clamp(min=0)
    assert result["clip_t"] == pytest.approx(clip_t.mean().item(), abs=1e-4)
    assert [r["clip_t"] for r in result["per_image"]] == pytest.approx(clip_t.tolist(), abs=1e-4)
    expected_i, expected_d = [], []
    for name, folder in refs.items():
        clip_i = (100 * clip_embed(gen) @ clip_embed(images(folder)).T).mean().item()
        dino_i = (100 * dino_embed(gen) @ dino_embed(images(folder)).T).mean().item()
        assert result["per_concept"][name]["clip_i"] == pytest.approx(clip_i, abs=1e-4)
        assert result["per_concept"][name]["dino"] == pytest.approx(dino_i, abs=1e-4)
        expected_i.append(clip_i)
        expected_d.append(dino_i)
    assert result["clip_i"] == pytest.approx(sum(expected_i) / 2, abs=1e-4)
    assert result["dino"] == pytest.approx(sum(expected_d) / 2, abs=1e-4)
    assert result["n_images"] == 3 and result["clip_model"] == str(clip_dir)
    saved = json.loads((generated / "metrics.json").read_text())
    assert saved["clip_i"] == pytest.approx(result["clip_i"]) and "transformers" in saved["versions"]


def test_identical_images_give_100(tiny_scorers, tmp_path):
    clip_dir, dino_dir = tiny_scorers
    folder = make_images(tmp_path / "same", 1, seed=5)
    result = run("--images", folder, "--prompt", "x", "--concept_images", f"c={folder}",
                 "--clip_model", clip_dir, "--dino_model", dino_dir, "--output", tmp_path / "m.json")
    assert result["per_concept"]["c"]["clip_i"] == pytest.approx(100, abs=1e-3)
    assert result["per_concept"]["c"]["dino"] == pytest.approx(100, abs=1e-3)
    assert (tmp_path / "m.json").is_file()


def fake_results(root):
    """An inference.py output tree: two configs with config.json beside their images."""
    for subjects, prompt in ((["<cat2>", "<dog6>"], "A cat and a dog."), (["<vase>"], "A vase."),):
        folder = root / "_".join(s.strip("<>") for s in subjects) / "_".join(prompt.split())
        make_images(folder, 2, seed=len(prompt))
        (folder / "config.json").write_text(json.dumps({"prompt": prompt,
                                                        "subject_list": [[s, i + 1] for i, s in enumerate(subjects)]}))
    return root


def test_batch_mode_writes_metrics_and_summary(tiny_scorers, tmp_path, capsys):
    clip_dir, dino_dir = tiny_scorers
    results = fake_results(tmp_path / "results")
    for name in ("cat2", "dog6", "vase"):
        make_images(tmp_path / "refs" / name, 2, seed=len(name) + 10)
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"<cat2>": "refs/cat2", "<dog6>": "refs/dog6", "<vase>": "refs/vase"}))
    rows = run("--results", results, "--concepts", concepts, "--clip_model", clip_dir, "--dino_model", dino_dir)
    assert len(rows) == 2
    metrics = [json.loads(p.read_text()) for p in sorted(results.rglob("metrics.json"))]
    assert [sorted(m["per_concept"]) for m in metrics] == [["<cat2>", "<dog6>"], ["<vase>"]]
    table = list(csv.DictReader((results / "summary.csv").open()))
    assert [r["config"] for r in table][-1] == "mean" and len(table) == 3
    assert float(table[-1]["clip_t"]) == pytest.approx((metrics[0]["clip_t"] + metrics[1]["clip_t"]) / 2, abs=1e-3)
    assert "| config | subjects | images | CLIP-T | CLIP-I | DINO |" in (results / "summary.md").read_text()
    assert "cat2_dog6/A_cat_and_a_dog." in capsys.readouterr().out


def expect_error(capsys, *argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_bad_input(tiny_scorers, tmp_path, capsys):
    clip_dir, dino_dir = tiny_scorers
    models = ["--clip_model", clip_dir, "--dino_model", dino_dir]
    (tmp_path / "empty").mkdir()
    good = make_images(tmp_path / "good", 1, seed=0)
    expect_error(capsys, "--images", tmp_path / "empty", "--prompt", "x", *models, fragment="no images")
    expect_error(capsys, "--images", good, "--prompt", "x", "--concept_images", f"c={tmp_path / 'empty'}", *models,
                 fragment="--concept_images c:")
    expect_error(capsys, "--images", good, "--prompt", "x", "--clip_model", tmp_path / "nowhere", "--dino_model",
                 dino_dir, fragment=f"--clip_model {tmp_path / 'nowhere'}: folder not found")
    results = fake_results(tmp_path / "results")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"<cat2>": str(good), "<dog6>": str(good)}))
    expect_error(capsys, "--results", results, "--concepts", concepts, *models,
                 fragment="subject <vase> has no reference folder")


def test_wrong_models_long_prompts_and_unwritable_summaries(tiny_scorers, tmp_path, capsys):
    clip_dir, dino_dir = tiny_scorers
    generated = make_images(tmp_path / "gen", 1, seed=1)
    refs = f"<a>={make_images(tmp_path / 'a', 1, seed=2)}"
    base = ["--images", generated, "--concept_images", refs, "--device", "cpu"]
    def expect_late_error(*argv, fragment):  # after the models load: their progress lines come first
        with pytest.raises(SystemExit) as exit_info:
            run(*argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: ") and fragment in err.strip().splitlines()[-1]

    expect_late_error(*base, "--prompt", "a dog", "--clip_model", dino_dir, "--dino_model", dino_dir,
                      fragment=f"--clip_model {dino_dir}: cannot embed an image with it")
    expect_late_error(*base, "--prompt", "dog " * 80, "--clip_model", clip_dir, "--dino_model", dino_dir,
                      fragment="82 tokens, more than CLIP's 77")
    assert not (generated / "metrics.json").exists()
    results = fake_results(tmp_path / "results")
    (results / "summary.md").mkdir()  # a summary that cannot be written: nothing is, not even metrics.json
    for name in ("cat2", "dog6", "vase"):
        make_images(tmp_path / "refs" / name, 1, seed=3)
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"<cat2>": "refs/cat2", "<dog6>": "refs/dog6", "<vase>": "refs/vase"}))
    expect_error(capsys, "--results", results, "--concepts", concepts, "--clip_model", clip_dir, "--dino_model",
                 dino_dir, fragment="summary.md: exists and is not a regular file")
    assert not list(results.rglob("metrics.json"))


def evaluate_process(tmp_path, env, *models):
    """evaluate.py in a process of its own, as a user runs it, on one image; (exit status, stderr lines, seconds)."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    images = make_images(tmp_path / "gen", 1, seed=0)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--images", str(images), "--prompt", "a dog",
                           *map(str, models)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub_cache"), **env})
    return done.returncode, done.stderr.strip().splitlines(), time.perf_counter() - start


@pytest.mark.model  # two processes that import transformers
def test_unreachable_default_models_fail_at_once_in_one_line(tmp_path):
    """The default hub ids with a hub that refuses connections and an empty cache: one request, one line, exit 2,
    no metrics; with HF_HUB_OFFLINE=1, no request at all."""
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}  # port 9: connection refused
    status, lines, seconds = evaluate_process(tmp_path, unreachable)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --clip_model: model 'openai/clip-vit-base-patch32': cannot be downloaded "
                               "(the hub cannot be reached") and "HF_HUB_OFFLINE=1" in lines[0]
    assert seconds < 60 and not (tmp_path / "gen" / "metrics.json").exists()
    status, lines, _ = evaluate_process(tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert status == 2 and lines == ["error: --clip_model: model 'openai/clip-vit-base-patch32': not in the local "
                                     "Hugging Face cache, and HF_HUB_OFFLINE is set (give a local model folder, a "
                                     "hub id that can be reached, or the id of a model already in the cache with "
                                     "HF_HUB_OFFLINE=1)"]


def test_hub_ids_in_the_cache_score_offline(tiny_scorers, tmp_path):
    """Hub ids whose files sit in the Hugging Face cache (as an earlier online run leaves them) are scored with
    HF_HUB_OFFLINE=1, and with a hub that cannot be reached (a warning, then the cached copy)."""
    import shutil

    commit = "0" * 40
    for model, folder in zip(("someone/tiny-clip", "someone/tiny-dino"), tiny_scorers):
        repo = tmp_path / "hub_cache" / f"models--{model.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    models = ("--clip_model", "someone/tiny-clip", "--dino_model", "someone/tiny-dino", "--device", "cpu")
    status, lines, _ = evaluate_process(tmp_path, {"HF_HUB_OFFLINE": "1"}, *models)
    assert status == 0, lines
    metrics = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert metrics["n_images"] == 1 and 0 <= metrics["clip_t"] <= 100
    (tmp_path / "gen" / "metrics.json").unlink()
    status, lines, _ = evaluate_process(tmp_path, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"},
                                        *models)
    assert status == 0, lines
    assert any(line.startswith("warning: model 'someone/tiny-clip': the hub cannot be reached") for line in lines)
    assert json.loads((tmp_path / "gen" / "metrics.json").read_text())["clip_t"] == metrics["clip_t"]


# ------------------------------------------------------------------------------------------------
# Region-aware scores

def write_record(folder, layout_path, subjects=("<a>", "<b>"), colours=("255,0,0", "0,255,0")):
    """A run record as inference.py writes it, with the keys the region scores read."""
    from file_utils import file_sha256

    record = {"prompt": "a cat and a dog", "layout": str(layout_path),
              "color_context": {c: [s, 2.5] for c, s in zip(colours, subjects)},
              "token_rows": {c: [2 + 3 * i] for i, c in enumerate(colours)},
              "subject_list": [[s, 2 + 3 * i] for i, s in enumerate(subjects)],
              "file_sha256": {"layout": file_sha256(layout_path)}}
    (folder / "config.json").write_text(json.dumps(record))


def test_region_box_follows_the_layout_resized_by_nearest(tmp_path):
    layout = np.zeros((32, 32, 3), dtype=np.uint8)
    layout[4:10, 2:14] = (255, 0, 0)  # at 64 px: rows 8..19, columns 4..27
    layout[20:, 20:] = (0, 255, 0)
    Image.fromarray(layout).save(tmp_path / "layout.png")
    write_record(tmp_path, tmp_path / "layout.png")
    masks, why_not = evaluate.record_regions(tmp_path / "config.json", json.loads((tmp_path / "config.json").read_text()),
                                             (64, 48))  # (W, H)
    assert why_not is None and masks["<a>"].shape == (48, 64)
    from region_utils import bounding_box
    assert bounding_box(masks["<a>"]) == (4, 6, 28, 15)  # rows 4..9 of 32 -> 6..14 of 48 (nearest)
    assert bounding_box(masks["<b>"]) == (40, 30, 64, 48)
    crop = evaluate.region_crop(Image.fromarray(np.full((48, 64, 3), 9, np.uint8)), (4, 6, 28, 15))
    pixels = np.asarray(crop)  # 24 x 9 centred on a 24 x 24 grey square: rows 7..15 are the image
    assert crop.size == (24, 24) and (pixels[7:16] == 9).all() and (pixels[:7] == 127).all() and (pixels[16:] == 127).all()


def pasted_run(root, name, photos, order):
    """One image: the photos pasted into the left and right halves of a red/green layout, in `order`."""
    folder = root / name
    folder.mkdir(parents=True)
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :32] = (255, 0, 0)
    layout[:, 32:] = (0, 255, 0)
    Image.fromarray(layout).save(root / "layout.png")
    write_record(folder, root / "layout.png")
    image = np.concatenate([photos[order[0]], photos[order[1]]], axis=1)  # [64, 64, 3]
    Image.fromarray(image).save(folder / "0.png")
    return folder


@pytest.mark.parametrize("order,swap_rate", [(("<a>", "<b>"), 0.0), (("<b>", "<a>"), 1.0)])
def test_pasted_subjects_are_recognised_in_their_regions_or_swapped(tiny_scorers, tmp_path, order, swap_rate):
    clip_dir, dino_dir = tiny_scorers
    rng = np.random.default_rng(0)
    photos = {s: rng.integers(0, 256, (64, 32, 3), dtype=np.uint8) for s in ("<a>", "<b>")}
    mapping = {}
    for s, photo in photos.items():  # each subject's photo is its region's crop: centred on a grey square
        square = np.full((64, 64, 3), 127, np.uint8)
        square[:, 16:48] = photo
        (tmp_path / s.strip("<>")).mkdir()
        Image.fromarray(square).save(tmp_path / s.strip("<>") / "0.png")
        mapping[s] = str(tmp_path / s.strip("<>"))
    (tmp_path / "concepts.json").write_text(json.dumps(mapping))
    folder = pasted_run(tmp_path / "results", "run", photos, order)
    rows = run("--results", tmp_path / "results", "--concepts", tmp_path / "concepts.json",
               "--clip_model", clip_dir, "--dino_model", dino_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    per_subject = metrics["regions"]["per_subject"]
    assert [per_subject[s]["identity_ok"] for s in ("<a>", "<b>")] == [[swap_rate == 0]] * 2
    assert metrics["swap_rate"] == swap_rate and rows[0]["swap_rate"] == swap_rate
    if swap_rate == 0:  # the crop is the photo itself
        assert per_subject["<a>"]["region_clip_i"] == [pytest.approx(100, abs=1e-3)]
        assert per_subject["<b>"]["region_dino"] == [pytest.approx(100, abs=1e-3)]
    assert per_subject["<a>"]["box"] == [0, 0, 32, 64] and metrics["attention_in_region"] is None
    regions = Image.open(folder / "regions.png")
    assert regions.size == (3 * 256, 256)  # the 64 px image and two crops, enlarged 4 times so labels cover little
    label_rows = (np.array(regions)[:, 256:512] == 0).all(axis=-1).any(axis=1)  # the first crop's label box rows
    assert label_rows[:40].any() and not label_rows[64:].any()  # 4 or 5 lines of 11 px, a quarter of the panel
    assert "| swap rate |" in (tmp_path / "results" / "summary.md").read_text()


def test_a_changed_layout_is_named_and_not_scored(tiny_scorers, tmp_path, capsys):
    clip_dir, dino_dir = tiny_scorers
    photos = {s: np.full((64, 32, 3), 50 * i, np.uint8) for i, s in enumerate(("<a>", "<b>"))}
    folder = pasted_run(tmp_path / "results", "run", photos, ("<a>", "<b>"))
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "results" / "layout.png")  # edited after the run
    (tmp_path / "concepts.json").write_text(json.dumps({"<a>": str(folder), "<b>": str(folder)}))
    rows = run("--results", tmp_path / "results", "--concepts", tmp_path / "concepts.json",
               "--clip_model", clip_dir, "--dino_model", dino_dir)
    assert "layout.png has changed since the run" in capsys.readouterr().err
    assert rows[0]["swap_rate"] is None and not (folder / "regions.png").exists()


def test_an_inference_run_with_attention_maps_gets_every_region_score(tiny_model, tiny_scorers, tmp_path):
    import inference
    from test_inference import write_config

    clip_dir, dino_dir = tiny_scorers
    config = write_config(tmp_path / "cfg")  # <dog> on the red left half ("dog"), <cat> on the green right half
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--inference_config", str(config), "--output_dir",
            str(tmp_path / "out"), "--num_images", "2", "--num_inference_steps", "2", "--save_attention"]
    folder = run_cli(inference.main, inference.parse_args(argv))[0]
    refs = make_images(tmp_path / "refs", 2, seed=4)
    (tmp_path / "concepts.json").write_text(json.dumps({"<cat>": str(refs), "<dog>": str(refs)}))
    run("--results", tmp_path / "out", "--concepts", tmp_path / "concepts.json",
        "--clip_model", clip_dir, "--dino_model", dino_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    per_subject = metrics["regions"]["per_subject"]
    assert per_subject["<dog>"]["box"] == [0, 0, 32, 64] and per_subject["<cat>"]["box"] == [32, 0, 64, 64]
    by_hand = []
    for i, seed in enumerate((0, 1)):
        with np.load(folder / "attention" / f"{seed}.npz") as maps:
            dog, cat = maps["<dog>"], maps["<cat>"]
        assert per_subject["<dog>"]["attention_in_region"][i] == pytest.approx(dog[:, :32].sum() / dog.sum(), rel=1e-5)
        assert per_subject["<cat>"]["attention_in_region"][i] == pytest.approx(cat[:, 32:].sum() / cat.sum(), rel=1e-5)
        by_hand += [dog[:, :32].sum() / dog.sum(), cat[:, 32:].sum() / cat.sum()]
    assert metrics["attention_in_region"] == pytest.approx(np.mean(by_hand), rel=1e-5)
    assert metrics["swap_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # two subjects in two images
    table = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert float(table[0]["attention_in_region"]) == pytest.approx(metrics["attention_in_region"], abs=1e-4)


def test_a_flux_run_gets_its_region_scores(tiny_flux, tiny_scorers, tmp_path):
    """evaluate.py reads a FLUX run as any other: its record, its layout and its attention maps (T5's rows)."""
    import inference
    from residual_utils import save_residual

    clip_dir, dino_dir = tiny_scorers
    for name in ("dog", "cat"):
        save_residual(tmp_path / f"{name}.safetensors", 0.1 * torch.randn(1, 32),
                      {"class_phrase": name, "base_model": "tiny", "family": "flux"})
    config = {"prompt": "a photo of a dog and a cat", "guidance_steps": 2, "guidance_weight": 0.08,
              "weight_negative": -1e8, "subject_list": ["<dog>", "<cat>"], "save_attention": True,
              "residual_dict": {"<dog>": str(tmp_path / "dog.safetensors"), "<cat>": str(tmp_path / "cat.safetensors")},
              "regions": [{"phrase": "<dog>", "box": [0, 0, 0.5, 1]}, {"phrase": "<cat>", "box": [0.5, 0, 1, 1]}]}
    (tmp_path / "c.json").write_text(json.dumps(config))
    argv = ["--pretrained_model_name_or_path", str(tiny_flux), "--inference_config", str(tmp_path / "c.json"),
            "--output_dir", str(tmp_path / "out"), "--num_images", "1", "--num_inference_steps", "2",
            "--height", "64", "--width", "64"]
    [folder] = run_cli(inference.main, inference.parse_args(argv))
    refs = make_images(tmp_path / "refs", 2, seed=4)
    (tmp_path / "concepts.json").write_text(json.dumps({"<cat>": str(refs), "<dog>": str(refs)}))
    run("--results", tmp_path / "out", "--concepts", tmp_path / "concepts.json",
        "--clip_model", clip_dir, "--dino_model", dino_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    with np.load(folder / "attention" / "0.npz") as maps:
        dog, cat = maps["<dog>"], maps["<cat>"]
    per_subject = metrics["regions"]["per_subject"]
    assert per_subject["<dog>"]["box"] == [0, 0, 32, 64]
    assert per_subject["<dog>"]["attention_in_region"][0] == pytest.approx(dog[:, :32].sum() / dog.sum(), rel=1e-5)
    assert per_subject["<cat>"]["attention_in_region"][0] == pytest.approx(cat[:, 32:].sum() / cat.sum(), rel=1e-5)
    assert dog[:, :32].sum() > dog[:, 32:].sum()  # the hard negative keeps <dog>'s token out of the right half
