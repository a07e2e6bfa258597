"""Read a toy-world image back into objects: colour, shape, centroid and size of each.

    python toy/analyze.py IMAGE.png [...]        # prints the objects found
    python toy/analyze.py --check 2000           # accuracy on world.py's own scenes, where the truth is known

Each pixel gets the nearest palette colour (or the background); each connected region of non-background
pixels of at least MIN_AREA pixels is an object, of its pixels' majority colour. Shape from how much of its bounding box an object fills: a square fills
it, a circle pi/4 of it, a triangle about half.
"""
import argparse

import numpy as np
from scipy import ndimage

from world import BACKGROUND, COLOURS, scene

PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), dtype=np.float32)  # [7, 3]
NAMES = ["background"] + list(COLOURS)
MIN_AREA = 12  # pixels; smaller specks are noise


def classify_shape(fill):
    """Fraction of the bounding box filled -> shape: square ~1.0, circle ~0.79, triangle ~0.5."""
    if fill >= 0.9:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"


def objects(image):
    """[{colour, shape, cx, cy, area, fill}] of an RGB uint8 image [H, W, 3], largest first."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    distance = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)  # [H, W, 7]
    labels = distance.argmin(-1)  # 0 is the background
    regions, count = ndimage.label(labels > 0)
    found = []
    for region in range(1, count + 1):
        inside = regions == region
        ys, xs = np.nonzero(inside)
        if len(ys) < MIN_AREA:
            continue
        # a sampled object can shade from one palette colour into the next: its colour is the majority
        colour = NAMES[np.bincount(labels[inside], minlength=len(NAMES)).argmax()]
        fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        found.append({"colour": colour, "shape": classify_shape(fill), "cx": float(xs.mean() + 0.5),
                      "cy": float(ys.mean() + 0.5), "area": int(len(ys)), "fill": round(float(fill), 3)})
    return sorted(found, key=lambda o: -o["area"])


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
    args = parser.parse_args()
    if args.check:
        print(f"{check(args.check):.4f} of {args.check} scenes read back exactly")
    from PIL import Image
    for path in args.images:
        print(path, objects(np.array(Image.open(path).convert("RGB"))))
