"""A procedurally generated benchmark: coloured shapes on textured backgrounds.

`draw` turns attributes (shape, colour, background texture) into an image; placement, size, rotation
and colour jitter come from the generator it is given. `generate` writes the dataset once under a
folder in the CoOp split-JSON layout, so it runs through the same loader path as the real benchmarks.
The class is the (colour, shape) pair; the texture is a nuisance that varies per image.
"""
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .base import Benchmark, write_atomic, write_json_atomic

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 190), "orange": (245, 140, 30), "pink": (240, 120, 180), "cyan": (40, 200, 210),
          "brown": (130, 80, 40), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon", "pentagon", "crescent")
TEXTURES = ("stripes", "checker", "dots", "noise")
CLASSES = tuple(zip(COLORS, SHAPES))  # ("red", "circle") -> class name "red circle"
PER_CLASS = {"train": 32, "val": 4, "test": 20}
SIZE = 64
SEED = 0
VERSION = 1  # bump when the drawing changes, so old copies are regenerated
SPLIT_FILE = "split_synthetic.json"
SUPERSAMPLE = 4  # shapes are drawn this much larger, then reduced, for smooth edges


def polygon(shape, r):
    """Vertices of a shape of radius r around the origin (None for the round shapes)."""
    regular = lambda n, radii: [(radii[k % len(radii)] * math.cos(2 * math.pi * k / n - math.pi / 2),
                                 radii[k % len(radii)] * math.sin(2 * math.pi * k / n - math.pi / 2))
                                for k in range(n)]
    w = 0.32 * r
    return {"square": regular(4, [r]), "triangle": regular(3, [r]), "pentagon": regular(5, [r]),
            "hexagon": regular(6, [r]), "star": regular(10, [r, 0.45 * r]),
            "diamond": [(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)],
            "cross": [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                      (-r, -w), (-w, -w)]}.get(shape)


def shape_mask(shape, size, cx, cy, r, angle):
    """An 'L' mask (255 inside the shape) of the given centre, radius and rotation."""
    s = SUPERSAMPLE
    mask = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = cx * s, cy * s, r * s
    ellipse = lambda x, y, rr, fill: d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)
    points = polygon(shape, r)
    if points is not None:
        c, si = math.cos(angle), math.sin(angle)
        d.polygon([(cx + x * c - y * si, cy + x * si + y * c) for x, y in points], fill=255)
    elif shape == "circle":
        ellipse(cx, cy, r, 255)
    elif shape == "ring":
        ellipse(cx, cy, r, 255)
        ellipse(cx, cy, 0.55 * r, 0)
    elif shape == "crescent":
        ellipse(cx, cy, r, 255)
        ellipse(cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle), 0.85 * r, 0)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return mask.resize((size, size), Image.Resampling.BOX)


def background(texture, size, rng):
    """HxWx3 float array: two muted colours mixed by a texture pattern."""
    grey = rng.integers(50, 200)
    c1 = np.clip(grey + rng.integers(-25, 26, 3), 0, 255)
    c2 = np.clip(c1 + rng.integers(-70, 71, 3), 0, 255)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if texture == "stripes":
        theta, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
        m = ((x * math.cos(theta) + y * math.sin(theta)) / period) % 1 < 0.5
    elif texture == "checker":
        p, ox, oy = rng.integers(4, 13), rng.integers(0, 12), rng.integers(0, 12)
        m = ((x + ox) // p + (y + oy) // p) % 2 == 0
    elif texture == "dots":
        p = rng.uniform(6, 12)
        m = (x % p - p / 2) ** 2 + (y % p - p / 2) ** 2 < (0.25 * p) ** 2
    elif texture == "noise":
        low = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8))
        m = np.asarray(low.resize((size, size), Image.Resampling.BILINEAR)) / 255.0
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {', '.join(TEXTURES)}")
    m = np.asarray(m, dtype=np.float64)[..., None]
    return c1 * (1 - m) + c2 * m


def draw(shape, color, texture, rng, size=SIZE):
    """An RGB image of a `color` `shape` on a `texture` background; jitter drawn from `rng`
    (a numpy Generator)."""
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {', '.join(COLORS)}")
    r = size * rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(r, size - r, 2)
    mask = np.asarray(shape_mask(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi)))[..., None] / 255.0
    fg = np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, 3), 0, 255)
    image = background(texture, size, rng) * (1 - mask) + fg * mask
    return Image.fromarray(np.round(image).astype(np.uint8))


def meta():
    return {"version": VERSION, "seed": SEED, "size": SIZE, "per_class": PER_CLASS, "classes": len(CLASSES)}


def is_complete(root):
    try:
        return json.loads((Path(root) / SPLIT_FILE).read_text()).get("generator") == meta()
    except (OSError, ValueError, AttributeError):
        return False


def generate(root):
    """Write the dataset under `root` unless a complete copy is there. Every image is written through a
    temporary file and a rename, and the split file last, so an interrupted run is never taken for a
    complete one (and concurrent runs write identical files)."""
    root = Path(root).expanduser()
    if is_complete(root):
        return root
    split = {"generator": meta()}
    for split_index, (name, count) in enumerate(PER_CLASS.items()):
        entries = []
        for label, (color, shape) in enumerate(CLASSES):
            folder = root / "images" / f"{color}_{shape}"
            for i in range(count):
                rng = np.random.default_rng([SEED, split_index, label, i])
                image = draw(shape, color, TEXTURES[rng.integers(len(TEXTURES))], rng)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=95)
                write_atomic(folder / f"{name}_{i:03d}.jpg", buffer.getvalue())
                entries.append([f"{color}_{shape}/{name}_{i:03d}.jpg", label, f"{color} {shape}"])
        split[name] = entries
    write_json_atomic(root / SPLIT_FILE, split)
    return root


class Synthetic(Benchmark):
    """The root given is the dataset folder itself; it is generated there on first use."""

    name = "synthetic"
    folders = (".",)
    image_dir = "images"
    split_file = SPLIT_FILE

    def __init__(self, root):
        generate(root)
        super().__init__(root)
