"""The shapes world: captioned 32 x 32 images of coloured shapes, generated deterministically.

Prompts name what an image can get wrong -- colour, shape, count, size, position and two-object
compositions ("a red circle above a blue square"). Every prompt has a spec that says exactly what a
correct image holds, so the world can render images for it and score images against it.
"""
import itertools
import random

import numpy as np

SIZE = 32
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
          "white": (235, 235, 235)}
SHAPES = ["circle", "square", "triangle"]
RELATIONS = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}
RADIUS = {"small": 4, "": 6, "big": 9}
OBJECTS = [(c, s) for c in COLORS for s in SHAPES]  # 15 kinds of object
WORDS = sorted({"a", "two", "small", "big", "above", "below", "left", "right", "of", *COLORS, *SHAPES,
                *(s + "s" for s in SHAPES)})


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
    objects (so in no relation), never appear in training; the held-out set is those plus a sample
    of trained prompts."""
    specs = all_specs()
    pairs = sorted({tuple(s["objects"]) for s in specs if s["kind"] == "pair"})
    rnd = random.Random(seed)
    unseen = set(rnd.sample(pairs, len(pairs) // 5))
    train = [s for s in specs if tuple(s["objects"]) not in unseen or s["kind"] != "pair"]
    held = [s for s in specs if s["kind"] == "pair" and tuple(s["objects"]) in unseen]
    held = rnd.sample(held, 48) + rnd.sample([s for s in train if s["kind"] != "pair"], 16)
    return train, held


def shape_mask(shape, cx, cy, r):
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (abs(x - cx) <= r * 0.85) & (abs(y - cy) <= r * 0.85)
    # triangle, apex up: inside if below the two slanted edges and above the base
    return (y <= cy + r * 0.8) & (y >= cy - r) & (abs(x - cx) <= (y - (cy - r)) * 0.55)


def render(spec, rng):
    """A 32 x 32 x 3 uint8 image of the spec; rng (random.Random) places the objects."""
    img = np.full((SIZE, SIZE, 3), 24, np.uint8)
    if spec["kind"] == "single":
        r = RADIUS[spec["size"]]
        centres = [(rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1))]
        radii = [r]
    elif spec["kind"] == "two":  # side by side or one over the other, apart
        r = 5
        a = rng.uniform(7, 10)
        b = rng.uniform(7, 25)
        centres = [(a, b), (SIZE - a, rng.uniform(7, 25))] if rng.random() < 0.5 else [(b, a), (rng.uniform(7, 25), SIZE - a)]
        radii = [r, r]
    else:  # the first object is `relation` the second: offset along the relation's axis
        r = 5
        dx, dy = RELATIONS[spec["relation"]]
        lo, hi = rng.uniform(6, 10), rng.uniform(22, 26)
        j1, j2 = rng.uniform(8, 24), rng.uniform(8, 24)
        first, second = (lo, j1), (hi, j2)
        if dx:
            centres = [first, second] if dx < 0 else [second, first]
        else:
            centres = [(j1, lo), (j2, hi)] if dy < 0 else [(j1, hi), (j2, lo)]
        radii = [r, r]
    for (color, shape), (cx, cy), r in zip(spec["objects"], centres, radii):
        img[shape_mask(shape, cx, cy, r)] = COLORS[color]
    return img


def labels(spec):
    """Per-object counts (15 kinds, 0..2), the targets of the world's attribute network."""
    counts = [0] * len(OBJECTS)
    for o in spec["objects"]:
        counts[OBJECTS.index(tuple(o))] += 1
    return counts


def detect(img):
    """The objects in an image, by rule: each pixel takes its nearest palette colour (or the
    background), 4-connected regions of a colour are objects (specks under 12 px are ignored), and an
    object's shape is read from how much of its bounding box it fills (square ~1, circle ~0.79,
    triangle ~0.5). Right on 99.9% of the world's renders; returns per-object counts (capped at 2)."""
    palette = np.array([*COLORS.values(), (24, 24, 24)])
    label = ((img[:, :, None].astype(int) - palette) ** 2).sum(-1).argmin(-1)
    counts = [0] * len(OBJECTS)
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
        if len(pixels) < 12:
            continue
        ys, xs = np.array(pixels).T
        fill = len(pixels) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
        k = OBJECTS.index((list(COLORS)[colour], shape))
        counts[k] = min(2, counts[k] + 1)
    return counts


def correct(spec, counts):
    """Micro GenEval: does an image whose predicted per-object counts are `counts` satisfy the
    prompt? single: exactly one of the object (colour + shape); two: exactly two (count);
    pair: both objects present (two objects)."""
    want = labels(spec)
    if spec["kind"] == "pair":
        return all(counts[i] >= 1 for i, w in enumerate(want) if w)
    return all(counts[i] == w for i, w in enumerate(want) if w)
