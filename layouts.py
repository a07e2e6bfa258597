"""Boxes as a layout: the `regions` form of a config, turned into the colour layout a painted one would be.

    "regions": [{"phrase": "<dog6>", "box": [left, top, right, bottom], "weight": 2.5}, ...]

Box coordinates are fractions of the image's width and height. A pixel belongs to a box when its centre lies
inside it (left * W <= x + 0.5 < right * W, likewise for rows); where boxes overlap, the later one covers the
earlier. The boxes of one phrase are one region (their union), so they share a weight; each region gets its own
colour (region_colour, in the order phrases first appear), unpainted pixels stay BACKGROUND, so the layout and
`regions_color_context` together are exactly a painted config: the sampler cannot tell the two apart.
Used by inference.py (configs with regions), make_layout.py and app.py.
"""
import numpy as np

from cli_utils import is_finite32

DEFAULT_WEIGHT = 2.5  # a region's w_active when "weight" is left out (the seed's value in color_context)
BACKGROUND = (0, 0, 0)  # pixels no box covers; never a region's colour
# Distinct, easily told apart colours for the first regions; later ones are generated (region_colour)
PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 0, 128), (128, 255, 0), (0, 255, 128))
MAX_REGIONS = 4096  # far more than a 77-token prompt has phrases; keeps the generated colours distinct
REGION_KEYS = ("phrase", "box", "weight")
RENDERED_LAYOUT = "layout.png"  # a boxes run's layout, as the sampler saw it, beside its images


