"""A toy world of coloured shapes: 64 px scenes with captions, deterministic from a seed.

    python toy/world.py toy/samples.png        # a grid of scenes with their captions printed

Three shapes x six colours, one or two objects on a light background. An object is named in one of three
ways: "a {colour} {shape}", the generic "a {shape}" (any colour), or a specific noun that means one shape in
one colour by itself ("a plum" is a purple circle). The specific nouns give the text encoder directions that
carry appearance, as breeds and identities do in Stable Diffusion, so a residual on the generic noun can
move it towards one appearance. Two objects: "... on the left and ... on the right", or "... and ...".

many_scene(seed) is the richer world of the many-subjects measurements: 96 px scenes of one to four objects in
halves, thirds or quadrants, each object with a pattern as well as a shape and a colour (plain; striped, a dark
band across it; dotted, a dark spot in its middle; hollow, a dark centre inside a coloured border). Two objects may
then share shape and colour and differ only in the pattern: look-alikes. Captions name the pattern as an adjective
("a striped lime", "a dotted circle").
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


PATTERNS = ("plain", "striped", "dotted", "hollow")
PATTERN_COLOUR = (35, 35, 40)  # the dark marks of a pattern, far from every colour and the background
MANY_SIZE = 96
LAYOUTS = {1: "centre", 2: "halves", 3: "thirds", 4: "quadrants"}  # how N objects share the image
PLACES = {"centre": ["in the middle"], "halves": ["on the left", "on the right"],
          "thirds": ["on the left", "in the middle", "on the right"],
          "quadrants": ["at the top left", "at the top right", "at the bottom left", "at the bottom right"]}


@dataclass
class Shape:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    pattern: str = "plain"


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


def pattern_mask(obj, size):
    """Boolean [size, size]: the pixels of an object that its pattern paints dark (within shape_mask).

    Each pattern is one coarse mark about the object's middle (a triangle's middle is a quarter radius below
    its centre), large enough for an 8x-downsampling VAE to keep: striped, a band across the object half a
    radius high; dotted, a disc of 0.3 radius; hollow, the shape shrunk to 0.65 of its size (the object is then
    a coloured border round a dark centre)."""
    inside = shape_mask(obj, size)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    middle = obj.cy + (0.25 * obj.radius if obj.shape == "triangle" else 0)
    if obj.pattern == "striped":
        return inside & (np.abs(y - middle) <= 0.25 * obj.radius)
    if obj.pattern == "dotted":
        return inside & ((x - obj.cx) ** 2 + (y - middle) ** 2 <= (0.3 * obj.radius) ** 2)
    if obj.pattern == "hollow":
        core = Shape(obj.shape, obj.colour, obj.cx, obj.cy, 0.65 * obj.radius)
        return inside & shape_mask(core, size)
    return np.zeros((size, size), dtype=bool)


def render(objects, size=SIZE):
    """uint8 [size, size, 3] image of the objects on the background."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        image[shape_mask(obj, size)] = COLOURS[obj.colour]
        if obj.pattern != "plain":
            image[pattern_mask(obj, size)] = PATTERN_COLOUR
    return image


def describe(obj, style):
    """"a {colour} {shape}", "a {shape}" or "a {noun}", the pattern before it unless plain ("a striped lime")."""
    pattern = "" if obj.pattern == "plain" else f"{obj.pattern} "
    if style == "colour":
        return f"a {pattern}{obj.colour} {obj.shape}"
    if style == "generic":
        return f"a {pattern}{obj.shape}"
    return f"a {pattern}{NOUNS[obj.shape][obj.colour]}"


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


def cells(layout, size=MANY_SIZE):
    """The (left, top, right, bottom) pixel box of each place of a layout, in PLACES' order."""
    half, third = size / 2, size / 3
    return {"centre": [(0, 0, size, size)],
            "halves": [(0, 0, half, size), (half, 0, size, size)],
            "thirds": [(0, 0, third, size), (third, 0, 2 * third, size), (2 * third, 0, size, size)],
            "quadrants": [(0, 0, half, half), (half, 0, size, half), (0, half, half, size), (half, half, size, size)],
            }[layout]


def many_scene(seed, count=None, size=MANY_SIZE):
    """(image uint8 [96, 96, 3], caption, objects in place order) of the richer world, for one seed.

    count: the number of objects (1 to 4; None: drawn, a quarter each). Each object sits in its own cell of the
    count's layout, with a random shape, colour and pattern (a third of the scenes with two or more objects
    hold a look-alike pair: two objects of one shape and colour with different patterns). The caption names
    each object by colour, generically or by its noun, with its pattern, either with the places ("a striped
    lime on the left and a red square on the right") or as a list in a random order ("a striped lime and a red
    square").
    """
    rng = np.random.default_rng(seed)
    count = count or int(rng.integers(1, 5))
    layout = LAYOUTS[count]
    objects = []
    for left, top, right, bottom in cells(layout, size):
        side = min(right - left, bottom - top)
        radius = rng.uniform(0.26, 0.34) * side
        margin = radius + 2
        objects.append(Shape(SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(6)],
                             rng.uniform(left + margin, max(left + margin, right - margin)),
                             rng.uniform(top + margin, max(top + margin, bottom - margin)), radius,
                             PATTERNS[rng.integers(len(PATTERNS))]))
    if count >= 2 and rng.random() < 1 / 3:  # a look-alike pair
        first, second = rng.choice(count, 2, replace=False)
        a, b = objects[first], objects[second]
        b.shape, b.colour = a.shape, a.colour
        b.pattern = PATTERNS[(PATTERNS.index(a.pattern) + 1 + rng.integers(len(PATTERNS) - 1)) % len(PATTERNS)]
    styles = ("colour", "generic", "noun")
    names = [describe(obj, rng.choice(styles, p=(0.4, 0.2, 0.4))) for obj in objects]
    if count == 1 or rng.random() < 0.5:
        parts = [f"{name} {place}" for name, place in zip(names, PLACES[layout])]
    else:
        parts = [names[i] for i in rng.permutation(count)]
    caption = parts[0] if count == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return render(objects, size), caption, objects


if __name__ == "__main__":
    from PIL import Image

    images = []
    for seed in range(16):
        image, caption, _ = scene(seed)
        images.append(image)
        print(seed, caption)
    grid = np.concatenate([np.concatenate(images[r * 4:(r + 1) * 4], axis=1) for r in range(4)], axis=0)
    Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(sys.argv[1] if len(sys.argv) > 1 else "samples.png")
