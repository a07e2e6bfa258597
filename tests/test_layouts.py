"""layouts.py and the `regions` form of a config: boxes give exactly the images of the painted layout."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import inference
from cli_utils import UserError, run_cli
from layouts import BACKGROUND, MAX_REGIONS, PALETTE, box_mask, region_colour, render_regions
from test_inference import expect_error, run, write_config

DOG_BOX, CAT_BOX = [0.1, 0.2, 0.6, 0.9], [0.4, 0.0, 1.0, 0.5]  # overlapping: the cat's box covers the dog's


def fail(key, message):
    raise UserError(f"{key}: {message}")


def test_box_rasterisation_by_hand_at_an_odd_size():
    # 7 x 5 pixels. Box 0: left 0.2 * 7 = 1.4 (centre 1.5 is the first inside), right 0.7 * 7 = 4.9 (centre
    # 4.5 the last), top 0.1 * 5 = 0.5 (centre 0.5 inside), bottom 0.9 * 5 = 4.5 (centre 4.5 outside).
    # Box 1: columns from 0.5 * 7 = 3.5 (centre 3.5 inside) to the edge, rows from 2.5 (centre 2.5 inside).
    regions = [{"phrase": "dog", "box": [0.2, 0.1, 0.7, 0.9], "weight": 2.5},
               {"phrase": "cat", "box": [0.5, 0.5, 1.0, 1.0], "weight": 2.5}]
    layout = render_regions(regions, 5, 7, fail)
    a, b, o = 1, 2, 0
    expected = np.array([[o, a, a, a, a, o, o],
                         [o, a, a, a, a, o, o],
                         [o, a, a, b, b, b, b],
                         [o, a, a, b, b, b, b],
                         [o, o, o, b, b, b, b]])
    colours = np.array([BACKGROUND, PALETTE[0], PALETTE[1]], dtype=np.uint8)
    assert np.array_equal(layout, colours[expected])


def test_region_colours_are_distinct_and_never_the_background():
    colours = [region_colour(i) for i in range(MAX_REGIONS)]
    assert len(set(colours)) == MAX_REGIONS and BACKGROUND not in colours
    assert all(0 <= c <= 255 for rgb in colours for c in rgb)


def painted_equivalent(folder, boxes, height, width):
    """The boxes painted by hand (pixel i is inside [a, b) when ceil(a*n - 1/2) <= i < ceil(b*n - 1/2)), in
    colours of this test's own choosing, and the config that names them."""
    folder.mkdir(parents=True)
    layout = np.zeros((height, width, 3), dtype=np.uint8)
    colours = [(10, 20, 30), (200, 100, 50)]
    for (left, top, right, bottom), colour in zip(boxes, colours):
        x0, x1 = (math.ceil(v * width - 0.5) for v in (left, right))
        y0, y1 = (math.ceil(v * height - 0.5) for v in (top, bottom))
        layout[y0:y1, x0:x1] = colour
    Image.fromarray(layout).save(folder / "painted.png")
    return write_config(folder, layout="painted.png",
                        color_context={"10,20,30": ["<dog>", 2.5], "200,100,50": ["cat", 3.0]})


def boxes_config(folder, **changes):
    regions = [{"phrase": "<dog>", "box": DOG_BOX}, {"phrase": "cat", "box": CAT_BOX, "weight": 3.0}]
    return write_config(folder, **{"layout": None, "color_context": None, "regions": regions, **changes})


