"""Procedural scenes with every annotation kind (boxes, masks, polygons, keypoints, captions).

numpy, PIL, contourpy and pycocotools only (no TensorFlow), so worker processes stay light.
One call to `render_scene` draws one scene from its own RNG and returns it in the `features.py`
structure.

Geometry convention: continuous pixel coordinates where pixel (i, j) covers [i, i+1) x [j, j+1)
(COCO's convention); stored coordinates are these divided by the image's height / width.
Painter's order: objects later in the list are drawn on top. Masks, boxes and polygons
describe the *visible* region of each object; an object whose visible region is smaller than
`SceneSpec.min_visible_pixels` pixels or `min_visible_fraction` of its drawn area is removed
from the annotations (it stays in the picture) and counted in `RenderedScene.num_hidden`.

Two labellings (`SceneSpec.fill`): "colour" fills each object with one colour and labels it by
its shape (CLASS_NAMES); "texture" fills each object, a shape from TEXTURE_SHAPES, with a
two-tone periodic texture and labels it by the texture (TEXTURES): six fine and six coarse
ones, periods tied to the image's longer side so a resized picture keeps its classes; the fine
ones average away once the image is small.
"""

import dataclasses
import io
import zlib
from typing import Any, Literal, NamedTuple

import contourpy
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

NUM_KEYPOINTS = 17  # COCO person keypoints (order as navit_seq.data.features.KEYPOINT_NAMES)
CLASS_NAMES = (
    "person", "circle", "ellipse", "square", "triangle", "diamond",
    "pentagon", "hexagon", "star", "cross", "ring", "arrow",
)  # fmt: skip
PLURALS = {"person": "people", "cross": "crosses"}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (245, 125, 185),
    "cyan": (40, 205, 215),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = ("plain", "striped", "checkered", "mottled")
PERSON_PROBABILITY = 0.2  # persons are over-sampled so keypoint tasks see enough of them
JPEG_QUALITY = 95
# Full-resolution colour (4:4:4): chroma subsampling smears the thin coloured limbs and stripes
# (mean error 3.4 -> 1.2 grey levels, files 1.6x larger).
JPEG_SUBSAMPLING = 0
# Textures (SceneSpec.fill="texture"). A texture is the mean of cosine gratings of one period,
# sharpened into a two-tone wave around `level` (and `negative`: light and dark swapped); its
# spatial spectrum peaks at 1 / period across each grating's lines. Periods are per longer
# image side (TEXTURE_SCALES): at 128 px a fine period is 4 px (a 16-px patch holds four) and a
# coarse one 16 px; at 32 px the fine one is 1 px, which an antialiased resize averages to the
# mean of the two tones, the same for every fine texture (all are symmetric waves, level 0):
# the six fine classes collapse into one. No two classes share their line angles and polarity,
# and each coarse stripe angle is 22.5 degrees from the nearest fine one, so the classes differ
# by more than their period: a texture is still its class when the image is shown at another
# size.
TEXTURE_SCALES = {"fine": 32, "coarse": 8}


class TextureClass(NamedTuple):
    scale: str  # a TEXTURE_SCALES key
    line_angles: tuple[float, ...]  # degrees, of each grating's lines, anticlockwise as seen
    level: float = 0.0  # light where the gratings' mean (in [-1, 1]) is above this
    negative: bool = False  # light and dark swapped


# Captions and phrases name a texture by its class name with spaces ("fine rising stripes").
TEXTURES = {
    "fine_horizontal_stripes": TextureClass("fine", (0,)),
    "fine_rising_stripes": TextureClass("fine", (45,)),
    "fine_vertical_stripes": TextureClass("fine", (90,)),
    "fine_falling_stripes": TextureClass("fine", (135,)),
    "fine_checks": TextureClass("fine", (45, 135)),  # axis-aligned squares
    "fine_diamonds": TextureClass("fine", (0, 90)),  # squares turned by 45 degrees
    "coarse_shallow_rising_stripes": TextureClass("coarse", (22.5,)),
    "coarse_steep_rising_stripes": TextureClass("coarse", (67.5,)),
    "coarse_steep_falling_stripes": TextureClass("coarse", (112.5,)),
    "coarse_shallow_falling_stripes": TextureClass("coarse", (157.5,)),
    # Three gratings 60 degrees apart: a hexagonal lattice of dots covering about a quarter of
    # the area, light on dark or dark on light.
    "coarse_light_dots": TextureClass("coarse", (0, 60, 120), level=0.3),
    "coarse_dark_dots": TextureClass("coarse", (0, 60, 120), level=0.3, negative=True),
}
TEXTURE_NAMES = tuple(TEXTURES)
TEXTURE_PERIOD_JITTER = 0.1  # each texture's period is its scale's times U(0.9, 1.1)
TEXTURE_SHARPNESS = 2.0  # the gratings' mean minus the level is scaled by this, then clipped
TEXTURE_DARK = 0.35  # the dark tone is the object's colour times this; the light tone is it
TEXTURE_SHAPES = ("circle", "ellipse", "square", "diamond", "pentagon", "hexagon")  # compact ones
FILLS = ("colour", "texture")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten")  # fmt: skip


