"""train.py, training_all.sh and get_dataset.sh on the tiny model and small image folders."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import train
from cli_utils import run_cli
from conftest import ROOT, build_tiny_sd, clip_tokenizer
from residual_utils import load_residual


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process training run starts from a clean accelerate state, as a new process would."""
    yield
    reset_accelerate()


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def make_images(folder, count=3, size=(80, 72), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def train_args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "dog", "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "3",
            "--learning_rate", "1e-3", "--num_validation_images", "0", *extra]


def run_train(*argv):
    reset_accelerate()
    return run_cli(train.main, train.parse_args(list(argv)))


def test_training_writes_residual_config_and_validation(tiny_model, tmp_path):
    data = make_images(tmp_path / "data")
    out = tmp_path / "out"
    path = run_train(*train_args(tiny_model, data, out, "--token_num", "2", "--num_validation_images", "2",
                                 "--validation_inference_steps", "2", "--checkpointing_steps", "2"))
    residual = load_residual(path)
    assert residual.tensor.shape == (2, 32) and residual.tensor.dtype == torch.float32
    assert residual.tensor.abs().sum() > 0
    meta = residual.metadata
    assert meta["class_phrase"] == "dog" and meta["token_num"] == "2" and meta["embedding_dim"] == "32"
    assert meta["base_model"] == str(tiny_model)
    assert json.loads(meta["training"])["learning_rate"] == 1e-3
    config = json.loads((out / "train_config.json").read_text())
    assert config["global_step"] == 3 and config["num_images"] == 3 and config["validation_prompt"] == "a photo of a dog"
    shots = sorted((out / "validation" / "step-3").glob("*.png"))
    assert [p.name for p in shots] == ["0.png", "1.png"]
    assert np.array(Image.open(shots[0])).shape == (64, 64, 3)
    assert (out / "checkpoint-2" / "step.json").is_file()
    assert not (out / "pipeline").exists()
    assert path.stat().st_size < 8192


def test_zero_learning_rate_gives_zero_residual(tiny_model, tmp_path):
    data = make_images(tmp_path / "data")
    path = run_train(*train_args(tiny_model, data, tmp_path / "out", "--learning_rate", "0"))
    assert torch.equal(load_residual(path).tensor, torch.zeros(1, 32))


def test_resolution_defaults_to_the_models_own_size(tiny_model, tmp_path, capsys):
    """The tiny model's UNet has sample_size 8: it makes 64 px images, so it trains at 64 px unless told
    otherwise; another size is trained as asked, with a warning (a -base model trained at 768 is a known trap)."""
    data = make_images(tmp_path / "data", count=1)
    argv = train_args(tiny_model, data, tmp_path / "own", "--max_train_steps", "1")
    del argv[argv.index("--resolution"):argv.index("--resolution") + 2]
    run_train(*argv)
    assert json.loads((tmp_path / "own" / "train_config.json").read_text())["resolution"] == 64
    assert "warning" not in capsys.readouterr().err
    run_train(*train_args(tiny_model, data, tmp_path / "other", "--max_train_steps", "1", "--resolution", "128"))
    assert json.loads((tmp_path / "other" / "train_config.json").read_text())["resolution"] == 128
    assert "warning: --resolution 128: the model's own size is 64 px" in capsys.readouterr().err