def region_colour(index):
    """The colour of region `index`: the palette first, then (index % 256, index // 256, 1), whose blue 1 no
    palette colour and not BACKGROUND has, so every index below MAX_REGIONS has its own colour."""
    if index < len(PALETTE):
        return PALETTE[index]
    return (index % 256, index // 256, 1)


def colour_key(rgb):
    """(r, g, b) as a color_context key 'r,g,b'."""
    return ",".join(str(c) for c in rgb)


def read_regions(value, fail):
    """The config's `regions` checked: [{"phrase", "box", "weight"}] with the weight filled in.

    fail(key, message) reports a mistake (it raises); keys are `regions` and `regions[i]`.
    """
    if not isinstance(value, list) or not value:
        fail("regions", 'expected a list of {"phrase": ..., "box": [left, top, right, bottom], "weight": 2.5}')
    if len(value) > MAX_REGIONS:
        fail("regions", f"{len(value)} regions, more than {MAX_REGIONS}")
    regions = [read_region(entry, lambda message, i=i: fail(f"regions[{i}]", message)) for i, entry in enumerate(value)]
    first = {}  # phrase -> index of its first box
    for i, region in enumerate(regions):
        j = first.setdefault(region["phrase"], i)
        if region["weight"] != regions[j]["weight"]:
            fail(f"regions[{i}]", f"weight {region['weight']}, but regions[{j}] gives '{region['phrase']}' weight "
                                  f"{regions[j]['weight']}: the boxes of one phrase are one region with one weight")
    return regions


def read_region(entry, fail):
    if not isinstance(entry, dict):
        fail(f'expected {{"phrase": ..., "box": [left, top, right, bottom]}}, got {entry!r}')
    unknown = [key for key in entry if key not in REGION_KEYS]
    if unknown:
        fail(f"unknown key '{unknown[0]}' (a region has {', '.join(REGION_KEYS)})")
    for key in ("phrase", "box"):
        if key not in entry:
            fail(f"{key}: missing (required)")
    phrase, box, weight = entry["phrase"], entry["box"], entry.get("weight", DEFAULT_WEIGHT)
    if not isinstance(phrase, str) or not phrase.strip():
        fail(f"phrase: expected a subject name or a phrase of the prompt, got {phrase!r}")
    if not isinstance(box, list) or len(box) != 4 or not all(is_finite32(v) for v in box):
        fail(f"box: expected [left, top, right, bottom] as fractions of the image, got {box!r}")
    if not all(0 <= v <= 1 for v in box):
        fail(f"box: {box} reaches outside the image (each coordinate is a fraction from 0 to 1)")
    left, top, right, bottom = box
    if not (left < right and top < bottom):
        fail(f"box: {box} is empty (expected left < right and top < bottom)")
    if not is_finite32(weight):
        fail(f"weight: expected a finite number, got {weight!r}")
    return {"phrase": phrase, "box": [float(v) for v in box], "weight": float(weight)}


def box_mask(box, height, width):
    """bool [H, W]: the pixels whose centre lies in box (left * W <= x + 0.5 < right * W, same for rows)."""
    left, top, right, bottom = box
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    columns = (left * width <= xs) & (xs < right * width)  # [W]
    rows = (top * height <= ys) & (ys < bottom * height)  # [H]
    return rows[:, None] & columns[None, :]


def phrase_colours(regions):
    """{phrase: (r, g, b)}: region_colour(i) for the i-th distinct phrase, in the order phrases first appear."""
    colours = {}
    for region in regions:
        colours.setdefault(region["phrase"], region_colour(len(colours)))
    return colours


def render_regions(regions, height, width, fail):
    """The layout uint8 [H, W, 3]: each box painted in its phrase's colour, in order (later covers earlier).

    A box left without a pixel of its own (thinner than a pixel at this size, or covered by later boxes of
    other phrases) would guide nothing: fail(key, message) reports it.
    """
    colours = phrase_colours(regions)
    layout = np.zeros((height, width, 3), dtype=np.uint8)
    layout[:] = BACKGROUND
    masks = [box_mask(region["box"], height, width) for region in regions]
    for region, mask in zip(regions, masks):
        layout[mask] = colours[region["phrase"]]
    for i, (region, mask) in enumerate(zip(regions, masks)):
        if not colour_mask(layout[mask], colours[region["phrase"]]).any():
            fail(f"regions[{i}]", f"box {region['box']} covers no pixel of the {width}x{height} image (thinner "
                                  f"than a pixel, or covered by later boxes)")
    return layout


def regions_color_context(regions):
    """The painted config's color_context of `regions`: {'r,g,b': [phrase, weight]}, one entry per phrase."""
    return {colour_key(rgb): [phrase, next(r["weight"] for r in regions if r["phrase"] == phrase)]
            for phrase, rgb in phrase_colours(regions).items()}


def colour_mask(layout, rgb):
    """bool [...]: the pixels of layout [..., 3] (uint8) whose colour is exactly rgb."""
    return (layout == np.array(rgb, dtype=np.uint8)).all(-1)


def outline(mask):
    """bool [H, W]: the pixels of the mask with a 4-neighbour outside it (or on the image's border)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def region_masks(layout, entries):
    """[(phrase, rgb, bool [H, W])] of each (phrase, rgb) entry on a layout uint8 [H, W, 3]."""
    return [(phrase, rgb, colour_mask(layout, rgb)) for phrase, rgb in entries]


def draw_preview(layout, entries, background=None):
    """A PIL image of the layout's regions, tinted, outlined and labelled with their phrases, over a white
    canvas or over `background` (a PIL image, resized to the layout's size). entries: [(phrase, rgb)]."""
    from PIL import Image, ImageDraw

    height, width = layout.shape[:2]
    canvas = np.full((height, width, 3), 255, dtype=np.float32)
    if background is not None:
        canvas = np.asarray(background.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)
    masks = region_masks(layout, entries)
    for _, rgb, mask in masks:  # a light tint of the region's colour, so the picture stays visible
        canvas[mask] = 0.6 * canvas[mask] + 0.4 * np.array(rgb, dtype=np.float32)
    for _, rgb, mask in masks:
        canvas[outline(mask)] = rgb
    image = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for phrase, rgb, mask in masks:
        if mask.any():
            ys, xs = np.nonzero(mask)
            x, y = int(xs.min()) + 3, int(ys.min()) + 2
            box = draw.textbbox((x, y), phrase)
            draw.rectangle(box, fill=(255, 255, 255))
            draw.text((x, y), phrase, fill=(0, 0, 0))
    return image