def heldout_colour(label: int) -> int:
    """The one colour index that class `label` takes only in the held-out split.

    (3 * label + colour) % 8 == 0 spreads the 12 held-out combinations over all 8 colours.
    """
    return (-3 * label) % len(COLOUR_NAMES)


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a scene may look like; `combos` picks seen or held-out colour-shape combinations."""

    min_side: int = 48
    max_side: int = 640
    max_aspect_ratio: float = 3.0  # long side / short side
    min_objects: int = 1
    max_objects: int = 10
    min_object_fraction: float = 0.12  # object size / image short side
    max_object_fraction: float = 0.5
    combos: Literal["seen", "heldout"] = "seen"
    min_visible_pixels: int = 16
    min_visible_fraction: float = 0.1
    num_captions: int = 5
    backgrounds: tuple[str, ...] = BACKGROUNDS  # the kinds a scene draws its background from
    person_probability: float = PERSON_PROBABILITY  # the rest: the 11 shapes, equally likely
    # "colour": one colour per object, labelled by shape; "texture": a textured shape from
    # TEXTURE_SHAPES, labelled by texture (every texture equally likely; no persons).
    fill: Literal["colour", "texture"] = "colour"

    def __post_init__(self):
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError(
                f"SceneSpec: need 8 <= min_side <= max_side, got min_side={self.min_side}, "
                f"max_side={self.max_side}; pass e.g. min_side=48, max_side=640."
            )
        if self.max_aspect_ratio < 1:
            raise ValueError(
                f"SceneSpec.max_aspect_ratio={self.max_aspect_ratio} must be >= 1 (long/short)."
            )
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"SceneSpec: need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                f"{self.max_objects}."
            )
        unknown = sorted(set(self.backgrounds) - set(BACKGROUNDS))
        if not self.backgrounds or unknown:
            raise ValueError(
                f"SceneSpec.backgrounds={self.backgrounds!r}: use a non-empty subset of "
                f"{BACKGROUNDS}."
            )
        if not 0 <= self.person_probability <= 1:
            raise ValueError(
                f"SceneSpec.person_probability={self.person_probability} must be in [0, 1]."
            )
        if self.fill not in FILLS:
            raise ValueError(f"SceneSpec.fill={self.fill!r}: use one of {FILLS}.")
        if self.combos not in ("seen", "heldout"):
            raise ValueError(f"SceneSpec.combos={self.combos!r}: use 'seen' or 'heldout'.")


def label_names(spec: SceneSpec) -> tuple[str, ...]:
    """`objects/label` index -> class name of scenes drawn with `spec`."""
    return TEXTURE_NAMES if spec.fill == "texture" else CLASS_NAMES


def wave_vector(line_angle: float) -> np.ndarray:
    """The unit (y, x) normal of lines at `line_angle` degrees (anticlockwise as seen, y down)."""
    radians = np.deg2rad(line_angle)
    return np.array([np.cos(radians), np.sin(radians)])


@dataclasses.dataclass(frozen=True)
class Texture:
    """A two-tone periodic fill of class `kind` (a TEXTURES value) at `period` pixels."""

    kind: TextureClass
    period: float  # pixels
    # (y, x) pixels the pattern is shifted by. A shift, not a phase per grating: the phases of
    # three gratings decide whether their sum has light dots or dark ones.
    offset: tuple[float, float]

    def values(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """[h, w] in [0, 1] (0 dark, 1 light) at continuous coordinates ys [h] x xs [w]."""
        frequency = 2 * np.pi / self.period
        ys, xs = ys - self.offset[0], xs - self.offset[1]
        mean = np.zeros((len(ys), len(xs)))
        for angle in self.kind.line_angles:
            dy, dx = wave_vector(angle)
            mean += np.cos(frequency * (dy * ys[:, None] + dx * xs[None, :]))
        mean /= len(self.kind.line_angles)
        wave = np.clip(TEXTURE_SHARPNESS * (mean - self.kind.level), -1.0, 1.0)
        return 0.5 - 0.5 * wave if self.kind.negative else 0.5 + 0.5 * wave


@dataclasses.dataclass
class RenderedScene:
    example: dict[str, Any]  # the features.py structure, as numpy arrays / python strings
    num_hidden: int  # objects drawn but removed from the annotations (too little visible)


@dataclasses.dataclass
class _Object:
    label: int
    colour: int
    size: float  # pixels: circumscribed diameter (height for a person)
    mask_drawer: Any  # callable(ImageDraw, offset_yx) drawing the shape with fill 1
    extent: tuple[float, float, float, float]  # (ymin, xmin, ymax, xmax) continuous pixels
    name: str  # what captions and phrases call it: "circle", "circle with fine checks"
    keypoints: np.ndarray | None = None  # [17, 2] (y, x) continuous pixels, persons only
    texture: Texture | None = None  # None: filled with its colour


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one scene, a pure function of (seed, split name, index)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def render_scene(
    rng: np.random.Generator, spec: SceneSpec = SceneSpec(), image_id: int = 0
) -> RenderedScene:
    """Draws one scene and returns its image and annotations (see the module docstring)."""
    height, width = _sample_image_size(rng, spec)
    background_name, image = _background(rng, height, width, spec.backgrounds)  # [H, W, 3] uint8
    objects = [
        _sample_object(rng, spec, height, width)
        for _ in range(rng.integers(spec.min_objects, spec.max_objects + 1))
    ]

    owner = np.full((height, width), -1, np.int8)  # index of the object seen at each pixel
    drawn_area = []
    for index, obj in enumerate(objects):
        y0, x0, y1, x1 = _pixel_window(obj.extent, height, width)
        if y1 <= y0 or x1 <= x0:
            drawn_area.append(0)
            continue
        canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
        obj.mask_drawer(ImageDraw.Draw(canvas), (y0, x0))
        shape = np.asarray(canvas, dtype=bool)  # [h, w] within the window
        drawn_area.append(int(shape.sum()))
        owner[y0:y1, x0:x1][shape] = index
        shade = rng.integers(-20, 21)
        colour = np.clip(np.asarray(COLOURS[COLOUR_NAMES[obj.colour]]) + shade, 0, 255)
        if obj.texture is None:
            image[y0:y1, x0:x1][shape] = colour.astype(np.uint8)
        else:
            light = obj.texture.values(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5)
            tone = TEXTURE_DARK + (1 - TEXTURE_DARK) * light[shape][:, None]  # [n, 1]
            image[y0:y1, x0:x1][shape] = np.rint(colour * tone).astype(np.uint8)

    annotations = []
    num_hidden = 0
    for index, obj in enumerate(objects):
        y0, x0, y1, x1 = _pixel_window(obj.extent, height, width)
        visible = owner[y0:y1, x0:x1] == index if y1 > y0 and x1 > x0 else np.zeros((0, 0), bool)
        area = int(visible.sum())
        if area < max(spec.min_visible_pixels, spec.min_visible_fraction * drawn_area[index]):
            num_hidden += 1
            continue
        annotations.append(_annotate(obj, index, visible, (y0, x0), owner))

    example = _assemble(rng, spec, annotations, image, background_name, image_id)
    return RenderedScene(example=example, num_hidden=num_hidden)


def render_record(task: tuple[int, str, int, SceneSpec, int]) -> tuple[int, dict, int]:
    """(index, example with the image as JPEG bytes, hidden objects) for task
    (seed, split, index, spec, image_id): what a dataset writer stores, made in a worker.
    """
    seed, split, index, spec, image_id = task
    scene = render_scene(scene_rng(seed, split, index), spec, image_id)
    jpeg = io.BytesIO()
    Image.fromarray(scene.example["image"]).save(
        jpeg, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING
    )
    return index, {**scene.example, "image": jpeg.getvalue()}, scene.num_hidden


# ----------------------------------------------------------------------------- sampling


def _sample_image_size(rng: np.random.Generator, spec: SceneSpec) -> tuple[int, int]:
    """Aspect ratio log-uniform in [1/r, r], then the long side uniform where both sides fit."""
    max_ratio = min(spec.max_aspect_ratio, spec.max_side / spec.min_side)
    ratio = float(np.exp(rng.uniform(-np.log(max_ratio), np.log(max_ratio))))  # height / width
    stretch = max(ratio, 1 / ratio)
    long_side = rng.uniform(spec.min_side * stretch, spec.max_side)
    short_side = long_side / stretch
    clip = lambda side: int(np.clip(round(side), spec.min_side, spec.max_side))
    if ratio >= 1:
        return clip(long_side), clip(short_side)
    return clip(short_side), clip(long_side)


def _background(
    rng: np.random.Generator, height: int, width: int, kinds: tuple[str, ...] = BACKGROUNDS
) -> tuple[str, np.ndarray]:
    """A muted background of one of `kinds` (textured ones, so objects are not cut out by a
    colour threshold)."""
    name = kinds[rng.integers(len(kinds))]
    ys = np.arange(height, dtype=np.float32)
    xs = np.arange(width, dtype=np.float32)
    if name == "plain":
        pattern = np.full((height, width), 128, np.uint8)
    elif name == "striped":  # sin(a + b) from 1-D factors: cheap at any size
        angle = rng.uniform(0, np.pi)
        frequency = 2 * np.pi / rng.uniform(6, 30)
        phase_y, phase_x = ys * np.sin(angle) * frequency, xs * np.cos(angle) * frequency
        wave = (
            np.sin(phase_y)[:, None] * np.cos(phase_x)[None, :]
            + np.cos(phase_y)[:, None] * np.sin(phase_x)[None, :]
        )  # [H, W] in [-1, 1]
        pattern = (wave * 127 + 128).astype(np.uint8)
    elif name == "checkered":
        cell = rng.integers(4, 24)
        odd = ((ys // cell) % 2).astype(bool)[:, None] ^ ((xs // cell) % 2).astype(bool)[None]
        pattern = np.where(odd, 255, 0).astype(np.uint8)
    else:  # mottled: smooth noise drawn at low resolution and upsampled
        low = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16)), dtype=np.uint8)
        pattern = np.asarray(Image.fromarray(low).resize((width, height), Image.BILINEAR))
    # Each grey level maps to one colour: base +- tint.
    base = rng.uniform(70, 170, size=3)
    tint = rng.uniform(-35, 35, size=3)
    palette = base + (np.arange(256)[:, None] / 127.5 - 1) * tint  # [256, 3]
    palette = np.clip(palette, 0, 255).astype(np.uint8)
    return name, palette[pattern]  # [H, W, 3]


def _sample_object(rng: np.random.Generator, spec: SceneSpec, height: int, width: int) -> _Object:
    if spec.fill == "texture":
        return _sample_textured_object(rng, spec, height, width)
    if rng.uniform() < spec.person_probability:
        label = 0
    else:
        label = int(rng.integers(1, len(CLASS_NAMES)))
    colour = _sample_colour(rng, spec, label)
    size = _sample_size(rng, spec, height, width)
    if label == 0:
        size *= 1.6  # a figure is tall and thin: scale its height up to a comparable area
        return _person(rng, label, colour, size, height, width)
    centre_y, centre_x = _sample_centre(rng, size, height, width)
    return _shape(rng, label, colour, size, centre_y, centre_x, CLASS_NAMES[label])


def _sample_textured_object(
    rng: np.random.Generator, spec: SceneSpec, height: int, width: int
) -> _Object:
    """A shape from TEXTURE_SHAPES filled with a texture, labelled by the texture."""
    label = int(rng.integers(len(TEXTURE_NAMES)))
    colour = _sample_colour(rng, spec, label)
    kind = TEXTURES[TEXTURE_NAMES[label]]
    period = max(height, width) / TEXTURE_SCALES[kind.scale]
    period *= rng.uniform(1 - TEXTURE_PERIOD_JITTER, 1 + TEXTURE_PERIOD_JITTER)
    offset = rng.uniform(0, 2 * period, size=2)  # two periods each way: every phase of each wave
    texture = Texture(kind=kind, period=period, offset=(float(offset[0]), float(offset[1])))
    shape = TEXTURE_SHAPES[rng.integers(len(TEXTURE_SHAPES))]
    size = _sample_size(rng, spec, height, width)
    centre_y, centre_x = _sample_centre(rng, size, height, width)
    drawn = _shape(rng, label, colour, size, centre_y, centre_x, shape)
    words = TEXTURE_NAMES[label].replace("_", " ")
    return dataclasses.replace(drawn, name=f"{shape} with {words}", texture=texture)


def _sample_colour(rng: np.random.Generator, spec: SceneSpec, label: int) -> int:
    if spec.combos == "heldout":
        return heldout_colour(label)
    seen = [c for c in range(len(COLOUR_NAMES)) if c != heldout_colour(label)]
    return seen[rng.integers(len(seen))]


def _sample_size(rng: np.random.Generator, spec: SceneSpec, height: int, width: int) -> float:
    short = min(height, width)
    return max(8.0, short * rng.uniform(spec.min_object_fraction, spec.max_object_fraction))


def _sample_centre(rng, size: float, height: int, width: int) -> tuple[float, float]:
    """A centre that keeps the shape's circumscribed circle inside the image where it fits."""
    radius = size / 2
    centre_y = rng.uniform(radius, max(radius, height - radius))
    centre_x = rng.uniform(radius, max(radius, width - radius))
    return centre_y, centre_x


