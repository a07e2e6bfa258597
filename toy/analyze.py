"""Read a toy-world image back into objects: colour, shape, centroid and size of each.

    python toy/analyze.py IMAGE.png [...]        # prints the objects found
    python toy/analyze.py --check 2000           # accuracy on world.py's own scenes, where the truth is known

Each pixel gets the nearest palette colour (or the background); each connected region of non-background
pixels of at least MIN_AREA pixels is an object, of its pixels' majority colour. Shape from how much of its bounding box an object fills: a square fills
it, a circle pi/4 of it, a triangle about half.

The richer world (world.many_scene) adds the patterns' dark colour to the palette (objects(..., patterns=True)):
an object is then its colour's pixels and its dark marks together, and the marks give the pattern: none (plain),
a band much wider than high (striped), a small spot (dotted) or a large centre (hollow). by_place assigns
the objects found to the places of a layout by their centroids.
"""
import argparse

import numpy as np
from scipy import ndimage

from world import BACKGROUND, COLOURS, MANY_SIZE, PATTERN_COLOUR, cells, many_scene, scene

PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), dtype=np.float32)  # [7, 3]
NAMES = ["background"] + list(COLOURS)
PATTERN_LABEL = len(NAMES)  # with patterns=True: the dark marks, after the colours
MIN_AREA = 12  # pixels; smaller specks are noise
HOLLOW_SHARE = 0.27  # dark marks of at least this share of an object (not a band) are a hollow centre


def classify_shape(fill):
    """Fraction of the bounding box filled -> shape: square ~1.0, circle ~0.79, triangle ~0.5."""
    if fill >= 0.9:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"


def classify_pattern(marks, area):
    """The pattern of an object from its dark marks (a boolean mask) and its area in pixels: none is plain; marks
    at least twice as wide as high are a band (striped); otherwise their share of the object tells a small spot
    (dotted) from a large centre (hollow)."""
    share = marks.sum() / area
    if share < 0.03:
        return "plain"
    ys, xs = np.nonzero(marks)
    if (xs.max() - xs.min() + 1) >= 2 * (ys.max() - ys.min() + 1):
        return "striped"
    return "hollow" if share >= HOLLOW_SHARE else "dotted"


def objects(image, patterns=False):
    """[{colour, shape, cx, cy, area, fill}] of an RGB uint8 image [H, W, 3], largest first; with patterns
    (the richer world) each also has its pattern."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    palette = np.concatenate([PALETTE, np.float32([PATTERN_COLOUR])]) if patterns else PALETTE
    distance = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # [H, W, 7 or 8]
    labels = distance.argmin(-1)  # 0 is the background
    regions, count = ndimage.label(labels > 0)
    found = []
    for region in range(1, count + 1):
        inside = regions == region
        ys, xs = np.nonzero(inside)
        if len(ys) < MIN_AREA:
            continue
        # a sampled object can shade from one palette colour into the next: its colour is the majority
        votes = np.bincount(labels[inside], minlength=len(NAMES) + 1)[:len(NAMES)]
        if patterns and votes.sum() == 0:
            continue  # dark marks alone are no object
        colour = NAMES[votes.argmax()]
        fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        entry = {"colour": colour, "shape": classify_shape(fill), "cx": float(xs.mean() + 0.5),
                 "cy": float(ys.mean() + 0.5), "area": int(len(ys)), "fill": round(float(fill), 3)}
        if patterns:
            entry["pattern"] = classify_pattern(inside & (labels == PATTERN_LABEL), len(ys))
        found.append(entry)
    return sorted(found, key=lambda o: -o["area"])


def by_place(found, layout, size=MANY_SIZE):
    """The objects found, per place of the layout (world.cells): a list per place of those whose centroid lies in
    it, largest first. An empty list is a missing object; more than one, extra objects."""
    places = [[] for _ in cells(layout, size)]
    for obj in found:
        for place, (left, top, right, bottom) in zip(places, cells(layout, size)):
            if left <= obj["cx"] < right and top <= obj["cy"] < bottom:
                place.append(obj)
                break
    return places


def identity(obj):
    """(shape, colour, pattern): what tells two subjects of the richer world apart."""
    return obj["shape"], obj["colour"], obj["pattern"]


def check_many(count):
    """Fraction of many_scene scenes read back exactly: in every place one object, of its shape, colour and
    pattern, and nothing else."""
    from world import LAYOUTS

    right = 0
    for seed in range(count):
        image, _, truth = many_scene(seed)
        places = by_place(objects(image, patterns=True), LAYOUTS[len(truth)])
        right += all(len(p) == 1 and identity(p[0]) == (t.shape, t.colour, t.pattern) for p, t in zip(places, truth))
    return right / count


def check(count):
    """Fraction of world.py scenes read back exactly: same number of objects, each colour and shape right."""
    right = 0
    for seed in range(count):
        image, _, truth = scene(seed)
        got = sorted((o["colour"], o["shape"]) for o in objects(image))
        right += got == sorted((t.colour, t.shape) for t in truth)
    return right / count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--check", type=int, default=0, help="check on this many world.py scenes")
    parser.add_argument("--many", action="store_true", help="the richer world's scenes (many_scene), patterns read")
    args = parser.parse_args()
    if args.check:
        rate = check_many(args.check) if args.many else check(args.check)
        print(f"{rate:.4f} of {args.check} scenes read back exactly")
    from PIL import Image
    for path in args.images:
        print(path, objects(np.array(Image.open(path).convert("RGB")), patterns=args.many))
