"""A toy world of coloured shapes: 64 px scenes with captions, deterministic from a seed.

    python toy/world.py toy/samples.png        # a grid of scenes with their captions printed

Three shapes x six colours, one or two objects on a light background. An object is named in one of three
ways: "a {colour} {shape}", the generic "a {shape}" (any colour), or a specific noun that means one shape in
one colour by itself ("a plum" is a purple circle). The specific nouns give the text encoder directions that
carry appearance, as breeds and identities do in Stable Diffusion, so a residual on the generic noun can
move it towards one appearance. Two objects: "... on the left and ... on the right", or "... and ...".
"""
import sys
from dataclasses import dataclass

import numpy as np

SIZE = 64
BACKGROUND = (236, 234, 228)
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "purple": (130, 50, 170),
    "yellow": (235, 200, 30), "blue": (40, 80, 215), "orange": (245, 135, 25),
}
# One single-token noun per (shape, colour).
NOUNS = {
    "circle": {"red": "apple", "green": "lime", "purple": "plum", "yellow": "lemon", "blue": "berry",
               "orange": "peach"},
    "square": {"red": "brick", "green": "mint", "purple": "violet", "yellow": "butter", "blue": "denim",
               "orange": "carrot"},
    "triangle": {"red": "rose", "green": "pine", "purple": "lilac", "yellow": "banana", "blue": "ocean",
                 "orange": "tiger"},
}


@dataclass
class Shape:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float


def shape_mask(obj, size=SIZE):
    """Boolean [size, size] mask of one object."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - obj.cx, y - obj.cy
    r = obj.radius
    if obj.shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if obj.shape == "square":
        half = 0.85 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # an upright isosceles triangle: apex above the centre, base below
    top, bottom, half_base = obj.cy - r, obj.cy + 0.8 * r, r
    t = (y - top) / (bottom - top)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half_base)


def render(objects, size=SIZE):
    """uint8 [size, size, 3] image of the objects on the background."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        image[shape_mask(obj, size)] = COLOURS[obj.colour]
    return image


def describe(obj, style):
    if style == "colour":
        return f"a {obj.colour} {obj.shape}"
    if style == "generic":
        return f"a {obj.shape}"
    return f"a {NOUNS[obj.shape][obj.colour]}"


def scene(seed):
    """(image uint8 [64, 64, 3], caption, objects) for one seed."""
    rng = np.random.default_rng(seed)
    styles = ("colour", "generic", "noun")
    style_p = (0.4, 0.2, 0.4)

    def random_object(cx_range, radius_range):
        return Shape(SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(6)], rng.uniform(*cx_range),
                     rng.uniform(22, 42), rng.uniform(*radius_range))

    if rng.random() < 0.5:
        obj = random_object((24, 40), (9, 15))
        obj.cy = rng.uniform(24, 40)
        return render([obj]), describe(obj, rng.choice(styles, p=style_p)), [obj]
    left, right = random_object((13, 20), (7, 10)), random_object((44, 51), (7, 10))
    a, b = describe(left, rng.choice(styles, p=style_p)), describe(right, rng.choice(styles, p=style_p))
    if rng.random() < 0.5:
        caption = f"{a} on the left and {b} on the right"
    else:
        caption = f"{a} and {b}" if rng.random() < 0.5 else f"{b} and {a}"
    return render([left, right]), caption, [left, right]


if __name__ == "__main__":
    from PIL import Image

    images = []
    for seed in range(16):
        image, caption, _ = scene(seed)
        images.append(image)
        print(seed, caption)
    grid = np.concatenate([np.concatenate(images[r * 4:(r + 1) * 4], axis=1) for r in range(4)], axis=0)
    Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(sys.argv[1] if len(sys.argv) > 1 else "samples.png")