def _regular_polygon(n: int, radius: float, angle: float, start: float = 0.0) -> np.ndarray:
    theta = start + angle + np.arange(n) * (2 * np.pi / n)
    return np.stack([-np.cos(theta) * radius, np.sin(theta) * radius], axis=1)  # [n, 2] (y, x)


def _shape_outlines(name: str, radius: float, angle: float, rng: np.random.Generator):
    """(outer outline, hole outline or None), each [n, 2] (y, x) relative to the centre."""
    rotate = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    if name == "circle":
        return _regular_polygon(64, radius, 0.0), None
    if name == "ellipse":
        circle = _regular_polygon(64, radius, 0.0)
        return (circle * [rng.uniform(0.4, 0.7), 1.0]) @ rotate, None
    if name == "ring":
        return _regular_polygon(64, radius, 0.0), _regular_polygon(64, radius * 0.5, 0.0)
    if name == "square":
        return _regular_polygon(4, radius, angle, np.pi / 4), None
    if name == "diamond":
        return (_regular_polygon(4, radius, 0.0) * [1.0, 0.6]) @ rotate, None
    if name in ("triangle", "pentagon", "hexagon"):
        sides = {"triangle": 3, "pentagon": 5, "hexagon": 6}[name]
        return _regular_polygon(sides, radius, angle), None
    if name == "star":
        tips = _regular_polygon(5, radius, angle)
        inner = _regular_polygon(5, radius * 0.45, angle, np.pi / 5)
        return np.stack([tips, inner], axis=1).reshape(10, 2), None
    if name == "cross":
        a, b = radius, radius * 0.35
        outline = [(-a, -b), (-a, b), (-b, b), (-b, a), (b, a), (b, b), (a, b), (a, -b), (b, -b),
                   (b, -a), (-b, -a), (-b, -b)]  # fmt: skip
        return np.asarray(outline) @ rotate, None
    if name == "arrow":
        a = radius
        outline = [(-a, 0), (-0.2 * a, 0.7 * a), (-0.2 * a, 0.3 * a), (a, 0.3 * a), (a, -0.3 * a),
                   (-0.2 * a, -0.3 * a), (-0.2 * a, -0.7 * a)]  # fmt: skip
        return np.asarray(outline) @ rotate, None
    raise ValueError(f"unknown shape name {name!r}; known: {CLASS_NAMES[1:]}")


