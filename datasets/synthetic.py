"""The synthetic world: images and captions composed from the same attributes, and few-shot tasks in it.

An image is a coloured shape with a surface pattern on a background scene, at some size, position and
rotation, with pixel noise; its caption names those attributes ("a photo of a small red striped triangle
on a sand background"). `sample` draws attributes, `render` draws a whole batch of them at once in torch
(the sandbox pretraining, scripts/pretrain_sandbox.py, renders every batch fresh) and `caption` words one.

`PRETRAIN` is the pretraining distribution: it never shows the colour-shape pairs of `HELD_OUT` nor the
backgrounds of `UNSEEN_BACKGROUNDS`. The few-shot tasks are defined against it:
    synthetic               8 colour-shape pairs seen in pretraining, on seen backgrounds (demo, tests)
    synthetic_compositions  the 16 colour-shape pairs never seen in pretraining ("red star")
    synthetic_shift         16 seen pairs on unseen backgrounds (brick, checkerboard) under heavy noise
Each task is written once under its folder in the CoOp split-JSON layout (32x32 PNG images), so it goes
through the same loader as the real benchmarks. Class names read as "a photo of a red star.".
"""
import io
import json
import math
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from so.files import write_atomic, write_json_atomic

from .base import Benchmark

COLORS = {"red": (215, 40, 40), "orange": (245, 140, 25), "yellow": (240, 215, 40), "green": (40, 165, 60),
          "cyan": (40, 200, 215), "blue": (40, 70, 215), "purple": (140, 55, 190), "pink": (245, 125, 185)}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "heart")
PATTERNS = ("plain", "striped", "spotted")
SIZES = {"small": (4.5, 6.5), "medium": (7.0, 9.0), "large": (9.5, 12.0)}  # shape radius in pixels
SEEN_BACKGROUNDS = ("sand", "grass", "sky", "snow", "stone", "night", "wood")
UNSEEN_BACKGROUNDS = ("brick", "checkerboard")
BACKGROUNDS = SEEN_BACKGROUNDS + UNSEEN_BACKGROUNDS
COLOR_NAMES, COLOR_VALUES = tuple(COLORS), torch.tensor(list(COLORS.values()), dtype=torch.float32)
PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
# Colour i with shape (i + 3) % 8 and (i + 7) % 8: every colour and every shape is in two held-out pairs,
# so each word is seen in pretraining, only the pairing is new.
HELD_OUT = tuple((c, s) for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES) if (j - i) % 8 in (3, 7))

SIZE = 32  # image side in pixels: the tiny CLIP's input size
SUPERSAMPLE = 2  # shapes are drawn this much finer, then averaged, for smooth edges
VERSION = 3  # bump when drawing or tasks change, so old copies are regenerated
SPLIT_FILE = "split_synthetic.json"


@dataclass(frozen=True)
class Distribution:
    """Which attribute values images are drawn from; the remaining attributes vary over all values."""

    pairs: tuple  # (colour, shape) pairs; one per class for a task
    backgrounds: tuple
    noise: tuple  # (low, high) standard deviation of Gaussian pixel noise, on a 0..1 scale
    per_class: dict = field(default_factory=lambda: {"train": 32, "val": 4, "test": 50})


PRETRAIN = Distribution(tuple(p for p in PAIRS if p not in HELD_OUT), SEEN_BACKGROUNDS, (0.0, 0.04))
TASKS = {
    "synthetic": Distribution(tuple((c, SHAPES[i]) for i, c in enumerate(COLORS)), SEEN_BACKGROUNDS,
                              (0.0, 0.04), {"train": 32, "val": 4, "test": 20}),
    "synthetic_compositions": Distribution(HELD_OUT, SEEN_BACKGROUNDS, (0.0, 0.04)),
    "synthetic_shift": Distribution(tuple((c, SHAPES[(i + k) % 8]) for i, c in enumerate(COLORS) for k in (0, 4)),
                                    UNSEEN_BACKGROUNDS, (0.12, 0.2)),
}


def sample(pair_index, dist, generator):
    """Attributes of len(pair_index) images: `pair_index` indexes dist.pairs; the rest is drawn."""
    n = len(pair_index)
    u = lambda *shape: torch.rand(*shape, generator=generator)
    pick = lambda k: torch.randint(k, (n,), generator=generator)
    size = pick(len(SIZES))
    low, high = torch.tensor(list(SIZES.values())).T
    radius = low[size] + (high[size] - low[size]) * u(n)
    centre = radius[:, None] + 0.5 + u(n, 2) * (SIZE - 1 - 2 * radius[:, None])
    return {"color": torch.tensor([COLOR_NAMES.index(dist.pairs[i][0]) for i in pair_index]),
            "shape": torch.tensor([SHAPES.index(dist.pairs[i][1]) for i in pair_index]),
            "pattern": pick(len(PATTERNS)),
            "background": torch.tensor([BACKGROUNDS.index(b) for b in dist.backgrounds])[pick(len(dist.backgrounds))],
            "size": size, "radius": radius, "centre": centre, "angle": u(n) * 2 * math.pi,
            "noise": dist.noise[0] + (dist.noise[1] - dist.noise[0]) * u(n),
            "jitter": (u(n, 3) - 0.5) * 30}


