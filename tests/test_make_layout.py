"""make_layout.py: boxes -> painted layout + color_context config -> the same images; previews."""
import json

import numpy as np
import pytest
from PIL import Image

import make_layout
from cli_utils import run_cli
from test_inference import run, write_config
from test_layouts import boxes_config


def make(config, out, *extra):
    return run_cli(make_layout.main, make_layout.parse_args([str(config), "--out_dir", str(out), *extra]))


def test_boxes_to_painted_config_make_the_same_images(tiny_model, tmp_path):
    config = boxes_config(tmp_path / "cfg")
    layout, painted, preview = make(config, tmp_path / "made", "--height", "64", "--width", "72")
    assert [f.name for f in (layout, painted, preview)] == ["config_layout.png", "config_painted.json",
                                                            "config_preview.png"]
    data = json.loads(painted.read_text())
    assert "regions" not in data and data["layout"] == "config_layout.png"
    assert data["color_context"] == {"255,0,0": ["<dog>", 2.5], "0,255,0": ["cat", 3.0]}
    assert data["residual_dict"]["<cat>"] == "../cfg/cat.safetensors"
    size = ("--height", "64", "--width", "72")
    a = run(tiny_model, config, tmp_path / "boxes", *size)
    b = run(tiny_model, painted, tmp_path / "painted", *size)
    assert np.array_equal(np.asarray(Image.open(a / "0.png")), np.asarray(Image.open(b / "0.png")))
    assert np.array_equal(np.asarray(Image.open(a / "layout.png")), np.asarray(Image.open(layout)))


def test_preview_outlines_regions_over_an_image(tmp_path):
    config = boxes_config(tmp_path / "cfg")
    photo = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    [preview] = make(config, tmp_path / "p", "--resolution", "80", "--preview_on", str(tmp_path / "photo.png"))[-1:]
    image = np.asarray(Image.open(preview)).astype(int)
    # the cat's box [0.4, 0, 1, 0.5] at 80 x 80: columns 32..79, rows 0..39 (labels sit at its top left corner)
    assert (image[30, 79] == (0, 255, 0)).all() and (image[39, 70] == (0, 255, 0)).all()  # right and bottom edge
    inside = 0.6 * photo[30, 70].astype(float) + 0.4 * np.array([0, 255, 0])  # tinted, not outlined
    assert np.abs(image[30, 70] - inside).max() <= 0.5
    assert (image[79, 0] == photo[79, 0]).all()  # no region: the photo as it is


def test_painted_config_gets_a_preview_only(tmp_path):
    painted = write_config(tmp_path / "painted")
    assert [f.name for f in make(painted, tmp_path / "b", "--resolution", "64")] == ["config_preview.png"]


def test_bad_box_is_one_line(tmp_path, capsys):
    config = boxes_config(tmp_path / "cfg", regions=[{"phrase": "cat", "box": [0, 0, 2, 1]}])
    with pytest.raises(SystemExit) as exit_info:
        make(config, tmp_path / "out")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {config}: regions[0]: box: [0, 0, 2, 1] reaches outside the "
                                               f"image (each coordinate is a fraction from 0 to 1)")