def _to_pil(points_yx: np.ndarray, offset_yx: tuple[int, int]) -> list[tuple[float, float]]:
    """Continuous (y, x) -> PIL (x, y) in a window whose top-left pixel is `offset_yx`.

    PIL puts pixel centres at integers; continuous coordinates put them at +0.5.
    """
    shifted = points_yx - np.asarray(offset_yx) - 0.5
    return [(float(x), float(y)) for y, x in shifted]


def _shape(rng, label, colour, size, centre_y, centre_x, shape: str) -> _Object:
    """The shape named `shape` (a CLASS_NAMES entry other than person) with label `label`."""
    radius = size / 2
    outer, hole = _shape_outlines(shape, radius, rng.uniform(0, 2 * np.pi), rng)
    outer = outer + [centre_y, centre_x]
    hole = None if hole is None else hole + [centre_y, centre_x]

    def draw(canvas: ImageDraw.ImageDraw, offset_yx):
        canvas.polygon(_to_pil(outer, offset_yx), fill=1)
        if hole is not None:
            canvas.polygon(_to_pil(hole, offset_yx), fill=0)

    extent = (*outer.min(0), *outer.max(0))
    return _Object(label, colour, size, draw, extent, name=shape)


# A front-facing stick figure in units of its height, origin at the hip centre, (y, x) with y
# down and x to the image right. The person's left side is on the image right (COCO).
_HEAD_CENTRE = np.array([-0.80, 0.0])
_HEAD_RADIUS = 0.1
_FACE = np.array([
    [0.02, 0.0],     # nose
    [-0.02, 0.035],  # left eye
    [-0.02, -0.035],  # right eye
    [0.0, 0.07],     # left ear
    [0.0, -0.07],    # right ear
])  # fmt: skip
_SHOULDERS = np.array([[-0.6, 0.12], [-0.6, -0.12]])
_HIPS = np.array([[0.0, 0.08], [0.0, -0.08]])
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.24, 0.22, 0.27, 0.26
_LIMB_WIDTH = 0.06


