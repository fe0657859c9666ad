"""Captioned scenes: the embedded default dataset, generated procedurally and deterministically.

Each image holds one to three objects (shape, colour, size, position) on a patterned background, and comes
with several natural captions that state what is there (different phrasings and orders, like the five human
captions per photo of Flickr8k). The class label is the shape of the main (largest) object, so the same data
serves class-conditional generation; the per-class caption banks are the train captions of each class.

Nothing is downloaded: image ``i`` of a split is a pure function of ``(seed, split, i)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import TextokError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (245, 220, 50), "green": (50, 170, 70),
    "cyan": (60, 200, 220), "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (240, 130, 190),
    "white": (245, 245, 245), "black": (20, 20, 20), "brown": (130, 80, 40), "gray": (128, 128, 128),
}
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.44}  # object diameter as a fraction of the image side
POSITIONS = {  # name -> (column, row) of a 3x3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
BACKGROUNDS = ("plain", "horizontal stripes", "vertical stripes", "checkerboard", "gradient", "two halves")
SPLITS = {"train": 0, "val": 1, "test": 2}
RENDER = 128  # drawn at this size (anti-aliased by downsampling), then resized to the requested resolution


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str
    jitter: tuple[float, float]
    angle: float


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    bg_colors: tuple[str, str]

    @property
    def label(self) -> int:
        return SHAPES.index(self.objects[0].shape)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))


def make_scene(seed: int, split: str, index: int) -> Scene:
    """Draw the scene description of image ``index`` of ``split``."""
    rng = _rng(seed, split, index)
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    cells = rng.permutation(len(POSITIONS))[:count]
    names = list(POSITIONS)
    colors = list(COLORS)
    objects = []
    for k in range(count):
        size = "large" if k == 0 and count == 1 else ("medium" if k == 0 else str(rng.choice(["small", "medium"])))
        objects.append(SceneObject(
            shape=str(rng.choice(SHAPES)), color=str(rng.choice(colors)), size=size,
            position=names[int(cells[k])] if count > 1 else str(rng.choice(["center", "center", *names])),
            jitter=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
            angle=float(rng.uniform(0, 360)) if k else float(rng.uniform(-15, 15)),
        ))
    object_colors = {o.color for o in objects}
    bg_choices = [c for c in colors if c not in object_colors]
    bg = rng.choice(bg_choices, size=2, replace=False)
    return Scene(tuple(objects), str(rng.choice(BACKGROUNDS)), (str(bg[0]), str(bg[1])))


# ---- captions -----------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(o: SceneObject, style: int) -> str:
    where = "in the center" if o.position == "center" else (
        f"on the {o.position}" if o.position in ("left", "right") else f"at the {o.position}")
    if style == 0:
        return f"{_article(o.size)} {o.size} {o.color} {o.shape} {where}"
    if style == 1:
        return f"{_article(o.color)} {o.color} {o.shape} ({o.size}) {where}"
    return f"{_article(o.size)} {o.size} {o.shape} colored {o.color}, {where}"


def _background_phrase(s: Scene) -> str:
    a, b = s.bg_colors
    return {
        "plain": f"a plain {a} background",
        "horizontal stripes": f"a background of horizontal {a} and {b} stripes",
        "vertical stripes": f"a background of vertical {a} and {b} stripes",
        "checkerboard": f"a {a} and {b} checkerboard background",
        "gradient": f"a background fading from {a} at the top to {b} at the bottom",
        "two halves": f"a background that is {a} above and {b} below",
    }[s.background]


def captions_for(scene: Scene) -> list[str]:
    """Five captions of one scene: different phrasings and object orders, all stating what is there."""
    objs = list(scene.objects)
    bg = _background_phrase(scene)
    n = len(objs)
    count_word = {1: "one object", 2: "two objects", 3: "three objects"}[n]

    def join(parts: list[str]) -> str:
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    out = [
        f"{join([_object_phrase(o, 0) for o in objs])} on {bg}.",
        f"A picture of {count_word}: {join([_object_phrase(o, 1) for o in objs])}. The image has {bg}.",
        f"On {bg} there is {join([_object_phrase(o, 2) for o in reversed(objs)])}.",
        f"{bg[0].upper() + bg[1:]}, with {join([_object_phrase(o, 0) for o in reversed(objs)])}.",
        f"A simple drawing showing {join([_object_phrase(o, 1) for o in objs])}, set against {bg}.",
    ]
    return [c[0].upper() + c[1:] for c in out]


# ---- rendering ----------------------------------------------------------------------------------
def _polygon(cx: float, cy: float, r: float, sides: int, angle: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    steps = sides * (2 if inner else 1)
    for i in range(steps):
        rad = (inner if inner and i % 2 else 1.0) * r
        a = math.radians(angle) + 2 * math.pi * i / steps - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_background(draw: ImageDraw.ImageDraw, s: Scene, size: int) -> None:
    a, b = COLORS[s.bg_colors[0]], COLORS[s.bg_colors[1]]
    draw.rectangle([0, 0, size, size], fill=a)
    band = size // 8
    if s.background == "horizontal stripes":
        for y in range(0, size, 2 * band):
            draw.rectangle([0, y + band, size, y + 2 * band - 1], fill=b)
    elif s.background == "vertical stripes":
        for x in range(0, size, 2 * band):
            draw.rectangle([x + band, 0, x + 2 * band - 1, size], fill=b)
    elif s.background == "checkerboard":
        cell = size // 4
        for i in range(4):
            for j in range(4):
                if (i + j) % 2:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell - 1, (j + 1) * cell - 1], fill=b)
    elif s.background == "gradient":
        for y in range(size):
            t = y / (size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(int(a[k] * (1 - t) + b[k] * t) for k in range(3)))
    elif s.background == "two halves":
        draw.rectangle([0, size // 2, size, size], fill=b)


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, size: int) -> None:
    col, row = POSITIONS[o.position]
    cx = (0.2 + 0.3 * col + o.jitter[0]) * size
    cy = (0.2 + 0.3 * row + o.jitter[1]) * size
    r = SIZES[o.size] * size / 2
    fill = COLORS[o.color]
    outline = (0, 0, 0) if o.color != "black" else (255, 255, 255)
    w = max(1, size // 64)
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=w)
    elif o.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.35)))
    elif o.shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, o.angle + 45), fill=fill, outline=outline, width=w)
    elif o.shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, o.angle), fill=fill, outline=outline, width=w)
    elif o.shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.1, r * 1.1, 3, o.angle), fill=fill, outline=outline, width=w)
    elif o.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, o.angle), fill=fill, outline=outline, width=w)
    elif o.shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.15, 5, o.angle, inner=0.45), fill=fill, outline=outline, width=w)
    elif o.shape == "cross":
        t = r * 0.36
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    canvas = Image.new("RGB", (RENDER, RENDER))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, scene, RENDER)
    for o in reversed(scene.objects):  # the main object last, on top
        _draw_object(draw, o, RENDER)
    if image_size != RENDER:
        canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX if image_size < RENDER else Image.Resampling.BICUBIC)
    return canvas


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


class CaptionedScenes(torch.utils.data.Dataset):
    """The embedded dataset. Items: ``{"image", "captions", "label", "index"}``.

    ``size`` images per split (default 4,000 train / 500 val / 500 test); every access is deterministic.
    ``cache=True`` keeps rendered images in memory (rendering costs ~1 ms each).
    """

    class_names = SHAPES

    def __init__(self, image_size: int = 32, split: str = "train", size: int | None = None, seed: int = 0,
                 cache: bool = True) -> None:
        if split not in SPLITS:
            raise TextokError(f"unknown split {split!r} for the captioned scenes (use one of {', '.join(SPLITS)})")
        if image_size < 8:
            raise TextokError(f"image_size {image_size} is too small for the captioned scenes (use at least 8)")
        self.image_size, self.split, self.seed = image_size, split, seed
        if size is not None and size < 0:
            raise TextokError(f"size {size} is negative: give a number of scenes (or None for the split's default)")
        self.size = size if size is not None else (4000 if split == "train" else 500)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        return make_scene(self.seed, self.split, index)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        scene = self.scene(index)
        image = self._cache.get(index) if self._cache is not None else None
        if image is None:
            image = pil_to_tensor(render_scene(scene, self.image_size))
            if self._cache is not None:
                self._cache[index] = image
        return {"image": image, "captions": captions_for(scene), "label": scene.label, "index": index}

    def captions_of(self, index: int) -> list[str]:
        """The captions of item ``index`` without rendering it."""
        return captions_for(self.scene(index))

    def label_of(self, index: int) -> int:
        """The class (main shape) of item ``index`` without rendering it."""
        return self.scene(index).label

    def caption_bank(self) -> dict[int, list[str]]:
        """Per-class captions of this split (use the train split's bank for generation)."""
        bank: dict[int, list[str]] = {k: [] for k in range(len(SHAPES))}
        for i in range(self.size):
            s = self.scene(i)
            bank[s.label].extend(captions_for(s))
        return bank