def polygon(rho, phi, n, inner):
    """Inside a star with n points at radius 1 and n inner corners at radius `inner` (straight edges);
    inner = cos(pi / n) makes the regular n-gon."""
    half = math.pi / n
    a = torch.remainder(phi, 2 * half)
    a = torch.minimum(a, 2 * half - a)  # angle from the nearest point, in [0, pi / n]
    # the edge from (1, 0) to inner * (cos half, sin half) is the line nx * x + ny * y = nx
    nx, ny = inner * math.sin(half), 1 - inner * math.cos(half)
    return rho * (nx * torch.cos(a) + ny * torch.sin(a)) <= nx


def shape_masks(attrs, grid):
    """[B, G, G] bool masks sampled on `grid` pixels, and each pixel's (u, v) in the shape's rotated frame."""
    x = grid[None, None, :] - attrs["centre"][:, 0, None, None]
    y = grid[None, :, None] - attrs["centre"][:, 1, None, None]
    cos, sin = torch.cos(attrs["angle"])[:, None, None], torch.sin(attrs["angle"])[:, None, None]
    u, v = x * cos + y * sin, -x * sin + y * cos
    inside = torch.zeros(u.shape, dtype=torch.bool)
    for k, shape in enumerate(SHAPES):
        index = (attrs["shape"] == k).nonzero()[:, 0]
        if len(index):
            r = attrs["radius"][index, None, None]
            inside[index] = unit_shape(shape, u[index] / r, v[index] / r)
    return inside, u, v