def _person(rng, label, colour, height_px, image_height, image_width) -> _Object:
    """An articulated figure with random limb angles; its 17 keypoints are its joints."""

    def limb(start, length, angle):  # angle 0 = straight down
        return start + length * np.array([np.cos(angle), np.sin(angle)])

    points = np.zeros((NUM_KEYPOINTS, 2))
    points[0:5] = _HEAD_CENTRE + _FACE
    points[5:7] = _SHOULDERS
    for side, sign in ((0, 1), (1, -1)):  # left (image right), right (image left)
        elbow = limb(_SHOULDERS[side], _UPPER_ARM, sign * rng.uniform(0.1, 2.6))
        wrist = limb(elbow, _FOREARM, sign * rng.uniform(-0.5, 3.0))
        knee = limb(_HIPS[side], _THIGH, sign * rng.uniform(-0.2, 0.8))
        ankle = limb(knee, _SHIN, sign * rng.uniform(-0.3, 0.5))
        points[7 + side], points[9 + side] = elbow, wrist
        points[11 + side], points[13 + side], points[15 + side] = _HIPS[side], knee, ankle
    tilt = rng.uniform(-0.35, 0.35)
    rotate = np.array([[np.cos(tilt), np.sin(tilt)], [-np.sin(tilt), np.cos(tilt)]])
    head_centre = _HEAD_CENTRE @ rotate
    points = points @ rotate
    scale = height_px
    # The hip centre anywhere in the image: limbs and keypoints may leave the picture.
    origin = np.array([rng.uniform(0, image_height), rng.uniform(0, image_width)])
    keypoints = points * scale + origin  # [17, 2] (y, x) continuous pixels
    head = head_centre * scale + origin
    head_radius = _HEAD_RADIUS * scale
    half_width = max(1.0, _LIMB_WIDTH * scale / 2)
    segments = [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)]
    torso = keypoints[[5, 6, 12, 11]]
    neck = (keypoints[5] + keypoints[6]) / 2

    def draw(canvas: ImageDraw.ImageDraw, offset_yx):
        def disc(centre, r):
            # Centred on the pixel holding `centre`, in whole pixels: PIL truncates fractional
            # ellipse boxes, which could leave a keypoint's own pixel off its figure.
            y, x = np.floor(centre).astype(int) - offset_yx
            r = max(1, round(r))
            canvas.ellipse((x - r, y - r, x + r, y + r), fill=1)

        canvas.polygon(_to_pil(torso, offset_yx), fill=1)
        canvas.line(_to_pil(np.stack([neck, head]), offset_yx), fill=1, width=round(2 * half_width))
        for a, b in segments:
            canvas.line(_to_pil(keypoints[[a, b]], offset_yx), fill=1, width=round(2 * half_width))
        disc(head, head_radius)
        for joint in keypoints:  # every keypoint, face ones too, lies on the figure
            disc(joint, half_width)

    outline = np.concatenate([keypoints, head[None] - head_radius, head[None] + head_radius])
    extent = (*(outline.min(0) - half_width - 1), *(outline.max(0) + half_width + 1))
    return _Object(label, colour, height_px, draw, extent, name="person", keypoints=keypoints)


