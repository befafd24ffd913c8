"""The shapes world: captioned 64 x 64 images of coloured shapes, generated deterministically.

Prompts name what an image can get wrong -- colour, shape, count, size, position and two-object
compositions ("a red circle above a blue square"). Every prompt has a spec that says exactly what a
correct image holds, so the world can render images for it and score images against it. Shapes are
drawn anti-aliased (4 x 4 samples a pixel), so their edges hold the in-between colours a VQ decoder
must get right, as real images do.
"""
import itertools
import random

import numpy as np

SIZE = 64
SUPERSAMPLE = 4  # samples per pixel side: anti-aliased edges
BACKGROUND = (24, 24, 24)
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
          "white": (235, 235, 235)}
SHAPES = ["circle", "square", "triangle"]
RELATIONS = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}
RADIUS = {"small": 7, "": 11, "big": 16}
PAIR_RADIUS = 9  # the objects of 'two' and 'pair' prompts
OBJECTS = [(c, s) for c in COLORS for s in SHAPES]  # 15 kinds of object
WORDS = sorted({"a", "two", "small", "big", "above", "below", "left", "right", "of", *COLORS, *SHAPES,
                *(s + "s" for s in SHAPES)})
MAP_CELLS = 8  # object_map's grid: 8 x 8 cells of 8 x 8 px


def all_specs():
    """Every prompt of the world with its spec: kind 'single' (colour, shape, size), 'two' (two of
    the same object) or 'pair' (two different objects and a relation)."""
    specs = [{"kind": "single", "objects": [o], "size": z} for o in OBJECTS for z in RADIUS]
    specs += [{"kind": "two", "objects": [o, o]} for o in OBJECTS]
    specs += [{"kind": "pair", "objects": [a, b], "relation": r}
              for a, b in itertools.permutations(OBJECTS, 2) for r in RELATIONS]
    for s in specs:
        s["prompt"] = caption(s)
    return specs


def caption(spec):
    (c1, s1), *rest = spec["objects"]
    if spec["kind"] == "single":
        return " ".join(w for w in ["a", spec["size"], c1, s1] if w)
    if spec["kind"] == "two":
        return f"two {c1} {s1}s"
    c2, s2 = rest[0]
    return f"a {c1} {s1} {spec['relation']} a {c2} {s2}"


def split(seed=0):
    """(train specs, held-out specs). A fifth of the two-object compositions, chosen by their pair of
    objects (so in no relation), never appear in training; the held-out set is 48 of those plus 16
    trained single-object and two-of-a-kind prompts."""
    specs = all_specs()
    pairs = sorted({tuple(s["objects"]) for s in specs if s["kind"] == "pair"})
    rnd = random.Random(seed)
    unseen = set(rnd.sample(pairs, len(pairs) // 5))
    train = [s for s in specs if tuple(s["objects"]) not in unseen or s["kind"] != "pair"]
    held = [s for s in specs if s["kind"] == "pair" and tuple(s["objects"]) in unseen]
    held = rnd.sample(held, 48) + rnd.sample([s for s in train if s["kind"] != "pair"], 16)
    return train, held


def layout(spec, rng):
    """Where the spec's objects go: [(colour, shape, cx, cy, r)], placed by rng (random.Random)."""
    S = SIZE
    if spec["kind"] == "single":
        r = RADIUS[spec["size"]]
        centres = [(rng.uniform(r + 2, S - r - 2), rng.uniform(r + 2, S - r - 2))]
    elif spec["kind"] == "two":  # side by side or one over the other, apart
        r = PAIR_RADIUS
        a, b, b2 = rng.uniform(12, 20), rng.uniform(12, S - 12), rng.uniform(12, S - 12)
        centres = [(a, b), (S - a, b2)] if rng.random() < 0.5 else [(b, a), (b2, S - a)]
    else:  # the first object is `relation` the second: apart along the relation's axis
        r = PAIR_RADIUS
        dx, dy = RELATIONS[spec["relation"]]
        lo, hi = rng.uniform(12, 20), rng.uniform(44, 52)
        j1, j2 = rng.uniform(16, 48), rng.uniform(16, 48)
        if dx:
            centres = [(lo, j1), (hi, j2)] if dx < 0 else [(hi, j1), (lo, j2)]
        else:
            centres = [(j1, lo), (j2, hi)] if dy < 0 else [(j1, hi), (j2, lo)]
    return [(c, s, cx, cy, r) for (c, s), (cx, cy) in zip(spec["objects"], centres)]


def coverage(shape, cx, cy, r):
    """SIZE x SIZE: the fraction of each pixel the shape covers (4 x 4 samples a pixel)."""
    n = SIZE * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        inside = (abs(x - cx) <= r * 0.85) & (abs(y - cy) <= r * 0.85)
    else:  # triangle, apex up: below the two slanted edges and above the base
        inside = (y <= cy + r * 0.8) & (y >= cy - r) & (abs(x - cx) <= (y - (cy - r)) * 0.55)
    return inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3))