def test_photos_are_resized_and_centre_cropped_as_torchvision_does(tmp_path):
    """The reference's Resize(R) truncates the long side, int(R * long / short), and its CenterCrop rounds half
    to even: a 107x80 photo becomes 85x64 (not 86), a 80x89 one 64x71 with its centre crop 4 rows down (not 3)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    photos = {"a.png": (107, 80), "b.png": (80, 89), "c.png": (64, 64)}  # PIL sizes (width, height)
    for name, (w, h) in photos.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    _, images, _ = train.load_instance_images(folder, 64)
    assert [tuple(image.shape) for image in images] == [(3, 64, 85), (3, 71, 64), (3, 64, 64)]
    expected = np.asarray(Image.open(folder / "a.png").resize((85, 64), Image.BILINEAR))
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(images[2].permute(1, 2, 0).numpy(), np.asarray(Image.open(folder / "c.png")))
    offsets = [train.crop_offset(image.shape, 64, True, 0, 0) for image in images]
    assert offsets == [(0, 10), (4, 0), (0, 0)]  # round(21 / 2) = 10, round(7 / 2) = 4


def test_preservation_loss_by_hand():
    torch.manual_seed(0)
    e, e0 = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    loss = train.preservation_loss(e, e0, token_num=2, loss_rate_first=0.5, loss_rate_second=0.25)
    per_sample = []
    for b in range(2):
        first = sum(float(e[b, 0, j] - e0[b, 0, j]) ** 2 for j in range(3)) ** 0.5
        rest = sum(float(e[b, i, j] - e0[b, i, j]) ** 2 for i in range(3, 6) for j in range(3)) ** 0.5
        per_sample.append(0.5 * first + 0.25 * rest)
    assert float(loss) == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    # rows 1 .. k are free: changing them changes nothing
    changed = e.clone()
    changed[:, 1:3] += 10
    assert float(train.preservation_loss(changed, e0, 2, 0.5, 0.25)) == pytest.approx(float(loss), rel=1e-6)


def test_residual_by_hand_from_two_encoders(tmp_path):
    from transformers import CLIPTextModel

    frozen_dir = build_tiny_sd(tmp_path / "a", seed=0) / "text_encoder"
    frozen = CLIPTextModel.from_pretrained(frozen_dir).eval()
    tuned = CLIPTextModel.from_pretrained(frozen_dir).eval()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokenizer = clip_tokenizer()
    ids, positions = train.template_rows(tokenizer, "pet_cat", 2)
    frozen_rows = train.concept_rows(frozen, ids, positions, 2)
    residual = train.compute_residual(tuned, ids, positions, 2, frozen_rows)

    pet = tokenizer("pet_cat").input_ids[1]
    diffs = []
    for template in train.TEMPLATES:
        sentence = tokenizer(template.format("pet_cat"), padding="max_length", max_length=77).input_ids
        p = sentence.index(pet)
        with torch.no_grad():
            a = tuned(torch.tensor([sentence])).last_hidden_state[0, p:p + 2]
            b = frozen(torch.tensor([sentence])).last_hidden_state[0, p:p + 2]
        diffs.append(a - b)
    assert len(diffs) == 27 and positions[0] == 5  # "a photo of a pet _ cat": BOS a photo of a pet
    torch.testing.assert_close(residual, torch.stack(diffs).mean(0), rtol=1e-5, atol=1e-6)


def test_resume_equals_uninterrupted(tiny_model, tmp_path):
    data = make_images(tmp_path / "data", count=3)
    common = ["--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3"]
    whole = run_train(*train_args(tiny_model, data, tmp_path / "whole", *common, "--max_train_steps", "7"))
    # a run stopped after step 5 (its last checkpoint is step 3), then resumed
    run_train(*train_args(tiny_model, data, tmp_path / "parts", *common, "--max_train_steps", "5"))
    assert sorted(p.name for p in (tmp_path / "parts").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = run_train(*train_args(tiny_model, data, tmp_path / "parts", *common, "--max_train_steps", "7",
                                    "--resume_from_checkpoint", "latest"))
    a, b = load_residual(whole).tensor, load_residual(resumed).tensor
    assert a.abs().sum() > 0
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "parts" / "train_config.json").read_text())["global_step"] == 7


def test_non_image_files_are_ignored(tiny_model, tmp_path):
    data = make_images(tmp_path / "data", count=2)
    (data / "notes.txt").write_text("not an image")
    (data / ".DS_Store").write_bytes(b"\x00\x01")
    (data / "sub").mkdir()
    run_train(*train_args(tiny_model, data, tmp_path / "out", "--max_train_steps", "1"))
    images = json.loads((tmp_path / "out" / "train_config.json").read_text())["images"]
    assert [os.path.basename(p) for p in images] == ["00.png", "01.png"]


def test_trained_residual_drives_inference(tiny_model, tmp_path, capsys):
    from config_keys import SamplingSettings
    from layout_guidance import SamplerInputs, generate, install_guidance, layout_weight_map
    from pipeline_utils import load_model
    from text_utils import encode_ids, token_ids

    data = make_images(tmp_path / "data")
    residual = run_train(*train_args(tiny_model, data, tmp_path / "dog"))
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[:, 32:] = 255
    Image.fromarray(array).save(tmp_path / "layout.png")
    config = tmp_path / "config.json"
    prompt = "A photo of a dog on a beach."
    config.write_text(json.dumps({
        "prompt": prompt, "residual_dict": {"<my_dog>": str(residual)},
        "color_context": {"255,255,255": ["<my_dog>", 2.5]}, "guidance_steps": 2, "guidance_weight": 0.08,
        "weight_negative": -1e8, "layout": "layout.png", "subject_list": ["<my_dog>"]}))
    [folder] = run_cli(inference.main, inference.parse_args([
        "--pretrained_model_name_or_path", str(tiny_model), "--inference_config", str(config),
        "--output_dir", str(tmp_path / "images"), "--num_images", "1", "--num_inference_steps", "2"]))
    assert "<my_dog> -> position 5 'dog'" in capsys.readouterr().out
    image = np.asarray(Image.open(folder / "0.png"))

    # the same image by hand: the saved residual added to row 5 of the prompt's states, the same sampler
    sd = load_model(str(tiny_model), torch.device("cpu"), torch.float32)
    ids = token_ids(sd.tokenizer, prompt)
    embeddings = encode_ids(sd.text_encoder, [ids, token_ids(sd.tokenizer, "", len(ids))])  # [2, L, d]
    with_residual = embeddings[0].clone()
    with_residual[5] += load_residual(residual).tensor[0]
    weight_map = layout_weight_map(array, [((255, 255, 255), [5], 2.5)], len(ids), -1e8)
    guidance = install_guidance(sd.unet)
    sampling = SamplingSettings(num_inference_steps=2, guidance_steps=2, guidance_weight=0.08)
    by_hand = {name: generate(sd, SamplerInputs(cond, embeddings[1], weight_map), sampling, [0], (64, 64),
                              guidance)[0] for name, cond in (("with", with_residual), ("without", embeddings[0]))}
    assert np.array_equal(image, by_hand["with"])
    assert np.abs(image.astype(int) - by_hand["without"].astype(int)).max() > 0


def test_v_prediction_target_by_hand(tiny_model_v):
    """train.py's diffusion loss on a v-prediction model is the MSE to v = sqrt(abar) eps - sqrt(1 - abar) x0,
    with abar the cumulative product of 1 - beta over SD's betas, computed here without the scheduler."""
    from diffusers import DDPMScheduler

    from pipeline_utils import load_model
    from text_utils import token_ids

    sd = load_model(str(tiny_model_v), torch.device("cpu"), torch.float32)
    scheduler = DDPMScheduler.from_config(sd.scheduler_config)
    assert scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    ids = torch.tensor([token_ids(sd.tokenizer, "dog", 77)] * 2)
    settings = train.StepSettings(resolution=64)
    with torch.no_grad():
        e0 = sd.text_encoder(ids)[0]
        total, diffusion, preserve = train.training_loss(train.Trained(sd.text_encoder, sd.unet, scheduler),
                                                         train.Targets(ids, e0),
                                                         train.NoisyBatch(latents, noise, timesteps), settings)

        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
        abar = torch.cumprod(1 - betas, dim=0)[timesteps].float()[:, None, None, None]
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents
        pred = sd.unet(noisy, timesteps, encoder_hidden_states=e0).sample
    assert float(diffusion) == pytest.approx(float(((pred - velocity) ** 2).mean()), rel=1e-4)
    assert abs(float(diffusion) - float(((pred - noise) ** 2).mean())) > 0.01  # not the epsilon target
    assert float(preserve) == 0 and float(total) == float(diffusion)  # the encoder is still the frozen one