def _pixel_window(extent, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows/cols [y0, y1) x [x0, x1) that can hold the object, clipped to the image."""
    ymin, xmin, ymax, xmax = extent
    return (
        max(0, int(np.floor(ymin)) - 1),
        max(0, int(np.floor(xmin)) - 1),
        min(height, int(np.ceil(ymax)) + 2),
        min(width, int(np.ceil(xmax)) + 2),
    )


# ----------------------------------------------------------------------------- annotation


def _annotate(obj: _Object, index: int, visible: np.ndarray, offset_yx, owner) -> dict:
    """Box, RLE, polygons and keypoints of one object's visible region."""
    height, width = owner.shape
    y0, x0 = offset_yx
    rows = np.flatnonzero(visible.any(1))
    cols = np.flatnonzero(visible.any(0))
    box = np.array([rows[0] + y0, cols[0] + x0, rows[-1] + 1 + y0, cols[-1] + 1 + x0], np.float64)
    full = np.zeros((height, width), np.uint8, order="F")
    full[y0 : y0 + visible.shape[0], x0 : x0 + visible.shape[1]] = visible
    rle = mask_utils.encode(full)
    polygons = [p + offset_yx for p in trace_polygons(visible)]

    keypoints = np.zeros((NUM_KEYPOINTS, 3))
    if obj.keypoints is not None:
        for k, (y, x) in enumerate(obj.keypoints):
            if 0 <= y < height and 0 <= x < width:
                seen_owner = owner[int(y), int(x)]
                keypoints[k] = (y, x, 2 if seen_owner == index else 1)
    return {
        "label": obj.label,
        "name": obj.name,
        "colour": obj.colour,
        "size": obj.size / min(height, width),
        "box": box,
        "area": float(visible.sum()),
        "rle": rle["counts"],
        "polygons": polygons,
        "keypoints": keypoints,
    }


def trace_polygons(mask: np.ndarray, tolerance: float = 0.3) -> list[np.ndarray]:
    """Polygons [n, 2] (y, x, continuous pixels) whose even-odd fill is `mask`.

    Outlines come from contourpy (marching squares through pixel centres: every pixel centre
    ends up >= 0.35 px from the outline, so a `tolerance` below that keeps each pixel on its
    side). COCO polygons cannot have holes: each hole is joined to the ring above it by a
    vertical cut walked there and back, which even-odd rasterisers fill correctly
    (pycocotools' rasteriser ignores vertical edges altogether).
    """
    padded = np.pad(mask, 1).astype(np.float64)
    generator = contourpy.contour_generator(z=padded, fill_type="OuterOffset")
    polygons = []
    for points, offsets in zip(*generator.filled(0.5, 2.0), strict=True):
        points_yx = points[:, ::-1] - 0.5  # grid index (pixel centre) -> continuous, minus pad
        rings = [
            _simplify_ring(points_yx[start:stop], tolerance)
            for start, stop in zip(offsets[:-1], offsets[1:], strict=True)
        ]
        polygon = rings[0]
        for hole in rings[1:]:
            polygon = _cut_to_hole(polygon, hole)
        polygons.append(polygon)
    return polygons


def _cut_to_hole(polygon: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One ring: `polygon`, a vertical cut up from the hole's top vertex, the hole, and back."""
    top = int(np.argmin(hole[:, 0]))
    hole = np.roll(hole, -top, axis=0)
    top_y, top_x = hole[0]
    start, stop = polygon, np.roll(polygon, -1, axis=0)
    spans = (np.minimum(start[:, 1], stop[:, 1]) <= top_x) & (
        top_x <= np.maximum(start[:, 1], stop[:, 1])
    )
    spans &= start[:, 1] != stop[:, 1]
    fraction = (top_x - start[:, 1]) / np.where(spans, stop[:, 1] - start[:, 1], 1.0)
    crossing_y = start[:, 0] + fraction * (stop[:, 0] - start[:, 0])
    above = np.where(spans & (crossing_y <= top_y), crossing_y, -np.inf)
    edge = int(np.argmax(above))  # the nearest edge above the hole
    cut = np.array([[above[edge], top_x]])
    return np.concatenate([polygon[: edge + 1], cut, hole, hole[:1], cut, polygon[edge + 1 :]])


def _simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a ring (open or closed), all segments split in parallel per round.

    Hand-written (vectorised over segments): none of the project's dependencies simplifies
    polygons. Returns an open ring with >= 3 vertices.
    """
    ring = ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring
    before, after = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    turn = (ring - before)[:, 0] * (after - ring)[:, 1] - (ring - before)[:, 1] * (after - ring)[
        :, 0
    ]
    if np.count_nonzero(turn) >= 3:
        ring = ring[turn != 0]  # collinear vertices carry no shape
    if len(ring) <= 4:
        return ring
    num = len(ring)
    closed = np.concatenate([ring, ring[:1]])  # [num + 1, 2]
    keep = np.zeros(num + 1, bool)
    keep[[0, int(np.argmax(((ring - ring[0]) ** 2).sum(1))), num]] = True
    index = np.arange(num + 1)
    while True:
        kept = np.flatnonzero(keep)
        segment = np.minimum(np.searchsorted(kept, index, side="right") - 1, len(kept) - 2)
        a, b = closed[kept[segment]], closed[kept[segment + 1]]
        direction, offsets = b - a, closed - a
        length = np.hypot(direction[:, 0], direction[:, 1])
        cross = direction[:, 0] * offsets[:, 1] - direction[:, 1] * offsets[:, 0]
        distance = np.where(
            length > 0, np.abs(cross) / np.maximum(length, 1e-12), np.hypot(*offsets.T)
        )
        distance[keep] = 0
        worst = np.maximum.reduceat(distance, kept[:-1])  # per segment
        candidates = np.flatnonzero((distance == worst[segment]) & (distance > tolerance))
        if len(candidates) == 0:
            return closed[keep][:-1]
        _, first = np.unique(segment[candidates], return_index=True)
        keep[candidates[first]] = True


# ----------------------------------------------------------------------------- text


def noun(label: int, count: int = 1) -> str:
    """The shape class `label` named for `count` of them: 'circle', 'people'."""
    return _noun(CLASS_NAMES[label], count)


def _noun(name: str, count: int) -> str:
    """`name` for `count` objects; the first word takes the plural ('circles with fine checks')."""
    if count == 1:
        return name
    head, space, rest = name.partition(" ")
    return PLURALS.get(head, head + "s") + space + rest


def _amount(count: int, next_word: str) -> str:
    """'a' / 'an' for one, a number word otherwise."""
    if count == 1:
        return "an" if next_word[0] in "aeiou" else "a"
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def _described(name: str, colour: int, count: int) -> str:
    """'a red circle', 'three people in blue', 'a red circle with fine checks'."""
    if name == "person":
        return f"{_amount(count, name)} {_noun(name, count)} in {COLOUR_NAMES[colour]}"
    return f"{_amount(count, COLOUR_NAMES[colour])} {COLOUR_NAMES[colour]} {_noun(name, count)}"


def _counted(name: str, count: int) -> str:
    """'a circle', 'two crosses'."""
    return f"{_amount(count, name)} {_noun(name, count)}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _phrase(annotation: dict) -> str:
    """A noun phrase naming one object, e.g. 'the small red star', 'the person in blue',
    'the large red circle with fine checks'."""
    size = annotation["size"]
    size_word = "small " if size < 0.2 else "large " if size > 0.38 else ""
    name, colour = annotation["name"], COLOUR_NAMES[annotation["colour"]]
    if name == "person":
        return f"the {size_word}person in {colour}"
    return f"the {size_word}{colour} {name}"


_TEMPLATES = (
    "{coloured}.",
    "a picture of {plain} on a {background} background.",
    "there {verb} {count} {things}: {coloured}.",
    "{coloured} on a {background} background.",
    "an image showing {plain}.",
    "a {background} scene with {coloured}.",
    "{plain}.",
)


def _captions(rng: np.random.Generator, annotations: list[dict], background: str, count: int):
    """`count` captions, each naming every kind of object present, in varied wording."""
    by_colour: dict[tuple[str, int], int] = {}
    by_name: dict[str, int] = {}
    for a in annotations:
        by_colour[a["name"], a["colour"]] = by_colour.get((a["name"], a["colour"]), 0) + 1
        by_name[a["name"]] = by_name.get(a["name"], 0) + 1
    captions = []
    templates = rng.permutation(len(_TEMPLATES))[:count]
    for template in templates:
        coloured = [_described(name, c, n) for (name, c), n in by_colour.items()]
        plain = [_counted(name, n) for name, n in by_name.items()]
        coloured = [coloured[i] for i in rng.permutation(len(coloured))]
        plain = [plain[i] for i in rng.permutation(len(plain))]
        n = len(annotations)
        captions.append(
            _TEMPLATES[template].format(
                coloured=_join(coloured),
                plain=_join(plain),
                background=background,
                verb="is" if n == 1 else "are",
                count=NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n,
                things="object" if n == 1 else "objects",
            )
        )
    return captions


def _assemble(rng, spec: SceneSpec, annotations, image, background, image_id) -> dict[str, Any]:
    height, width = image.shape[:2]
    scale = np.array([height, width], np.float64)
    num = len(annotations)
    polygons = [p for a in annotations for p in a["polygons"]]
    keypoints = np.zeros((num, NUM_KEYPOINTS, 3), np.float32)
    for i, a in enumerate(annotations):
        keypoints[i, :, :2] = a["keypoints"][:, :2] / scale
        keypoints[i, :, 2] = a["keypoints"][:, 2]
    return {
        "image": image,
        "image_id": image_id,
        "objects": {
            "bbox": np.array(
                [a["box"] / np.tile(scale, 2) for a in annotations], np.float32
            ).reshape(num, 4),
            "label": np.array([a["label"] for a in annotations], np.int64),
            "category_id": np.array([a["label"] + 1 for a in annotations], np.int64),
            "id": np.arange(1, num + 1, dtype=np.int64) + image_id * 1000,
            "is_crowd": np.zeros(num, bool),
            "area": np.array([a["area"] for a in annotations], np.float32),
            "mask_rle": [a["rle"] for a in annotations],
            "num_polygons": np.array([len(a["polygons"]) for a in annotations], np.int32),
            "keypoints": keypoints,
            "num_keypoints": (keypoints[:, :, 2] > 0).sum(1).astype(np.int32),
            "phrase": [_phrase(a) for a in annotations],
        },
        "polygon_points": (
            np.concatenate(polygons) / scale if polygons else np.zeros((0, 2))
        ).astype(np.float32),
        "polygon_sizes": np.array([len(p) for p in polygons], np.int32),
        "captions": _captions(rng, annotations, background, spec.num_captions)
        if annotations
        else [f"an empty {background} background."] * spec.num_captions,
    }