def draw(objects):
    """A SIZE x SIZE x 3 uint8 image of laid-out objects, each blended over what is below by its coverage."""
    img = np.empty((SIZE, SIZE, 3))
    img[:] = BACKGROUND
    for color, shape, cx, cy, r in objects:
        a = coverage(shape, cx, cy, r)[..., None]
        img = img * (1 - a) + np.array(COLORS[color]) * a
    return np.floor(img + 0.5).astype(np.uint8)


def render(spec, rng):
    """A 64 x 64 x 3 uint8 image of the spec; rng (random.Random) places the objects."""
    return draw(layout(spec, rng))


def labels(spec):
    """Per-object counts (15 kinds, 0..2): what world.detect returns and the feature network learns to count."""
    counts = [0] * len(OBJECTS)
    for o in spec["objects"]:
        counts[OBJECTS.index(tuple(o))] += 1
    return counts


def object_map(objects):
    """MAP_CELLS x MAP_CELLS: in each cell, 1 + the kind of object that covers most of it (if over a
    third), else 0 (background). With the counts, the feature network's task: every object's colour,
    shape, size, position and number."""
    k = SIZE // MAP_CELLS
    best, out = np.zeros((MAP_CELLS, MAP_CELLS)), np.zeros((MAP_CELLS, MAP_CELLS), np.int64)
    for color, shape, cx, cy, r in objects:
        cov = coverage(shape, cx, cy, r).reshape(MAP_CELLS, k, MAP_CELLS, k).mean((1, 3))
        win = (cov > best) & (cov > 1 / 3)
        out[win], best = 1 + OBJECTS.index((color, shape)), np.maximum(best, cov)
    return out


def read_objects(img):
    """The objects in an image, by rule: each pixel takes its nearest palette colour (or the
    background), 4-connected regions of a colour are objects (specks under 40 px are ignored), and an
    object's shape is read from how much of its bounding box it fills (square ~1, circle ~0.79,
    triangle ~0.5). Returns [(colour, shape, cx, cy, r)] as layout() places them: the centre and radius
    from the bounding box by each shape's geometry (coverage()), so draw() redraws what the image shows."""
    palette = np.array([*COLORS.values(), BACKGROUND])
    label = ((img[:, :, None].astype(int) - palette) ** 2).sum(-1).argmin(-1)
    objects = []
    seen = np.zeros(label.shape, bool)
    for y0, x0 in zip(*np.nonzero(label < len(COLORS))):
        if seen[y0, x0]:
            continue
        colour, stack, pixels = label[y0, x0], [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < SIZE and 0 <= u < SIZE and not seen[v, u] and label[v, u] == colour:
                    seen[v, u] = True
                    stack.append((v, u))
        if len(pixels) < 40:
            continue
        ys, xs = np.array(pixels).T
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = len(pixels) / (h * w)
        shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
        # coverage()'s geometry: a circle of radius r, a square of half-side 0.85 r, a triangle 1.8 r high
        r = {"circle": (h + w) / 4, "square": (h + w) / 4 / 0.85, "triangle": h / 1.8}[shape]
        cy = ys.min() + r if shape == "triangle" else ys.min() + h / 2  # a triangle's centre: r below its apex
        objects.append((list(COLORS)[colour], shape, xs.min() + w / 2, cy, r))
    return objects


def count(objects):
    """Per-object counts (15 kinds, capped at 2) of a list of objects."""
    counts = [0] * len(OBJECTS)
    for colour, shape, *_ in objects:
        k = OBJECTS.index((colour, shape))
        counts[k] = min(2, counts[k] + 1)
    return counts


def detect(img):
    """The counts of the objects read_objects finds: right on the world's renders."""
    return count(read_objects(img))


def correct(spec, counts):
    """Micro GenEval: does an image whose predicted per-object counts are `counts` satisfy the
    prompt? single: exactly one of the object (colour + shape); two: exactly two (count);
    pair: both objects present (two objects)."""
    want = labels(spec)
    if spec["kind"] == "pair":
        return all(counts[i] >= 1 for i, w in enumerate(want) if w)
    return all(counts[i] == w for i, w in enumerate(want) if w)
