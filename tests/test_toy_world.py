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


def test_the_many_subjects_scores_count_swaps_collapses_and_missing_places():
    """toy/many.py's per-sample figures on rendered scenes whose truth is known: right, swapped, collapsed, empty."""
    import many

    group = many.GROUPS["3"]
    truth = [many.CONCEPTS[name][1:] for name in group]

    def scene(identities):
        objects = []
        for (left, top, right, bottom), found in zip(world.cells("thirds"), identities):
            if found is not None:
                shape, colour, pattern = found
                objects.append(world.Shape(shape, colour, (left + right) / 2, (top + bottom) / 2, 10, pattern))
        return world.render(objects, world.MANY_SIZE)

    samples = [truth, [truth[1], truth[0], truth[2]], [truth[0], truth[0], truth[2]], [truth[0], None, truth[2]]]
    images = np.stack([scene(s) for s in samples])
    inside = np.zeros((96, 96), np.float32)
    inside[:, :32] = 1  # the first subject's attention all in its place; the others spread evenly
    maps = [{f"<{n}>": (inside if i == 0 else np.ones((96, 96), np.float32)) for i, n in enumerate(group)}] * 4
    scores = many.score_group(group, images, maps)
    assert scores["layout_accuracy"] == 0.25 and scores["swap_rate"] == 0.25
    assert scores["collapse"] == 0.25 and scores["missing"] == 0.25
    assert scores["leakage"] == 0.5  # the swap and the collapse put a colour where its subject is not; empty is none
    assert abs(scores["attention_in_region"] - (1 + 1 / 3 + 1 / 3) / 3) < 0.01
    assert abs(scores["layout_accuracy_se"] - np.std([1, 0, 0, 0], ddof=1) / 2) < 1e-9
    assert scores["wrong_attribute"] == {k: 3 / 11 for k in many.ATTRIBUTES}  # 3 of the 11 objects drawn
    # a look-alike drawn with its partner's pattern: only the pattern is wrong
    pair = many.LOOKALIKES[0]
    first, second = (many.CONCEPTS[name][1:] for name in pair)
    halves = [world.Shape(first[0], first[1], 24, 48, 12, first[2]), world.Shape(second[0], second[1], 72, 48, 12,
                                                                               first[2])]
    mixed = many.score_group(pair, world.render(halves, world.MANY_SIZE)[None],
                             [{f"<{n}>": np.ones((96, 96), np.float32) for n in pair}])
    assert mixed["wrong_attribute"] == {"shape": 0.0, "colour": 0.0, "pattern": 0.5}
    assert mixed["collapse"] == 1.0 and mixed["layout_accuracy"] == 0.0 and mixed["leakage"] == 1.0
    pooled = many.pooled([scores, scores])
    assert pooled["swap_rate"] == 0.25 and abs(pooled["swap_rate_se"] - scores["swap_rate_se"] / np.sqrt(2)) < 1e-9


def test_the_goal_table_takes_the_worst_group_and_the_faithful_baselines():
    """toy/many.py's goal rows: swap and collapse are judged on the highest group, class kept and the wrong-token
    control against the faithful method's own figures."""
    import many

    def cell(layout, swap, collapse):
        return {"layout_accuracy": layout, "swap_rate": swap, "collapse": collapse}

    results = {
        "many": {"2": {"faithful": cell(0.5, 0.1, 0.0), "best": cell(0.95, 0.0, 0.0)},
                 "3": {"faithful": cell(0.4, 0.0, 0.2), "best": cell(0.79, 0.06, 0.0)},
                 "4": {"faithful": cell(0.3, 0.0, 0.0), "best": cell(0.70, 0.0, 0.05)}},
        "lookalike": {"faithful": cell(0.2, 0.0, 0.5), "best": cell(0.85, 0.0, 0.01)},
        "seeds": 32, "concept_fidelity_min": 0.4, "class_kept": 0.8, "negative_control": 0.2,
        "best": {"concept_fidelity_min": 0.95, "class_kept": 0.79, "negative_control": 0.25}}
    rows = {label: (faithful, best, goal, met) for label, faithful, best, goal, met in many.goal_rows(results)}
    assert rows["layout accuracy, N = 2"][3] and not rows["layout accuracy, N = 3"][3]
    assert rows["layout accuracy, N = 4"][3] and rows["layout accuracy, look-alike pairs"][3]
    assert rows["swap, all N (the highest)"][:2] == (0.1, 0.06) and not rows["swap, all N (the highest)"][3]
    assert rows["collapse, all N (the highest)"][:2] == (0.5, 0.05) and rows["collapse, all N (the highest)"][3]
    assert rows["lowest single-concept fidelity"][3]
    assert rows["class kept, single subject"][2] == ">= 0.80" and not rows["class kept, single subject"][3]
    assert rows["wrong-token control"][2] == "<= 0.25" and rows["wrong-token control"][3]
    assert sum(line.endswith("| missed |") for line in many.goal_lines(results)) == 3


def test_the_base_model_check_reads_its_own_scenes_right_and_sees_a_wrong_pattern():
    """check_base.py's captions name every object by noun and place, and its scoring reads the world's own scenes
    as exact; one changed pattern is one wrong attribute, a blank image a missing place."""
    import check_base

    for count in range(1, 5):
        for seed, (caption, truth) in zip(range(check_base.FIRST_SCENE + 100 * count, 10 ** 9),
                                          check_base.captioned_scenes(count)):
            image, _, found = world.many_scene(seed, count)
            assert caption.count(" a ") + caption.startswith("a ") == count
            for obj, place in zip(found, world.PLACES[world.LAYOUTS[count]]):
                assert f"{world.describe(obj, 'noun')} {place}" in caption
            [(exact, missing, wrong, borrowed)] = check_base.score([image], truth)
            assert exact and not missing and not any(any(w) for w in wrong) and not any(any(b) for b in borrowed)
            changed = [world.Shape(**{**vars(o)}) for o in found]
            changed[0].pattern = "hollow" if changed[0].pattern != "hollow" else "plain"
            [(exact, _, wrong, borrowed)] = check_base.score([world.render(changed, world.MANY_SIZE)], truth)
            assert not exact and wrong[0] == [False, False, True]
            assert borrowed[0] == [False, False, any(o.pattern == changed[0].pattern for o in found[1:])]
            if count >= 2 and found[0].colour != found[1].colour:  # two colours traded: each borrowed
                traded = [world.Shape(**{**vars(o)}) for o in found]
                traded[0].colour, traded[1].colour = found[1].colour, found[0].colour
                [(_, _, wrong, borrowed)] = check_base.score([world.render(traded, world.MANY_SIZE)], truth)
                assert wrong[:2] == borrowed[:2] == [[False, True, False]] * 2
    blank = np.full((96, 96, 3), world.BACKGROUND, dtype=np.uint8)
    assert check_base.score([blank], truth) == [(False, True, [None] * 4, [None] * 4)]
