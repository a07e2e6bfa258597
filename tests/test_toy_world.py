"""The richer toy world (world.many_scene: one to four objects with patterns, look-alike pairs) and its analyser:
every attribute of the world's own scenes reads back exactly, and a changed or missing object is seen."""
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "toy"))
import analyze  # noqa: E402
import world  # noqa: E402


def test_scenes_are_deterministic_and_cover_every_count_pattern_and_look_alikes():
    image, caption, objects = world.many_scene(11)
    again, caption_again, _ = world.many_scene(11)
    assert np.array_equal(image, again) and caption == caption_again and image.shape == (96, 96, 3)
    counts, patterns, look_alikes = Counter(), Counter(), 0
    for seed in range(400):
        _, caption, objects = world.many_scene(seed)
        counts[len(objects)] += 1
        patterns.update(o.pattern for o in objects)
        pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]]
        look_alikes += any((a.shape, a.colour) == (b.shape, b.colour) and a.pattern != b.pattern for a, b in pairs)
        for obj in objects:  # the caption names each object's pattern, unless plain
            assert obj.pattern == "plain" or obj.pattern in caption
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 70
    assert set(patterns) == set(world.PATTERNS) and look_alikes > 80
    _, caption, _ = world.many_scene(5, count=4)
    assert caption.count(",") >= 2 or "at the top left" in caption


def test_every_attribute_reads_back_exactly():
    assert analyze.check_many(500) == 1.0


def test_the_analyser_sees_a_changed_pattern_a_missing_object_and_the_old_world_unchanged():
    image, _, objects = world.many_scene(2, count=4)
    places = analyze.by_place(analyze.objects(image, patterns=True), "quadrants")
    assert [analyze.identity(p[0]) for p in places] == [(o.shape, o.colour, o.pattern) for o in objects]
    changed = [world.Shape(o.shape, o.colour, o.cx, o.cy, o.radius, "striped" if o.pattern != "striped" else "dotted")
               for o in objects]
    read = analyze.by_place(analyze.objects(world.render(changed, 96), patterns=True), "quadrants")
    assert all(analyze.identity(p[0])[2] != o.pattern for p, o in zip(read, objects))
    read = analyze.by_place(analyze.objects(world.render(objects[1:], 96), patterns=True), "quadrants")
    assert read[0] == [] and all(len(p) == 1 for p in read[1:])
    old, _, truth = world.scene(7)  # the two-object world the committed base model was trained on
    assert all(o.pattern == "plain" for o in truth) and not (old == world.PATTERN_COLOUR).all(-1).any()
    assert analyze.check(300) >= 0.98