def test_latent_cache_encodes_each_crop_once_with_the_same_latents(tiny_model):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval()
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=generator) for _ in range(2)]
    keys = [(0, 0, 0), (1, 0, 16), (0, 0, 0), (1, 0, 16), (1, 0, 3)]
    noise = torch.randn(len(keys), 4, 8, 8, generator=generator)

    def pixels(key):
        return train.crop_pixels(images, key, 64)

    cache, uncached = train.LatentCache(vae), train.LatentCache(vae, max_bytes=0)
    for j, key in enumerate(keys):
        a = cache.latents([key], pixels, noise[j:j + 1])
        b = uncached.latents([key], pixels, noise[j:j + 1])
        with torch.no_grad():
            posterior = vae.encode(pixels(key)[None]).latent_dist
        by_hand = (posterior.mean + posterior.std * noise[j:j + 1]) * vae.config.scaling_factor
        assert torch.equal(a, b)
        torch.testing.assert_close(a, by_hand, rtol=1e-5, atol=1e-6)
    assert cache.encoded == 3 and uncached.encoded == 5
    assert len(cache.entries) == 3 and not uncached.entries
    assert cache.latents(keys, pixels, noise).shape == (5, 4, 8, 8) and cache.encoded == 3


def test_latent_cache_leaves_the_residual_unchanged(tiny_model, tmp_path):
    data = make_images(tmp_path / "data", count=2, size=(64, 64))  # square: one crop per photo
    common = ["--max_train_steps", "4", "--train_batch_size", "2", "--checkpointing_steps", "0"]
    cached = run_train(*train_args(tiny_model, data, tmp_path / "cached", *common))
    encoded = run_train(*train_args(tiny_model, data, tmp_path / "encoded", *common, "--latent_cache_mb", "0"))
    a, b = load_residual(cached).tensor, load_residual(encoded).tensor
    assert a.abs().sum() > 0
    assert torch.equal(a, b)


