"""Subjects' regions in a colour layout and their attention maps: one home for both, for inference and evaluation.

A subject's region is the pixels of the layout colours whose token rows (the run record's `token_rows`) hold the
subject's first row (its position): a `color_context` entry naming the subject, or naming its class phrase at
its position. The layout is resized to the image as inference does it (nearest). Attention maps are the
`attention/{seed}.npz` inference.py writes with --save_attention: one [H, W] float32 map per phrase, sum 1.
"""
import io
import zipfile

import numpy as np
from PIL import Image, ImageDraw

from cli_utils import MAX_IMAGE_SIDE, UserError
from file_utils import read_rgb, write_atomic
from layouts import colour_mask, outline

ATTENTION_FOLDER = "attention"
HEAT = np.array([255, 0, 0], dtype=np.float32)  # the colour an attention map blends the image towards
OUTLINE = (255, 255, 255)
MAX_MAPS = 80  # maps in one attention file: one per subject or phrase of a prompt of at most 77 tokens
LABELLED_SIDE = 256  # a smaller panel is enlarged (nearest, by a whole factor) so its 11 px text lines cover little


def read_layout(path, width, height):
    """The layout file as uint8 [height, width, 3], resized by nearest neighbour (colours stay exact)."""
    return np.array(Image.fromarray(read_rgb(path, "layout")).resize((width, height), Image.NEAREST))


def region_colours(token_rows, first_row):
    """The colour keys of `token_rows` {colour: rows} whose rows hold `first_row`."""
    return [colour for colour, rows in token_rows.items() if first_row in rows]


def region_mask(layout, rgbs):
    """bool [H, W]: the pixels of `layout` [H, W, 3] whose colour is one of `rgbs`."""
    mask = np.zeros(layout.shape[:2], dtype=bool)
    for rgb in rgbs:
        mask |= colour_mask(layout, rgb)
    return mask


def bounding_box(mask):
    """(left, top, right, bottom) of the True pixels, right and bottom exclusive (PIL's crop box); None if none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mass_inside(attention_map, mask):
    """The share of a map's mass on the mask's pixels."""
    return float(attention_map[mask].sum() / attention_map.sum())


# ------------------------------------------------------------------------------------------------
# Attention files

def write_attention(path, maps):
    """{name: [H, W] float32} as one .npz (names are the keys)."""
    def save(tmp):
        buffer = io.BytesIO()
        np.savez(buffer, **maps)
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            f.write(buffer.getvalue())
    write_atomic(path, save)


def read_attention(path, size=None):
    """{name: [H, W] float32} of an attention file written by write_attention, for an image of size (W, H)
    (None: maps of any one size).

    Anything else is a UserError naming the file: not an .npz, broken or cut short, holding pickled objects
    (never unpickled) or more data than maps of that size, a map not [H, W], not finite, negative or all zero.
    """
    width, height = size or (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    try:
        with zipfile.ZipFile(path) as archive:  # sizes before anything is decompressed: a small file can hold a lot
            entries = archive.infolist()
            if len(entries) > MAX_MAPS or any(info.file_size > 8 * height * width + 4096 for info in entries):
                raise UserError(f"{path}: holds more than attention maps of a {width}x{height} image "
                                f"(at most {MAX_MAPS}, one per phrase)")
        with np.load(path, allow_pickle=False) as data:
            maps = {name: data[name] for name in data.files}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable attention file ({type(e).__name__}: {str(e)[:120]})") from None
    shapes = {attention_map.shape for attention_map in maps.values()}
    if size is None and len(shapes) == 1 and len(next(iter(shapes))) == 2:
        height, width = next(iter(shapes))
    for name, attention_map in maps.items():
        if attention_map.shape != (height, width) or attention_map.dtype.kind != "f":
            raise UserError(f"{path}: map {name!r}: expected a float map [{height}, {width}] (the image's size), "
                            f"got {attention_map.dtype} {list(attention_map.shape)}")
        with np.errstate(over="ignore", invalid="ignore"):
            maps[name] = attention_map = attention_map.astype(np.float32)  # checked as it is used: float32
            total = attention_map.sum(dtype=np.float32)
        if not np.isfinite(attention_map).all() or (attention_map < 0).any() or not np.isfinite(total) \
                or not total > 0:
            raise UserError(f"{path}: map {name!r}: expected finite (as float32), non-negative values that do not "
                            f"all vanish")
    return maps


# ------------------------------------------------------------------------------------------------
# Pictures

def heat(image, attention_map):
    """The image [H, W, 3] blended towards red by the map scaled from its minimum (0) to its maximum (0.8, so the
    image still shows): uint8 [H, W, 3]. Each map is scaled alone: the picture shows where, not how much."""
    low, high = attention_map.min(), attention_map.max()
    alpha = 0.8 * ((attention_map - low) / max(high - low, 1e-12))[..., None]
    return (image * (1 - alpha) + HEAT * alpha).round().astype(np.uint8)


def labelled(panel, mask, lines):
    """A PIL image of panel [H, W, 3] with the mask's outline (if any) and text lines at the top left; a panel
    under LABELLED_SIDE pixels on its short side is enlarged first, each pixel a square of pixels."""
    scale = -(-LABELLED_SIDE // min(panel.shape[:2]))
    panel = panel.repeat(scale, axis=0).repeat(scale, axis=1)  # a copy, drawn on below
    if mask is not None:
        panel[outline(mask.repeat(scale, axis=0).repeat(scale, axis=1))] = OUTLINE
    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        left, top, right, bottom = draw.textbbox((1, 1 + 11 * i), line)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((1, 1 + 11 * i), line, fill=(255, 255, 255))
    return image


def side_by_side(panels, rows=1):
    """PIL images of one size in a grid of `rows` rows, left to right then top to bottom."""
    cols = -(-len(panels) // rows)
    w, h = panels[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % cols) * w, (i // cols) * h))
    return sheet


def attention_picture(image, maps, masks):
    """The image, then per phrase its map as a heat overlay with the outline of its region and its name.

    maps {name: [H, W]}; masks {name: bool [H, W] or None (no region)}."""
    panels = [labelled(image, None, [])]
    panels += [labelled(heat(image, m), masks.get(name), [name]) for name, m in maps.items()]
    return side_by_side(panels)
