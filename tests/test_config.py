"""config_keys.py's table is the one definition of the config's keys: the README's table, the checks, the
defaults and the sampler's settings follow it; config.py reads configs by it; record.py's records round-trip."""
import dataclasses
import json

import pytest
import torch

import config_keys
from cli_utils import UserError
from config import ConfigReader, job_settings, prepare_job
from config_keys import KEY, KEYS, SamplingSettings, markdown_table
from conftest import ROOT, clip_tokenizer
from layout_guidance import SamplerInputs
from naive_sampler import check_computable
from test_inference import expect_error, run, write_config


def test_the_readme_table_is_the_key_table():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("python config_keys.py prints it")
    table = readme[readme.index("\n", start) + 1:readme.index("\n<!-- end of the table of keys -->")]
    assert table == markdown_table()
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == [key.name for key in KEYS]


def test_sampling_settings_have_a_field_per_sampling_key_with_its_default():
    fields = {field.name: field.default for field in dataclasses.fields(SamplingSettings)}
    assert fields == {key.name: key.off if key.required else key.default for key in KEYS if key.sampling}
    assert fields["guidance_steps"] == 0 and fields["cfg_scale"] == 7.5  # unguided unless a config says so
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingSettings().cfg_scale = 1.0


@pytest.mark.parametrize("key", [key for key in KEYS if key.kind in ("integer", "number", "bool", "choice", "text")])
def test_every_plain_key_is_checked_by_its_kind(key, tmp_path):
    bad = {"integer": 1.5, "number": float("inf"), "bool": "yes", "choice": "other", "text": 3}[key.kind]
    config = write_config(tmp_path, **{key.name: bad})
    with pytest.raises(Exception, match=rf"{key.name}: expected"):
        ConfigReader(config).read()


def test_a_job_carries_the_defaults_and_its_sampling_settings(tmp_path):
    config = write_config(tmp_path, cfg_scale=5.0, num_inference_steps=3)
    job = prepare_job(config, clip_tokenizer(), 32, 64, 64, {"num_inference_steps": 4})
    assert job.sampling == SamplingSettings(num_inference_steps=4, cfg_scale=5.0, guidance_steps=50,
                                            guidance_weight=0.08)
    sd_defaults = {k: v for k, v in config_keys.DEFAULTS.items() if "sd" in KEY[k].families}
    assert "flux_guidance" not in job.settings and "flux_guidance" not in sd_defaults
    assert {k: job.settings[k] for k in sd_defaults} == {**sd_defaults, "cfg_scale": 5.0, "num_inference_steps": 4}
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.layout = None


def test_a_preset_sets_its_keys_and_a_given_key_still_wins(tmp_path):
    separated = config_keys.PRESETS["separated"]
    assert separated and config_keys.PRESETS["faithful"] == {}
    job = prepare_job(write_config(tmp_path, preset="separated"), clip_tokenizer(), 32, 64, 64, {})
    assert {k: job.settings[k] for k in separated} == separated
    assert job.sampling.residual_guidance == separated["residual_guidance"] != KEY["residual_guidance"].default
    job = prepare_job(write_config(tmp_path, preset="separated", residual_guidance=1.5), clip_tokenizer(), 32, 64,
                      64, {"residual_guidance_in_region": False})
    assert job.settings["residual_guidance"] == 1.5 and job.settings["residual_guidance_in_region"] is False
    assert job.settings["region_self_attention"] is True
    faithful = prepare_job(write_config(tmp_path), clip_tokenizer(), 32, 64, 64, {})
    assert {k: faithful.settings[k] for k in separated} == {k: KEY[k].default for k in separated}
    with pytest.raises(UserError, match=r"preset: expected one of faithful, separated, got 'strong'"):
        ConfigReader(write_config(tmp_path, preset="strong")).read()
    with pytest.raises(UserError, match=r"preset: expected one of faithful, separated, got 'strong'"):
        job_settings({}, {"preset": "strong"})  # a caller's override is checked too


def test_the_naive_sampler_refuses_what_it_does_not_compute():
    tensor = torch.zeros(3, 4)
    check_computable(SamplerInputs(tensor, tensor), SamplingSettings())
    not_computed = [key.name for key in KEYS if key.sampling and not key.naive]
    assert not_computed == ["true_cfg_scale", "guidance_schedule", "residual_guidance", "residual_guidance_in_region"]
    with pytest.raises(ValueError, match="does not compute true_cfg_scale"):
        check_computable(SamplerInputs(tensor, tensor), SamplingSettings(true_cfg_scale=2.0))
    with pytest.raises(ValueError, match="does not compute guidance_schedule"):
        check_computable(SamplerInputs(tensor, tensor), SamplingSettings(guidance_schedule="constant"))
    with pytest.raises(ValueError, match="does not compute region_self_attention, text_length"):
        check_computable(SamplerInputs(tensor, tensor, masks=([1], [1]), region_labels=tensor), SamplingSettings())


def test_a_residual_trained_in_another_text_length_regime_is_warned_of(tiny_model, tmp_path, capsys):
    from residual_utils import save_residual

    folder = tmp_path / "cfg"
    config = write_config(folder)
    training = json.dumps({"text_length": "words"})
    save_residual(folder / "dog.safetensors", torch.zeros(1, 32), {"class_phrase": "dog", "base_model": "x",
                                                                    "training": training})
    run(tiny_model, config, tmp_path / "out")
    err = capsys.readouterr().err
    assert "residual_dict.<dog>: trained with text_length 'words', sampled with 'adaptive'" in err
    assert "residual_dict.<cat>" not in err  # trained at max (no record: no word), sampled adaptive: the pair meant
    run(tiny_model, write_config(folder, text_length="words"), tmp_path / "out2")
    assert "trained with text_length" not in capsys.readouterr().err


def test_run_records_carry_their_version(tiny_model, tmp_path, capsys):
    import inference

    folder = run(tiny_model, write_config(tmp_path / "cfg"), tmp_path / "out")
    record = json.loads((folder / "config.json").read_text())
    assert record["record_version"] == 1
    record["record_version"] = 2
    (tmp_path / "rec.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="rec.json: record_version 2: this inference.py reads version 1"):
        inference.main(inference.parse_args(["--rerun", str(tmp_path / "rec.json"), "--output_dir",
                                             str(tmp_path / "again")]))
    del record["record_version"]  # written before records were versioned: the same format
    (tmp_path / "rec.json").write_text(json.dumps(record))
    again = run_rerun(tmp_path / "rec.json", tmp_path / "again2")
    assert (again / "0.png").read_bytes() == (folder / "0.png").read_bytes()


def run_rerun(record, out):
    import inference
    from cli_utils import run_cli

    return run_cli(inference.main, inference.parse_args(["--rerun", str(record), "--output_dir", str(out)]))[0]