def test_gradient_checkpointing_trains_the_same_residual(tiny_model, tmp_path):
    data = make_images(tmp_path / "data")
    plain = run_train(*train_args(tiny_model, data, tmp_path / "plain"))
    checkpointed = run_train(*train_args(tiny_model, data, tmp_path / "checkpointed", "--gradient_checkpointing"))
    a, b = load_residual(plain).tensor, load_residual(checkpointed).tensor
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_unet_trains_the_same_residual_on_one_graph(tiny_model, tmp_path, counted_compile):
    patch, graphs = counted_compile
    patch(train)
    data = make_images(tmp_path / "data")
    eager = run_train(*train_args(tiny_model, data, tmp_path / "eager"))
    compiled = run_train(*train_args(tiny_model, data, tmp_path / "compiled", "--compile"))
    assert len(graphs) == 1
    a, b = load_residual(eager).tensor, load_residual(compiled).tensor
    assert a.abs().sum() > 0
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Bad input

def expect_error(capsys, argv, fragment, out):
    with pytest.raises(SystemExit) as exit_info:
        run_train(*argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not (out / "residual.safetensors").exists()


def test_bad_training_input(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    good = make_images(tmp_path / "good", count=2)
    expect_error(capsys, train_args(tiny_model, tmp_path / "nowhere", out), "folder not found", out)
    (tmp_path / "empty").mkdir()
    expect_error(capsys, train_args(tiny_model, tmp_path / "empty", out), "no images", out)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    expect_error(capsys, train_args(tiny_model, tmp_path / "texts", out), "no images", out)
    broken = make_images(tmp_path / "broken", count=1)
    (broken / "01.jpg").write_bytes(b"\xff\xd8 truncated")
    expect_error(capsys, train_args(tiny_model, broken, out), f"{broken / '01.jpg'}: not a readable image", out)
    expect_error(capsys, train_args(tiny_model, good, out, "--resolution", "60"), "--resolution 60", out)
    expect_error(capsys, train_args(tiny_model, good, out, "--token_num", "0"), "--token_num 0", out)
    expect_error(capsys, train_args(tiny_model, good, out, "--latent_cache_mb", "-1"), "--latent_cache_mb -1", out)
    from torch._inductor import config as inductor_config
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler++",)}):
        expect_error(capsys, train_args(tiny_model, good, out, "--compile"), "--compile on the CPU needs a C++", out)
    argv = train_args(tiny_model, good, out)
    argv[argv.index("dog")] = " "
    expect_error(capsys, argv, "--instance_prompt", out)
    expect_error(capsys, train_args(tmp_path / "no_model", good, out), "no_model': folder not found", out)
    expect_error(capsys, train_args(tiny_model, good, out, "--validation_prompt", "a cat"),
                 "must contain the instance prompt 'dog'", out)


# ------------------------------------------------------------------------------------------------
# The shell scripts

def test_get_dataset_from_local_copy(tmp_path):
    source = tmp_path / "dataset"
    for subject in ("cat2", "vase"):
        make_images(source / subject, count=2, seed=len(subject))
    sums = tmp_path / "SUMS"
    sums.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.parent.name}/{p.name}\n"
                            for p in sorted(source.rglob("*.png"))))
    dest = tmp_path / "Data"
    cmd = ["bash", str(ROOT / "get_dataset.sh"), "--from", str(source), "--sums", str(sums), "--dest", str(dest)]
    first = subprocess.run(cmd + ["cat2", "vase", "flower_1"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "installed: cat2 vase" in first.stdout
    assert "no public source for: flower_1" in first.stdout and f"{dest}/flower_1/" in first.stdout
    assert sorted(p.name for p in (dest / "cat2").iterdir()) == ["00.png", "01.png"]
    again = subprocess.run(cmd + ["cat2", "vase"], capture_output=True, text=True)
    assert again.returncode == 0 and "already in place: cat2 vase" in again.stdout

    # a file whose sum does not match is reported and not installed
    (source / "vase" / "01.png").write_bytes(b"tampered")
    (dest / "vase" / "01.png").unlink()
    bad = subprocess.run(cmd + ["vase"], capture_output=True, text=True)
    assert bad.returncode == 1 and "checksum mismatch for vase/01.png" in bad.stderr
    assert sorted(p.name for p in (dest / "vase").iterdir()) == ["00.png"]


def test_get_dataset_leaves_no_empty_folder_when_every_checksum_fails(tmp_path):
    """A subject none of whose files install leaves neither its folder nor a --dest folder the run created; a
    folder that was there before stays."""
    source = tmp_path / "dataset"
    make_images(source / "dog", count=2)
    make_images(source / "cat2", count=1, seed=1)
    sums = tmp_path / "SUMS"
    sums.write_text("".join(f"{'0' * 64}  dog/{p.name}\n" for p in sorted((source / "dog").iterdir()))
                    + f"{hashlib.sha256((source / 'cat2' / '00.png').read_bytes()).hexdigest()}  cat2/00.png\n")
    dest = tmp_path / "Data" / "concept_image"
    cmd = ["bash", str(ROOT / "get_dataset.sh"), "--from", str(source), "--sums", str(sums), "--dest", str(dest)]
    bad = subprocess.run(cmd + ["dog"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("checksum mismatch for dog/") == 2, bad.stderr
    assert "error: incomplete: dog" in bad.stderr
    assert sorted(tmp_path.iterdir()) == sorted([source, sums])  # no Data/ at all

    good = subprocess.run(cmd + ["cat2"], capture_output=True, text=True)
    assert good.returncode == 0 and [p.name for p in dest.iterdir()] == ["cat2"]
    bad = subprocess.run(cmd + ["dog", "cat2"], capture_output=True, text=True)
    assert bad.returncode == 1 and sorted(p.name for p in dest.iterdir()) == ["cat2"]
    assert [p.name for p in (dest / "cat2").iterdir()] == ["00.png"]


def test_get_dataset_sums_cover_the_seed_subjects():
    lines = (ROOT / "data" / "dreambench_SHA256SUMS").read_text().splitlines()
    subjects = {line.split()[1].split("/")[0] for line in lines}
    assert {"cat2", "dog", "dog6", "vase"} <= subjects and len(lines) == 158


def test_training_all_skips_and_reports(tiny_model, tmp_path):
    data = tmp_path / "Data"
    make_images(data / "mydog", count=2)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# name prompt\nmydog dog\nghost cat\n")
    env = {**os.environ, "MODEL_NAME": str(tiny_model), "DATA_DIR": str(data), "OUTPUT_DIR": str(tmp_path / "out"),
           "CONCEPTS_FILE": str(concepts), "PYTHON": sys.executable, "NUM_GPUS": "0"}
    extra = ["--resolution", "64", "--max_train_steps", "2", "--num_validation_images", "0"]
    first = subprocess.run(["bash", str(ROOT / "training_all.sh"), *extra], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "missing ghost: no images" in first.stdout
    assert "trained: mydog; skipped: none; missing images: ghost" in first.stdout
    assert load_residual(tmp_path / "out" / "mydog" / "residual.safetensors").tensor.shape == (1, 32)
    again = subprocess.run(["bash", str(ROOT / "training_all.sh"), *extra], capture_output=True, text=True, env=env)
    assert "skip mydog" in again.stdout and "trained: none; skipped: mydog" in again.stdout


def test_two_processes_equal_one_with_the_whole_batch(tiny_model, tmp_path):
    """Data-parallel with gradient accumulation: 2 processes x batch 1 == 1 process x batch 2 (gloo, CPU)."""
    data = make_images(tmp_path / "data", count=3)
    common = ["--max_train_steps", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "0"]
    single = run_train(*train_args(tiny_model, data, tmp_path / "one", *common, "--train_batch_size", "2"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *train_args(tiny_model, data, tmp_path / "two", *common,
                                                               "--train_batch_size", "1")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert config["num_processes"] == 2
    a, b = load_residual(single).tensor, load_residual(tmp_path / "two" / "residual.safetensors").tensor
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_words_text_length_trains_with_the_unet_mask(tiny_model, tmp_path):
    data = make_images(tmp_path / "data")
    words = run_train(*train_args(tiny_model, data, tmp_path / "words", "--text_length", "words",
                                  "--num_validation_images", "1", "--validation_inference_steps", "2"))
    plain = run_train(*train_args(tiny_model, data, tmp_path / "max"))
    a, b = load_residual(words).tensor, load_residual(plain).tensor
    assert a.abs().sum() > 0 and not torch.allclose(a, b)
    assert json.loads((tmp_path / "words" / "train_config.json").read_text())["text_length"] == "words"
    assert (tmp_path / "words" / "validation" / "step-3" / "0.png").is_file()


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 4000)", "(default: 5e-06)", "(default: 0.01)", "(default: 0.001)", "(default: 1024)",
                    "(default: constant)", "(default: no)", "(default: 500)", "(default: max)"):
        assert default in text