def unit_shape(shape, u, v):
    """Inside `shape` of radius 1 at the origin, a point facing up (-v)."""
    rho, phi = torch.hypot(u, v), torch.atan2(v, u) + math.pi / 2
    if shape == "circle":
        return rho <= 1
    if shape == "ring":
        return (rho <= 1) & (rho >= 0.55)
    if shape == "square":
        return polygon(rho, phi + math.pi / 4, 4, math.cos(math.pi / 4))
    if shape == "triangle":
        return polygon(rho, phi, 3, 0.5)
    if shape == "star":
        return polygon(rho, phi, 5, 0.42)
    if shape == "diamond":
        return u.abs() / 0.6 + v.abs() <= 1
    if shape == "cross":
        return ((u.abs() <= 0.32) & (v.abs() <= 1)) | ((v.abs() <= 0.32) & (u.abs() <= 1))
    if shape == "heart":
        x, y = 1.15 * u, 0.25 - 1.15 * v
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def backgrounds(attrs, generator):
    """[B, 3, S, S] float backgrounds (0..255), one scene per image."""
    n, s = len(attrs["background"]), SIZE
    y, x = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    rand = lambda *shape: torch.rand(n, *shape, generator=generator)
    blotch = lambda k: F.interpolate(rand(1, k, k), size=(s, s), mode="bilinear", align_corners=False)[:, 0]
    fine = rand(s, s) - 0.5
    phase, period, angle = rand(1, 1) * 8, 4 + rand(1, 1) * 4, rand(1, 1) * math.pi
    along = x * torch.cos(angle) + y * torch.sin(angle)
    scenes = {  # (base colour, per-pixel brightness offset)
        "sand": ((210, 185, 135), 30 * fine + 20 * (blotch(4) - 0.5)),
        "grass": ((70, 135, 55), 45 * (rand(1, s) - 0.5) + 25 * (blotch(4) - 0.5)),
        "sky": ((125, 175, 235), 2.2 * (y - s / 2) + 10 * (blotch(3) - 0.5)),
        "snow": ((232, 236, 242), 14 * fine),
        "stone": ((128, 128, 124), 70 * (blotch(8) - 0.5) + 14 * fine),
        "night": ((22, 26, 58), 200 * (rand(s, s) < 0.025).float()),
        "wood": ((140, 95, 55), 28 * torch.sin(2 * math.pi * along / period + 3 * blotch(3))),
        "brick": ((165, 70, 50), 80 * (((y + phase) % 4 < 1) | ((x + 4 * ((y + phase) // 4 % 2) + phase) % 8 < 1))),
        "checkerboard": ((30, 30, 30), 190 * (((x + phase) // period + (y + phase) // period) % 2 == 0)),
    }
    base = torch.tensor([scenes[b][0] for b in BACKGROUNDS], dtype=torch.float32)[attrs["background"]]
    offset = torch.stack([scenes[b][1].float() for b in BACKGROUNDS], 1)[torch.arange(n), attrs["background"]]
    return base[:, :, None, None] + offset[:, None] + 8 * (rand(3, 1, 1) - 0.5)


def render(attrs, generator):
    """uint8 [B, 3, SIZE, SIZE] images of `attrs` (from `sample`); noise and textures from `generator`."""
    n, k = len(attrs["shape"]), SUPERSAMPLE
    grid = (torch.arange(SIZE * k, dtype=torch.float32) + 0.5) / k
    inside, u, v = shape_masks(attrs, grid)
    stripes = torch.remainder(u, 4) < 2
    spots = (torch.remainder(u, 4) - 2) ** 2 + (torch.remainder(v, 4) - 2) ** 2 < 1.5
    dark = torch.stack([torch.zeros_like(stripes), stripes, spots], 1)[torch.arange(n), attrs["pattern"]]
    color = (COLOR_VALUES[attrs["color"]] + attrs["jitter"]).clamp(0, 255)[:, :, None, None]
    shade = 1 - 0.5 * dark.float()[:, None]
    mask = inside.float()[:, None]
    fg = F.avg_pool2d(mask * color * shade, k)
    alpha = F.avg_pool2d(mask, k)
    image = backgrounds(attrs, generator) * (1 - alpha) + fg
    image = image + 255 * attrs["noise"][:, None, None, None] * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 255).round().to(torch.uint8)


def position_words(cx, cy):
    third = SIZE / 3
    col = "left" if cx < third else "right" if cx > 2 * third else ""
    row = "top" if cy < third else "bottom" if cy > 2 * third else ""
    if row and col:
        return f"in the {row} {col}"
    return f"at the {row}" if row else f"on the {col}" if col else "in the centre"


def caption(attrs, i, rng):
    """A caption of image i naming a random subset of its attributes (`rng`: a random.Random)."""
    size, pattern = list(SIZES)[attrs["size"][i]], PATTERNS[attrs["pattern"][i]]
    words = [size if size != "medium" and rng.random() < 0.5 else "",
             COLOR_NAMES[attrs["color"][i]] if rng.random() < 0.8 else "",
             pattern if pattern != "plain" and rng.random() < 0.5 else "",
             SHAPES[attrs["shape"][i]] if rng.random() < 0.8 else "shape"]
    if rng.random() < 0.5:
        words.append(f"on a {BACKGROUNDS[attrs['background'][i]]} background")
    if rng.random() < 0.3:
        words.append(position_words(*attrs["centre"][i].tolist()))
    template = rng.choices(["a photo of a {}.", "a picture of a {}.", "an image of a {}."], [0.6, 0.2, 0.2])[0]
    return template.format(" ".join(w for w in words if w))


def pretraining_batch(n, generator):
    """n fresh images of the pretraining distribution and their captions."""
    attrs = sample(torch.randint(len(PRETRAIN.pairs), (n,), generator=generator).tolist(), PRETRAIN, generator)
    rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
    return render(attrs, generator), [caption(attrs, i, rng) for i in range(n)]


def meta(name):
    dist = TASKS[name]
    return {"version": VERSION, "task": name, "size": SIZE, "classes": len(dist.pairs), "per_class": dist.per_class}


def is_complete(root, name="synthetic"):
    try:
        return json.loads((Path(root) / SPLIT_FILE).read_text()).get("generator") == meta(name)
    except (OSError, ValueError, AttributeError):
        return False


def generate(root, name="synthetic"):
    """Write task `name` under `root` unless a complete copy is there. Every image is written through a
    temporary file and a rename, and the split file last, so an interrupted run is never taken for a
    complete one (and concurrent runs write identical files)."""
    root = Path(root).expanduser()
    if is_complete(root, name):
        return root
    dist = TASKS[name]
    split = {"generator": meta(name)}
    for split_name, count in dist.per_class.items():
        generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{split_name}".encode()))
        labels = [label for label in range(len(dist.pairs)) for _ in range(count)]
        images = render(sample(labels, dist, generator), generator)
        entries = []
        for j, (label, image) in enumerate(zip(labels, images)):
            color, shape = dist.pairs[label]
            rel = f"{color}_{shape}/{split_name}_{j % count:03d}.png"
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            write_atomic(root / "images" / rel, buffer.getvalue())
            entries.append([rel, label, f"{color} {shape}"])
        split[split_name] = entries
    write_json_atomic(root / SPLIT_FILE, split)
    return root


class Synthetic(Benchmark):
    """The root given is the task's folder itself; the task is generated there on first use."""

    name = "synthetic"
    folders = (".",)
    image_dir = "images"
    split_file = SPLIT_FILE

    def __init__(self, root):
        generate(root, self.name)
        super().__init__(root)


class SyntheticCompositions(Synthetic):
    name = "synthetic_compositions"


class SyntheticShift(Synthetic):
    name = "synthetic_shift"