def test_boxes_give_the_images_of_the_painted_layout_and_rerun(tiny_model, tmp_path):
    size = ("--height", "64", "--width", "72", "--num_images", "2")
    painted = run(tiny_model, painted_equivalent(tmp_path / "painted", [DOG_BOX, CAT_BOX], 64, 72),
                  tmp_path / "out_painted", *size)
    config = boxes_config(tmp_path / "boxes")
    boxes = run(tiny_model, config, tmp_path / "out_boxes", *size)
    for seed in (0, 1):
        a, b = (np.asarray(Image.open(folder / f"{seed}.png")) for folder in (painted, boxes))
        assert a.shape == (64, 72, 3) and np.array_equal(a, b)
    unguided = run(tiny_model, boxes_config(tmp_path / "other", guidance_steps=0), tmp_path / "unguided", *size)
    assert not np.array_equal(np.asarray(Image.open(unguided / "0.png")), np.asarray(Image.open(boxes / "0.png")))

    record = json.loads((boxes / "config.json").read_text())
    assert record["regions"][1] == {"phrase": "cat", "box": CAT_BOX, "weight": 3.0}
    assert record["regions"][0]["weight"] == 2.5
    assert record["color_context"] == {"255,0,0": ["<dog>", 2.5], "0,255,0": ["cat", 3.0]}
    assert record["layout"] == str(boxes.resolve() / "layout.png")
    rendered = np.asarray(Image.open(boxes / "layout.png"))
    hand = np.asarray(Image.open(tmp_path / "painted" / "painted.png"))
    assert np.array_equal(rendered.any(-1), hand.any(-1))  # the same pixels painted, in other colours

    config.unlink()
    [again] = run_cli(inference.main, inference.parse_args(["--rerun", str(boxes / "config.json"), "--output_dir",
                                                            str(tmp_path / "again")]))
    assert np.array_equal(np.asarray(Image.open(again / "1.png")), np.asarray(Image.open(boxes / "1.png")))
    (boxes / "layout.png").write_bytes((again / "0.png").read_bytes())
    with pytest.raises(SystemExit):
        run_cli(inference.main, inference.parse_args(["--rerun", str(boxes / "config.json"), "--output_dir",
                                                      str(tmp_path / "third")]))


BAD_REGIONS = [
    ("both forms", dict(layout="layout.png"), ["regions: give either regions (boxes) or layout and color_context"]),
    ("outside", dict(regions=[{"phrase": "cat", "box": [0, 0, 1.2, 1]}]),
     ["regions[0]: box: [0, 0, 1.2, 1] reaches outside the image"]),
    ("empty", dict(regions=[{"phrase": "cat", "box": [0.5, 0, 0.5, 1]}]), ["regions[0]: box: ", "is empty"]),
    ("unknown phrase",
     dict(regions=[{"phrase": "cat", "box": [0, 0, 1, 1]}, {"phrase": "horse", "box": [0, 0, 0.5, 1]}]),
     ["regions[1]: phrase 'horse' does not occur in the prompt"]),
    ("thinner than a pixel", dict(regions=[{"phrase": "cat", "box": [0.5, 0, 0.505, 1]}]),
     ["regions[0]: box [0.5, 0.0, 0.505, 1.0] covers no pixel of the 64x64 image"]),
    ("covered", dict(regions=[{"phrase": "cat", "box": [0.2, 0.2, 0.4, 0.4]}, {"phrase": "dog", "box": [0, 0, 1, 1]}]),
     ["regions[0]: ", "covered by later boxes"]),
    ("no list", dict(regions={"cat": [0, 0, 1, 1]}), ["regions: expected a list"]),
    ("region key", dict(regions=[{"phrase": "cat", "bbox": [0, 0, 1, 1]}]), ["regions[0]: unknown key 'bbox'"]),
    ("weight", dict(regions=[{"phrase": "cat", "box": [0, 0, 1, 1], "weight": "high"}]), ["regions[0]: weight: "]),
]


@pytest.mark.parametrize("name,changes,fragments", BAD_REGIONS, ids=[c[0] for c in BAD_REGIONS])
def test_bad_regions_are_one_line(tiny_model, tmp_path, capsys, name, changes, fragments):
    config = boxes_config(tmp_path / "cfg", **changes)
    line = expect_error(capsys, tiny_model, config, tmp_path / "out", *fragments)
    assert str(config) in line


def test_box_mask_edges_are_half_open():
    assert box_mask([0, 0, 0.5, 1], 1, 4).tolist() == [[True, True, False, False]]
    assert box_mask([0.125, 0, 0.375, 1], 1, 4).tolist() == [[True, False, False, False]]  # centre 0.5 in, 1.5 out
